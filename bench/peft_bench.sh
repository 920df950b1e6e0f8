#!/usr/bin/env bash
# peft_bench.sh — what LoRA and QLoRA cost against full fine-tuning on 2 CPU ranks x 1 thread (issue #18):
# each rank's peak RSS (GNU time, max resident set) and the step time (median of metrics.jsonl's step_ms
# over the steps after SKIP), for full fine-tuning, LoRA and QLoRA (nf4 + double quantization, block 64),
# r 16 on all 7 projections, Llama 8 layers x 512, vocab 32000, global batch 4 x 64, ZeRO-1. The modes run
# interleaved, ROUNDS times; the table keeps each mode's best (lowest) step time and peak RSS and prints
# the ratios to full fine-tuning, with the load average before and after: the machine may be shared, so
# compare rows of one run only. Prints numbers only; asserts nothing.
#
#   bench/peft_bench.sh [BUILD_DIR]     env: STEPS (default 8), SKIP (2), LAYERS (8), DIM (512),
#                                         VOCAB (32000), GB (global batch, 4), SEQ (64), ROUNDS (2),
#                                         PRECISION (fp32 or bf16), BASE_BUILD (another build dir: adds the
#                                         mode qlora@base, QLoRA with that build's binary, interleaved too),
#                                         MODES (default "full lora qlora"; qlora@unfused: QLoRA with
#                                         SHARDTUNE_QLORA_FUSED=0, whole units dequantized before each matmul)
set -euo pipefail
BUILD=${1:-build}
BIN=$BUILD/shardtune
PY=${ST_PYTHON:-/usr/bin/python3}
STEPS=${STEPS:-8} SKIP=${SKIP:-2} LAYERS=${LAYERS:-8} DIM=${DIM:-512} VOCAB=${VOCAB:-32000}
GB=${GB:-4} SEQ=${SEQ:-64} ROUNDS=${ROUNDS:-2} PRECISION=${PRECISION:-fp32}
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT

"$BIN" init-model --family llama --layers "$LAYERS" --dim "$DIM" --heads 8 --kv-heads 4 --vocab "$VOCAB" \
  --max-seq "$SEQ" --seed 1 --out "$T/model" >/dev/null
"$PY" - "$T/data.jsonl" "$VOCAB" <<'EOF'
import json, random, sys
random.seed(0)
V = int(sys.argv[2])
with open(sys.argv[1], "w") as f:
    for _ in range(200):
        s = random.randrange(V)
        f.write(json.dumps({"input_ids": [(s + i) % V for i in range(random.randint(70, 200))]}) + "\n")
EOF
"$BIN" data pack --jsonl "$T/data.jsonl" --out "$T/data.h5" --vocab "$VOCAB" >/dev/null
cat > "$T/job.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/run
seed: 1
train: { steps: $STEPS, micro_batch: $((GB / 2)), seq_len: $SEQ, lr: 1.0e-4, warmup_steps: 0, log_every: 1000 }
tasks:
  - { name: a, path: $T/data.h5 }
eval: { every_steps: 0 }
checkpoint: { every_steps: 0 }
monitor: { publish: "", control: "" }
finetune:
  lora: { r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
  qlora: { quant: nf4, double_quant: true, block: 64 }
YAML

step_ms() { # RUN_DIR -> median step_ms over the steps after SKIP
  "$PY" - "$1/metrics.jsonl" "$SKIP" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])][int(sys.argv[2]):]
print(f"{statistics.median(r['step_ms'] for r in rows):.1f}")
EOF
}

echo "model: llama ${LAYERS} layers x ${DIM}, vocab ${VOCAB}, ${PRECISION}; 2 ranks x 1 thread, ZeRO-1, global batch" \
     "${GB} x ${SEQ}; r 16 on all 7 projections; median step of steps $((SKIP + 1))..${STEPS}; ${ROUNDS} rounds, interleaved"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg) ($(nproc) cores)"
declare -A best_ms best_kb
printf "%-6s %-10s %10s %14s\n" round mode step_ms "peak_RSS_MiB"
MODES=${MODES:-"full lora qlora"}
[ -n "${BASE_BUILD:-}" ] && MODES="$MODES qlora@base"
for round in $(seq "$ROUNDS"); do
  for mode in $MODES; do
    rd="$T/r$round-$mode"
    mkdir -p "$rd"
    bin=$BIN
    [ "$mode" = qlora@base ] && bin=$BASE_BUILD/shardtune
    fused=1
    [ "$mode" = qlora@unfused ] && fused=0
    SHARDTUNE_QLORA_FUSED=$fused mpirun --oversubscribe -x SHARDTUNE_QLORA_FUSED -np 2 sh -c '/usr/bin/time -o "$0/rss.${OMPI_COMM_WORLD_RANK:-0}" -f "%M" "$@"' "$rd" \
      "$bin" train "$T/job.yaml" run_dir="$rd" sharding.stage=1 precision="$PRECISION" finetune.mode="${mode%@*}" >/dev/null
    kb=$(cat "$rd"/rss.* | sort -n | tail -1)
    ms=$(step_ms "$rd")
    printf "%-6s %-10s %10s %14.1f\n" "$round" "$mode" "$ms" "$(echo "$kb / 1024" | bc -l)"
    if [ -z "${best_ms[$mode]:-}" ] || [ "$(echo "$ms < ${best_ms[$mode]}" | bc)" = 1 ]; then best_ms[$mode]=$ms; fi
    if [ -z "${best_kb[$mode]:-}" ] || [ "$kb" -lt "${best_kb[$mode]}" ]; then best_kb[$mode]=$kb; fi
  done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "best of ${ROUNDS} (the larger rank's peak RSS), ratios to full fine-tuning (or the first mode without it):"
printf "%-10s %10s %10s %14s %10s\n" mode step_ms "x full" "peak_RSS_MiB" "x full"
ref=full
case " $MODES " in *" full "*) ;; *) ref=${MODES%% *} ;; esac
for mode in $MODES; do
  printf "%-10s %10s %10.3f %14.1f %10.3f\n" "$mode" "${best_ms[$mode]}" "$(echo "${best_ms[$mode]} / ${best_ms[$ref]}" | bc -l)" \
    "$(echo "${best_kb[$mode]} / 1024" | bc -l)" "$(echo "${best_kb[$mode]} / ${best_kb[$ref]}" | bc -l)"
done
