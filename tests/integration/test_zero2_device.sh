#!/usr/bin/env bash
# test_zero2_device.sh — sharding.stage 2 on a device backend without a full-size gradient buffer
# (worker/comm_zero2_dev.c), run by `shardtune train` on tests/tools/fakedev --guard (device-style memory:
# every copy and checked kernel operand must be a device allocation; several ranks go through the fake NCCL
# of tests/tools/nccl_fake.h, whose stream-order checks fail the run):
#  1. full fine-tune on 1, 2 and 3 ranks (global batch 12: micro_batch x grad_accum 2 x ranks), 6 steps: the
#     losses equal the CPU ranks' stage 2 of the same world size: bit for bit on 2 ranks (the CPU ranks
#     reduce-scatter each micro-batch's buckets into the shard too: the same sums, a sum of two the same in
#     either order), within 1e-6 relative on 1 rank (the CPU rank accumulates the micro-batches inside the
#     gradient GEMMs, the device rank adds each micro-batch's gradient to the shard: one rounding more
#     per element per step) and on 3 (NCCL and MPI may associate a sum of three differently: a few ulp per
#     step); and the 1-rank ZeRO-0 run within 1e-5 relative (#17's bound);
#  2. precision bf16 with activation checkpointing and eval, frozen layers (only the last layer trains),
#     progressive unfreezing (the communicator rebuilt at each stage change), LoRA (all projections,
#     dropout), QLoRA + DoRA under bf16 and tied embeddings (the others are untied: their gradient shares the layer bucket) on 2
#     ranks, and prefix tuning, prompt tuning and P-tuning with its LSTM encoder (the prompt's tensors in a
#     resident edge buffer): losses bit-identical to the CPU ranks' stage 2 of the same job;
#  3. checkpointed at step 3 on 2 device ranks, resumed on 3 device ranks and on 1 CPU rank: steps 4-6 equal
#     the uninterrupted run within 1e-6 relative;
#  4. the planner is true for it: each rank's step total of `shardtune plan --json` (backend=cuda) equals the
#     device bytes fakedev saw allocated between steps (FAKEDEV_REPORT_MEM=1) within 1% (3 ranks fp32, 2 ranks
#     bf16, 2 ranks LoRA and tied), and the peak exceeds it only by the trainer's MFU probe (no transient full
#     gradient buffer); also with SHARDTUNE_ZERO2_FULL_GRADS=1 (the full buffer, the old layout), which
#     holds more on every rank;
#  5. overlap: on 2 and 3 ranks at least half of the gradient reductions (final norm + head's and the upper
#     layer's of the four per micro-batch of this 2-layer model) were still in flight while a matmul ran
#     (fakedev's count: a layer's reduce-scatter travels beside the next layer's backward, the other bucket);
#  6. one stream wait removed (the fake NCCL's NCCL_FAKE_DROP_EVENT=K: the K-th wait for a reduction's
#     comm-stream mark is skipped; 1: before the bucket of layer 1's reduction is reused for the embeddings,
#     2: at the end of the micro-batch's backward): the stream-order checker fails the run.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"
# both NP NAME [overrides]: job NAME on NP fake device ranks and job NAME_c on NP CPU ranks
both() {
  local np=$1 name=$2; shift 2
  job "$name" 6 $((6 / np)) 2 sharding.stage=2 "${common[@]}" "$@"
  job "${name}_c" 6 $((6 / np)) 2 sharding.stage=2 "${common[@]}" "$@"
  dev "$np" "$name"
  [ "$(train "$np" "${name}_c")" = 0 ] || fail "cpu stage 2 $name on $np ranks: $(cat "$T/${name}_c.err")"
}

export FAKEDEV_REPORT_MEM=1
# held NAME: rank -> device bytes held between steps (fakedev's report)
held() {
  python3 - "$T/$1.out" <<'PY'
import re, sys
print(" ".join(f"{m.group(1)}:{m.group(2)}" for m in re.finditer(r"fakedev device bytes: rank (\d+) peak \d+ between steps (\d+)", open(sys.argv[1]).read())))
PY
}
# plan_true NP NAME: each rank's plan step total = the device bytes fakedev held between steps (1%)
plan_true() {
  local np=$1 name=$2
  local args=(); mapfile -t args < <(grep . "$T/$name.args" || true)
  "$BIN" plan "$T/$name.yaml" --ranks "$np" backend=cuda "${args[@]}" --json >"$T/$name.plan" || fail "plan of $name"
  python3 - "$T/$name.plan" "$T/$name.out" <<'PY'
import json, re, sys
plan = {r["rank"]: r["bytes"]["total"] for r in json.load(open(sys.argv[1]))["stages"][0]["ranks"]}
seen = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"fakedev device bytes: rank (\d+) peak \d+ between steps (\d+)", open(sys.argv[2]).read())}
assert set(seen) == set(plan), (seen, plan)
worst = max(abs(seen[r] - plan[r]) / plan[r] for r in plan)
assert worst <= 0.01, f"plan {plan} vs measured {seen}"
# the peak (loading and stage changes included): beyond the step total only the trainer's MFU probe, three
# 1024 x 1024 fp32 matrices (+ the bf16 GEMM scratch: at most another 8 MiB) that the plan leaves out; no
# full-size gradient buffer exists even for a moment
peak = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"fakedev device bytes: rank (\d+) peak (\d+)", open(sys.argv[2]).read())}
extra = max(peak[r] - seen[r] for r in peak)
assert 12 << 20 <= extra <= 20 << 20, f"device peak beyond the step total: {extra} bytes ({peak} vs {seen})"
print(f"{worst:.2g}")
PY
}

