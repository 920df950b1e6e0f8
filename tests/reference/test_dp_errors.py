"""Bad input to `shardtune train` (and `shardtune plan` where it applies): every case ends with exactly one
line on stderr that names the cause, a non-zero exit, no training step (no metrics.jsonl, no final/),
and nothing half-written in run_dir. Cases run on 2 MPI ranks (the error must come out once) and, for
speed, the rest as an MPI singleton.

Cases: an empty task dataset (no tokens; too short for one window), a stage with nothing trainable,
invalid / out-of-range layer ranges ("5-2", "0-99" on a 2-layer model, "x"), an unknown module kind,
seq_len above the model's max positions, a token id >= the model's vocabulary, a missing model dir, a
truncated model.safetensors, an unwritable run_dir.
"""
import json
import os
import shutil
import sys
import time

import h5py
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common as dp  # noqa: E402


def empty_dataset(path):
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.zeros(0, dtype=np.uint32))
        f.create_dataset("doc_offsets", data=np.zeros(1, dtype=np.uint64))
        f.attrs["vocab_size"] = np.int64(128)
        f.attrs["eos_id"] = np.int64(-1)
    return path


def tiny_dataset(path):
    """Valid file, 10 tokens: not one training window of seq_len 16."""
    with h5py.File(path, "w") as f:
        f.create_dataset("tokens", data=np.arange(10, dtype=np.uint32))
        f.create_dataset("doc_offsets", data=np.array([0, 10], dtype=np.uint64))
        f.attrs["vocab_size"] = np.int64(128)
        f.attrs["eos_id"] = np.int64(-1)
    return path


def files_under(d):
    out = []
    for root, _, files in os.walk(d):
        out += [os.path.join(root, f) for f in files]
    return out


def expect_fail(name, job, overrides, needles, ranks=0, run_dir=None, plan=False):
    """ranks=0: singleton (no mpirun)."""
    args = overrides + ([f"run_dir={run_dir}"] if run_dir else [])
    r = dp.train(job, ranks or 1, args, mpirun=ranks > 0, check=False)
    err = [line for line in r.stderr.splitlines() if line.strip()]
    # mpirun adds its own summary lines after a non-zero exit; ours is the one that names shardtune
    ours = [line for line in err if line.startswith("shardtune ")]
    assert r.returncode != 0, f"{name}: exit 0\n{r.stdout}\n{r.stderr}"
    assert len(ours) == 1, f"{name}: want one error line, got {ours}\n{r.stderr}"
    if ranks == 0:
        assert len(err) == 1, f"{name}: extra stderr lines: {err}"
    for n in needles:
        assert n in ours[0], f"{name}: '{n}' not in: {ours[0]}"
    assert "step " not in r.stdout, f"{name}: training started:\n{r.stdout}"
    if run_dir:
        left = [p for p in files_under(run_dir)] if os.path.isdir(run_dir) else []
        assert not left, f"{name}: files left in run_dir: {left}"
    if plan:
        p = dp.sh([dp.BIN, "plan", job, "--ranks", "2"] + overrides, check=False)
        perr = [line for line in p.stderr.splitlines() if line.strip()]
        assert p.returncode != 0 and len(perr) == 1, f"{name}: plan: {p.returncode} {p.stderr}"
        for n in needles:
            assert n in perr[0], f"{name}: plan: '{n}' not in: {perr[0]}"
    print(f"  {name:28s} rc={r.returncode}: {ours[0]}")


