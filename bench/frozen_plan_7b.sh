#!/usr/bin/env bash
# frozen_plan_7b.sh — the planner's numbers for frozen weights held in bf16 only (docs/finetune.md "Frozen
# weights under bf16"): Llama-2-7B's shape (hidden 4096, 32 layers, 32 heads, ffn 11008, vocab 32000 untied)
# with torch_dtype bfloat16, finetune.mode frozen training the top 8 layers (24 of 32 frozen) and the head,
# precision bf16, seq 2048, micro_batch 1, activation checkpointing, ZeRO-1, on the CPU backend. Prints the
# plan with every fp32 copy kept (SHARDTUNE_FROZEN_FP32=1, the layout before) and as shipped. A hand-written
# config.json and no weights (`shardtune plan` reads the registry only). Plan numbers only: runs nothing.
#
# FINETUNE (environment) replaces the finetune section, e.g. LoRA r16 on every projection:
#   FINETUNE='{ mode: lora, lora: { r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] } }'
#
#   bench/frozen_plan_7b.sh [BUILD_DIR [RANKS [key=value ...]]]   (the overrides go to every `shardtune plan`)
# e.g. `bench/frozen_plan_7b.sh build 8 backend=cuda --device-mem 80`: device ranks (the fp32 copy never allocated,
# coordinator/trainer/train_frozen16.c).
set -euo pipefail
BIN=${1:-build}/shardtune
RANKS=${2:-8}
FINETUNE=${FINETUNE:-'{ mode: frozen, train_layers: "-8" }'}
shift 2 || shift $# || true
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/model"
cat > "$T/model/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008,
 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
 "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "tie_word_embeddings": false,
 "torch_dtype": "bfloat16", "hidden_act": "silu"}
JSON
: > "$T/data.h5"
cat > "$T/job.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/run
train: { steps: 10, micro_batch: 1, seq_len: 2048, lr: 1.0e-5 }
tasks:
  - { name: a, path: $T/data.h5 }
precision: bf16
memory: { activation_checkpointing: true }
sharding: { stage: 1 }
finetune: $FINETUNE
YAML
for keep in 1 0; do
  if [ "$keep" = 1 ]; then echo "== every fp32 copy kept (SHARDTUNE_FROZEN_FP32=1: before)"; else echo "== frozen weights in bf16 only"; fi
  SHARDTUNE_FROZEN_FP32=$keep "$BIN" plan "$T/job.yaml" --ranks "$RANKS" "$@"
done
