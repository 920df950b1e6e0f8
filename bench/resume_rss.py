#!/usr/bin/env python3
"""resume_rss.py — the resume phase's measured peak RSS, whole-image resume (SHARDTUNE_RESUME_IMAGE=1) against the
in-place one (coordinator/trainer/train_ckpt.c), with the planner's resume column for both. A Llama 4 x 256 model,
vocab 32000, bf16 source, `frozen` training the top layer (3 of 4 layers, the embedding and the head held in bf16
only), 1 rank ZeRO-1, micro_batch 1 x seq 32: trains to step 2 (a checkpoint), then resumes to step 4; the
trainer's SHARDTUNE_REPORT_LOAD_RSS=1 line gives ru_maxrss before and after the resume (rank 0 under mpirun). Rounds alternate the two
paths; the losses of both must agree. Runs with the system python (numpy, h5py), from the repository root:

  python3 bench/resume_rss.py [--build build] [--rounds 2]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--build", default="build")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("SHARDTUNE_BIN", os.path.abspath(os.path.join(a.build, "shardtune")))
    sys.path.insert(0, os.path.join(HERE, "..", "tests", "reference"))
    import dp_common as dp
    import test_frozen_bf16 as fb
    root = tempfile.mkdtemp(prefix="st_resume_rss_")
    print("work dir", root)
    try:
        big = fb.to_bf16_dir(dp.init_model(os.path.join(root, "f32"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000,
                                           max_seq=128), os.path.join(root, "b16"))
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1)
        job = dp.write_job(os.path.join(root, "j.yaml"), big, os.path.join(root, "x"), [{"name": "a", "path": data}],
                           'finetune: { mode: frozen, train_layers: "-1" }\n')
        ov = ["train.micro_batch=1", "train.seq_len=32", "sharding.stage=1", "precision=bf16", "checkpoint.every_steps=2"]
        print("load average:", open("/proc/loadavg").read().split()[:3])
        losses = {}
        for name, env in (("image", {"SHARDTUNE_RESUME_IMAGE": "1"}), ("in_place", {})):
            r = subprocess.run([dp.BIN, "plan", job, "--ranks", "1"] + ov, env=dict(dp.ENV, **env), capture_output=True,
                               text=True, check=True)
            lines = r.stdout.splitlines()
            i = max(k for k, x in enumerate(lines) if x.split()[:1] == ["rank"] and x.rstrip().endswith("resume"))
            print(f"{name}: plan resume column {lines[i + 1].split()[-1]} MiB")
        for rnd in range(a.rounds):
            for name, env in (("image", {"SHARDTUNE_RESUME_IMAGE": "1"}), ("in_place", {})):
                rd = os.path.join(root, f"{name}{rnd}")
                for steps in (2, 4):
                    # through mpirun: a child of this python would inherit its peak RSS (ru_maxrss survives fork + exec)
                    r = subprocess.run(["mpirun", "-np", "1", dp.BIN, "train", job] + ov + [f"run_dir={rd}", f"train.steps={steps}"],
                                       env=dict(dp.ENV, SHARDTUNE_REPORT_LOAD_RSS="1", **env), capture_output=True,
                                       text=True)
                    assert r.returncode == 0, r.stderr
                m = re.search(r"rank 0: peak RSS before the resume (\d+) kB, after it (\d+) kB", r.stderr)
                b, e = int(m.group(1)) / 1024, int(m.group(2)) / 1024
                print(f"round {rnd} {name}: peak RSS before the resume {b:.1f} MiB, after it {e:.1f} MiB (+{e - b:.1f})")
                losses.setdefault(name, [(x.get("step"), x.get("loss")) for x in dp.losses(rd)])
        assert losses["image"] == losses["in_place"], losses
        print("losses identical:", losses["image"])
        print("load average:", open("/proc/loadavg").read().split()[:3])
    finally:
        if not os.environ.get("KEEP"): shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
