"""Peak RSS per rank of a progressive stage change under CPU ZeRO-3: the weights and moments moved to their new
owners (worker/comm.c reshard_weights / reshard_moments) against SHARDTUNE_ZERO3_RESHARD=whole (weights
acquired whole, moments gathered whole: the path before).

Llama 4 layers x 256, 4 heads / 2 kv, vocab 32000, 2 ranks, stages `all` -> `-1` at step 2 (so the change,
not the load, is the peak), 3 steps, rounds interleaved. Prints each rank's peak RSS (GNU time) and the plan's
per-rank peak and transition extra. Run from the repository root after building:
    /usr/bin/python3 bench/zero3_reshard_rss.py [ROUNDS]        (~30 s on 2 cores)
Numbers, not assertions (the test is tests/reference/test_zero3_reshard.py: both paths bit-identical).
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "reference"))
import dp_common as dp  # noqa: E402
from test_dp_memory import measured_rss, plan  # noqa: E402

STAGES = ('finetune: { mode: progressive, stages: [ {at_step: 0, train_layers: "all"}, '
          '{at_step: 2, train_layers: "-1"} ] }\n')


def main():
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    root = dp.tmpdir("st_z3_reshard_rss_")
    try:
        model = dp.init_model(os.path.join(root, "m"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000, max_seq=128)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1)
        job = dp.write_job(os.path.join(root, "j.yaml"), model, os.path.join(root, "run"),
                           [{"name": "a", "path": data}], STAGES)
        ov = ["train.steps=3", "train.micro_batch=2", "train.seq_len=32", "sharding.stage=3", "checkpoint.every_steps=0"]
        for r in range(rounds):
            for name, env in (("whole", {"SHARDTUNE_ZERO3_RESHARD": "whole"}), ("moved", {})):
                old = dict(dp.ENV)
                dp.ENV.update(env)
                try:
                    got = measured_rss(job, 2, ov + [f"run_dir={root}/r{r}_{name}"])
                finally:
                    dp.ENV.clear()
                    dp.ENV.update(old)
                print(f"round {r} {name}: peak RSS per rank " + " / ".join(f"{g / 2**20:.1f}" for g in got) + " MiB")
        p = plan(job, 2, ov + [f"run_dir={root}/p"])
        print("plan (moved): per-rank peak " + " / ".join(f"{x / 2**20:.1f}" for x in p["rank_peak_bytes"]) +
              f" MiB, transition extra {p['stages'][1]['transition_extra_bytes'] / 2**20:.1f} MiB")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
