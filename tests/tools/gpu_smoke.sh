#!/usr/bin/env bash
# gpu_smoke.sh — the one prepared script for a machine with NVIDIA GPUs: about 10 minutes of device time.
#
#   tests/tools/gpu_smoke.sh [--self-test] [BUILD_CUDA_DIR]     (default build-cuda)
#   tests/tools/gpu_smoke.sh --bundle BUILD_CUDA_DIR            (on the build machine, before)
#
# env: OUT (results go to $OUT/gpu_smoke.txt, else ./gpu_smoke.txt), GPUS (ranks, default min(2, visible
# GPUs)), STEPS (trainer steps, default 12), PEAK_TFLOPS (MFU denominator; default from the GPU's name).
#
# 0. Environment: nvidia-smi, then `ldd` of every binary. A CUDA image may lack Debian's runtime libraries
#    (OpenBLAS, gfortran, Open MPI, HDF5, ZeroMQ): `--bundle` copies the ones the binaries need (all but the
#    CUDA libraries, which the image has, and glibc) into BUILD/bundle/lib, which this script then puts on
#    LD_LIBRARY_PATH. A binary that still misses a library is reported and its sections are skipped
#    (one line each); the trainer parts also need mpirun and python3: optional.
# 1. gpu_check: every kernel against its CPU twin at small and real-model shapes, a > 2^31-element tensor,
#    gradients and losses of Llama / q|k|v-bias / GPT-2 training steps, each check reading the backend's
#    status (tests/tools/gpu_check.c).
# 2. compute-sanitizer when present: memcheck on attention, cross-entropy and the bf16 GEMMs; racecheck
#    on attention (small shapes).
# 3. gpu_bench when built (bench/gpu_bench.c): 7B-class shapes, TFLOP/s and MFU against the bf16 peak.
# 4. The real trainer: a small Llama with `backend: cuda` on GPUS ranks (NCCL; one GPU: the one-rank NCCL
#    switch SHARDTUNE_NCCL_ONE_RANK=1) for ZeRO 0, 1, 2, 3 in fp32 and bf16, each against the same job on the
#    CPU backend (1 rank, same global batch); a progressive run (stage changes) against the CPU; a bf16
#    ZeRO-2 stop + resume bit-identical to its unbroken run; PEFT on the device (QLoRA fp32, QLoRA + DoRA
#    bf16, P-tuning's LSTM encoder) against the CPU backend.
# One line per check and a summary; exit 0 all passed, 1 a check failed, 2 no GPU (one line why).
# --self-test runs sections 0, 1 and 4 without a GPU (CI: tests/integration/test_gpu_smoke_selftest.sh):
# gpu_check --self-test, the "GPU" jobs on the CPU backend on 2 ranks, a tiny model and 6 steps.
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

if [ "${1:-}" = --bundle ]; then # copy the non-CUDA, non-glibc shared libraries the binaries need
  BUILD=${2:-build-cuda}
  mkdir -p "$BUILD/bundle/lib"
  for b in shardtune gpu_check gpu_bench; do
    [ -x "$BUILD/$b" ] || continue
    ldd "$BUILD/$b" | awk '$3 ~ /^\// {print $3}' | while read -r lib; do
      case $(basename "$lib") in
        libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*|ld-linux*|libresolv.so*) ;;  # glibc: the image's
        libcuda.so*|libnvidia*|libcudart*|libcublas*|libnccl*) ;;                           # driver / CUDA: the image's
        *) cp -Lu "$lib" "$BUILD/bundle/lib/" ;;
      esac
    done
  done
  echo "gpu_smoke: $(ls "$BUILD/bundle/lib" | wc -l) libraries, $(du -sh "$BUILD/bundle/lib" | cut -f1) in $BUILD/bundle/lib"
  exit 0
fi

SELF_TEST=0
[ "${1:-}" = --self-test ] && { SELF_TEST=1; shift; }
BUILD=${1:-build-cuda}
ST=$BUILD/shardtune
PY=${ST_PYTHON:-python3}
RES=${OUT:-.}/gpu_smoke.txt
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
[ -x "$BUILD/gpu_check" ] || { echo "gpu_smoke: build the CUDA backend first ($BUILD/gpu_check)"; exit 2; }
if [ $SELF_TEST = 1 ]; then
  DEV=cpu GPUS=2 STEPS=6 LAYERS=2 DIM=64 FFN=172 SEQ=64 CHECK_ARGS="--self-test" NGPU=0
else
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NGPU:-0}" -ge 1 ] || { echo "gpu_smoke: no GPU visible (nvidia-smi -L lists none): nothing checked"; exit 2; }
  DEV=cuda GPUS=${GPUS:-$(( NGPU < 2 ? NGPU : 2 ))} STEPS=${STEPS:-12} LAYERS=4 DIM=256 FFN=688 SEQ=256 CHECK_ARGS=
