#!/usr/bin/env bash
# test_zero3_device_qlora.sh — QLoRA at sharding.stage 3 on a device backend (worker/comm_zero3_dev.c qz_*),
# run by `shardtune train` on tests/tools/fakedev --guard (device-style memory: every copy and checked kernel
# operand, qmatmul's codes and scales included, must be a device allocation; several ranks go through the
# fake NCCL, whose stream-order checks fail the run). Each rank keeps its 1/N of the quantized bytes (codes,
# absmax, double-quantization data), a layer's bytes are gathered with its group (prefetched) and read by the
# fused qmatmul; the adapters are the trainable shard.
#  1. NF4 + double quantization (fp32), int8 without double quantization (bf16 with activation
#     checkpointing), NF4 under bf16 and DoRA, on 2 ranks, 6 steps: losses bit-identical to the CPU ranks'
#     stage 3 of the same job (the same kernels on the same bytes: fakedev's qmatmul is the CPU twin, and a
#     sum of two is the same in either order) and final/ (the peft adapter directory) byte-identical;
#     NF4 on 3 ranks (uneven shards of the bytes too) within 1e-6 relative (NCCL and MPI may associate a sum
#     of three differently: a few ulp per step, as test_zero3_device_peft.sh's LoRA on 3 ranks);
#  2. the planner is true for it: `shardtune plan --json` with backend=cuda gives each rank's step total equal
#     to the device bytes fakedev held at step boundaries (1%), NF4 fp32 and int8 bf16 on 2 ranks, and the
#     peak exceeds it only by the trainer's MFU probe (the load, each rank quantizing only its words of the codes,
#     coordinator/trainer/train_qload.c, stays under that; test_zero3_device_qload.sh compares it with the whole
#     load);
#  3. a run checkpointed at step 3 on 2 device ranks resumes on 3 device ranks and on 1 CPU rank: steps 4-6
#     equal the uninterrupted device run within 1e-6 relative, and final/ equals its final/ within the same
#     bound (the adapters' values: a resumed run reduces in another order);
#     the unfused path (SHARDTUNE_QLORA_FUSED=0: the one-unit scratch a device buffer of the communicator's)
#     the same on 2 ranks, holding exactly the planned scratch more device bytes than the fused run, which has
#     none;
#  4. the fake NCCL's stream-order checker sees qmatmul read the gathered bytes: with a layer's bytes enqueued
#     after the mark its acquire waits for (SHARDTUNE_ZERO3_DEV_FAULT=qz-late) the run fails with a violation.
source "$(dirname "${BASH_SOURCE[0]}")/ckpt_lib.sh"
source "$(dirname "${BASH_SOURCE[0]}")/fakedev_lib.sh"

q=(finetune.mode=qlora "finetune.lora.targets=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]")

export FAKEDEV_REPORT_MEM=1
cmp_cpu_adapter 2 nf4 0 "${q[@]}"
p=$(plan_true 2 nf4) || fail "nf4 2 ranks: the plan is not the device memory held"
echo "  plan step total vs device bytes held between steps: $p relative (1%)"
cmp_cpu_adapter 2 i8bf 0 "${q[@]}" finetune.qlora.quant=int8 finetune.qlora.double_quant=false precision=bf16 \
  memory.activation_checkpointing=true
p=$(plan_true 2 i8bf) || fail "int8 bf16 2 ranks: the plan is not the device memory held"
echo "  plan step total vs device bytes held between steps: $p relative (1%)"
# the unfused path (SHARDTUNE_QLORA_FUSED=0, both sides): the one-unit scratch is the communicator's device
# buffer; the fused runs above have none, so this run holds exactly the scratch more than nf4 (the same job)
export SHARDTUNE_QLORA_FUSED=0
cmp_cpu_adapter 2 unf 0 "${q[@]}"
p=$(plan_true 2 unf) || fail "unfused nf4 2 ranks: the plan is not the device memory held"
unset SHARDTUNE_QLORA_FUSED
echo "  plan step total vs device bytes held between steps: $p relative (1%)"
python3 - "$T/nf4.out" "$T/unf.out" "$T/nf4.plan" "$T/unf.plan" <<'PY' || fail "unfused vs fused device bytes"
import json, re, sys
held = lambda f: {int(m.group(1)): int(m.group(2)) for m in
                  re.finditer(r"fakedev device bytes: rank (\d+) peak \d+ between steps (\d+)", open(f).read())}
