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
model (2 and 3 ranks): numbers, not assertions, beyond the moved path not exceeding the whole one.

The piecewise move runs owner to owner (NCCL point to point) unless SHARDTUNE_Z3DEV_MOVE=gather (each piece
all-gathered): every case runs under both and the whole path, all three identical. Its traffic is asserted
(check_traffic, from fakedev's FAKEDEV_REPORT_MEM line): owner to owner, each rank receives exactly what its new
parts need from the others (counted by the communicator apart from the path, and delivered so by the fake NCCL),
all ranks together at most the moved bytes; gathered, (ranks - 1) x the moved bytes.
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
GATHER = {"SHARDTUNE_Z3DEV_MOVE": "gather"}
UNFREEZE = "finetune: { mode: progressive, unfreeze_every: 2 }\n"
STAGES = ('finetune: { mode: progressive, layer_lr_decay: 0.8, stages: [ {at_step: 0, train_layers: "-1"},'
          ' {at_step: 3, train_layers: "-2"}, {at_step: 5, train_layers: "all"} ] }\n')


PEAK = re.compile(r"fakedev device bytes: rank (\d+) peak (\d+)")
MOVE = re.compile(r"fakedev stage-change moves: rank (\d+) received (\d+) needed (\d+) moved (\d+); point-to-point "
                  r"received (\d+)")


def dev(job, ranks, ov, env_extra=None):
    """A guarded fakedev run; returns each rank's (peak device bytes, move bytes received, needed, moved, received
    point to point) (FAKEDEV_REPORT_MEM=1)."""
    env = dict(dp.ENV, FAKEDEV_REPORT_MEM="1", **(env_extra or {}))
    args = ["mpirun", "--oversubscribe", "-np", str(ranks), FAKE, "--guard", job] + ov
    r = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout}\n{r.stderr}"
    bad = [x for x in r.stderr.splitlines() if "fakedev (rank" in x or "stream order violated" in x]
    assert not bad, f"{' '.join(args)}: {bad[:3]}"
    peaks = {int(m.group(1)): int(m.group(2)) for m in PEAK.finditer(r.stdout)}
    stats = {int(m.group(1)): (peaks.get(int(m.group(1))),) + tuple(int(m.group(k)) for k in range(2, 6))
             for m in MOVE.finditer(r.stdout)}
    assert len(stats) == ranks == len(peaks), r.stdout
    return stats


def check_traffic(tag, ranks, gather, p2p):
    """The owner-to-owner move receives exactly what each rank's new parts need from the others (counted apart
    from the path; the fake NCCL's delivered bytes agree), all ranks together at most the moved bytes; the gather
    path receives every other rank's old part of each piece: all ranks together (ranks - 1) x the moved bytes."""
    moved = {s[3] for s in p2p.values()} | {s[3] for s in gather.values()}
    assert len(moved) == 1, (tag, gather, p2p)
    moved = moved.pop()
    for r, (_, rec, need, _, pp) in p2p.items():
        assert rec == need == pp, (tag, r, p2p[r])
        assert gather[r][2] == need and gather[r][4] == 0, (tag, r, gather[r], p2p[r])
    total_p2p, total_gather = sum(s[1] for s in p2p.values()), sum(s[1] for s in gather.values())
    assert total_gather == (ranks - 1) * moved, (tag, gather, moved)
    assert total_p2p <= moved and (ranks == 1 or moved == 0 or total_p2p > 0), (tag, p2p, moved)
    return moved


def pair(root, tag, job, ranks, ov):
    """The job under the three paths (whole, the piece all-gathered, owner to owner); returns the whole-path run dir
    and each path's stats."""
    a, g, b = (os.path.join(root, tag + x) for x in ("_whole", "_gather", "_moved"))
    pa = dev(job, ranks, ov + [f"run_dir={a}"], WHOLE)
    pg = dev(job, ranks, ov + [f"run_dir={g}"], GATHER)
    pb = dev(job, ranks, ov + [f"run_dir={b}"])
    k = fb.same_run(a, b, tag)
    fb.same_run(g, b, tag)
    moved = check_traffic(tag, ranks, pg, pb)
    assert ranks == 1 or moved > 0, (tag, pb)
    print(f"  {tag}: {k} checkpoints, final/, losses identical (whole, gather, point to point); moved "
          f"{moved} B, received per rank gather {[pg[r][1] for r in sorted(pg)]} point to point "
          f"{[pb[r][1] for r in sorted(pb)]}")
    return a, pa, pg, pb


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
                ref, _, _, _ = pair(root, f"unfreeze_every {prec} {ranks} ranks", uf, ranks, ov + [f"precision={prec}"])
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
        for ranks in (2, 3):
            _, pw, pg, pm = pair(root, f"peak, 4 x 256 vocab 4096, {ranks} ranks", bj, ranks, bov)
            for r in sorted(pw):
                print(f"  rank {r}: device peak whole {pw[r][0] / 2**20:.1f} MiB, moved {pm[r][0] / 2**20:.1f} MiB; "
                      f"stage changes received {pg[r][1] / 2**20:.2f} MiB gathered, {pm[r][1] / 2**20:.2f} MiB point "
                      f"to point, of {pm[r][3] / 2**20:.2f} MiB moved")
                assert pm[r][0] <= pw[r][0], (pm, pw)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_zero3_reshard_device: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