fi
mkdir -p "$(dirname "$RES")" && : > "$RES" || RES=/dev/null
exec > >(tee -a "$RES") 2>&1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
failed=0
check() { # NAME STATUS DETAIL
  printf "%-44s %-4s %s\n" "$1" "$([ "$2" = 0 ] && echo ok || echo FAIL)" "$3"
  [ "$2" = 0 ] || failed=1
}
skip() { printf "%-44s %-4s %s\n" "$1" skip "$2"; }

echo "== 0. environment ($(date -u +%FT%TZ), results in $RES)"
[ $SELF_TEST = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version,compute_cap --format=csv,noheader
missing() { ldd "$1" 2>&1 | awk '/not found/ {print $1}' | tr '\n' ' '; }
[ -d "$BUILD/bundle/lib" ] && export LD_LIBRARY_PATH="$BUILD/bundle/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
declare -A RUNS
for b in gpu_check shardtune gpu_bench; do
  if [ ! -x "$BUILD/$b" ]; then RUNS[$b]=0; skip "ldd $b" "not built"; continue; fi
  m=$(missing "$BUILD/$b")
  if [ -z "$m" ]; then RUNS[$b]=1; check "ldd $b" 0 "all libraries found"
  else RUNS[$b]=0; check "ldd $b" 1 "missing: $m(run --bundle on the build machine and carry $BUILD/bundle)"; fi
done
HAVE_MPI=0; command -v mpirun >/dev/null && HAVE_MPI=1
HAVE_PY=0; command -v "$PY" >/dev/null && HAVE_PY=1 # the trainer section makes its data and compares with it

echo "== 1. gpu_check (kernels vs CPU twins at small and real shapes, gradients, training steps)"
if [ "${RUNS[gpu_check]}" = 1 ]; then
  timeout 420 "$BUILD/gpu_check" $CHECK_ARGS; check "gpu_check" $? "see the lines above"
fi

echo "== 2. compute-sanitizer"
SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
if [ $SELF_TEST = 1 ] || [ -z "$SAN" ] || [ "${RUNS[gpu_check]}" != 1 ]; then
  skip "compute-sanitizer" "$([ $SELF_TEST = 1 ] && echo 'self-test: no GPU' || echo 'not available')"
else
  for g in attention xent bf16; do
    timeout 150 "$SAN" --tool memcheck --error-exitcode 9 "$BUILD/gpu_check" --no-train --no-big --only $g >"$T/san_$g" 2>&1
    rc=$?; check "memcheck gpu_check --only $g" $rc "$(grep -m1 -E 'ERROR SUMMARY|FAIL' "$T/san_$g")"
  done
  timeout 200 "$SAN" --tool racecheck --error-exitcode 9 "$BUILD/gpu_check" --no-train --no-big --only attention >"$T/race" 2>&1
  rc=$?; check "racecheck gpu_check --only attention" $rc "$(grep -m1 -E 'RACECHECK SUMMARY|ERROR SUMMARY' "$T/race")"
fi

echo "== 3. gpu_bench (7B-class shapes: TFLOP/s, MFU)"
if [ $SELF_TEST = 1 ] || [ "${RUNS[gpu_bench]}" != 1 ]; then
  skip "gpu_bench" "$([ $SELF_TEST = 1 ] && echo 'self-test: no GPU' || echo 'not built or not runnable')"
else
  name=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
  case "$name" in *H100*|*H200*|*H800*) peak=989 ;; *A100*|*A800*) peak=312 ;; *L40S*) peak=362 ;; *) peak=0 ;; esac
  timeout 240 "$BUILD/gpu_bench" --peak-tflops "${PEAK_TFLOPS:-$peak}"; check "gpu_bench" $? "peak ${PEAK_TFLOPS:-$peak} TFLOP/s ($name)"
fi

echo "== 4. trainer on $GPUS $DEV rank(s) vs the CPU backend on 1 rank"
if [ "${RUNS[shardtune]}" != 1 ] || [ $HAVE_MPI = 0 ] || [ $HAVE_PY = 0 ]; then
  skip "trainer" "needs a runnable $ST, mpirun and $PY"
  echo "== $([ $failed = 0 ] && echo 'all GPU checks passed (trainer skipped)' || echo 'some GPU checks FAILED')"
  exit $failed
