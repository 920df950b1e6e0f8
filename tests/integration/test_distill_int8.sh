#!/usr/bin/env bash
# test_distill_int8.sh — `distill.teacher_dtype: int8` in train (the teacher's linear layers and head in int8,
# worker/model.h st_model_set_int8). The teacher's numerics are checked in tests/reference/test_distill_int8.py
# and tests/unit/test_int8.c; here, the trainer:
#  * a Llama teacher 2x the student and a GPT-2 teacher (biases, Conv1D weights), 1 rank: every step
#    loss = alpha kd + (1 - alpha) ce, step 1's ce_loss = the plain run's loss (the student is untouched), the
#    int8 teacher's kd_loss differs from the fp32 teacher's but by little (|kd8 - kd32| <= 5% of kd32 at step 1:
#    these teachers are smooth), the loss falls;
#  * 2 ranks, GPT-2 teacher: 6 steps straight, and 3 steps + checkpoint + resume to 6: every step's loss,
#    kd_loss and ce_loss bit-identical (the int8 teacher is stateless and deterministic), same final weights;
#    the 2-rank run's step losses equal the 1-rank run's within 1e-5 relative (same global batch);
#  * sharding.stage 3 (the teacher sharded like the student, each rank keeping its share of the int8 packs and
#    gathering a layer's packs, worker/comm.h st_frozen_shard) on 1, 2 and 3 ranks, GPT-2 (tied head) and Llama
#    (untied) teachers: every step's loss, kd_loss and ce_loss equal the stage-0 run's on as many ranks bit for
#    bit (the packs are made per row from the same fp32 rows whatever the sharding);
#  * a device backend (tests/tools/fakedev --guard: device memory, the CPU kernels, which compute the CUDA
#    backend's int8 function bit for bit, kernels/cuda/int8.cu, checked by gpu_check): every step's losses
#    equal the cpu backend's run bit for bit;
#  * the planner counts the int8 teacher: its packs in, the quantized weights' fp32 pages out (fewer bytes than
#    the fp32 teacher's, at stage 0 and at stage 3 on 2 ranks; the RSS is measured in bench/distill_bench.sh's
#    numbers, docs/compress.md);
#  * errors: distill.teacher_dtype without distill.teacher; an unknown dtype.
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
"$BIN" init-model --family llama --layers 3 --dim 96 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 4 \
  --out "$T/llama_t" >/dev/null
"$BIN" init-model --family gpt2 --layers 3 --dim 96 --heads 4 --vocab 128 --max-seq 64 --seed 5 \
  --out "$T/gpt2_t" >/dev/null
"$PY" "$SRC/scripts/make_demo_data.py" --out "$T/train.jsonl" --docs 200 --vocab 128 >/dev/null
"$BIN" data pack --jsonl "$T/train.jsonl" --out "$T/train.h5" --vocab 128 >/dev/null

