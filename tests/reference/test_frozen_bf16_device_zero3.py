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
another world size: LoRA 2 -> 3 ranks and mode frozen 3 -> 2, each equal to the same resume under
SHARDTUNE_FROZEN_FP32=1; the checkpoint's values of the parts held in bf16 only are written there straight
(train_ckpt.c held_exact: the device peak up to the end of the resume stays below the bytes between steps + 2 per
held float, what a frozen shard restored to fp32 adds). Each rank's report
(SHARDTUNE_REPORT_LOAD_RSS=1) names the floats of its parts held in bf16 only: they sum to the floats computed from
the safetensors file; the device bytes held between steps (FAKEDEV_REPORT_MEM=1) fall by exactly 2 bytes per such
float on every rank, and so do the plan's (`shardtune plan backend=cuda`, per rank, against the plan under
SHARDTUNE_FROZEN_FP32=1).
The load reads the BF16 file tensors of the parts it holds straight into bf16 (train_frozen16.c
st_trainer_z3_frozen_bf16, laid out so when the communicator is built): the device peak of the load (fakedev's peak
when the trainer first asks the status, right after its load) falls by 2 bytes a float held at the first stage on
every rank, and so does the plan's load phase (at_load). A source whose config says bfloat16 but whose file stores a
frozen tensor as F32 (one not bf16-exact: never held; one of bf16 values: held by the check after the load, not
read into bf16) gives the same results as SHARDTUNE_FROZEN_FP32=1, the load holding only the BF16 tensors in bf16.
"""
import os
import shutil
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402
import test_frozen_bf16_device as fbd  # noqa: E402
import test_frozen_bf16_zero3 as z3  # noqa: E402

FAKE = fbd.FAKE


def run(job, ranks, ov, env_extra=None, loads=None, peaks=None):
    """A guarded fakedev run: ({(rank, stage): floats held in bf16 only}, {rank: device bytes between steps});
    loads gets {rank: the load's device peak}, peaks {rank: the resume's (the load's when not resuming)}."""
    return fbd.run(job, ranks, ov, env_extra, stage=None, loads=loads, peaks=peaks)


def mixed_dir(f32, b16, dst, raw, wide):
    """b16 copied to dst (config still bfloat16) with tensor `raw` stored F32 from the fp32 model f32 (not
    bf16-exact) and tensor `wide` stored F32 with its bf16 values widened (exact)."""
    shutil.copytree(b16, dst)
    src = dp.read_safetensors(os.path.join(f32, "model.safetensors"))

    def pick(name, dtype, r):
        if name == raw:
            return "F32", np.ascontiguousarray(src[name], dtype="<f4").tobytes()
        if name == wide:
            return "F32", (np.frombuffer(r, dtype="<u2").astype("<u4") << 16).tobytes()
        return dtype, r
    fb.rewrite_safetensors(os.path.join(dst, "model.safetensors"), pick)
    return dst


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
            load_ref, load = {}, {}
            held_ref, dev_ref = run(jobs[mode], ranks, ov + [f"run_dir={ref}"], fb.KEEP, load_ref)
            held, dev = run(jobs[mode], ranks, ov + [f"run_dir={new}"], loads=load)
            assert set(held_ref.values()) == {0}, f"{tag}: SHARDTUNE_FROZEN_FP32=1 held some in bf16 only: {held_ref}"
            for s in want[mode]:
                assert z3.held_sum(held, s) == want[mode][s], f"{tag}: stage {s} held {held}, want {want[mode][s]}"
            last = max(s for _, s in held)
            saved = [dev_ref[r] - dev[r] for r in range(ranks)]
            assert saved == [2 * held[(r, last)] for r in range(ranks)], \
                f"{tag}: device bytes between steps {dev_ref} -> {dev}, held {held}"
            # the streamed load (every mode here, progressive too: train.c st_plan_streams) read the held parts
            # straight into bf16: its peak falls by as much (the first stage's parts)
            load_saved = [load_ref[r] - load[r] for r in range(ranks)]
            assert load_saved == [2 * held[(r, 0)] for r in range(ranks)], \
                f"{tag}: the load's device peak {load_ref} -> {load}, held {held}, between {dev_ref} -> {dev}"
            k = fb.same_run(ref, new, tag)
            line = f"  {tag}: {want[mode]} floats in bf16 only, device bytes {saved} less, load peak {load_saved} " \
                   f"less; {k} checkpoints, final/, losses"
            if mode in ("lora", "frozen"):  # the plan: per rank, the same saving
                pov = ov + ["backend=cuda"]
                p_ref = fbd.plan_weights(jobs[mode], ranks, pov, fb.KEEP)
                p_new = fbd.plan_weights(jobs[mode], ranks, pov, {})
                assert [a - b for a, b in zip(p_ref, p_new)] == saved, \
                    f"{tag}: plan {p_ref} -> {p_new}, measured {saved}"
                l_ref, l_new = (fbd.plan_weights(jobs[mode], ranks, pov, e, "at_load") for e in (fb.KEEP, {}))
                assert [a - b for a, b in zip(l_ref, l_new)] == load_saved, \
                    f"{tag}: plan's load {l_ref} -> {l_new}, measured {load_saved}"
                line += ", plan (step and load)"
            elif mode == "progressive":  # the plan's load phase (the first stage's parts): the same saving
                pov = ov + ["backend=cuda"]
                l_ref, l_new = (fbd.plan_weights(jobs[mode], ranks, pov, e, "at_load") for e in (fb.KEEP, {}))
                assert [a - b for a, b in zip(l_ref, l_new)] == load_saved, \
                    f"{tag}: plan's load {l_ref} -> {l_new}, measured {load_saved}"
                line += ", plan (load)"
            print(line + " identical")

        # a bf16 config whose file stores two frozen tensors as F32: one not bf16-exact (never held), one of
        # bf16 values (held by the check after the load); the load holds the BF16 ones only
        raw, wide = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
        mixed = mixed_dir(os.path.join(root, "f32"), b16, os.path.join(root, "mixed"), raw, wide)
        t = dp.read_safetensors(os.path.join(mixed, "model.safetensors"))
        mjob = dp.write_job(os.path.join(root, "mixed.yaml"), mixed, os.path.join(root, "x"),
                            [{"name": "a", "path": os.path.join(root, "a.h5")}], z3.FROZEN)  # z3.setup's data
        ref, new = os.path.join(root, "ref_mixed"), os.path.join(root, "new_mixed")
        load_ref, load = {}, {}
        held_ref, _ = run(mjob, 3, common + [f"run_dir={ref}"], fb.KEEP, load_ref)
        held, _ = run(mjob, 3, common + [f"run_dir={new}"], loads=load)
        assert set(held_ref.values()) == {0}, f"mixed source, SHARDTUNE_FROZEN_FP32=1: {held_ref}"
        assert z3.held_sum(held, 0) == want["frozen"][0] - t[raw].size, f"mixed source: held {held}"
        load_saved = [load_ref[r] - load[r] for r in range(3)]
        assert sum(load_saved) == 2 * (z3.held_sum(held, 0) - t[wide].size), \
            f"mixed source: the load's device peak {load_ref} -> {load}, held {held}"
        k = fb.same_run(ref, new, "mixed source")
        print(f"  frozen on 3 fake devices, {raw} F32 (not held), {wide} F32 of bf16 values (held after the load): "
              f"load peak {load_saved} less; {k} checkpoints, final/, losses identical")

        # resumes at another world size, each against the same resume with every fp32 copy kept
        for mode, first, second in (("lora", 2, 3), ("frozen", 3, 2)):
            dirs = {}
            for name, env in (("keep", fb.KEEP), ("new", {})):
                rd = os.path.join(root, f"res_{mode}_{name}")
                run(jobs[mode], first, common + [f"run_dir={rd}", "train.steps=2"], env)
                peaks = {}
                held, dev = run(jobs[mode], second, common + [f"run_dir={rd}"], env, peaks=peaks)
                if name == "new":
                    assert z3.held_sum(held, 0) == want[mode][0], f"resumed {mode}: {held}"
                    # the checkpoint's values went straight into the bf16 parts: the frozen shard was never
                    # whole in fp32 again (that alone would add 2 bytes a held float to the bytes between steps)
                    assert all(peaks[r] - dev[r] < 2 * held[(r, 0)] for r in range(second)), \
                        f"resumed {mode}: device peak {peaks}, between steps {dev}, held {held}"
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
