#!/usr/bin/env bash
# test_distill_train.sh — `distill:` in train: the trainer runs the teacher and reports the combined loss.
# The loss formula and gradients are checked against torch in tests/reference/test_distill_torch.py; here:
#  * teacher = the student itself: step 1 has kd_loss ~ 0, ce_loss equal to a plain run's step-1 loss and
#    loss = (1 - alpha) * ce_loss;
#  * a GPT-2 teacher for a Llama student (another architecture and size), 1 and 2 ranks: every step
#    loss = alpha * kd_loss + (1 - alpha) * ce_loss, step 1's ce_loss equals the plain run's loss, teacher_ms
#    is reported; the loss falls;
#  * precision bf16 (a bf16 teacher: its bf16 weight copy): the self teacher gives kd_loss exactly 0 and the
#    plain bf16 run's loss as ce_loss (teacher and student compute the same bf16 forward); the GPT-2 teacher
#    keeps loss = alpha kd + (1 - alpha) ce and the loss falls;
#  * device-style memory (tests/tools/fakedev --guard: every copy checked for host/device mix-ups, as on
#    a GPU): the GPT-2-teacher run in fp32 and bf16 gives the cpu runs' losses exactly;
#  * errors: another vocabulary, temperature 0.
set -euo pipefail
BIN=${SHARDTUNE_BIN:?}
PY=${ST_PYTHON:-/usr/bin/python3}
SRC=${ST_SOURCE_DIR:?}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 \
  --out "$T/student" >/dev/null
"$BIN" init-model --family gpt2 --layers 3 --dim 96 --heads 4 --vocab 128 --max-seq 64 --seed 5 \
  --out "$T/teacher" >/dev/null
"$BIN" init-model --family gpt2 --layers 1 --dim 32 --heads 2 --vocab 100 --max-seq 64 --out "$T/other" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/train.jsonl" --docs 200 --vocab 128 >/dev/null
"$BIN" data pack --jsonl "$T/train.jsonl" --out "$T/train.h5" --vocab 128 >/dev/null

job() { # job NAME [distill yaml line]
  {
    echo "model: { path: $T/student }"
    echo "run_dir: $T/$1"
    echo "seed: 7"
    echo "train: { steps: 4, micro_batch: 4, grad_accum: 1, seq_len: 32, lr: 3.0e-3, warmup_steps: 0 }"
    echo "tasks: [ { name: count, path: $T/train.h5 } ]"
    echo "eval: { every_steps: 0 }"
    echo "checkpoint: { every_steps: 0 }"
    echo "monitor: { publish: \"\", control: \"\" }"
    if [ $# -gt 1 ]; then echo "$2"; fi
  } > "$T/$1.yaml"
}
job plain
job self "distill: { teacher: $T/student, temperature: 2.0, alpha: 0.5 }"
job gpt2 "distill: { teacher: $T/teacher, temperature: 2.0, alpha: 0.7 }"
"$BIN" train "$T/plain.yaml" >/dev/null 2>"$T/plain.err" || fail "plain run: $(cat "$T/plain.err")"
"$BIN" train "$T/self.yaml" >/dev/null 2>"$T/self.err" || fail "self-distill run: $(cat "$T/self.err")"
"$BIN" train "$T/gpt2.yaml" >/dev/null 2>"$T/gpt2.err" || fail "gpt2-teacher run: $(cat "$T/gpt2.err")"
mpirun --oversubscribe -np 2 "$BIN" train "$T/gpt2.yaml" run_dir="$T/gpt2_2r" train.micro_batch=2 >/dev/null \
  2>"$T/gpt2_2r.err" || fail "2-rank run: $(cat "$T/gpt2_2r.err")"
for j in plain self gpt2; do
  "$BIN" train "$T/$j.yaml" run_dir="$T/${j}_bf16" precision=bf16 >/dev/null 2>"$T/${j}_bf16.err" ||
    fail "bf16 $j run: $(cat "$T/${j}_bf16.err")"
done
FAKE=${ST_BUILD_DIR:?}/fakedev
[ -x "$FAKE" ] || fail "no $FAKE (tests/tools/fakedev.c not built)"
for p in fp32 bf16; do
  "$FAKE" --guard "$T/gpt2.yaml" run_dir="$T/gpt2_dev_$p" precision=$p >/dev/null 2>"$T/gpt2_dev_$p.err" ||
    fail "guarded $p run: $(cat "$T/gpt2_dev_$p.err")"
  ! grep -q "fakedev" "$T/gpt2_dev_$p.err" || fail "a host/device mix-up ($p): $(cat "$T/gpt2_dev_$p.err")"
done

"$PY" - "$T" <<'PYEOF' || fail "metrics check"
import json, sys
T = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{T}/{name}/metrics.jsonl")]
plain, me, g1, g2 = rows("plain"), rows("self"), rows("gpt2"), rows("gpt2_2r")
def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)
ok = True
def check(c, msg):
    global ok
    print(("ok   " if c else "FAIL ") + msg)
    ok &= bool(c)
