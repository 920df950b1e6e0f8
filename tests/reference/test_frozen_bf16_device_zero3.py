"""Frozen weights of a bf16 source held once, in bf16, at device ZeRO-3 (issue #17; worker/comm_zero3_dev.c
st_z3dev_hold_bf16).

As tests/reference/test_frozen_bf16_zero3.py (same bf16 Llama model, jobs and held floats), on the fake device
(tests/tools/fakedev.c --guard: the CUDA backend's code paths, every copy and kernel operand checked against the
tagged device allocations, several ranks through the fake NCCL, whose bf16 all-gather is new here). Every job runs
twice, as shipped and with SHARDTUNE_FROZEN_FP32=1 (every rank's frozen shard kept in fp32 and gathered as fp32: the
layout before). The two must agree exactly: the losses, every dataset and attribute of every checkpoint (h5py, incl.
adapter_base_checksum: summed from the slots' widened bf16 values), final/ byte for byte (mode frozen's whole model
gathered from the ranks' bf16 parts, widened). Cases: LoRA on 2 ranks, mode frozen on 3, progressive on 2 crossing
its stage change (the shards re-cut from the gathered whole weights, then held again), prompt tuning on 2; resumes at
another world size: LoRA 2 -> 3 ranks and mode frozen 3 -> 2 (the parts widened back into their fp32 places, written,
held again), each equal to the same resume under SHARDTUNE_FROZEN_FP32=1. Each rank's report
(SHARDTUNE_REPORT_LOAD_RSS=1) names the floats of its parts held in bf16 only: they sum to the floats computed from
the safetensors file; the device bytes held between steps (FAKEDEV_REPORT_MEM=1) fall by exactly 2 bytes per such
float on every rank, and so do the plan's (`shardtune plan backend=cuda`, per rank, against the plan under
SHARDTUNE_FROZEN_FP32=1).
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402
import test_frozen_bf16_device as fbd  # noqa: E402
import test_frozen_bf16_zero3 as z3  # noqa: E402

FAKE = fbd.FAKE


def run(job, ranks, ov, env_extra=None):
    """A guarded fakedev run: ({(rank, stage): floats held in bf16 only}, {rank: device bytes between steps})."""
    return fbd.run(job, ranks, ov, env_extra, stage=None)


def main():
    t0 = time.time()
    if not os.access(FAKE, os.X_OK):
        print(f"no {FAKE} (tests/tools/fakedev.c not built)")
        sys.exit(1)
    root = dp.tmpdir("st_frozen_bf16_dz3_")
    try:
        b16, jobs, common, want = z3.setup(root)
        cases = [("lora", 2, []), ("frozen", 3, []), ("progressive", 2, []), ("prompt", 2, [])]
        for mode, ranks, more in cases:
            tag = f"{mode} on {ranks} fake devices at ZeRO-3"
            ov = common + more
            ref, new = os.path.join(root, f"ref_{mode}"), os.path.join(root, f"new_{mode}")
            held_ref, dev_ref = run(jobs[mode], ranks, ov + [f"run_dir={ref}"], fb.KEEP)
            held, dev = run(jobs[mode], ranks, ov + [f"run_dir={new}"])
            assert set(held_ref.values()) == {0}, f"{tag}: SHARDTUNE_FROZEN_FP32=1 held some in bf16 only: {held_ref}"
            for s in want[mode]:
                assert z3.held_sum(held, s) == want[mode][s], f"{tag}: stage {s} held {held}, want {want[mode][s]}"
            last = max(s for _, s in held)
            saved = [dev_ref[r] - dev[r] for r in range(ranks)]
            assert saved == [2 * held[(r, last)] for r in range(ranks)], \
                f"{tag}: device bytes between steps {dev_ref} -> {dev}, held {held}"
            k = fb.same_run(ref, new, tag)
            line = f"  {tag}: {want[mode]} floats in bf16 only, device bytes {saved} less; {k} checkpoints, final/, " \
                   "losses"
            if mode in ("lora", "frozen"):  # the plan: per rank, the same saving
                pov = ov + ["backend=cuda"]
                p_ref = fbd.plan_weights(jobs[mode], ranks, pov, fb.KEEP)
                p_new = fbd.plan_weights(jobs[mode], ranks, pov, {})
                assert [a - b for a, b in zip(p_ref, p_new)] == saved, \
                    f"{tag}: plan {p_ref} -> {p_new}, measured {saved}"
                line += ", plan"
            print(line + " identical")

        # resumes at another world size, each against the same resume with every fp32 copy kept
        for mode, first, second in (("lora", 2, 3), ("frozen", 3, 2)):
            dirs = {}
            for name, env in (("keep", fb.KEEP), ("new", {})):
                rd = os.path.join(root, f"res_{mode}_{name}")
                run(jobs[mode], first, common + [f"run_dir={rd}", "train.steps=2"], env)
                held, _ = run(jobs[mode], second, common + [f"run_dir={rd}"], env)
                if name == "new":
                    assert z3.held_sum(held, 0) == want[mode][0], f"resumed {mode}: {held}"
                dirs[name] = rd
            a, b = dirs["keep"], dirs["new"]
            k = fb.same_run(a, b, f"resumed {mode}")
            print(f"  {mode} resumed {first} -> {second} fake devices at ZeRO-3: {k} checkpoints, final/, losses "
                  f"identical")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_frozen_bf16_device_zero3: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
