#!/usr/bin/env bash
# test_zero3_device.sh — sharding.stage 3 on a device backend without a GPU (worker/comm_zero3_dev.c), run by
# `shardtune train` on tests/tools/fakedev --guard (device-style memory: every copy and checked kernel
# operand must be a device allocation; several ranks go through the fake NCCL of tests/tools/nccl_fake.h,
# whose stream-order checks fail the run):
#  1. on 1, 2 and 3 ranks (global batch 12: micro_batch x grad_accum 2 x ranks), 6 steps: no host/device
#     mix-up, no stream-order violation; the losses equal the CPU ranks' stage 3 of the same world size:
#     bit for bit on 1 and 2 ranks (the same operations on the same values: a sum of two is the same in
#     either order), within 1e-6 relative on 3 (NCCL and MPI may associate a sum of three differently: a
#     few ulp per step); and the 1-rank ZeRO-0 run within 1e-5 relative (other reduction orders; #17's
#     bound). final/model.safetensors is byte-identical to the CPU stage-3 run's on 1 and 2 ranks;
#  2. precision bf16 with activation checkpointing and eval on 2 ranks: losses and eval losses bit-identical
#     to the CPU ranks' bf16 stage 3;
#  3. a device stage-3 run checkpointed at step 3 on 2 ranks resumes on 3 ranks (fakedev) and on 1 CPU rank:
#     steps 4-6 equal the uninterrupted 2-rank device run within 1e-6 relative;
#  4. the planner is true for it: `shardtune plan --json` with backend=cuda gives each rank's step total
#     equal to the device bytes fakedev saw allocated at step boundaries (FAKEDEV_REPORT_MEM=1) within 1%,
#     on 3 ranks fp32 and 2 ranks bf16, and the peak (loading included) exceeds it only by the trainer's MFU
#     probe (12 MiB + the bf16 GEMM scratch): no whole-model buffer exists on a device rank;
#  5. frozen layers, frozen modules (frozen and trained runs inside a layer), progressive stage changes
#     (unfreeze_every 2: the old shards moved to their new owners in pieces; test_zero3_reshard_device.py
#     compares that with the whole path) and bf16 frozen: losses equal to the
#     CPU ranks' stage 3 (bit for bit and final/ byte-identical on 2 ranks, 1e-6 relative on 3); the plan's
#     step total equals the device memory held (frozen modules, 3 ranks); a frozen run checkpointed on 2
#     device ranks resumes on 3 device ranks and on 1 CPU rank (steps 4-6 within 1e-6);
#  6. what the device layout does not support is refused by name (eval.generate samples; the adapter and prompt
#     modes: test_zero3_device_peft.sh, QLoRA: test_zero3_device_qlora.sh).
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"

export FAKEDEV_REPORT_MEM=1
# plan_true NP NAME: each rank's plan step total = the device bytes fakedev held between steps (1%)
job ref0 6 6 2 sharding.stage=0 "${common[@]}"
[ "$(train 1 ref0)" = 0 ] || fail "ZeRO-0 reference: $(cat "$T/ref0.err")"
for np in 1 2 3; do
  micro=$((6 / np))
  job "d$np" 6 "$micro" 2 sharding.stage=3 "${common[@]}"
  job "c$np" 6 "$micro" 2 sharding.stage=3 "${common[@]}"
  dev "$np" "d$np"
  [ "$(train "$np" "c$np")" = 0 ] || fail "cpu stage 3 on $np ranks: $(cat "$T/c$np.err")"
  tol=0; [ "$np" = 3 ] && tol=1e-6
  same=$(close "$T/d$np/metrics.jsonl" "$T/c$np/metrics.jsonl" $tol 1 6) || fail "$np ranks: device vs cpu stage 3"
  z0=$(close "$T/d$np/metrics.jsonl" "$T/ref0/metrics.jsonl" 1e-5 1 6) || fail "$np ranks: device stage 3 vs ZeRO-0"
  if [ "$np" != 3 ]; then
    cmp -s "$T/d$np/final/model.safetensors" "$T/c$np/final/model.safetensors" || fail "$np ranks: final/ differs from cpu stage 3's"
  fi
  echo "stage 3 on $np fake device rank(s): losses vs cpu stage 3 $same (tolerance $tol), vs 1-rank ZeRO-0 $z0 (1e-5)"
done
p=$(plan_true 3 d3) || fail "3 ranks: the plan's step total is not the device memory held"
echo "plan step total vs device bytes held between steps, 3 ranks fp32: $p relative (1%)"

bf=(sharding.stage=3 precision=bf16 memory.activation_checkpointing=true eval.every_steps=3)
job b2 6 3 2 "${bf[@]}" "${common[@]}"
job bc2 6 3 2 "${bf[@]}" "${common[@]}"
dev 2 b2
[ "$(train 2 bc2)" = 0 ] || fail "cpu bf16 stage 3: $(cat "$T/bc2.err")"
close "$T/b2/metrics.jsonl" "$T/bc2/metrics.jsonl" 0 1 6 >/dev/null || fail "bf16: device vs cpu stage 3 differ"
[ "$(grep -o '"val_loss":{[^}]*}' "$T/b2/metrics.jsonl")" = "$(grep -o '"val_loss":{[^}]*}' "$T/bc2/metrics.jsonl")" ] &&
  grep -q val_loss "$T/b2/metrics.jsonl" || fail "bf16: device vs cpu stage 3 eval losses differ"