check(abs(me[0]["kd_loss"]) < 1e-6, f"self teacher: step-1 kd_loss {me[0]['kd_loss']:.3g} ~ 0")
check(rel(me[0]["ce_loss"], plain[0]["loss"]) < 1e-6, f"self teacher: ce_loss {me[0]['ce_loss']} = plain {plain[0]['loss']}")
check(rel(me[0]["loss"], 0.5 * me[0]["ce_loss"]) < 1e-5, f"self teacher: loss {me[0]['loss']} = 0.5 ce")
check("ce_loss" not in plain[0] and "kd_loss" not in plain[0], "plain run has no KD fields")
for name, r in (("1 rank", g1), ("2 ranks", g2)):
    check(len(r) == 4, f"{name}: 4 steps")
    for x in r:
        want = 0.7 * x["kd_loss"] + 0.3 * x["ce_loss"]
        check(rel(x["loss"], want) < 1e-5, f"{name} step {x['step']}: loss {x['loss']:.6f} = 0.7 kd + 0.3 ce {want:.6f}")
        check(x["teacher_ms"] > 0, f"{name} step {x['step']}: teacher_ms {x['teacher_ms']}")
    check(rel(r[0]["ce_loss"], plain[0]["loss"]) < 1e-5, f"{name}: step-1 ce_loss = plain loss")
    check(r[-1]["loss"] < r[0]["loss"], f"{name}: loss falls {r[0]['loss']:.4f} -> {r[-1]['loss']:.4f}")
pb, sb, gb = rows("plain_bf16"), rows("self_bf16"), rows("gpt2_bf16")
check(sb[0]["kd_loss"] == 0.0, f"bf16 self teacher: step-1 kd_loss {sb[0]['kd_loss']!r} == 0")
check(rel(sb[0]["ce_loss"], pb[0]["loss"]) < 1e-6, f"bf16 self teacher: ce_loss {sb[0]['ce_loss']} = plain bf16 {pb[0]['loss']}")
check(rel(gb[0]["loss"], g1[0]["loss"]) > 1e-7, f"bf16 differs from fp32: {gb[0]['loss']} vs {g1[0]['loss']}")
for x in gb:
    want = 0.7 * x["kd_loss"] + 0.3 * x["ce_loss"]
    check(rel(x["loss"], want) < 1e-5, f"bf16 step {x['step']}: loss {x['loss']:.6f} = 0.7 kd + 0.3 ce {want:.6f}")
check(gb[-1]["loss"] < gb[0]["loss"], f"bf16: loss falls {gb[0]['loss']:.4f} -> {gb[-1]['loss']:.4f}")
for p, ref in (("fp32", g1), ("bf16", gb)):
    d = rows("gpt2_dev_" + p)
    same = [(a["loss"], a["kd_loss"], a["ce_loss"]) == (b["loss"], b["kd_loss"], b["ce_loss"]) for a, b in zip(d, ref)]
    check(len(d) == len(ref) and all(same), f"device-style memory ({p}): losses equal the cpu run's")
sys.exit(0 if ok else 1)
PYEOF

# user errors: one line naming the cause, non-zero exit
set +e
out=$("$BIN" train "$T/gpt2.yaml" run_dir="$T/e1" distill.teacher="$T/other" 2>&1); rc=$?
set -e
[ $rc -ne 0 ] && grep -q "vocabulary" <<<"$out" || fail "other vocabulary: rc $rc: $out"
set +e
out=$("$BIN" train "$T/gpt2.yaml" run_dir="$T/e2" distill.temperature=0 2>&1); rc=$?
set -e
[ $rc -ne 0 ] && grep -q "distill.temperature" <<<"$out" || fail "temperature 0: rc $rc: $out"
echo "ok"
