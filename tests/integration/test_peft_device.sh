#!/usr/bin/env bash
# test_peft_device.sh — the PEFT modes on a device backend without a GPU (tests/tools/fakedev.c --guard:
# the CPU backend's kernels behind device-style memory, host_memory 0, every copy and every operand of
# matmul / copy_cols / add_scalar / lora_dropout / dora_* / scale_rows / prompt_act* / dequant_* checked
# against the tagged device allocations):
#  1. LoRA (every llama projection: packed q/k/v and gate/up column blocks; without and with dropout), DoRA
#     (fp32; bf16 with dropout), prompt tuning (llama, and gpt2: its position rows added), prefix tuning with and without
#     projection, P-tuning (MLP encoder): no host buffer reaches the backend, the losses of 6 steps (2
#     micro-batches each) are bit-identical to the same job on the CPU backend, and the saved adapter
#     (final/adapter_model.safetensors) is byte-identical;
#  2. QLoRA (nf4 + double quantization, int8, bf16 with its bf16-only layout, DoRA in fp32 and bf16) and
#     P-tuning's LSTM encoder (host LSTM core fed by explicit copies), as 1.; QLoRA + DoRA bf16 checkpointed
#     and resumed on the device backend gives the uninterrupted run's losses; QLoRA bf16 with the head and the
#     layer weights forced into blocks, as 1.;
#  3. the plan is true for QLoRA on a device: the step total of `shardtune plan --json backend=cuda` equals the
#     device bytes fakedev held between steps (FAKEDEV_REPORT_MEM=1) within 15%.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
FAKE=${ST_BUILD_DIR:?}/fakedev
[ -x "$FAKE" ] || fail "no $FAKE (tests/tools/fakedev.c not built)"
same_losses() {
  python3 - "$1" "$2" <<'PY'
import json, sys
def losses(p):
    return {json.loads(l)["step"]: json.loads(l)["loss"] for l in open(p) if '"loss"' in l and '"step"' in l}
a, b = losses(sys.argv[1]), losses(sys.argv[2])
assert set(a) == set(b) == set(range(1, 7)), (sorted(a), sorted(b))
for s in b:
    assert a[s] == b[s], (s, a[s], b[s])
PY
}
ALL="finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
common=(sharding.stage=0 checkpoint.every_steps=0 train.schedule=constant "$ALL")

# device NAME [overrides]: the guarded fakedev run and the CPU run of one job; losses and adapter equal
device() {
  local name=$1; shift
  [[ -z "${ST_PEFT_DEVICE_ONLY:-}" || "$name" == $ST_PEFT_DEVICE_ONLY ]] || return 0 # iterating on one case
  job "$name" 6 1 2 "${common[@]}" "$@"
  job "${name}_cpu" 6 1 2 "${common[@]}" "$@"
  set +e
  "$FAKE" --guard "$T/$name.yaml" "${common[@]}" "$@" >"$T/$name.out" 2>"$T/$name.err"; local rc=$?
  set -e
  [ $rc = 0 ] || fail "$name on fakedev exited $rc: $(cat "$T/$name.err")"
  ! grep -q "fakedev" "$T/$name.err" || fail "$name: a host/device mix-up: $(cat "$T/$name.err")"
  [ "$(train 1 "${name}_cpu")" = 0 ] || fail "$name cpu reference: $(cat "$T/${name}_cpu.err")"
  same_losses "$T/$name/metrics.jsonl" "$T/${name}_cpu/metrics.jsonl" || fail "$name: fakedev and cpu losses differ"
  local a="$T/$name/final/adapter_model.safetensors" b="$T/${name}_cpu/final/adapter_model.safetensors"
  [ -s "$a" ] && [ -s "$b" ] || fail "$name: no saved adapter ($a, $b)"
  cmp -s "$a" "$b" || fail "$name: the adapter saved on fakedev differs from the cpu run's"
  echo "$name on device-style memory: 6 losses bit-identical to the cpu run, adapter byte-identical"
}
# QLoRA (worker/qlora.c on a device backend: quantized on the host while read, codes and double-quantized
# scales uploaded, each layer dequantized per acquire by the backend's dequant_int8 + add_scalar (the scales)
# and dequant_nf4 / dequant_int8 into the device scratch; under bf16 the embedding and head put into the
# bf16-only part through a device staging piece). fakedev runs the CPU backend's kernels, so the tolerance
# is 0: the same codes (quantized by the same host code) dequantized by the same functions give the same
# operands, and every later kernel is the CPU run's.
device qlora finetune.mode=qlora
device qlora_int8 finetune.mode=qlora finetune.qlora.quant=int8 finetune.qlora.double_quant=false
device qlora_bf16 finetune.mode=qlora precision=bf16 finetune.lora.dropout=0.2
# the head and the layer weights in blocks (forced small: the env hooks), as a large model runs them
SHARDTUNE_HEAD_WIDEN_FLOATS=1024 SHARDTUNE_W_WIDEN_FLOATS=1024 device qlora_bf16_blocks finetune.mode=qlora \
  precision=bf16 memory.activation_checkpointing=true
