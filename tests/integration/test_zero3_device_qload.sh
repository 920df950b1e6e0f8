#!/usr/bin/env bash
# test_zero3_device_qload.sh — QLoRA's sharded load at sharding.stage 3 on a device backend
# (coordinator/trainer/train_qload.c: each rank quantizes only its 4-byte words of the codes, reading only the
# blocks they depend on, and reads only its parts of the kept base) against the whole load it replaced
# (SHARDTUNE_Z3DEV_QLOAD=whole: train.c load_quantized quantizes the whole base on every rank, then the
# communicator cuts it), both `shardtune train` on tests/tools/fakedev --guard with the same ranks and job:
# the losses, every checkpoint (each dataset and attribute, base_checksum and adapter_base_checksum included,
# but job_spec), final/ and `export --merge` of the last checkpoint are bit-identical; on a model whose fp32
# embedding and head dominate, each rank's peak RSS after loading (fakedev's device memory included) is lower.
# Cases: NF4 + double
# quantization (fp32) on 2 ranks; on 3 ranks with block 3 (uneven shards: a rank's edge inside a tensor's
# codes, mid-block, and another inside the double-quantized scales: checked from the layout, `cuts`), NF4's
# fp32 scales and int8 without double quantization under bf16 cut the same way; DoRA (magnitudes from the gathered codes);
# the unfused path (SHARDTUNE_QLORA_FUSED=0); a bf16 source (BF16 safetensors) under bf16 on 3 ranks. A model
# file with a NaN in a quantized tensor is refused naming it.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/qload_lib.sh"

q=(finetune.mode=qlora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
qrun=dev qwhere="fake device ranks"

qload_cases 4
SHARDTUNE_QLORA_FUSED=0 same 2 unf finetune.qlora.block=48

# a NaN in a quantized tensor: refused naming it (every element is checked by the rank that owns its code byte)
nan_model "$T/model" "$T/modelnan"
job qnan 2 2 1 sharding.stage=3 "${common[@]}" "${q[@]}" "model.path=$T/modelnan"
args=(); mapfile -t args < <(grep . "$T/qnan.args")
set +e
mpirun --oversubscribe -np 3 "$FAKE" --guard "$T/qnan.yaml" "${args[@]}" >"$T/qnan.out" 2>"$T/qnan.err"
rc=$?
set -e
[ $rc != 0 ] && grep -q "down_proj" "$T/qnan.err" || fail "a NaN in a quantized tensor was not refused (rc $rc): $(tail -3 "$T/qnan.err")"
echo "a NaN in layers.1.mlp.down_proj refused by the sharded load: $(grep -m1 -o "[^:]*down_proj[^\"]*" "$T/qnan.err" | head -c 160)"
