"""Shared helpers of the data-parallel tests (test_dp_*.py): tiny models and datasets made with the real
CLI, jobs run under mpirun, metrics and safetensors read back with independent parsers (json, numpy)."""
import json
import os
import struct
import subprocess
import tempfile

import numpy as np

BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
           OMPI_MCA_rmaps_base_oversubscribe="1")


def sh(args, check=True, timeout=120):
    r = subprocess.run(args, env=ENV, capture_output=True, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def init_model(out, family, layers, dim=64, heads=4, kv=2, vocab=128, max_seq=64, seed=1):
    args = [BIN, "init-model", "--family", family, "--layers", str(layers), "--dim", str(dim), "--heads",
            str(heads), "--vocab", str(vocab), "--max-seq", str(max_seq), "--seed", str(seed), "--out", out]
    if family == "llama":
        args += ["--kv-heads", str(kv)]
    sh(args)
    return out


def make_dataset(path, vocab, docs, seed, step=1, masked_prefix=3, vocab_flag=None):
    """Learnable documents: arithmetic progressions mod vocab (stride `step`), the first tokens masked."""
    rng = np.random.default_rng(seed)
    jl = path + ".jsonl"
    with open(jl, "w") as f:
        for _ in range(docs):
            n = int(rng.integers(12, 60))
            start = int(rng.integers(0, vocab))
            ids = [(start + step * i) % vocab for i in range(n)]
            labels = [-100 if i < masked_prefix else t for i, t in enumerate(ids)]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    sh([BIN, "data", "pack", "--jsonl", jl, "--out", path, "--vocab", str(vocab_flag or vocab)])
    return path


def write_job(path, model, run_dir, tasks, extra=""):
    lines = [f"model: {{ path: {model} }}", f"run_dir: {run_dir}", "seed: 7",
             "train: { steps: 8, micro_batch: 12, grad_accum: 1, seq_len: 16, lr: 3.0e-3, warmup_steps: 2,"
             " schedule: cosine, weight_decay: 0.1, grad_clip: 1.0, log_every: 100 }",
             "sharding: { stage: 0 }", "eval: { every_steps: 0 }", 'monitor: { publish: "", control: "" }',
             "tasks:"]
    for t in tasks:
        lines.append("  - { " + ", ".join(f"{k}: {v}" for k, v in t.items()) + " }")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n" + extra)
    return path


def train(job, ranks, overrides=(), mpirun=True, check=True, timeout=120):
    args = [BIN, "train", job] + list(overrides)
    if mpirun:
        args = ["mpirun", "--oversubscribe", "-np", str(ranks)] + args
    return sh(args, check=check, timeout=timeout)


def losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


NP = {"F32": "<f4", "F16": "<f2", "BF16": "<u2", "F64": "<f8"}


def read_safetensors(path):
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    buf = raw[8 + n:]
    out = {}
    for name, e in header.items():
        a, b = e["data_offsets"]
        out[name] = np.frombuffer(buf[a:b], dtype=NP[e["dtype"]]).reshape(e["shape"])
    return out


def tmpdir(prefix):
    return tempfile.mkdtemp(prefix=prefix, dir=os.environ.get("TMPDIR", "/tmp"))


def h5_items(path):
    """Every attribute and dataset of an HDF5 file (a checkpoint), as bytes: two files compare with ==."""
    import h5py  # only the callers that compare checkpoints need it
    out = {}
    with h5py.File(path, "r") as f:
        for k, v in f.attrs.items():
            out["@" + k] = np.asarray(v).tobytes()

        def visit(name, obj):
            for k, v in obj.attrs.items():
                out[name + "@" + k] = np.asarray(v).tobytes()
            if isinstance(obj, h5py.Dataset):
                out[name] = (obj.dtype.str, obj.shape, obj[()].tobytes())
        f.visititems(visit)
    return out
