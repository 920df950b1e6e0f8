"""Memory per rank at ZeRO stages 0-3, with and without activation checkpointing, on CPU ranks.

The issue's model (Llama 8 layers x 512, 8 heads / 4 kv, vocab 32000, untied head; global batch 4 x 64):
each configuration trains 3 steps under mpirun (OMP_NUM_THREADS=1) and prints, per rank, the measured
peak RSS (GNU time) and what `shardtune plan` gives for that rank (step total, load, at_save), the
losses and the median step time of steps 2-3. Run from the repository root after building:
    /usr/bin/python3 bench/zero_mem.py            (~3 min on 2 cores)
Numbers, not assertions (the tests are tests/reference/test_zero3.py and test_act_ckpt.py).
"""
import os
import shutil
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import dp_common as dp  # noqa: E402
from test_dp_memory import measured_rss, plan  # noqa: E402

CONFIGS = [  # (ranks, zero stage, activation checkpointing)
    (1, 0, False), (1, 0, True), (2, 1, False), (2, 2, False), (2, 3, False), (2, 3, True),
    (4, 2, False), (4, 3, False), (4, 3, True)]


def main():
    root = dp.tmpdir("st_zero_mem_")
    try:
        data = dp.make_dataset(os.path.join(root, "a.h5"), 32000, 400, seed=1)
        model = dp.init_model(os.path.join(root, "m"), "llama", 8, dim=512, heads=8, kv=4, vocab=32000,
                              max_seq=128)
        job = dp.write_job(os.path.join(root, "job.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}])
        mib = 2.0**20
        print(f"{'ranks':>5} {'ZeRO':>4} {'ckpt':>4} {'rank':>4} {'peak RSS':>9} {'plan step':>9} {'plan load':>9} "
              f"{'at_save':>9} {'step ms':>8}  losses")
        for ranks, zero, ckpt in CONFIGS:
            rd = os.path.join(root, f"r{ranks}z{zero}{int(ckpt)}")
            ov = ["train.steps=3", f"train.micro_batch={4 // ranks}", "train.seq_len=64", f"sharding.stage={zero}",
                  f"memory.activation_checkpointing={'true' if ckpt else 'false'}"]
            p = plan(job, ranks, ov)
            rss = measured_rss(job, ranks, ov + [f"run_dir={rd}"])
            m = dp.losses(rd)
            ms = statistics.median(x["step_ms"] for x in m[1:])
            losses = " ".join("%.6f" % x["loss"] for x in m)
            for r in range(ranks):
                b = p["stages"][0]["ranks"][r]["bytes"]
                print(f"{ranks:>5} {zero:>4} {'on' if ckpt else 'off':>4} {r:>4} {rss[r] / mib:>8.1f}M "
                      f"{b['total'] / mib:>8.1f}M {p['load_bytes'] / mib:>8.1f}M {b['at_save'] / mib:>8.1f}M "
                      f"{ms:>8.1f}  {losses if r == 0 else ''}")
            shutil.rmtree(rd, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