device qlora_dora finetune.mode=qlora finetune.lora.dora=true finetune.qlora.block=48
device qlora_dora_bf16 finetune.mode=qlora finetune.lora.dora=true precision=bf16 finetune.lora.dropout=0.2
# resumed on the device backend: checkpointed at step 3 (adapters and AdamW state; the fp32 part of the
# buffer restored, the bf16-only embedding / head read again from the model directory) = the 6 steps above
if [ -s "$T/qlora_dora_bf16/metrics.jsonl" ]; then
  rargs=(finetune.mode=qlora finetune.lora.dora=true precision=bf16 finetune.lora.dropout=0.2)
  job qresume 6 1 2 "${common[@]}" "${rargs[@]}"
  "$FAKE" --guard "$T/qresume.yaml" "${common[@]}" "${rargs[@]}" checkpoint.every_steps=3 train.steps=3 \
    >"$T/qresume.out" 2>"$T/qresume.err" || fail "qresume part 1: $(cat "$T/qresume.err")"
  "$FAKE" --guard "$T/qresume.yaml" "${common[@]}" "${rargs[@]}" checkpoint.every_steps=3 resume=auto \
    >>"$T/qresume.out" 2>>"$T/qresume.err" || fail "qresume part 2: $(cat "$T/qresume.err")"
  ! grep -q "fakedev" "$T/qresume.err" || fail "qresume: a host/device mix-up: $(cat "$T/qresume.err")"
  same_losses "$T/qresume/metrics.jsonl" "$T/qlora_dora_bf16/metrics.jsonl" || fail "qresume: resumed losses differ"
  echo "qlora + dora bf16 resumed at step 3 on device-style memory: losses bit-identical to the uninterrupted run"
fi
# the planner is true for QLoRA on a device: `shardtune plan --json backend=cuda` gives the step total that
# fakedev saw allocated between steps (FAKEDEV_REPORT_MEM=1) within 15%, bf16 + activation checkpointing with
# the head and the layer weights forced into blocks (the env hooks: the bf16 matmul scratch then holds one
# block on a device too) and the kept inputs in bf16
if [[ -z "${ST_PEFT_DEVICE_ONLY:-}" || qplan == $ST_PEFT_DEVICE_ONLY ]]; then
  qp=(finetune.mode=qlora precision=bf16 memory.activation_checkpointing=true memory.checkpoint_dtype=bf16)
  job qplan 3 1 2 "${common[@]}" "${qp[@]}"
  export SHARDTUNE_HEAD_WIDEN_FLOATS=1024 SHARDTUNE_W_WIDEN_FLOATS=1024
  FAKEDEV_REPORT_MEM=1 "$FAKE" --guard "$T/qplan.yaml" "${common[@]}" "${qp[@]}" >"$T/qplan.out" 2>"$T/qplan.err" ||
    fail "qplan on fakedev: $(cat "$T/qplan.err")"
  ! grep -q "fakedev" "$T/qplan.err" || fail "qplan: a host/device mix-up: $(cat "$T/qplan.err")"
  "$BIN" plan "$T/qplan.yaml" --ranks 1 backend=cuda "${common[@]}" "${qp[@]}" --json >"$T/qplan.plan" || fail "plan of qplan"
  unset SHARDTUNE_HEAD_WIDEN_FLOATS SHARDTUNE_W_WIDEN_FLOATS
  p=$(python3 - "$T/qplan.plan" "$T/qplan.out" <<'PY'
import json, re, sys
plan = json.load(open(sys.argv[1]))["stages"][0]["ranks"][0]["bytes"]["total"]
m = re.search(r"fakedev device bytes: rank 0 peak \d+ between steps (\d+)", open(sys.argv[2]).read())
assert m, "no fakedev device bytes line"
seen = int(m.group(1))
rel = abs(seen - plan) / plan
assert rel <= 0.15, f"plan {plan} vs device bytes held between steps {seen}: {rel:.3g} > 0.15"
print(f"{rel:.2g} (plan {plan}, held {seen})")
PY
  ) || fail "qplan: the plan's step total is not the device memory held: $p"
  echo "qlora bf16 (blocked head and weights, bf16 kept inputs) on device-style memory: plan vs held $p (15%)"
fi
device lora finetune.mode=lora
device lora_dropout finetune.mode=lora finetune.lora.dropout=0.2
device dora finetune.mode=lora finetune.lora.dora=true
device dora_bf16 finetune.mode=lora finetune.lora.dora=true finetune.lora.dropout=0.2 precision=bf16
device prompt finetune.mode=prompt_tuning finetune.prompt.virtual_tokens=3
device prefix finetune.mode=prefix_tuning finetune.prefix.virtual_tokens=3
device ptuning finetune.mode=p_tuning finetune.prompt.virtual_tokens=3
# the LSTM encoder: host code fed through explicit copies (worker/prompt.c lstm_*), bf16 too
device ptuning_lstm finetune.mode=p_tuning finetune.prompt.encoder=lstm finetune.prompt.virtual_tokens=3
device ptuning_lstm_bf16 finetune.mode=p_tuning finetune.prompt.encoder=lstm finetune.prompt.virtual_tokens=4 precision=bf16
device prefix_proj finetune.mode=prefix_tuning finetune.prefix.virtual_tokens=3 finetune.prefix.projection=true
"$BIN" init-model --family gpt2 --layers 2 --dim 64 --heads 4 --vocab 128 --max-seq 64 --seed 3 --out "$T/gpt2" >/dev/null
device prompt_gpt2 finetune.mode=prompt_tuning finetune.prompt.virtual_tokens=3 model.path="$T/gpt2"