fi
ONE=
[ "$DEV" = cuda ] && [ "$GPUS" = 1 ] && ONE="-x SHARDTUNE_NCCL_ONE_RANK=1" # one GPU: NCCL on one rank
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
gpu_train() { # NAME [overrides]: the job on GPUS ranks of DEV
  local name=$1; shift
  mpirun --oversubscribe $ONE -np "$GPUS" "$ST" train "$T/$name.yaml" "$@" >> "$T/$name.out" 2>&1
}
for prec in fp32 bf16; do
  job "cpu_$prec" cpu $prec 0 $GB
  "$ST" train "$T/cpu_$prec.yaml" > "$T/cpu_$prec.out" 2>&1; check "cpu reference $prec" $? "$(tail -1 "$T/cpu_$prec.out")"
  tol=$([ $prec = fp32 ] && echo 1e-4 || echo 5e-3)
  for stage in 0 1 2 3; do # 3: worker/comm_zero3_dev.c (gather buffers, per-group reduce-scatter) on the device
    name="gpu_${prec}_z$stage"
    job "$name" $DEV $prec $stage 4
    if ! gpu_train "$name"; then check "$GPUS $DEV rank(s) $prec ZeRO-$stage" 1 "train failed: $(grep -m1 -i error "$T/$name.out")"; continue; fi
    detail=$(compare "$(losses "$name")" "$(losses "cpu_$prec")" "$tol"); check "$GPUS $DEV rank(s) $prec ZeRO-$stage vs CPU" $? "$detail"
  done
done

echo "== 4b. progressive stage changes on $DEV (ZeRO-1, bf16): the re-sharded AdamW moments live in device memory"
prog="finetune: { mode: progressive, unfreeze_every: $(( STEPS / 3 )) }"
job prog_cpu cpu bf16 0 $GB "$prog"
job prog_gpu $DEV bf16 1 4 "$prog"
if "$ST" train "$T/prog_cpu.yaml" > "$T/prog_cpu.out" 2>&1 && gpu_train prog_gpu; then
  detail=$(compare "$(losses prog_gpu)" "$(losses prog_cpu)" 5e-3); check "progressive bf16 ZeRO-1 vs CPU" $? "$detail"
else
  check "progressive bf16 ZeRO-1 vs CPU" 1 "train failed: $(grep -h -m1 -i error "$T/prog_cpu.out" "$T/prog_gpu.out")"
fi

echo "== 4c. resume on $DEV (bf16, ZeRO-2): stop at step $(( STEPS / 2 )), resume, compare"
job part $DEV bf16 2 4
sed -i "s/steps: $STEPS,/steps: $(( STEPS / 2 )),/" "$T/part.yaml"
gpu_train part && gpu_train part train.steps=$STEPS
rc=$?
if [ $rc = 0 ] && [ "$(losses part)" = "$(losses gpu_bf16_z2)" ]; then
  check "resume bf16 ZeRO-2 bit-identical" 0 "$(grep -m1 'resumed from' "$T/part.out")"
else
  check "resume bf16 ZeRO-2 bit-identical" 1 "rc $rc; losses $(losses part 2>/dev/null | cut -c1-80) vs $(losses gpu_bf16_z2 | cut -c1-80)"
fi

echo "== 4d. PEFT on $DEV (ZeRO-1) against the CPU backend: QLoRA nf4 + dq (fp32), QLoRA + DoRA (bf16), P-tuning LSTM (fp32)"
ALLP="[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
peft_case() { # NAME PRECISION TOL FINETUNE-YAML [overrides]: CPU 1 rank vs DEV on GPUS ranks
  local name=$1 prec=$2 tol=$3 ft=$4; shift 4
  job "${name}_cpu" cpu "$prec" 0 $GB "$ft"
  job "${name}_gpu" $DEV "$prec" 1 4 "$ft"
  if "$ST" train "$T/${name}_cpu.yaml" "$@" > "$T/${name}_cpu.out" 2>&1 && gpu_train "${name}_gpu" "$@"; then
    detail=$(compare "$(losses "${name}_gpu")" "$(losses "${name}_cpu")" "$tol"); check "$name $prec ZeRO-1 vs CPU" $? "$detail"
  else
    check "$name $prec ZeRO-1 vs CPU" 1 "train failed: $(grep -h -m1 -i error "$T/${name}_cpu.out" "$T/${name}_gpu.out")"
  fi
}
peft_case qlora fp32 1e-4 "finetune: { mode: qlora, lora: { r: 8, alpha: 16, targets: $ALLP } }"
peft_case qlora_dora bf16 5e-3 "finetune: { mode: qlora, lora: { r: 8, alpha: 16, dora: true, targets: $ALLP } }"
# the virtual tokens lead every sequence: V + seq_len within the model's positions
peft_case ptuning_lstm fp32 1e-4 "finetune: { mode: p_tuning, prompt: { virtual_tokens: 8, encoder: lstm } }" \
  train.seq_len=$(( SEQ - 8 ))

echo "== $([ $failed = 0 ] && echo 'all GPU checks passed' || echo 'some GPU checks FAILED')"
exit $failed
