#!/usr/bin/env bash
# test_zero3_qload.sh — QLoRA's sharded load at sharding.stage 3 on CPU ranks (coordinator/trainer/train_qload.c
# over worker/comm.c's parts: each rank quantizes only its bytes [qlo, qhi) of the blob, reading only the blocks
# they depend on, and reads only its parts of the kept base, in place) against the whole load it replaced
# (SHARDTUNE_Z3DEV_QLOAD=whole: train.c load_quantized quantizes the whole base on every rank, then the
# communicator gives back what is not this rank's), both `shardtune train` with real MPI ranks and the same job:
# the losses, every checkpoint (each dataset and attribute, base_checksum and adapter_base_checksum included, but
# job_spec), final/ and `export --merge` of the last checkpoint are bit-identical; on a model whose fp32 embedding
# and head dominate, each rank's peak RSS after loading is lower. Cases: NF4 + double quantization on 1 and 2
# ranks; on 3 ranks with block 3 (the host shards are bytes: a rank's edge inside a tensor's codes, mid-block,
# and another inside its double-quantized scales: checked from the layout, `cuts`); NF4's fp32 scales and int8
# under bf16 cut the same way; DoRA (magnitudes from the gathered codes); the unfused path
# (SHARDTUNE_QLORA_FUSED=0: the scratch in the weight buffer); a bf16 source under bf16; a resume of the 2-rank
# run on 3 ranks (the base checksum agrees). A model file with a NaN in a quantized tensor is refused naming it.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/qload_lib.sh"

q=(finetune.mode=qlora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")
qrun=run qwhere="CPU ranks"

# run NP NAME: train job NAME on NP ranks (environment assignments before it reach the ranks); fails on an error
run() {
  [ "$(train "$1" "$2")" = 0 ] || fail "$2 on $1 ranks: $(tail -5 "$T/$2.err")"
}

same 1 one
qload_cases 1
SHARDTUNE_QLORA_FUSED=0 same 2 unf finetune.qlora.block=48

# resume 2 -> 3 ranks: the 2-rank run's step-2 checkpoint resumed on 3 ranks, sharded and whole alike
for n in nf4 wnf4; do
  rm -rf "$T/r$n"; mkdir -p "$T/r$n/checkpoints"; cp "$T/$n/checkpoints/step-00000002.h5" "$T/r$n/checkpoints/"
  sed "s|run_dir: $T/$n|run_dir: $T/r$n|" "$T/$n.yaml" >"$T/r$n.yaml"; cp "$T/$n.args" "$T/r$n.args"
done
run 3 rnf4
SHARDTUNE_Z3DEV_QLOAD=whole run 3 rwnf4
grep -q "resumed from step-00000002" "$T/rnf4.out" || fail "rnf4 did not resume: $(tail -3 "$T/rnf4.err")"
losses_equal "$T/rnf4/metrics.jsonl" "$T/rwnf4/metrics.jsonl" || fail "resume 2 -> 3: losses differ from the whole load's"
h5same "$T/rnf4/checkpoints/step-00000004.h5" "$T/rwnf4/checkpoints/step-00000004.h5" || fail "resume 2 -> 3: checkpoint differs"
echo "resume of the 2-rank run on 3 CPU ranks: losses and checkpoint bit-identical to the whole load's"

# a NaN in a quantized tensor: refused naming it (every element is checked by the rank that owns its code byte)
nan_model "$T/model" "$T/modelnan"
job qnan 2 2 1 sharding.stage=3 "${q[@]}" "model.path=$T/modelnan"
[ "$(train 3 qnan)" != 0 ] && grep -q "down_proj" "$T/qnan.err" ||
  fail "a NaN in a quantized tensor was not refused: $(tail -3 "$T/qnan.err")"
echo "a NaN in layers.1.mlp.down_proj refused by the sharded load: $(grep -m1 -o "[^:]*down_proj[^\"]*" "$T/qnan.err" | head -c 160)"
