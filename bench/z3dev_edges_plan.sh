#!/usr/bin/env bash
# z3dev_edges_plan.sh — the planner's per-rank step totals for device ZeRO-3 (backend cuda, sharding.stage 3)
# with the embedding and head gathered whole (SHARDTUNE_ZERO3_DEV_EDGES=whole, the layout before) and as shipped
# (the batch's embedding rows, the head in vocabulary blocks: worker/comm_zero3_dev.c). Jobs: Llama-3-8B QLoRA
# (nf4 + double quantization, r 16 on all 7 projections) and LoRA and full fine-tuning on 8 ranks, Llama-2-7B
# full on 8 ranks (issue #17), Llama-2-70B full on 64 ranks; all bf16, seq 2048, micro_batch 1, activation
# checkpointing. Hand-written config.json files, no weights: plan numbers only, runs nothing.
#
#   bench/z3dev_edges_plan.sh [BUILD_DIR]
set -euo pipefail
BIN=${1:-build}/shardtune
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
# model NAME hidden ffn layers heads kv_heads vocab
model() {
  mkdir -p "$T/$1"
  cat > "$T/$1/config.json" <<JSON
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": $2, "intermediate_size": $3,
 "num_hidden_layers": $4, "num_attention_heads": $5, "num_key_value_heads": $6, "vocab_size": $7,
 "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "torch_dtype": "bfloat16", "hidden_act": "silu"}
JSON
}
model l3_8b 4096 14336 32 32 8 128256
model l2_7b 4096 11008 32 32 32 32000
model l2_70b 8192 28672 80 64 8 32000
: > "$T/data.h5"
lora='{ r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }'
# run LABEL MODEL RANKS FINETUNE
run() {
  cat > "$T/job.yaml" <<YAML
model: { path: $T/$2 }
run_dir: $T/run
train: { steps: 10, micro_batch: 1, seq_len: 2048, lr: 1.0e-4 }
tasks:
  - { name: a, path: $T/data.h5 }
precision: bf16
memory: { activation_checkpointing: true }
finetune: $4
YAML
  local step=()
  for edges in whole shipped; do
    local env=(); [ "$edges" = whole ] && env=(SHARDTUNE_ZERO3_DEV_EDGES=whole)
    step+=("$(env "${env[@]}" "$BIN" plan "$T/job.yaml" --ranks "$3" backend=cuda sharding.stage=3 --json |
      python3 -c 'import json,sys; t = max(r["bytes"]["total"] for r in json.load(sys.stdin)["stages"][0]["ranks"]); print("%.0f" % (t / 2**20))')")
  done
  printf '%-34s %4s ranks  step MiB per rank: whole edges %7s  rows + blocks %7s\n' "$1" "$3" "${step[0]}" "${step[1]}"
}
run "Llama-3-8B QLoRA nf4" l3_8b 8 "{ mode: qlora, lora: $lora, qlora: { quant: nf4, double_quant: true, block: 64 } }"
run "Llama-3-8B LoRA" l3_8b 8 "{ mode: lora, lora: $lora }"
run "Llama-3-8B full" l3_8b 8 "{ mode: full }"
run "Llama-2-7B full" l2_7b 8 "{ mode: full }"
run "Llama-2-70B full" l2_70b 64 "{ mode: full }"