tot = lambda f: {r["rank"]: r["bytes"]["total"] for r in json.load(open(f))["stages"][0]["ranks"]}
fz, uz, fp, up = held(sys.argv[1]), held(sys.argv[2]), tot(sys.argv[3]), tot(sys.argv[4])
for r in fz:  # the scratch: the largest matmul unit (gate + up: 2 x d_ff x d_model fp32 floats) or q/k/v
    assert uz[r] - fz[r] == up[r] - fp[r] > 0, (r, uz[r] - fz[r], up[r] - fp[r])
print(f"  unfused holds {uz[0] - fz[0]} device bytes more per rank (its scratch), as planned")
PY
unset FAKEDEV_REPORT_MEM
cmp_cpu_adapter 2 dora 0 finetune.mode=qlora finetune.lora.dora=true precision=bf16 finetune.qlora.block=48
cmp_cpu_adapter 3 nf4r3 1e-6 "${q[@]}"

# checkpointed at step 3 on 2 device ranks, resumed on 3 device ranks and on 1 cpu rank
job kq 6 3 2 sharding.stage=3 checkpoint.every_steps=3 train.schedule=constant "${q[@]}"
dev 2 kq
ck="$T/kq/checkpoints/step-00000003.h5"
[ -f "$ck" ] || fail "no checkpoint at step 3: $(ls "$T/kq/checkpoints")"
job r3q 6 2 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck" "${q[@]}"
dev 3 r3q
a=$(close "$T/r3q/metrics.jsonl" "$T/kq/metrics.jsonl" 1e-6 4 6) || fail "resumed on 3 device ranks: steps 4-6 differ"
job r1q 6 6 2 sharding.stage=3 checkpoint.every_steps=0 train.schedule=constant "resume=$ck" "${q[@]}"
[ "$(train 1 r1q)" = 0 ] || fail "resume on 1 cpu rank: $(cat "$T/r1q.err")"
b=$(close "$T/r1q/metrics.jsonl" "$T/kq/metrics.jsonl" 1e-6 4 6) || fail "resumed on 1 cpu rank: steps 4-6 differ"
# final/: the same peft adapter (tensor names, shapes, config) with values within the losses' bound
"$PY" - "$T/kq/final" "$T/r3q/final" "$T/r1q/final" <<'PY' || fail "final/ of the resumed runs differs"
import json, struct, sys
def tensors(d):
    raw = open(d + "/adapter_model.safetensors", "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", (k, v["dtype"])
        a, b = v["data_offsets"]
        out[k] = (v["shape"], struct.unpack(f"<{(b - a) // 4}f", raw[8 + n + a:8 + n + b]))
    return out, json.load(open(d + "/adapter_config.json"))
ref, cfg = tensors(sys.argv[1])
for d in sys.argv[2:]:
    got, gcfg = tensors(d)
    assert gcfg == cfg, d
    assert set(got) == set(ref), (d, sorted(set(got) ^ set(ref)))
    for k, (shape, vals) in ref.items():
        assert got[k][0] == shape, (d, k)
        scale = max(1e-3, max(abs(v) for v in vals))
        worst = max(abs(x - y) for x, y in zip(got[k][1], vals)) / scale
        assert worst <= 1e-5, f"{d}: {k} differs by {worst:.3g} of its largest value"
PY
echo "qlora: device stage-3 checkpoint (2 ranks, step 3) resumed on 3 device ranks ($a) and 1 cpu rank ($b): steps 4-6 equal (1e-6), final/ equal (1e-5 of each tensor's largest value)"

# the gathered bytes are read by qmatmul only after the compute stream waited for them: a late gather is caught
# (adapters on layer 0 only: layer 1's acquire waits for its base's mark alone, no adapter mark after the bytes)
job qlate 2 3 1 sharding.stage=3 "${common[@]}" "${q[@]}" finetune.lora.layers=0
args=(); mapfile -t args < <(grep . "$T/qlate.args")
set +e
SHARDTUNE_ZERO3_DEV_FAULT=qz-late mpirun --oversubscribe -np 2 -x SHARDTUNE_ZERO3_DEV_FAULT "$FAKE" --guard \
  "$T/qlate.yaml" "${args[@]}" >"$T/qlate.out" 2>"$T/qlate.err"
rc=$?
set -e
[ $rc != 0 ] && grep -q "qmatmul read the output of a queued collective" "$T/qlate.out" "$T/qlate.err" ||
  fail "a quantized-bytes gather after its mark was not caught (rc $rc): $(tail -3 "$T/qlate.err")"
echo "qz-late fault: qmatmul reading bytes of a queued gather caught by the stream-order checker"
