"""A resume of full / frozen / progressive below ZeRO-3 reads the checkpoint's weights into the model's own storage
(coordinator/trainer/train_ckpt.c in_place, checkpoints/ckpt_read.c st_ckpt_check_model / _in_place) and the
moments into the optimizer's: bit for bit the resume through a whole image (SHARDTUNE_RESUME_IMAGE=1).

Each case trains to step 2 (a checkpoint), then resumes to step 4 twice, once each way, in copies of the run:
fp32 and bf16 (frozen layers held in bf16 only), ZeRO 0/1/2, 1-3 ranks, at another world size and another ZeRO
stage, and a progressive run across its stage change; losses, every checkpoint's datasets and attributes and final/
must be identical. A checkpoint with a model tensor changed behind its checksum must fail both ways with the same
message, and a checkpoint whose tensor has another shape too.
"""
import os
import shutil
import subprocess
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402

IMAGE = {"SHARDTUNE_RESUME_IMAGE": "1"}
TEXTS = {"full": "finetune: { mode: full }\n",
         "frozen": 'finetune: { mode: frozen, train_layers: "-1" }\n',
         "progressive": ('finetune: { mode: progressive, stages: [ {at_step: 0, train_layers: "-1"}, '
                         '{at_step: 2, train_layers: "-3"} ] }\n'),
         # layer 2 trained, then frozen: its checkpoint values are not bf16, so they get their fp32 place back
         "shrinking": ('finetune: { mode: progressive, stages: [ {at_step: 0, train_layers: "-2"}, '
                       '{at_step: 2, train_layers: "-1"} ] }\n')}
# (mode, precision, (ranks, ZeRO) of the first run, (ranks, ZeRO) of the resume)
CASES = [("full", "fp32", (1, 0), (1, 0)),
         ("full", "bf16", (2, 2), (3, 1)),
         ("frozen", "bf16", (2, 1), (3, 1)),
         ("frozen", "fp32", (3, 0), (2, 2)),
         ("progressive", "bf16", (2, 2), (2, 2)),
         ("progressive", "fp32", (1, 0), (2, 1)),
         ("shrinking", "bf16", (2, 1), (1, 0))]


def main():
    t0 = time.time()
    root = dp.tmpdir("st_resume_in_place_")
    try:
        f32 = dp.init_model(os.path.join(root, "f32"), "llama", 4, dim=64, heads=4, kv=2, vocab=256, max_seq=64)
        b16 = fb.to_bf16_dir(f32, os.path.join(root, "b16"))
        data = dp.make_dataset(os.path.join(root, "a.h5"), 256, 200, seed=1)
        common = ["train.steps=4", "train.seq_len=16", "train.micro_batch=4", "train.schedule=constant",
                  "train.warmup_steps=0", "checkpoint.every_steps=2", "checkpoint.keep_last=5"]
        for mode, prec, first, second in CASES:
            model = b16 if prec == "bf16" else f32
            job = dp.write_job(os.path.join(root, f"{mode}_{prec}.yaml"), model, os.path.join(root, "x"),
                               [{"name": "a", "path": data}], TEXTS[mode])
            ov = common + [f"precision={prec}"]
            stop = 4 if mode == "shrinking" else 2  # the checkpoint resumed from: in the last stage
            total = stop + 2
            dirs = {}
            for name, env in (("image", IMAGE), ("in_place", {})):
                rd = os.path.join(root, f"{mode}_{prec}_{name}")
                fb.run(job, first[0], ov + [f"sharding.stage={first[1]}", f"run_dir={rd}", f"train.steps={stop}"])
                fb.run(job, second[0], ov + [f"sharding.stage={second[1]}", f"run_dir={rd}", f"train.steps={total}"], env)
                dirs[name] = rd
            n = fb.same_run(dirs["image"], dirs["in_place"], f"{mode} {prec}")
            print(f"  {mode} {prec}: {first[0]} rank(s) ZeRO-{first[1]} -> {second[0]} rank(s) ZeRO-{second[1]}: "
                  f"losses, {n} checkpoints, final/ identical")
        corrupt(root, f32, data, common)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_resume_in_place: OK ({time.time() - t0:.1f} s)")


def failing(job, ranks, ov, env):
    """The resume's one error line (it must fail)."""
    env = dict(dp.ENV, **env)
    args = ["mpirun", "--oversubscribe", "-np", str(ranks), dp.BIN, "train", job] + ov
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0, f"{' '.join(args)} succeeded\n{r.stdout}\n{r.stderr}"
    lines = [x for x in r.stderr.splitlines() if "checkpoint" in x and "shardtune" in x]
    assert lines, r.stderr
    return lines[-1]


def corrupt(root, f32, data, common):
    job = dp.write_job(os.path.join(root, "corrupt.yaml"), f32, os.path.join(root, "x"),
                       [{"name": "a", "path": data}], TEXTS["frozen"])
    rd = os.path.join(root, "corrupt")
    fb.run(job, 2, common + [f"run_dir={rd}", "train.steps=2", "sharding.stage=1"])
    ck = os.path.join(rd, "checkpoints", sorted(x for x in os.listdir(os.path.join(rd, "checkpoints"))
                                                 if x.endswith(".h5"))[-1])
    for what in ("checksum", "shape"):
        with h5py.File(ck, "r+") as f:
            name = "model/" + sorted(k for k in f["model"].keys())[1]
            if what == "checksum":
                x = f[name][()]
                x.flat[len(x.flat) // 2] += np.float32(1.0)  # the stored checksum no longer fits
                f[name][...] = x
            else:
                attrs = dict(f[name].attrs)
                x = f[name][()]
                del f[name]
                f[name] = np.zeros((x.shape[0] + 1,) + x.shape[1:], np.float32)
                for k, v in attrs.items():
                    f[name].attrs[k] = v
        ov = common + ["sharding.stage=1", f"run_dir={rd}", f"resume={ck}"]
        a, b = failing(job, 2, ov, IMAGE), failing(job, 2, ov, {})
        assert a == b, f"{what}: the messages differ\n{a}\n{b}"
        assert ("fails its checksum" if what == "checksum" else "has shape") in a, a
        print(f"  corrupted checkpoint ({what}): the same message both ways: {a}")


if __name__ == "__main__":
    main()
