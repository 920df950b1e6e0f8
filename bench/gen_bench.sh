#!/usr/bin/env bash
# gen_bench.sh — decode and prefill speed of `shardtune generate` on the CPU (fp32, greedy): prints
# prefill tokens/s and decode tokens/s for batch 1 and batch 8 on two random-init models.
#   bench/gen_bench.sh [BUILD_DIR] [THREADS]      (defaults: build, 2)
# Numbers only; nothing is asserted. The side-by-side ratio against transformers' generate (PyPI torch +
# transformers of bench/torch_venv.sh) is bench/gen_vs_hf.py.
set -euo pipefail
BUILD=${1:-build}
THREADS=${2:-2}
BIN="$BUILD/shardtune"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=$THREADS OPENBLAS_NUM_THREADS=1

"$BIN" init-model --family gpt2 --layers 12 --dim 768 --heads 12 --vocab 50257 --max-seq 1024 --out "$TMP/gpt2-124m" >/dev/null
"$BIN" init-model --family llama --layers 4 --dim 256 --heads 4 --kv-heads 2 --ffn 688 --vocab 32000 --max-seq 1024 \
    --out "$TMP/llama-small" >/dev/null
python3 - "$TMP/prompts.jsonl" <<'PY'
import json, random, sys
random.seed(1)
with open(sys.argv[1], "w") as f:
    for _ in range(8):
        f.write(json.dumps({"input_ids": [random.randrange(1000) for _ in range(32)]}) + "\n")
PY
head -1 "$TMP/prompts.jsonl" > "$TMP/one.jsonl"
printf '%-12s %-6s %s\n' model batch "timing (prompt 32 tokens, 64 new, $THREADS threads)"
for model in gpt2-124m llama-small; do
  for batch in 1 8; do
    in="$TMP/prompts.jsonl"; [ "$batch" = 1 ] && in="$TMP/one.jsonl"
    line=$("$BIN" generate --model "$TMP/$model" --prompts "$in" --out "$TMP/out.jsonl" --force --max-new 64 \
           --batch "$batch" --backend cpu --timing 2>&1 | grep '^timing')
    printf '%-12s %-6s %s\n' "$model" "$batch" "${line#timing (rank 0): }"
  done
done
