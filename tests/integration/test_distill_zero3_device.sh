#!/usr/bin/env bash
# test_distill_zero3_device.sh — the distillation teacher at sharding.stage 3 on a device backend
# (worker/comm_zero3_teacher_dev.c: 1/N of its weights per rank in device memory, gathered a group at a time into
# device slots, the next group prefetched on the NCCL stream), run by `shardtune train` on tests/tools/fakedev
# --guard (device-style memory: a host buffer where device memory belongs fails the run; several ranks go
# through the fake NCCL, whose stream-order checks fail the run):
#  1. every step's loss, kd_loss and ce_loss equal the CPU ranks' stage 3 (worker/comm.h st_frozen_shard) bit
#     for bit: a GPT-2 teacher (tied head, wte held over the layers) and a Llama teacher (GQA, untied head) on 2
#     and on 3 ranks (there the student steps with lr 1e-30: three ranks' gradient sums may associate differently
#     under NCCL and MPI, test_zero3_device.sh, so the student is held still and each step's batch is new); bf16 (the slots' compute copy rounded from the gathered fp32 weights) on 2 ranks; int8
#     teachers (distill.teacher_dtype: int8: the packs made on the device per group, each rank keeping its share
#     of the pack space, the forward gathering a group's packs and unquantized weights), GPT-2 and Llama, on 2
#     and 3 ranks; a LoRA student with an fp32 and with an int8 teacher on 2 ranks;
#  2. a device run checkpointed at step 2 resumes on the same 2 device ranks: steps 3-4 bit-identical to the
#     uninterrupted run;
#  3. the planner is true for it: `shardtune plan --json` with backend=cuda gives each rank's step total (the
#     teacher's device shard and gather slots counted) equal to the device bytes fakedev saw held at step
#     boundaries within 1%, on 3 ranks fp32 (GPT-2 teacher), 2 ranks bf16 (Llama teacher) and 3 ranks int8 (Llama
#     teacher: the plan sizes the packs in the CUDA layout, fakedev holds the CPU kernels'; both small); and the plan's
#     teacher bytes differ between 2 and 3 ranks by the shard's ceil(n/2) - ceil(n/3) floats, to the byte;
#  4. the fake NCCL's stream-order checker sees the teacher's gathers: with the teacher's gather wait removed
#     (SHARDTUNE_ZERO3_DEV_FAULT=teacher-gather-wait) the run fails with a stream-order violation;
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"

"$BIN" init-model --family gpt2 --layers 3 --dim 96 --heads 4 --vocab 128 --max-seq 64 --seed 5 --out "$T/gt" >/dev/null
"$BIN" init-model --family llama --layers 3 --dim 96 --heads 4 --kv-heads 2 --vocab 128 --max-seq 64 --seed 9 \
  --out "$T/lt" >/dev/null