job ref0 6 6 2 sharding.stage=0 "${common[@]}"
[ "$(train 1 ref0)" = 0 ] || fail "ZeRO-0 reference: $(cat "$T/ref0.err")"
for np in 1 2 3; do
  both "$np" "d$np"
  tol=0; [ "$np" != 2 ] && tol=1e-6
  same=$(close "$T/d$np/metrics.jsonl" "$T/d${np}_c/metrics.jsonl" $tol 1 6) || fail "$np ranks: device vs cpu stage 2"
  z0=$(close "$T/d$np/metrics.jsonl" "$T/ref0/metrics.jsonl" 1e-5 1 6) || fail "$np ranks: device stage 2 vs ZeRO-0"
  echo "stage 2 on $np fake device rank(s): losses vs cpu stage 2 $same (tolerance $tol), vs 1-rank ZeRO-0 $z0 (1e-5)"
done
# overlapped NAME: each rank's gradient reductions, at least half of them queued while a matmul ran
overlapped() {
  python3 - "$T/$1.out" <<'PY'
import re, sys
seen = {int(m.group(1)): (int(m.group(2)), int(m.group(3))) for m in re.finditer(
    r"fakedev device bytes: rank (\d+) .* gradient reductions (\d+), (\d+) of them beside compute", open(sys.argv[1]).read())}
assert seen and all(n > 0 and 2 * o >= n for n, o in seen.values()), seen
print(" ".join(f"rank {r}: {o} of {n}" for r, (n, o) in sorted(seen.items())))
PY
}
for np in 2 3; do
  ov=$(overlapped "d$np") || fail "$np ranks: the layers' reductions did not overlap backward: $(grep -m3 "gradient reductions" "$T/d$np.out")"
  echo "stage 2 on $np fake device ranks: gradient reductions in flight while a matmul ran: $ov"
done
p=$(plan_true 3 d3) || fail "3 ranks: the plan's step total is not the device memory held"
# the same job with the full-size gradient buffer (the old layout): more memory, by at least what it saves
job full3 6 2 2 sharding.stage=2 "${common[@]}"
SHARDTUNE_ZERO2_FULL_GRADS=1 dev 3 full3
pf=$(SHARDTUNE_ZERO2_FULL_GRADS=1 plan_true 3 full3) || fail "3 ranks full buffer: plan vs held"
python3 - "$(held d3)" "$(held full3)" <<'PY' || fail "3 ranks: the bucketed layout does not hold less"
import sys
new = dict(map(int, x.split(":")) for x in sys.argv[1].split())
old = dict(map(int, x.split(":")) for x in sys.argv[2].split())
assert set(new) == set(old) == {0, 1, 2}, (new, old)
for r in new:
    assert new[r] < old[r], (r, new[r], old[r])
print("device bytes between steps per rank, bucketed vs full buffer:", {r: (new[r], old[r]) for r in sorted(new)})
PY
echo "plan step total vs device bytes held between steps, 3 ranks fp32: $p (full buffer: $pf) relative (1%)"

both 2 b2 precision=bf16 memory.activation_checkpointing=true eval.every_steps=3
close "$T/b2/metrics.jsonl" "$T/b2_c/metrics.jsonl" 0 1 6 >/dev/null || fail "bf16: device vs cpu stage 2 differ"
[ "$(grep -o '"val_loss":{[^}]*}' "$T/b2/metrics.jsonl")" = "$(grep -o '"val_loss":{[^}]*}' "$T/b2_c/metrics.jsonl")" ] &&
  grep -q val_loss "$T/b2/metrics.jsonl" || fail "bf16: device vs cpu stage 2 eval losses differ"
p=$(plan_true 2 b2) || fail "bf16 2 ranks: the plan's step total is not the device memory held"
echo "stage 2 bf16 + activation checkpointing on 2 fake device ranks: losses and eval losses bit-identical to the cpu ranks'; plan vs held $p"

both 2 frz finetune.mode=frozen "finetune.train_layers=-1"
close "$T/frz/metrics.jsonl" "$T/frz_c/metrics.jsonl" 0 1 6 >/dev/null || fail "frozen: device vs cpu stage 2 differ"
echo "stage 2 with frozen layers on 2 fake device ranks: losses bit-identical to the cpu ranks'"

both 2 prog finetune.mode=progressive finetune.unfreeze_every=2
close "$T/prog/metrics.jsonl" "$T/prog_c/metrics.jsonl" 0 1 6 >/dev/null || fail "progressive: device vs cpu stage 2 differ"
grep -q '"stage":2' "$T/prog/metrics.jsonl" || fail "progressive: no stage change happened"
echo "stage 2 progressive (the trainable set changes: the bucket layout rebuilt) on 2 fake device ranks: losses bit-identical to the cpu ranks'"

