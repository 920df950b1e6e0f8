#!/usr/bin/env bash
# dp_bench.sh — data-parallel step time: 1 rank x 2 threads vs 2 ranks x 1 thread, same model and global
# batch, under ZeRO 0/1/2, and how much of the gradient reduction the bucketed overlap hides behind
# backward (ZeRO 0/1/2 with sharding.overlap true vs false; stage 2 reduce-scatters each bucket into its
# owners' shards). Reads step_ms and comm_ms (the time a step waited on collectives) from RUN_DIR/metrics.jsonl, skipping the first steps (warm-up), and prints a
# table of medians. Prints numbers only; asserts nothing.
#
#   bench/dp_bench.sh [BUILD_DIR]     env: STEPS (default 12), SKIP (3), LAYERS (4), DIM (256),
#                                         VOCAB (32000), MICRO (global batch, default 8), SEQ (128)
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/shardtune
PY=${ST_PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-12} SKIP=${SKIP:-3} LAYERS=${LAYERS:-4} DIM=${DIM:-256} VOCAB=${VOCAB:-32000}
GB=${MICRO:-8} SEQ=${SEQ:-128}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

"$BIN" init-model --family llama --layers "$LAYERS" --dim "$DIM" --heads 4 --kv-heads 2 --vocab "$VOCAB" \
  --max-seq "$SEQ" --seed 1 --out "$T/model" >/dev/null
"$PY" - "$T/data.jsonl" "$VOCAB" <<'EOF'
import json, random, sys
random.seed(0)
V = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for _ in range(400):
        s = random.randrange(V)
        f.write(json.dumps({"input_ids": [(s + i) % V for i in range(random.randint(100, 400))]}) + "\n")
EOF
"$BIN" data pack --jsonl "$T/data.jsonl" --out "$T/data.h5" --vocab "$VOCAB" >/dev/null
cat > "$T/job.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/run
seed: 1
train: { steps: $STEPS, micro_batch: $GB, seq_len: $SEQ, lr: 1.0e-4, warmup_steps: 0, log_every: 1000 }
tasks:
  - { name: a, path: $T/data.h5 }
eval: { every_steps: 0 }
monitor: { publish: "", control: "" }
YAML

summary() { # RUN_DIR -> "step_ms comm_ms tok/s" (medians over steps after SKIP)
  "$PY" - "$1/metrics.jsonl" "$SKIP" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
med = lambda k: statistics.median(r[k] for r in rows)
print(f"{med('step_ms'):.1f} {med('comm_ms'):.1f} {med('tokens_per_s'):.0f}")
EOF
}

echo "model: llama ${LAYERS} layers, dim ${DIM}, vocab ${VOCAB}; global batch ${GB} x ${SEQ} tokens;" \
     "median of steps $((SKIP + 1))..${STEPS}"
printf "%-22s %6s %10s %10s %8s %10s\n" layout zero step_ms comm_ms comm% tok/s
for zero in 0 1 2; do
  OMP_NUM_THREADS=2 "$BIN" train "$T/job.yaml" run_dir="$T/a$zero" sharding.stage=$zero >/dev/null
  read -r s c tps < <(summary "$T/a$zero")
  printf "%-22s %6s %10s %10s %7.1f%% %10s\n" "1 rank x 2 threads" "$zero" "$s" "$c" \
    "$("$PY" -c "print(100*$c/$s)")" "$tps"
  OMP_NUM_THREADS=1 mpirun --oversubscribe -np 2 --bind-to core "$BIN" train "$T/job.yaml" run_dir="$T/b$zero" \
    sharding.stage=$zero train.micro_batch=$((GB / 2)) >/dev/null
  read -r s c tps < <(summary "$T/b$zero")
  printf "%-22s %6s %10s %10s %7.1f%% %10s\n" "2 ranks x 1 thread" "$zero" "$s" "$c" \
    "$("$PY" -c "print(100*$c/$s)")" "$tps"
done

echo
echo "overlap of the gradient reduction with backward (2 ranks x 1 thread; ZeRO-2: bucketed reduce-scatter):"
printf "%-8s %12s %12s %12s %10s\n" zero exposed_ms blocking_ms hidden step_ms_gain
for zero in 0 1 2; do
  OMP_NUM_THREADS=1 mpirun --oversubscribe -np 2 --bind-to core "$BIN" train "$T/job.yaml" run_dir="$T/n$zero" \
    sharding.stage=$zero train.micro_batch=$((GB / 2)) sharding.overlap=false >/dev/null
  read -r s_off c_off _ < <(summary "$T/n$zero")
  read -r s_on c_on _ < <(summary "$T/b$zero")
  printf "%-8s %12s %12s %11.0f%% %9.1f ms\n" "$zero" "$c_on" "$c_off" \
    "$("$PY" -c "print(max(0.0, 100*(1-$c_on/$c_off)) if $c_off > 0 else 0)")" "$("$PY" -c "print($s_off-$s_on)")"
done
