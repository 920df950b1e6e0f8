#!/usr/bin/env bash
# test_zero3_device_peft.sh — sharding.stage 3 on a device backend (worker/comm_zero3_dev.c) for the adapter
# and prompt-learning modes, run by `shardtune train` on tests/tools/fakedev --guard (device-style memory:
# every copy and checked kernel operand must be a device allocation; several ranks go through the fake NCCL,
# whose stream-order checks fail the run). The base is the frozen space (sharded, no gradient, no optimizer
# state), the adapters / the prompt's tensors the trainable one; a layer's adapters are gathered into a slot
# of their own, the prompt's tensors too (held over every layer for a prefix without encoder).
#  1. LoRA (every projection, dropout), DoRA under bf16 with activation checkpointing, prompt tuning,
#     P-tuning (LSTM encoder; the MLP one shares the projection's code), prefix tuning (without projection
#     under bf16 with activation checkpointing: backward's recomputed layers read the table, held over the
#     layers; with projection) on 2 ranks, 6 steps:
#     losses bit-identical to the CPU ranks' stage 3 of the same job (the same operations on the same values:
#     a sum of two is the same in either order) and final/ (the peft adapter directory) byte-identical;
#     LoRA on 3 ranks (uneven shards) within 1e-6 relative (NCCL and MPI may associate a sum of three
#     differently);
#  2. the planner is true for it: `shardtune plan --json` with backend=cuda gives each rank's step total equal
#     to the device bytes fakedev held at step boundaries (1%), LoRA and prefix tuning (bf16) on 2 ranks, and the peak
#     (loading included) exceeds it only by the trainer's MFU probe: no whole-model buffer on a device rank;
#  3. a LoRA and a P-tuning (LSTM) run checkpointed at step 3 on 2 device ranks resume on 3 device ranks and
#     on 1 CPU rank: steps 4-6 equal the uninterrupted device run within 1e-6 relative.
# QLoRA: test_zero3_device_qlora.sh.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"

lora=(finetune.mode=lora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")

export FAKEDEV_REPORT_MEM=1
cmp_cpu_adapter 2 lora2 0 "${lora[@]}" finetune.lora.dropout=0.1
p=$(plan_true 2 lora2) || fail "lora 2 ranks: the plan's step total is not the device memory held"
echo "  plan step total vs device bytes held between steps: $p relative (1%)"
cmp_cpu_adapter 2 prefix2 0 finetune.mode=prefix_tuning finetune.prefix.virtual_tokens=3 precision=bf16 memory.activation_checkpointing=true
p=$(plan_true 2 prefix2) || fail "prefix 2 ranks: the plan's step total is not the device memory held"
echo "  plan step total vs device bytes held between steps: $p relative (1%)"
unset FAKEDEV_REPORT_MEM
cmp_cpu_adapter 3 lora3 1e-6 "${lora[@]}"
cmp_cpu_adapter 2 dora2 0 finetune.mode=lora finetune.lora.dora=true precision=bf16 memory.activation_checkpointing=true
cmp_cpu_adapter 2 prompt2 0 finetune.mode=prompt_tuning finetune.prompt.virtual_tokens=3
cmp_cpu_adapter 2 plstm2 0 finetune.mode=p_tuning finetune.prompt.encoder=lstm finetune.prompt.virtual_tokens=3
cmp_cpu_adapter 2 pproj2 0 finetune.mode=prefix_tuning finetune.prefix.virtual_tokens=3 finetune.prefix.projection=true

# checkpointed at step 3 on 2 device ranks, resumed on 3 device ranks and on 1 cpu rank
for mode in "lora ${lora[*]}" "plstm finetune.mode=p_tuning finetune.prompt.encoder=lstm finetune.prompt.virtual_tokens=3"; do
  set -- $mode
  name=$1; shift
  job "k$name" 6 3 2 sharding.stage=3 checkpoint.every_steps=3 train.schedule=constant "$@"
  dev 2 "k$name"
  ck="$T/k$name/checkpoints/step-00000003.h5"
  [ -f "$ck" ] || fail "$name: no checkpoint at step 3: $(ls "$T/k$name/checkpoints")"
  job "r3$name" 6 2 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck" "$@"
  dev 3 "r3$name"
  a=$(close "$T/r3$name/metrics.jsonl" "$T/k$name/metrics.jsonl" 1e-6 4 6) || fail "$name: resumed on 3 device ranks: steps 4-6 differ"
  job "r1$name" 6 6 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck" "$@"
  [ "$(train 1 "r1$name")" = 0 ] || fail "$name: resume on 1 cpu rank: $(cat "$T/r1$name.err")"
  b=$(close "$T/r1$name/metrics.jsonl" "$T/k$name/metrics.jsonl" 1e-6 4 6) || fail "$name: resumed on 1 cpu rank: steps 4-6 differ"
  echo "$name: device stage-3 checkpoint (2 ranks, step 3) resumed on 3 device ranks ($a) and 1 cpu rank ($b): steps 4-6 equal (1e-6)"
done