# same3 A.jsonl B.jsonl FIRST LAST: loss, kd_loss and ce_loss of steps FIRST..LAST equal bit for bit
same3() {
  python3 - "$@" <<'PY'
import json, sys
def rows(p):
    return {r["step"]: r for r in map(json.loads, open(p)) if "step" in r and "kd_loss" in r}
a, b, lo, hi = rows(sys.argv[1]), rows(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for s in range(lo, hi + 1):
    assert s in a and s in b, f"step {s} missing: {sorted(a)} {sorted(b)}"
    for k in ("loss", "kd_loss", "ce_loss"):
        assert a[s][k] == b[s][k], f"step {s} {k}: {a[s][k]!r} != {b[s][k]!r}"
    assert a[s]["kd_loss"] > 0, f"step {s}: the teacher is not used"
print(f"steps {lo}-{hi} bit-identical")
PY
}

kd() { echo "distill.teacher=$T/$1" distill.alpha=0.7 distill.temperature=2.0; }

# cmp_cpu NP NAME TEACHER [overrides]: device run NAME vs the CPU ranks' stage 3 of the same job, 4 steps
cmp_cpu() {
  local np=$1 name=$2 teacher=$3; shift 3
  local micro=$((6 / np))
  # shellcheck disable=SC2046
  job "$name" 4 "$micro" 2 sharding.stage=3 $(kd "$teacher") "${common[@]}" "$@"
  # shellcheck disable=SC2046
  job "c$name" 4 "$micro" 2 sharding.stage=3 $(kd "$teacher") "${common[@]}" "$@"
  dev "$np" "$name"
  [ "$(train "$np" "c$name")" = 0 ] || fail "$name: cpu stage 3 on $np ranks: $(cat "$T/c$name.err")"
  local d
  d=$(same3 "$T/$name/metrics.jsonl" "$T/c$name/metrics.jsonl" 1 4) || fail "$name ($np ranks): device vs cpu stage 3"
  echo "$name on $np fake device ranks ($teacher teacher): $d with the cpu ranks' stage 3"
}

cmp_cpu 2 g2 gt
cmp_cpu 2 l2 lt
# 3 ranks: the student's own gradient sums of three may associate differently (NCCL vs MPI, test_zero3_device.sh),
# so the student takes steps of lr 1e-30 (its weights stay bit for bit what they were): every step compares the
# teacher's part on a new batch, bit for bit
tiny=train.lr=1e-30
cmp_cpu 3 g3 gt $tiny
cmp_cpu 3 l3 lt $tiny
cmp_cpu 2 b2 lt precision=bf16 memory.activation_checkpointing=true
cmp_cpu 2 lora2 gt finetune.mode=lora
# int8 teachers: each group's packs made on the device from its gathered fp32 weights, each rank keeping its
# share of the pack space; the forward gathers a group's packs and its unquantized fp32 weights
cmp_cpu 2 gi2 gt distill.teacher_dtype=int8
cmp_cpu 2 li2 lt distill.teacher_dtype=int8
cmp_cpu 3 gi3 gt distill.teacher_dtype=int8 $tiny
cmp_cpu 3 li3 lt distill.teacher_dtype=int8 $tiny
cmp_cpu 2 lorai2 lt distill.teacher_dtype=int8 finetune.mode=lora

# checkpoint at step 2 on 2 device ranks, resumed on 2 device ranks
# shellcheck disable=SC2046
job full 4 3 2 sharding.stage=3 $(kd gt) train.schedule=constant checkpoint.every_steps=2
dev 2 full
ck="$T/full/checkpoints/step-00000002.h5"
[ -f "$ck" ] || fail "no checkpoint at step 2: $(ls "$T/full/checkpoints")"
# shellcheck disable=SC2046
job res 4 3 2 sharding.stage=3 $(kd gt) train.schedule=constant checkpoint.every_steps=0 "resume=$ck"
dev 2 res
r=$(same3 "$T/res/metrics.jsonl" "$T/full/metrics.jsonl" 3 4) || fail "resumed on 2 device ranks: steps 3-4 differ"
echo "device stage-3 distillation checkpointed at step 2, resumed on 2 device ranks: $r with the run straight through"

# the planner: step totals against the device bytes held, and the teacher's bytes from its config
export FAKEDEV_REPORT_MEM=1
# shellcheck disable=SC2046
job pg3 4 2 2 sharding.stage=3 $(kd gt) "${common[@]}"
dev 3 pg3
p=$(plan_true 3 pg3) || fail "3 ranks: the plan's step total is not the device memory held"
echo "plan step total vs device bytes held between steps, 3 ranks fp32, GPT-2 teacher: $p relative (1%)"
# shellcheck disable=SC2046
job pl2 4 3 2 sharding.stage=3 $(kd lt) precision=bf16 "${common[@]}"
dev 2 pl2
p=$(plan_true 2 pl2) || fail "bf16 2 ranks: the plan's step total is not the device memory held"
echo "plan step total vs device bytes held between steps, 2 ranks bf16, Llama teacher: $p relative (1%)"
# shellcheck disable=SC2046
job pi3 4 2 2 sharding.stage=3 $(kd lt) distill.teacher_dtype=int8 "${common[@]}"
dev 3 pi3
p=$(plan_true 3 pi3) || fail "int8 3 ranks: the plan's step total is not the device memory held"
echo "plan step total vs device bytes held between steps, 3 ranks, int8 Llama teacher: $p relative (1%)"
unset FAKEDEV_REPORT_MEM
# the teacher's planned bytes: its shard ceil(n / world) floats counted exactly (the 2-rank plan minus the 3-rank
# plan of the same job), and on top of the shard at least two gather slots of the largest group
"$BIN" plan "$T/pg3.yaml" --ranks 2 backend=cuda $(cat "$T/pg3.args") --json >"$T/pg2.plan" || fail "plan on 2 ranks"
python3 - "$T/pg2.plan" "$T/pg3.plan" "$T/gt/model.safetensors" <<'PY' || fail "the teacher's planned bytes"
import json, sys
def teacher(p):
    t = {r["bytes"]["teacher"] for s in json.load(open(p))["stages"] for r in s["ranks"]}
    assert len(t) == 1, t
    return t.pop()
with open(sys.argv[3], "rb") as f:
    hdr = json.loads(f.read(int.from_bytes(f.read(8), "little")))
numel = {k: eval("*".join(map(str, v["shape"])) or "1") for k, v in hdr.items() if k != "__metadata__"}
n = sum(numel.values())
t2, t3 = teacher(sys.argv[1]), teacher(sys.argv[2])
want = 4 * ((n + 1) // 2 - (n + 2) // 3)
assert t2 - t3 == want, f"2-rank minus 3-rank teacher bytes {t2 - t3} != 4 x (ceil(n/2) - ceil(n/3)) = {want} (n {n})"
layer = max(v for k, v in numel.items() if k.startswith("h.0.")) # at least the largest tensor of a layer
assert t3 >= 4 * ((n + 2) // 3 + 3 * layer), (t3, n, layer)
print(f"teacher plan: 2 ranks {t2} bytes, 3 ranks {t3} bytes; the shard's difference {want} to the byte")
PY


# the stream-order checker sees the teacher's gathers: with its gather wait removed
# (SHARDTUNE_ZERO3_DEV_FAULT=teacher-gather-wait) the guarded run must report the race
# shellcheck disable=SC2046
job race 2 3 1 sharding.stage=3 $(kd gt) "${common[@]}"
set +e
SHARDTUNE_ZERO3_DEV_FAULT=teacher-gather-wait mpirun --oversubscribe -np 2 "$FAKE" --guard "$T/race.yaml" \
  $(cat "$T/race.args") >"$T/race.out" 2>"$T/race.err"; rc=$?
set -e
[ $rc != 0 ] && grep -q "stream order violated" "$T/race.err" ||
  fail "the teacher's missing gather wait was not caught (rc $rc): $(tail -3 "$T/race.err")"
echo "a teacher gather computed on without its wait: caught by the stream-order checker"
