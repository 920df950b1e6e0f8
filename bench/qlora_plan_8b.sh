#!/usr/bin/env bash
# qlora_plan_8b.sh — the planner's numbers for issue #18's QLoRA target: Llama-3-8B (hidden 4096, 32 layers,
# 32/8 heads, ffn 14336, vocab 128256 untied), nf4 + double quantization, block 64, LoRA r 16 on all 7
# projections, precision bf16, seq 2048, micro_batch 1, activation checkpointing, 1 rank. A hand-written
# config.json and no weights (`shardtune plan` reads the registry only). Prints `shardtune plan` for the
# defaults and for memory.checkpoint_dtype: bf16, each on the CPU backend and with backend=cuda (device
# memory). Plan numbers only: runs nothing. RANKS=8 with sharding.stage=3 gives the 8-rank ZeRO-3 form (on
# cuda: worker/comm_zero3_dev.c's QLoRA layout, the quantized bytes sharded).
#
#   [RANKS=N] bench/qlora_plan_8b.sh [BUILD_DIR [key=value ...]]   (the overrides go to every `shardtune plan`)
set -euo pipefail
BIN=${1:-build}/shardtune
shift || true
T=$(mktemp -d)
trap 'rm -rf "$T"' EXIT
mkdir -p "$T/model"
cat > "$T/model/config.json" <<'JSON'
{"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
 "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
 "max_position_embeddings": 8192, "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "tie_word_embeddings": false,
 "torch_dtype": "bfloat16", "hidden_act": "silu"}
JSON
: > "$T/data.h5"
cat > "$T/job.yaml" <<YAML
model: { path: $T/model }
run_dir: $T/run
train: { steps: 10, micro_batch: 1, seq_len: 2048, lr: 1.0e-4 }
tasks:
  - { name: a, path: $T/data.h5 }
precision: bf16
memory: { activation_checkpointing: true }
finetune:
  mode: qlora
  lora: { r: 16, alpha: 32, targets: [q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj] }
  qlora: { quant: nf4, double_quant: true, block: 64 }
YAML
for backend in cpu cuda; do
  for dt in fp32 bf16; do
    echo "== backend $backend, memory.checkpoint_dtype: $dt"
    extra=()
    [ "$backend" = cuda ] && extra+=(backend=cuda)
    "$BIN" plan "$T/job.yaml" --ranks "${RANKS:-1}" memory.checkpoint_dtype="$dt" "${extra[@]}" "$@"
  done
done
