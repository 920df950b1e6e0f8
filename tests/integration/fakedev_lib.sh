# fakedev_lib.sh — shared by the device-sharding tests (test_zero2_device.sh, test_zero3_device*.sh,
# test_distill_zero3_device.sh): the fakedev binary, `close` (losses of two runs agree within a relative tolerance),
# `dev` (a guarded fakedev run whose stream-order violations fail the test), `cmp_cpu` (a full or
# frozen mode's device stage 3 against the CPU ranks'), `cmp_cpu_adapter` (an adapter mode's
# device stage 3 against the CPU ranks') and `plan_true` (the device plan against the bytes held). Sourced after ckpt_lib.sh (fail, T); `common`: the overrides every run of these tests takes.
FAKE=${ST_BUILD_DIR:?}/fakedev
[ -x "$FAKE" ] || fail "no $FAKE (tests/tools/fakedev.c not built)"

# close A.jsonl B.jsonl TOL FIRST LAST: the losses of steps FIRST..LAST agree within TOL relative (0: equal)
close() {
  python3 - "$@" <<'PY'
import json, sys
def losses(p):
    return {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if '"loss"' in l and '"step"' in l}
a, b, tol, lo, hi = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
want = set(range(lo, hi + 1))
assert want <= set(a) and want <= set(b), (sorted(a), sorted(b))
worst = max(abs(a[s] - b[s]) / abs(b[s]) for s in want)
assert worst <= tol if tol else all(a[s] == b[s] for s in want), f"worst relative difference {worst:.3g} > {tol}"
print(f"{worst:.2g}")
PY
}
common=(checkpoint.every_steps=0 train.schedule=constant)

# dev NP NAME [overrides]: the guarded fakedev run of job NAME on NP ranks
dev() {
  local np=$1 name=$2; shift 2
  local args=(); mapfile -t args < <(grep . "$T/$name.args" || true)
  set +e
  mpirun --oversubscribe -np "$np" "$FAKE" --guard "$T/$name.yaml" "${args[@]}" "$@" >>"$T/$name.out" 2>>"$T/$name.err"
  local rc=$?
  set -e
  [ $rc = 0 ] || fail "$name on fakedev ($np ranks) exited $rc: $(tail -5 "$T/$name.err")"
  ! grep -q "fakedev (rank\|stream order violated" "$T/$name.err" || fail "$name: $(grep -m3 "fakedev (rank\|stream order" "$T/$name.err")"
}

# cmp_cpu_losses NP NAME TOL [overrides]: runs the device stage-3 job NAME and the CPU ranks' job cNAME (the same
# job) and prints their losses' largest difference; fails above TOL
cmp_cpu_losses() {
  local np=$1 name=$2 tol=$3; shift 3
  local micro=$((6 / np))
  job "$name" 6 "$micro" 2 sharding.stage=3 "${common[@]}" "$@"
  job "c$name" 6 "$micro" 2 sharding.stage=3 "${common[@]}" "$@"
  dev "$np" "$name"
  [ "$(train "$np" "c$name")" = 0 ] || fail "$name: cpu stage 3 on $np ranks: $(cat "$T/c$name.err")"
  close "$T/$name/metrics.jsonl" "$T/c$name/metrics.jsonl" "$tol" 1 6 || fail "$name ($np ranks): device vs cpu stage 3"
}

# cmp_cpu NP NAME TOL [overrides]: the device stage-3 run NAME vs the CPU ranks' run of the same job; at TOL 0
# also final/model.safetensors byte for byte
cmp_cpu() {
  local np=$1 name=$2 tol=$3 d
  d=$(cmp_cpu_losses "$@") || exit 1
  if [ "$tol" = 0 ]; then
    cmp -s "$T/$name/final/model.safetensors" "$T/c$name/final/model.safetensors" || fail "$name: final/ differs from cpu stage 3's"
  fi
  echo "$name on $np fake device ranks: losses vs cpu stage 3 $d (tolerance $tol)"
}

# cmp_cpu_adapter NP NAME TOL [overrides]: as cmp_cpu for an adapter mode: at TOL 0 final/ (a peft adapter
# directory) byte for byte
cmp_cpu_adapter() {
  local np=$1 name=$2 tol=$3 d
  d=$(cmp_cpu_losses "$@") || exit 1
  if [ "$tol" = 0 ]; then
    [ -f "$T/$name/final/adapter_model.safetensors" ] || fail "$name: no peft adapter in final/: $(ls "$T/$name/final")"
    diff -r "$T/$name/final" "$T/c$name/final" >/dev/null || fail "$name: final/ differs from cpu stage 3's"
  fi
  echo "$name on $np fake device ranks: losses vs cpu stage 3 $d (tolerance $tol)"
}

# plan_true NP NAME: the device stage-3 plan of run NAME against the fake device's bytes in $T/NAME.out
# (between steps within 1%; the peak beyond it only the MFU probe); prints the worst relative difference
plan_true() {
  local np=$1 name=$2
  local args=(); mapfile -t args < <(grep . "$T/$name.args" || true)
  "$BIN" plan "$T/$name.yaml" --ranks "$np" backend=cuda "${args[@]}" --json >"$T/$name.plan" || fail "plan of $name"
  python3 - "$T/$name.plan" "$T/$name.out" <<'PY'
import json, re, sys
plan = {r["rank"]: r["bytes"]["total"] for r in json.load(open(sys.argv[1]))["stages"][0]["ranks"]}
seen = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"fakedev device bytes: rank (\d+) peak \d+ between steps (\d+)", open(sys.argv[2]).read())}
assert set(seen) == set(plan), (seen, plan)
worst = max(abs(seen[r] - plan[r]) / plan[r] for r in plan)
assert worst <= 0.01, f"plan {plan} vs measured {seen}"
# the peak: loading included (no whole-model buffer), beyond the step total only the trainer's MFU probe,
# three 1024 x 1024 fp32 matrices (+ the bf16 GEMM scratch: at most another 8 MiB) that the plan leaves out
peak = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"fakedev device bytes: rank (\d+) peak (\d+)", open(sys.argv[2]).read())}
extra = max(peak[r] - seen[r] for r in peak)
assert 12 << 20 <= extra <= 20 << 20, f"device peak beyond the step total: {extra} bytes ({peak} vs {seen})"
print(f"{worst:.2g}")
PY
}