job() { # job NAME STEPS [distill yaml line]
  {
    echo "model: { path: $T/student }"
    echo "run_dir: $T/$1"
    echo "seed: 7"
    echo "train: { steps: $2, micro_batch: 4, grad_accum: 1, seq_len: 32, lr: 3.0e-3, warmup_steps: 0, schedule: constant }"
    echo "tasks: [ { name: count, path: $T/train.h5 } ]"
    echo "eval: { every_steps: 0 }"
    echo "checkpoint: { every_steps: 3, async: false }"
    echo "monitor: { publish: \"\", control: \"\" }"
    if [ $# -gt 2 ]; then echo "$3"; fi
  } > "$T/$1.yaml"
}
run() { # run NAME [args...]: 1 rank
  local n=$1; shift
  "$BIN" train "$T/$n.yaml" "$@" >"$T/$n.out" 2>"$T/$n.err" || fail "$n: $(cat "$T/$n.err")"
}
job plain 4
for t in llama gpt2; do
  job "${t}32" 4 "distill: { teacher: $T/${t}_t, temperature: 2.0, alpha: 0.7 }"
  job "${t}8" 4 "distill: { teacher: $T/${t}_t, temperature: 2.0, alpha: 0.7, teacher_dtype: int8 }"
done
for n in plain llama32 llama8 gpt232 gpt28; do run $n; done
job straight 6 "distill: { teacher: $T/gpt2_t, temperature: 2.0, alpha: 0.7, teacher_dtype: int8 }"
job resumed 3 "distill: { teacher: $T/gpt2_t, temperature: 2.0, alpha: 0.7, teacher_dtype: int8 }"
mp() { # mp NAME [args...]: 2 ranks
  local n=$1; shift
  mpirun --oversubscribe -np 2 "$BIN" train "$T/$n.yaml" train.micro_batch=2 "$@" >"$T/$n.out" 2>"$T/$n.err" ||
    fail "$n (2 ranks): $(cat "$T/$n.err")"
}
mp straight
mp resumed
mp resumed train.steps=6
# stage 3 against stage 0 on 1 (gpt28), 2 (straight), 3 ranks (checkpoints off: only the losses are compared)
z3() { # z3 NAME NP TEACHER STAGE MICRO_BATCH
  job "$1" 4 "distill: { teacher: $T/$3_t, temperature: 2.0, alpha: 0.7, teacher_dtype: int8 }"
  mpirun --oversubscribe -np "$2" "$BIN" train "$T/$1.yaml" train.micro_batch="$5" sharding.stage="$4" \
    checkpoint.every_steps=0 >"$T/$1.out" 2>"$T/$1.err" || fail "$1 ($2 ranks, stage $4): $(cat "$T/$1.err")"
}
z3 z3_1 1 gpt2 3 4
z3 z3_2 2 gpt2 3 2
z3 z0_3 3 gpt2 0 2
z3 z3_3 3 gpt2 3 2
z3 z0_llama 2 llama 0 2
z3 z3_llama 2 llama 3 2
# a device backend: fakedev --guard (device memory; its int8 kernels are the CPU's, the CUDA function's twin)
"${ST_BUILD_DIR:?}/fakedev" --guard "$T/gpt28.yaml" run_dir="$T/dev8" >"$T/dev8.out" 2>"$T/dev8.err" ||
  fail "fakedev int8 teacher: $(tail -5 "$T/dev8.err")"
! grep -q "fakedev (rank" "$T/dev8.err" || fail "fakedev: $(grep -m3 "fakedev (rank" "$T/dev8.err")"
grep -q "resumed from step-00000003.h5 at step 3" "$T/resumed.out" || fail "no resume line: $(cat "$T/resumed.out")"
cmp -s "$T/straight/final/model.safetensors" "$T/resumed/final/model.safetensors" || fail "resume: final weights differ"

"$PY" - "$T" <<'PYEOF' || fail "metrics check"
import json, sys
T = sys.argv[1]
def rows(name):
    return [json.loads(l) for l in open(f"{T}/{name}/metrics.jsonl")]
def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)
ok = True
def check(c, msg):
    global ok
    print(("ok   " if c else "FAIL ") + msg)
    ok &= bool(c)
plain = rows("plain")
for t in ("llama", "gpt2"):
    r8, r32 = rows(t + "8"), rows(t + "32")
    check(len(r8) == 4, f"{t}: 4 steps")
    for x in r8:
        want = 0.7 * x["kd_loss"] + 0.3 * x["ce_loss"]
        check(rel(x["loss"], want) < 1e-5, f"{t} int8 step {x['step']}: loss {x['loss']:.6f} = 0.7 kd + 0.3 ce")
    check(rel(r8[0]["ce_loss"], plain[0]["loss"]) < 1e-5, f"{t} int8: step-1 ce_loss = plain loss {plain[0]['loss']:.6f}")
    d = abs(r8[0]["kd_loss"] - r32[0]["kd_loss"])
    check(0 < d <= 0.05 * r32[0]["kd_loss"],
          f"{t}: step-1 kd_loss int8 {r8[0]['kd_loss']:.6f} vs fp32 teacher {r32[0]['kd_loss']:.6f} (differs, by <= 5%)")
    check(r8[-1]["loss"] < r8[0]["loss"], f"{t} int8: loss falls {r8[0]['loss']:.4f} -> {r8[-1]['loss']:.4f}")
s, r, one = rows("straight"), rows("resumed"), rows("gpt28")
check(len(s) == 6 and len(r) == 6, f"6 steps each ({len(s)}, {len(r)})")
key = lambda x: (x["step"], x["loss"], x["kd_loss"], x["ce_loss"])
check([key(x) for x in s] == [key(x) for x in r], "2 ranks: 3 steps + resume = 6 straight steps, bit for bit")
check(all(rel(a["loss"], b["loss"]) < 1e-5 for a, b in zip(s, one)), "2 ranks = 1 rank (steps 1-4) within 1e-5")
trip = lambda x: (x["loss"], x["kd_loss"], x["ce_loss"])
for name, zero in (("1", "gpt28"), ("2", "straight"), ("3", "z0_3"), ("llama", "z0_llama")):
    a, b = rows(zero)[:4], rows("z3_" + name)
    check(len(a) == 4 and len(b) == 4, f"stage 3 / stage 0 ({name}): 4 steps each")
    check([trip(x) for x in a] == [trip(y) for y in b],
          f"stage 3 = stage 0 ({name}), steps 1-4 bit for bit (step 1: {trip(b[0])})")
    check(all(x["kd_loss"] > 0 for x in b), f"stage 3 ({name}): the teacher is used (kd_loss > 0)")
d, c8 = rows("dev8"), rows("gpt28")
check(len(d) == 4 and [trip(x) for x in d] == [trip(x) for x in c8],
      "fakedev (device memory, the CUDA function's twin kernels) = cpu backend, 4 steps bit for bit")
sys.exit(0 if ok else 1)
PYEOF

# the planner counts the int8 packs on top of the fp32 teacher
p32=$("$BIN" plan "$T/gpt232.yaml" --ranks 1 --json 2>/dev/null | "$PY" -c "import json,sys; print(json.load(sys.stdin)['stages'][0]['ranks'][0]['bytes']['teacher'])") ||
  fail "plan --json (fp32 teacher)"
p8=$("$BIN" plan "$T/gpt28.yaml" --ranks 1 --json 2>/dev/null | "$PY" -c "import json,sys; print(json.load(sys.stdin)['stages'][0]['ranks'][0]['bytes']['teacher'])") ||
  fail "plan --json (int8 teacher)"
[ "$p8" -lt "$p32" ] || fail "plan: int8 teacher $p8 bytes, fp32 $p32"
echo "ok: plan counts the int8 teacher: $p8 bytes (fp32 teacher $p32)"
tb() { "$BIN" plan "$1" --ranks 2 --json sharding.stage=3 "${@:2}" 2>/dev/null |
  "$PY" -c "import json,sys; print(max(r['bytes']['teacher'] for s in json.load(sys.stdin)['stages']
                                         for r in s['ranks']))"; }
q32=$(tb "$T/gpt232.yaml") || fail "plan --json stage 3 (fp32 teacher)"
q8=$(tb "$T/gpt28.yaml") || fail "plan --json stage 3 (int8 teacher)"
[ "$q8" -lt "$q32" ] || fail "plan stage 3 on 2 ranks: int8 teacher $q8 bytes, fp32 $q32"
echo "ok: plan counts the sharded int8 teacher: $q8 bytes per rank on 2 ranks (fp32 teacher $q32)"

# user errors: one line naming the cause, non-zero exit
expect_err() { # expect_err PATTERN args...
  local pat=$1; shift
  set +e
  out=$("$BIN" train "$@" 2>&1); rc=$?
  set -e
  [ $rc -ne 0 ] && grep -q -- "$pat" <<<"$out" || fail "expected an error naming '$pat': rc $rc: $out"
  echo "ok: refused: $(grep -m1 -- "$pat" <<<"$out")"
}
expect_err "distill.teacher_dtype" "$T/plain.yaml" run_dir="$T/e1" distill.teacher_dtype=int8
expect_err "teacher_dtype" "$T/gpt28.yaml" run_dir="$T/e3" distill.teacher_dtype=int4
echo "ok"