def main():
    t0 = time.time()
    root = dp.tmpdir("st_dp_err_")
    try:
        model = dp.init_model(os.path.join(root, "m"), "llama", 2, max_seq=32)
        data = dp.make_dataset(os.path.join(root, "a.h5"), 128, 60, seed=1)
        big = dp.make_dataset(os.path.join(root, "big.h5"), 200, 60, seed=2)  # ids up to 199
        empty = empty_dataset(os.path.join(root, "empty.h5"))
        tiny = tiny_dataset(os.path.join(root, "tiny.h5"))
        rd = os.path.join(root, "run")
        job = dp.write_job(os.path.join(root, "job.yaml"), model, rd, [{"name": "a", "path": data}])
        two = dp.write_job(os.path.join(root, "two.yaml"), model, rd,
                           [{"name": "a", "path": data}, {"name": "e", "path": empty}])
        short = dp.write_job(os.path.join(root, "short.yaml"), model, rd,
                             [{"name": "a", "path": data}, {"name": "tiny", "path": tiny}])
        vocab = dp.write_job(os.path.join(root, "vocab.yaml"), model, rd, [{"name": "big", "path": big}])
        frozen = ["finetune.mode=frozen"]

        expect_fail("empty task dataset", two, [], ["empty.h5"], ranks=2, run_dir=rd)
        expect_fail("task shorter than a window", short, [], ["tiny"], run_dir=rd)
        expect_fail("nothing trainable", job, frozen + ["finetune.train_layers=none", "finetune.train_modules=[attn]"],
                    ["finetune.train_layers", "nothing to train"], ranks=2, run_dir=rd, plan=True)
        expect_fail("embed without layer 0", job, frozen + ["finetune.train_layers=1", "finetune.train_modules=[embed]"],
                    ["nothing to train"], run_dir=rd, plan=True)
        expect_fail("reversed range 5-2", job, frozen + ["finetune.train_layers=5-2"], ["5-2"], run_dir=rd,
                    plan=True)
        expect_fail("out of range 0-99", job, frozen + ["finetune.train_layers=0-99"], ["0-99"], ranks=2,
                    run_dir=rd, plan=True)
        expect_fail("layer spec x", job, frozen + ["finetune.train_layers=x"], ["finetune.train_layers"],
                    run_dir=rd, plan=True)
        expect_fail("progressive stage 0-99", job,
                    ["finetune.mode=progressive", 'finetune.stages=[{at_step: 0, train_layers: "-1"}, '
                     '{at_step: 2, train_layers: "0-99"}]'], ["finetune.stages.1", "0-99"], run_dir=rd, plan=True)
        expect_fail("unknown module kind", job, frozen + ["finetune.train_modules=[attn,lora]"],
                    ["train_modules", "lora"], run_dir=rd, plan=True)
        expect_fail("seq_len > max positions", job, ["train.seq_len=33"], ["seq_len", "33", "32"], ranks=2,
                    run_dir=rd, plan=True)
        expect_fail("token id >= vocab", vocab, [], ["big.h5", "vocabulary"], ranks=2, run_dir=rd)
        expect_fail("missing model dir", job, [f"model.path={root}/nope"], ["nope"], ranks=2, run_dir=rd,
                    plan=True)
        cut = os.path.join(root, "cut")
        shutil.copytree(model, cut)
        st = os.path.join(cut, "model.safetensors")
        os.truncate(st, os.path.getsize(st) // 2)
        expect_fail("truncated safetensors", job, [f"model.path={cut}"], ["model.safetensors"], ranks=2, run_dir=rd)
        shape = os.path.join(root, "shape")
        shutil.copytree(model, shape)
        cfgp = os.path.join(shape, "config.json")
        cj = json.load(open(cfgp))
        cj["intermediate_size"] += 8
        json.dump(cj, open(cfgp, "w"))
        expect_fail("shape != config.json", job, [f"model.path={shape}"], ["mlp.gate_proj.weight", "shape"], ranks=2,
                    run_dir=rd)
        gone = os.path.join(root, "gone")
        shutil.copytree(model, gone)
        os.remove(os.path.join(gone, "model.safetensors"))
        expect_fail("missing safetensors", job, [f"model.path={gone}"], ["gone"], run_dir=rd)
        expect_fail("mistyped config key", job, ["train.lerning_rate=1e-3"], ["train.lerning_rate", "train.lr"],
                    ranks=2, run_dir=rd, plan=True)
        blocker = os.path.join(root, "blocker")
        open(blocker, "w").close()
        expect_fail("unwritable run_dir", job, [], ["run_dir", "blocker/run", "Not a directory"], ranks=2,
                    run_dir=os.path.join(blocker, "run"))
        assert os.path.getsize(blocker) == 0
        assert not os.path.exists(rd), f"a failed run left {rd} behind: {files_under(rd)}"
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"test_dp_errors: OK ({time.time() - t0:.1f} s)")


if __name__ == "__main__":
    main()
