"""A progressive stage change at device ZeRO-3 (worker/comm_zero3_dev.c st_z3dev_detach / st_z3dev_reshard /
st_z3dev_move_moments: the old master shards and moments moved to their new owners in pieces of one gather slot,
no whole weights, no whole moments) against the path before (SHARDTUNE_ZERO3_RESHARD=whole: the whole old moments
gathered on every rank, the whole weights all-gathered into one device buffer, the new shards cut from them), on
the fake device (tests/tools/fakedev --guard: device-style memory, the fake NCCL's stream-order checks with
several ranks). Both only copy values, so the runs must agree exactly: every dataset and attribute of every
checkpoint (h5py), final/ byte for byte, the losses (test_frozen_bf16.same_run).

Cases: unfreeze_every 2 over 7 steps (three stage changes) on 1, 2 and 3 ranks in fp32 and in bf16, and over 5 steps on 1 rank (final/ written
with layers still frozen); by stages
(layer_lr_decay: parameters both frozen -> trainable and kept trainable at new offsets) on 3 ranks; a resume at
another world size across the changes (checkpoints at steps 2 and 4 of the 3-rank fp32 run, resumed on 2 ranks
under each path). The device bytes each path held at its peak (FAKEDEV_REPORT_MEM=1) are printed for a larger
model: numbers, not assertions, beyond the moved path not exceeding the whole one.
"""
import os
import re
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402
import test_frozen_bf16 as fb  # noqa: E402

FAKE = os.path.join(os.path.dirname(os.path.abspath(dp.BIN)), "fakedev")
WHOLE = {"SHARDTUNE_ZERO3_RESHARD": "whole"}
UNFREEZE = "finetune: { mode: progressive, unfreeze_every: 2 }\n"
STAGES = ('finetune: { mode: progressive, layer_lr_decay: 0.8, stages: [ {at_step: 0, train_layers: "-1"},'
          ' {at_step: 3, train_layers: "-2"}, {at_step: 5, train_layers: "all"} ] }\n')


def dev(job, ranks, ov, env_extra=None):
    """A guarded fakedev run; returns each rank's peak device bytes (FAKEDEV_REPORT_MEM=1)."""
    env = dict(dp.ENV, FAKEDEV_REPORT_MEM="1", **(env_extra or {}))
    args = ["mpirun", "--oversubscribe", "-np", str(ranks), FAKE, "--guard", job] + ov
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    bad = [x for x in r.stderr.splitlines() if "fakedev (rank" in x or "stream order violated" in x]
    assert not bad, f"{' '.join(args)}: {bad[:3]}"
    peaks = {int(m.group(1)): int(m.group(2)) for m in re.finditer(r"fakedev device bytes: rank (\d+) peak (\d+)", r.stdout)}
    assert len(peaks) == ranks, r.stdout
    return peaks


def pair(root, tag, job, ranks, ov):
    """The job under both paths; returns the whole-path run dir and both peaks."""
    a, b = os.path.join(root, tag + "_whole"), os.path.join(root, tag + "_moved")
    pa = dev(job, ranks, ov + [f"run_dir={a}"], WHOLE)
    pb = dev(job, ranks, ov + [f"run_dir={b}"])
    k = fb.same_run(a, b, tag)
    print(f"  {tag}: {k} checkpoints, final/, losses identical")
    return a, pa, pb


def main():
    assert os.access(FAKE, os.X_OK), f"no {FAKE}"
    t0 = time.time()
    root = dp.tmpdir("st_zero3_reshard_dev_")
    try:
        model = dp.init_model(os.path.join(root, "m"), "llama", 3, dim=64, vocab=256, max_seq=64)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 256, 200, seed=1)
        tasks = [{"name": "a", "path": data}]
        uf = dp.write_job(os.path.join(root, "uf.yaml"), model, os.path.join(root, "x"), tasks, UNFREEZE)
        st = dp.write_job(os.path.join(root, "st.yaml"), model, os.path.join(root, "x"), tasks, STAGES)
        ov = ["train.steps=7", "train.seq_len=16", "checkpoint.every_steps=2", "checkpoint.keep_last=5",
              "sharding.stage=3", "train.micro_batch=6"]
        ck3 = None
        for prec in ("fp32", "bf16"):
            for ranks in (1, 2, 3):
                ref, _, _ = pair(root, f"unfreeze_every {prec} {ranks} ranks", uf, ranks, ov + [f"precision={prec}"])
                if ranks == 3 and prec == "fp32":
                    ck3 = ref
        pair(root, "stages fp32 3 ranks", st, 3, ov)
        # ending in a stage with frozen layers on 1 rank: final/ reads the frozen parts through part_base
        pair(root, "unfreeze_every fp32 1 rank, 5 steps", uf, 1, ov + ["train.steps=5"])
        for at in (2, 4):
            ck = os.path.join(ck3, "checkpoints", f"step-{at:08d}.h5")
            pair(root, f"unfreeze_every resumed from step {at} (3 -> 2 ranks)", uf, 2, ov + [f"resume={ck}"])
        # the device bytes at the peak on a model large enough that its stage changes, not the trainer's MFU probe
        # (12 MiB), set the peak
        big = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=256, vocab=4096, max_seq=64)
        d4k = dp.make_dataset(os.path.join(root, "b.h5"), 4096, 100, seed=1)
        bj = dp.write_job(os.path.join(root, "big.yaml"), big, os.path.join(root, "x"), [{"name": "a", "path": d4k}], UNFREEZE)
        bov = ["train.steps=5", "train.seq_len=16", "train.micro_batch=4", "checkpoint.every_steps=0", "sharding.stage=3"]
        _, pw, pm = pair(root, "peak, 4 x 256 vocab 4096, 2 ranks", bj, 2, bov)
        for r in sorted(pw):
            print(f"  rank {r}: device peak whole {pw[r] / 2**20:.1f} MiB, moved {pm[r] / 2**20:.1f} MiB")
            assert pm[r] <= pw[r], (pm, pw)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_zero3_reshard_device: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
