#!/usr/bin/env bash
# gguf_cli_same.sh — do two builds' `shardtune export ... --format gguf` write the same bytes? For model
# directories of several shapes (llama with permuted q/k heads; llama of width 80, whose rows fit no 32-block:
# the f16 fallbacks; gpt2 of width 96, whose rows fit no 256-block: the k-quants' q4_0 / q5_0 / q5_1 / q8_0
# fallbacks, and its transposed Conv1D tensors), every --quant, and the GGUF LoRA adapter of a LoRA and a QLoRA
# run's checkpoint and of a PEFT adapter directory (f32, q8_0, q4_K), `cmp` of the two files. Prints one line per
# case and "N of N the same"; exits 1 at the first difference. What a faster export must keep (used in
# session 10 for the ranged reads, the 8-block q8_0 / q4_0 and the vectorized k-quant searches).
#
#   bench/gguf_cli_same.sh BASE_BUILD_DIR [BUILD_DIR]      env: OUT (scratch dir, /tmp/st_gguf_cli_same)
set -euo pipefail
BASE=${1:?BASE_BUILD_DIR}
NEW=${2:-build}
O=${OUT:-/tmp/st_gguf_cli_same}
rm -rf "$O"
mkdir -p "$O"
S=$NEW/shardtune
n=0
same() { # SRC QUANT
  for side in base new; do
    B=$([ $side = base ] && echo "$BASE" || echo "$NEW")/shardtune
    "$B" export "$1" --out "$O/$side.gguf" --format gguf --quant "$2" --force >/dev/null 2>"$O/err" ||
      { echo "$side: export $1 --quant $2 failed: $(cat "$O/err")"; exit 1; }
  done
  cmp "$O/base.gguf" "$O/new.gguf" || { echo "${1#$O/} $2: the two builds' files differ"; exit 1; }
  echo "${1#$O/} $2: same ($(stat -c %s "$O/new.gguf") bytes)"
  n=$((n + 1))
}
"$S" init-model --family llama --layers 2 --dim 128 --heads 4 --kv-heads 2 --vocab 300 --max-seq 64 --out "$O/llama128" >/dev/null
"$S" init-model --family llama --layers 2 --dim 80 --heads 4 --kv-heads 2 --vocab 300 --max-seq 64 --out "$O/llama80" >/dev/null
"$S" init-model --family gpt2 --layers 2 --dim 96 --heads 4 --vocab 300 --max-seq 64 --out "$O/gpt2_96" >/dev/null
for m in llama128 llama80 gpt2_96; do
  for q in f32 f16 bf16 q8_0 q4_0 q2_K q3_K q4_K q5_K q6_K q4_K_M q5_K_M; do same "$O/$m" $q; done
done
# LoRA / QLoRA checkpoints of a 2-step run, and the PEFT adapter directory of the first
python3 -c "
import json, random
random.seed(1)
with open('$O/d.jsonl', 'w') as f:
    for _ in range(40): f.write(json.dumps({'input_ids': [random.randrange(300) for _ in range(40)]}) + '\n')"
"$S" data pack --jsonl "$O/d.jsonl" --out "$O/d.h5" --vocab 300 >/dev/null
for mode in lora qlora; do
  cat >"$O/job_$mode.yaml" <<EOF
model: { path: $O/llama128 }
run_dir: $O/run_$mode
seed: 1
finetune: { mode: $mode, lora: { r: 4, alpha: 16, targets: [q_proj, k_proj, v_proj, down_proj] } }
train: { steps: 2, micro_batch: 2, grad_accum: 1, seq_len: 16, lr: 1.0e-2, warmup_steps: 0 }
tasks: [ { name: t, path: $O/d.h5 } ]
eval: { every_steps: 0 }
checkpoint: { every_steps: 2, keep_last: 0 }
monitor: { publish: "", control: "" }
EOF
  OMP_NUM_THREADS=1 "$S" train "$O/job_$mode.yaml" >"$O/train_$mode.log" 2>&1 || { tail -3 "$O/train_$mode.log"; exit 1; }
  for q in f32 q8_0 q4_K; do same "$O/run_$mode/checkpoints" $q; done
done
"$S" export "$O/run_lora/checkpoints" --out "$O/peft" --format peft >/dev/null
for q in f32 q8_0 q4_K; do same "$O/peft" $q; done
echo "$n of $n the same"
