#!/usr/bin/env bash
# gpu_smoke.sh — the one command to run first on a machine with NVIDIA GPUs (nothing here has run on one).
#
#   bench/gpu_smoke.sh [--self-test] [BUILD_CUDA_DIR]   (default build-cuda; env GPUS: ranks to use,
#                                  default min(2, visible GPUs); STEPS: default 12)
#
# 1. build-cuda/gpu_check: every CUDA kernel against its CPU twin, then a training step's loss agreement,
#    tokens/s and MFU (docs/gpu.md).
# 2. The real trainer on the GPUs: a small Llama trained with `backend: cuda` on GPUS ranks (NCCL) for
#    ZeRO 0, 1, 2 in fp32 and bf16, each compared step by step with the same job on the CPU backend
#    (1 rank, same global batch): max relative loss difference within 1e-4 (fp32) / 5e-3 (bf16).
# 3. Resume on the GPUs: the bf16 ZeRO-2 job stopped at a checkpoint and resumed equals its uninterrupted
#    run bit for bit.
# Prints one line per check and a summary; exit 0 all passed, 1 a check failed, 2 no GPU (one line why).
# --self-test runs the same script without a GPU (CI: tests/integration/test_gpu_smoke_selftest.sh):
# `gpu_check --self-test`, the "GPU" runs on the CPU backend on 2 ranks, a tiny model and 6 steps.
set -uo pipefail
SELF_TEST=0
[ "${1:-}" = --self-test ] && { SELF_TEST=1; shift; }
BUILD=${1:-build-cuda}
ST=$BUILD/shardtune
PY=${ST_PYTHON:-/usr/bin/python3}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
[ -x "$ST" ] && [ -x "$BUILD/gpu_check" ] || { echo "gpu_smoke: build the CUDA backend first ($BUILD/shardtune, $BUILD/gpu_check)"; exit 2; }
if [ $SELF_TEST = 1 ]; then
  DEV=cpu GPUS=2 STEPS=6 LAYERS=2 DIM=64 FFN=172 SEQ=64 CHECK_ARGS=--self-test
else
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NGPU:-0}" -ge 1 ] || { echo "gpu_smoke: no GPU visible (nvidia-smi -L lists none): nothing checked"; exit 2; }
  DEV=cuda GPUS=${GPUS:-$(( NGPU < 2 ? NGPU : 2 ))} STEPS=${STEPS:-12} LAYERS=4 DIM=256 FFN=688 SEQ=256 CHECK_ARGS=
fi
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
failed=0
check() { # NAME STATUS DETAIL
  printf "%-44s %-4s %s\n" "$1" "$([ "$2" = 0 ] && echo ok || echo FAIL)" "$3"
  [ "$2" = 0 ] || failed=1
}

echo "== 1. gpu_check (kernels vs CPU twins, training step, tokens/s, MFU)"
"$BUILD/gpu_check" $CHECK_ARGS; check "gpu_check" $? "see the lines above"

echo "== 2. trainer on $GPUS $DEV rank(s) vs the CPU backend on 1 rank"
"$ST" init-model --family llama --layers $LAYERS --dim $DIM --heads 4 --kv-heads 2 --ffn $FFN --vocab 4096 \
  --max-seq $SEQ --seed 1 --out "$T/model" >/dev/null
"$PY" - "$T/data.jsonl" <<'EOF'
import json, random, sys
random.seed(0)
with open(sys.argv[1], "w") as f:
    for _ in range(2000):
        s = random.randrange(4096)
        f.write(json.dumps({"input_ids": [(s + 7 * i) % 4096 for i in range(random.randint(200, 600))]}) + "\n")
EOF
"$ST" data pack --jsonl "$T/data.jsonl" --out "$T/data.h5" --vocab 4096 >/dev/null
GB=$(( 4 * GPUS ))
job() { # NAME BACKEND PRECISION STAGE MICRO [extra yaml line]
  cat > "$T/$1.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/$1
seed: 3
backend: $2
precision: $3
train: { steps: $STEPS, micro_batch: $5, seq_len: $SEQ, lr: 1.0e-3, warmup_steps: 2, schedule: constant, log_every: 1000 }
sharding: { stage: $4 }
tasks: [ { name: a, path: $T/data.h5 } ]
eval: { every_steps: 0 }
checkpoint: { every_steps: $(( STEPS / 2 )), keep_last: 0 }
monitor: { publish: "", control: "" }
${6:-}
YAML
}
losses() { "$PY" -c "
import json, sys
last = {}
for line in open(sys.argv[1]):
    r = json.loads(line); last[r['step']] = r['loss']
print(' '.join(repr(last[s]) for s in sorted(last)))" "$T/$1/metrics.jsonl"; }
compare() { "$PY" -c "
import sys
a = [float(x) for x in sys.argv[1].split()]; b = [float(x) for x in sys.argv[2].split()]; tol = float(sys.argv[3])
assert len(a) == len(b) and a, f'{len(a)} vs {len(b)} steps'
d = max(abs(x - y) / abs(y) for x, y in zip(a, b))
print(f'max rel loss diff {d:.2e} (tol {tol:g}), final {a[-1]:.4f} vs {b[-1]:.4f}')
sys.exit(0 if d <= tol else 1)" "$1" "$2" "$3"; }
for prec in fp32 bf16; do
  job "cpu_$prec" cpu $prec 0 $GB
  "$ST" train "$T/cpu_$prec.yaml" > "$T/cpu_$prec.out" 2>&1; check "cpu reference $prec" $? "$(tail -1 "$T/cpu_$prec.out")"
  tol=$([ $prec = fp32 ] && echo 1e-4 || echo 5e-3)
  for stage in 0 1 2; do
    name="gpu_${prec}_z$stage"
    job "$name" $DEV $prec $stage 4
    mpirun --oversubscribe -np "$GPUS" "$ST" train "$T/$name.yaml" > "$T/$name.out" 2>&1
    rc=$?
    if [ $rc != 0 ]; then check "$GPUS $DEV rank(s) $prec ZeRO-$stage" 1 "train failed: $(grep -m1 -i error "$T/$name.out")"; continue; fi
    detail=$(compare "$(losses "$name")" "$(losses "cpu_$prec")" "$tol"); check "$GPUS $DEV rank(s) $prec ZeRO-$stage vs CPU" $? "$detail"
  done
done

echo "== 3. resume on $DEV (bf16, ZeRO-2): stop at step $(( STEPS / 2 )), resume, compare"
job part $DEV bf16 2 4
sed -i "s/steps: $STEPS,/steps: $(( STEPS / 2 )),/" "$T/part.yaml"
mpirun --oversubscribe -np "$GPUS" "$ST" train "$T/part.yaml" > "$T/part.out" 2>&1 &&
  mpirun --oversubscribe -np "$GPUS" "$ST" train "$T/part.yaml" train.steps=$STEPS >> "$T/part.out" 2>&1
rc=$?
if [ $rc = 0 ] && [ "$(losses part)" = "$(losses gpu_bf16_z2)" ]; then
  check "resume bf16 ZeRO-2 bit-identical" 0 "$(grep -m1 'resumed from' "$T/part.out")"
else
  check "resume bf16 ZeRO-2 bit-identical" 1 "rc $rc; losses $(losses part 2>/dev/null | cut -c1-80) vs $(losses gpu_bf16_z2 | cut -c1-80)"
fi

echo "== $([ $failed = 0 ] && echo 'all GPU checks passed' || echo 'some GPU checks FAILED')"
exit $failed
