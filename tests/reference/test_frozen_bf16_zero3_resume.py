"""Resumes at another world size with frozen weights held in bf16 only at CPU ZeRO-3 (test_frozen_bf16_zero3.py).

A LoRA run stopped at step 2 on 2 ranks at ZeRO-3 and resumed on 3 (the checkpoint's adapter_base_checksum checked
against the base gathered from the ranks' bf16 parts), and a progressive run stopped at its stage boundary on 2
ranks at ZeRO-2 and resumed on 3 at ZeRO-3 (the stage change on resume: held layers become trainable, widened
from the gathered bf16 tensors): final/ byte for byte, every dataset and attribute of the last checkpoint and the
losses equal to the same two runs with SHARDTUNE_FROZEN_FP32=1 (every fp32 copy kept); the resumed ranks' parts
held in bf16 only add up to the floats computed from the safetensors file.
"""
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402
import test_frozen_bf16_zero3 as z3  # noqa: E402


def main():
    t0 = time.time()
    root = dp.tmpdir("st_frozen_bf16_z3r_")
    try:
        b16, jobs, common, want = z3.setup(root)
        # resumes at another world size, each against the same resume with every fp32 copy kept
        for mode, first, second in (("lora", (2, ["sharding.stage=3"]), (3, ["sharding.stage=3"])),
                                    ("progressive", (2, ["sharding.stage=2"]), (3, ["sharding.stage=3"]))):
            dirs = {}
            for name, env in (("keep", fb.KEEP), ("new", {})):
                rd = os.path.join(root, f"res_{mode}_{name}")
                fb.run(jobs[mode], first[0], common + first[1] + [f"run_dir={rd}", "train.steps=2"], env)
                held = fb.run(jobs[mode], second[0], common + second[1] + [f"run_dir={rd}"], env)
                if name == "new":
                    s = max(s for _, s in held)
                    assert z3.held_sum(held, s) == want[mode][s], f"resumed {mode}: {held}"
                dirs[name] = rd
            a, b = dirs["keep"], dirs["new"]
            for name in sorted(os.listdir(os.path.join(a, "final"))):
                assert open(os.path.join(a, "final", name), "rb").read() == \
                    open(os.path.join(b, "final", name), "rb").read(), f"resumed {mode}: final/{name} differs"
            last = sorted(x for x in os.listdir(os.path.join(a, "checkpoints")) if x.endswith(".h5"))[-1]
            ia = dp.h5_items(os.path.join(a, "checkpoints", last))
            ib = dp.h5_items(os.path.join(b, "checkpoints", last))
            ia.pop("@job_spec", None)
            ib.pop("@job_spec", None)
            assert ia == ib, f"resumed {mode}: {last} differs: {[k for k in ia if ia[k] != ib.get(k)][:5]}"
            la = [(m.get("step"), m.get("loss")) for m in dp.losses(a)]
            assert la == [(m.get("step"), m.get("loss")) for m in dp.losses(b)], f"resumed {mode}: losses"
            print(f"  {mode} resumed {first[0]} ranks {first[1][0]} -> {second[0]} ranks ZeRO-3: final/, {last}, "
                  f"losses identical")

    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_frozen_bf16_zero3_resume: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
