"""`shardtune plan` memory estimate vs the measured peak RSS of real runs.

A Llama model large enough that its tensors dominate (4 layers, dim 256, vocab 32000: 19.3M floats)
is trained for 2 steps, once as 1 rank with ZeRO-1, once as 2 MPI ranks with ZeRO-2 (no full gradient:
buckets reduce-scattered and their pages given back during backward; again with 2 micro-batches per step,
whose later one receives through per-bucket buffers), once as 1 rank
with precision bf16 (bf16 weight copy, bf16 saved activations, matmul operand scratch), and once as
finetune.mode lora on 2 ranks with ZeRO-2 (adapters on all seven projections: adapter gradients and
moments only, the adapters' working memory, an adapter-only final/), and lora / qlora (nf4) on 1 rank under
bf16 (the base's bf16 copy; QLoRA: of the compacted buffer only); each rank's
peak RSS comes from /usr/bin/time (max resident set size). The fixed overhead of the process (code,
MPI, HDF5, OpenBLAS, allocator) is measured, not assumed: the same job on a 1-layer dim-16 vocab-128
model, minus that model's own (tiny) plan. Each rank's RSS minus this baseline must be within 15% of
the plan's estimate for that rank: its largest phase (load, step, checkpoint, final/ on rank 0).
"""
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402

TOL = 0.15


def plan(job, ranks, overrides):
    r = dp.sh([dp.BIN, "plan", job, "--ranks", str(ranks), "--json"] + overrides)
    return json.loads(r.stdout)


def expected_per_rank(p):
    """Peak bytes of each rank from the plan: its max over the phases (load, every stage's total + the
    transition into it, a checkpoint, final/ on the final stage), recomputed here from the phase numbers."""
    out = []
    for r in range(p["world"]):
        peak = p["stages"][0]["ranks"][r]["bytes"]["at_load"]
        for i, s in enumerate(p["stages"]):
            b = s["ranks"][r]["bytes"]
            held = b["total"]
            if i > 0:
                held = max(held, p["stages"][i - 1]["ranks"][r]["bytes"]["total"])
            peak = max(peak, held + s["transition_extra_bytes"], b["at_ckpt"])
        peak = max(peak, p["stages"][p["final_stage"]]["ranks"][r]["bytes"]["at_save"])
        out.append(peak)
    assert out == p["rank_peak_bytes"] and max(out) == p["peak_bytes"], (out, p["rank_peak_bytes"], p["peak_bytes"])
    return out


def measured_rss(job, ranks, overrides):
    """Max RSS in bytes of each rank (GNU time's %M is in KiB)."""
    # one file per rank: lines that several ranks write to a shared stderr can interleave mid-line
    out_dir = dp.tmpdir("st_dp_rss_")
    wrap = ['sh', '-c', '/usr/bin/time -o "$0/rss.${OMPI_COMM_WORLD_RANK:-0}" -f "%M" "$@"', out_dir, dp.BIN,
            "train", job]
    args = ["mpirun", "--oversubscribe", "-np", str(ranks)] + wrap + overrides if ranks > 1 else wrap + overrides
    r = dp.sh(args, timeout=300)
    rss = {}
    for name in os.listdir(out_dir):
        if name.startswith("rss."):
            rss[int(name[4:])] = int(open(os.path.join(out_dir, name)).read().split()[-1]) * 1024
    shutil.rmtree(out_dir, ignore_errors=True)
    assert sorted(rss) == list(range(ranks)), f"missing rank RSS: {r.stderr}"
    return [rss[i] for i in range(ranks)]


def main():
    t0 = time.time()
    root = dp.tmpdir("st_dp_mem_")
    try:
        big = dp.init_model(os.path.join(root, "big"), "llama", 4, dim=256, heads=4, kv=2, vocab=32000, max_seq=128)
        small = dp.init_model(os.path.join(root, "small"), "llama", 1, dim=16, heads=2, kv=1, vocab=128, max_seq=128)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 200, seed=1)
        job = dp.write_job(os.path.join(root, "job.yaml"), big, os.path.join(root, "run"),
                           [{"name": "a", "path": data}])
        common = ["train.steps=2", "train.micro_batch=4", "train.seq_len=64"]

        ov = common + [f"model.path={small}", "sharding.stage=1", f"run_dir={root}/base"]
        base = measured_rss(job, 1, ov)[0] - plan(job, 1, ov)["peak_bytes"]
        print(f"  baseline (1-layer dim-16 model, minus its plan): {base / 2**20:.1f} MiB")
        assert 0 < base < 200 * 2**20, f"implausible baseline {base}"

        for ranks, zero, precision, mode, *more in [
                (1, 1, "fp32", "full"), (2, 2, "fp32", "full"), (1, 1, "bf16", "full"),
                (2, 2, "fp32", "full", "train.micro_batch=2", "train.grad_accum=2"),
                (2, 2, "fp32", "lora"), (1, 1, "bf16", "lora"), (1, 1, "bf16", "qlora")]:
            ov = common + [f"sharding.stage={zero}", f"run_dir={root}/r{ranks}z{zero}{precision}{mode}{len(more)}",
                           f"precision={precision}", f"finetune.mode={mode}"] + more
            want = expected_per_rank(plan(job, ranks, ov))
            got = measured_rss(job, ranks, ov)
            for r in range(ranks):
                net = got[r] - base
                err = (net - want[r]) / want[r]
                print(f"  {mode} {precision} {ranks} rank(s) ZeRO-{zero} {' '.join(more)} rank {r}: plan {want[r] / 2**20:7.1f} MiB, "
                      f"measured {got[r] / 2**20:7.1f} MiB - baseline = {net / 2**20:7.1f} MiB ({err:+.1%})")
                assert abs(err) <= TOL, f"rank {r}: estimate off by {err:+.1%}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_dp_memory: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