both 2 lora finetune.mode=lora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]" finetune.lora.dropout=0.1
close "$T/lora/metrics.jsonl" "$T/lora_c/metrics.jsonl" 0 1 6 >/dev/null || fail "lora: device vs cpu stage 2 differ"
p=$(plan_true 2 lora) || fail "lora 2 ranks: the plan's step total is not the device memory held"
echo "stage 2 LoRA (all projections, dropout) on 2 fake device ranks: losses bit-identical to the cpu ranks'; plan vs held $p"
both 2 qlora finetune.mode=qlora finetune.lora.dora=true precision=bf16
close "$T/qlora/metrics.jsonl" "$T/qlora_c/metrics.jsonl" 0 1 6 >/dev/null || fail "qlora: device vs cpu stage 2 differ"
echo "stage 2 QLoRA + DoRA bf16 on 2 fake device ranks: losses bit-identical to the cpu ranks'"

# prompt learning: the prompt's tensors in a third resident edge buffer (prefix tuning's table is written by
# every layer's backward; P-tuning's LSTM gradients come from the host)
for mode in "prefix finetune.mode=prefix_tuning finetune.prefix.virtual_tokens=3" \
            "prompt finetune.mode=prompt_tuning finetune.prompt.virtual_tokens=3" \
            "plstm finetune.mode=p_tuning finetune.prompt.encoder=lstm finetune.prompt.virtual_tokens=3"; do
  set -- $mode
  name=$1; shift
  both 2 "$name" "$@"
  close "$T/$name/metrics.jsonl" "$T/${name}_c/metrics.jsonl" 0 1 6 >/dev/null || fail "$name: device vs cpu stage 2 differ"
  p=$(plan_true 2 "$name") || fail "$name 2 ranks: the plan's step total is not the device memory held"
  echo "stage 2 $* on 2 fake device ranks: losses bit-identical to the cpu ranks'; plan vs held $p"
done

# tied embeddings: their gradient is written in forward (the head) and in backward: a resident edge buffer
# (untied ones, as in the jobs above, share the layer bucket)
"$BIN" init-model --family llama --layers 2 --dim 64 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 3 --tied \
  --out "$T/tied_model" >/dev/null
both 2 tied "model.path=$T/tied_model"
close "$T/tied/metrics.jsonl" "$T/tied_c/metrics.jsonl" 0 1 6 >/dev/null || fail "tied: device vs cpu stage 2 differ"
p=$(plan_true 2 tied) || fail "tied 2 ranks: the plan's step total is not the device memory held"
echo "stage 2 with tied embeddings on 2 fake device ranks: losses bit-identical to the cpu ranks'; plan vs held $p"
unset FAKEDEV_REPORT_MEM

# checkpoint at step 3 on 2 device ranks, resumed on 3 device ranks and on 1 cpu rank
job full 6 3 2 sharding.stage=2 checkpoint.every_steps=3 train.schedule=constant
dev 2 full
ck="$T/full/checkpoints/step-00000003.h5"
[ -f "$ck" ] || fail "no checkpoint at step 3: $(ls "$T/full/checkpoints")"
job r3 6 2 2 sharding.stage=2 checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
dev 3 r3
a=$(close "$T/r3/metrics.jsonl" "$T/full/metrics.jsonl" 1e-6 4 6) || fail "resumed on 3 device ranks: steps 4-6 differ"
job r1 6 6 2 sharding.stage=2 checkpoint.every_steps=0 train.schedule=constant "resume=$ck"
[ "$(train 1 r1)" = 0 ] || fail "resume on 1 cpu rank: $(cat "$T/r1.err")"
b=$(close "$T/r1/metrics.jsonl" "$T/full/metrics.jsonl" 1e-6 4 6) || fail "resumed on 1 cpu rank: steps 4-6 differ"
echo "device stage-2 checkpoint (2 ranks, step 3) resumed on 3 device ranks ($a) and 1 cpu rank ($b): steps 4-6 equal (1e-6)"

# one stream wait removed: the checker must catch it (1: a bucket's reuse, 2: the end of backward)
job race 2 3 2 sharding.stage=2 "${common[@]}"
for k in 1 2; do
  set +e
  NCCL_FAKE_DROP_EVENT=$k mpirun --oversubscribe -np 2 -x NCCL_FAKE_DROP_EVENT "$FAKE" --guard "$T/race.yaml" $(cat "$T/race.args") \
    >"$T/race$k.out" 2>"$T/race$k.err"; rc=$?
  set -e
  [ $rc != 0 ] && grep -q "stream order violated" "$T/race$k.err" ||
    fail "a removed stream wait (wait $k for a mark) went unnoticed (exit $rc): $(tail -5 "$T/race$k.err")"
  echo "wait $k for a reduction's mark removed: the stream-order checker fails the run ($(grep -m1 -o "stream order violated: [^(]*" "$T/race$k.err"))"
done