p=$(plan_true 2 b2) || fail "bf16 2 ranks: the plan's step total is not the device memory held"
echo "stage 3 bf16 + activation checkpointing on 2 fake device ranks: losses and eval losses bit-identical to the cpu ranks'; plan vs held $p"
unset FAKEDEV_REPORT_MEM

# checkpoint at step 3 on 2 device ranks, resumed on 3 device ranks and on 1 cpu rank
job full 6 3 2 sharding.stage=3 checkpoint.every_steps=3 train.schedule=constant
dev 2 full
ck="$T/full/checkpoints/step-00000003.h5"
[ -f "$ck" ] || fail "no checkpoint at step 3: $(ls "$T/full/checkpoints")"
job r3 6 2 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
dev 3 r3
a=$(close "$T/r3/metrics.jsonl" "$T/full/metrics.jsonl" 1e-6 4 6) || fail "resumed on 3 device ranks: steps 4-6 differ"
job r1 6 6 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
[ "$(train 1 r1)" = 0 ] || fail "resume on 1 cpu rank: $(cat "$T/r1.err")"
b=$(close "$T/r1/metrics.jsonl" "$T/full/metrics.jsonl" 1e-6 4 6) || fail "resumed on 1 cpu rank: steps 4-6 differ"
echo "device stage-3 checkpoint (2 ranks, step 3) resumed on 3 device ranks ($a) and 1 cpu rank ($b): steps 4-6 equal (1e-6)"

# frozen parameters (the frozen space sharded as on CPU ranks), progressive stage changes, bf16: the device
# run against the CPU ranks' stage 3 of the same world size (bit for bit on 2 ranks, 1e-6 relative on 3), and
# final/ byte-identical on 2 ranks
# cmp_cpu NP NAME TOL [overrides]: device run NAME vs the CPU ranks' run of the same job
cmp_cpu 2 frz2 0 finetune.mode=frozen "finetune.train_layers=-1"
cmp_cpu 3 frz3 1e-6 finetune.mode=frozen "finetune.train_layers=-1"
cmp_cpu 2 mlp2 0 finetune.mode=frozen "finetune.train_layers=-2" finetune.train_modules=mlp # frozen and trained runs inside each layer
cmp_cpu 2 prog2 0 finetune.mode=progressive finetune.unfreeze_every=2 # stage changes at steps 2 and 4
cmp_cpu 3 prog3 1e-6 finetune.mode=progressive finetune.unfreeze_every=2
cmp_cpu 2 bfrz2 0 finetune.mode=frozen "finetune.train_layers=-1" precision=bf16 memory.activation_checkpointing=true
export FAKEDEV_REPORT_MEM=1
job pfrz 6 2 2 sharding.stage=3 finetune.mode=frozen "finetune.train_layers=-2" finetune.train_modules=mlp "${common[@]}"
dev 3 pfrz
p=$(plan_true 3 pfrz) || fail "frozen, 3 ranks: the plan's step total is not the device memory held"
echo "plan step total vs device bytes held between steps, frozen modules on 3 ranks: $p relative (1%)"
unset FAKEDEV_REPORT_MEM

# a frozen device run checkpointed at step 3 on 2 ranks resumes on 3 device ranks and on 1 cpu rank
job ffull 6 3 2 sharding.stage=3 finetune.mode=frozen "finetune.train_layers=-1" checkpoint.every_steps=3 train.schedule=constant
dev 2 ffull
ck="$T/ffull/checkpoints/step-00000003.h5"
[ -f "$ck" ] || fail "frozen: no checkpoint at step 3: $(ls "$T/ffull/checkpoints")"
job fr3 6 2 2 sharding.stage=3 finetune.mode=frozen "finetune.train_layers=-1" checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
dev 3 fr3
a=$(close "$T/fr3/metrics.jsonl" "$T/ffull/metrics.jsonl" 1e-6 4 6) || fail "frozen, resumed on 3 device ranks: steps 4-6 differ"
job fr1 6 6 2 sharding.stage=3 finetune.mode=frozen "finetune.train_layers=-1" checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
[ "$(train 1 fr1)" = 0 ] || fail "frozen, resume on 1 cpu rank: $(cat "$T/fr1.err")"
b=$(close "$T/fr1/metrics.jsonl" "$T/ffull/metrics.jsonl" 1e-6 4 6) || fail "frozen, resumed on 1 cpu rank: steps 4-6 differ"
echo "frozen device stage-3 checkpoint (2 ranks, step 3) resumed on 3 device ranks ($a) and 1 cpu rank ($b): steps 4-6 equal (1e-6)"

job gen 2 3 1 sharding.stage=3 eval.generate.every_steps=1 "eval.generate.prompts=$T/none.jsonl" "${common[@]}"
set +e
"$FAKE" --guard "$T/gen.yaml" $(cat "$T/gen.args") >"$T/gen.out" 2>"$T/gen.err"; rc=$?
set -e
[ $rc != 0 ] && grep "error:" "$T/gen.err" | grep -q "eval.generate at sharding.stage 3 is supported on CPU ranks only" ||
  fail "eval.generate at stage 3 on a device backend: not refused by name: $(cat "$T/gen.err")"
echo "eval.generate samples at stage 3 on a device backend: refused by name"
