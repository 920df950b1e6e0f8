#!/usr/bin/env bash
# test_qlora_readers.sh — QLoRA's base has no whole dequantized matrix on the fused path (worker/qlora.h: the
# quantized tensors' registry offsets are virtual, nothing is stored there, a read through one faults), so every
# reader outside the base matmuls goes through the codes: DoRA (magnitude init, norms panel by panel, its base
# term and input gradient through qmatmul), eval.generate's merged view (each tensor dequantized straight into
# the view), checkpoints and `export CKPT --merge` (st_qlora_materialize). Each job runs twice, fused (the
# default) and with SHARDTUNE_QLORA_FUSED=0 (the unfused path: the one-unit scratch every reader used to read),
# and everything it writes must be the same bits: the losses of every step, samples.jsonl (eval.generate every 2
# steps), final/adapter_model.safetensors, the checkpoint merged onto the dequantized base by `export --merge`
# and `generate --adapter final/` over the model directory. Cases: DoRA + bf16 (the base held in bf16 only) +
# LoRA dropout on 1 rank, and DoRA fp32 at ZeRO-3 on 2 ranks (each layer's codes gathered before it is read).
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
ALL="finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
printf '%s\n' '{"id": "a", "input_ids": [5, 6, 7, 8]}' '{"id": "b", "input_ids": [100, 3, 50, 9, 9, 1]}' > "$T/prompts.jsonl"
gen=(eval.generate.every_steps=2 "eval.generate.prompts=$T/prompts.jsonl" eval.generate.max_new=6 eval.generate.batch=2)

# run NAME NP FUSED [overrides]: 4 steps, a checkpoint and samples every 2
run() {
  local name=$1 np=$2 fused=$3; shift 3
  job "$name" 4 1 2 checkpoint.every_steps=2 train.schedule=constant "$ALL" "${gen[@]}" "$@"
  local args=(); mapfile -t args < <(grep . "$T/$name.args")
  # panels of 200 floats (3 rows of 64): DoRA's norms and magnitudes over several panels on this small model
  SHARDTUNE_QLORA_PANEL_FLOATS=200 SHARDTUNE_QLORA_FUSED=$fused mpirun --oversubscribe -x SHARDTUNE_QLORA_FUSED \
    -x SHARDTUNE_QLORA_PANEL_FLOATS -np "$np" "$BIN" train \
    "$T/$name.yaml" "${args[@]}" >"$T/$name.out" 2>"$T/$name.err" || fail "$name: $(cat "$T/$name.err")"
  SHARDTUNE_QLORA_FUSED=$fused "$BIN" export "$T/$name/checkpoints" --merge --out "$T/$name/merged" >/dev/null \
    2>>"$T/$name.err" || fail "$name: export --merge: $(cat "$T/$name.err")"
  "$BIN" generate --model "$T/model" --adapter "$T/$name/final" --prompts "$T/prompts.jsonl" --out "$T/$name/gen.jsonl" \
    --max-new 6 --batch 2 --backend cpu >/dev/null 2>>"$T/$name.err" || fail "$name: generate: $(cat "$T/$name.err")"
}

# same NAME [overrides]: the fused and the unfused runs of one job write the same bits
same() {
  local name=$1 np=$2; shift 2
  run "$name" "$np" 1 "$@"
  run "${name}_unfused" "$np" 0 "$@"
  local a="$T/$name" b="$T/${name}_unfused"
  "$PY" - "$a/metrics.jsonl" "$b/metrics.jsonl" <<'PY' || fail "$name: losses differ from the unfused run's"
import json, sys
def losses(p):
    return {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if '"loss"' in l and '"step"' in l}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert set(a) == set(b) == {1, 2, 3, 4}, (sorted(a), sorted(b))
assert all(a[s] == b[s] for s in a), (a, b)
PY
  [ "$(wc -l <"$a/samples.jsonl")" = 4 ] || fail "$name: $(wc -l <"$a/samples.jsonl") samples, want 2 prompts x 2"
  cmp -s "$a/samples.jsonl" "$b/samples.jsonl" || fail "$name: samples.jsonl differs from the unfused run's"
  cmp -s "$a/final/adapter_model.safetensors" "$b/final/adapter_model.safetensors" ||
    fail "$name: final/ differs from the unfused run's"
  cmp -s "$a/merged/model.safetensors" "$b/merged/model.safetensors" ||
    fail "$name: export --merge differs from the unfused run's"
  cmp -s "$a/gen.jsonl" "$b/gen.jsonl" || fail "$name: generate --adapter differs from the unfused run's"
  echo "$name: losses, samples, final/, export --merge and generate --adapter bit-identical to the unfused (scratch) run"
}

same dora_bf16 1 finetune.mode=qlora finetune.lora.dora=true precision=bf16 finetune.lora.dropout=0.2 \
  sharding.stage=0
same dora_zero3 2 finetune.mode=qlora finetune.lora.dora=true sharding.stage=3 finetune.qlora.block=48
