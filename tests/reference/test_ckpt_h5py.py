"""test_ckpt_h5py.py — a checkpoint read with h5py alone (docs/checkpoint-format.md):
the /model tensors (transposed back where hf_transposed=1) equal `shardtune export` output byte for
byte, every dataset's checksum recomputed in numpy equals its attribute, /optim shapes equal /model
shapes, and the root attributes are what the format says. GPT-2 so the Conv1D transposes are exercised;
saved by 3 ranks so every dataset was written in uneven pieces."""
import json, os, struct, subprocess, sys, tempfile

import h5py
import numpy as np

BIN = os.environ["SHARDTUNE_BIN"]
SRC = os.environ["ST_SOURCE_DIR"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")


def run(*args):
    r = subprocess.run(list(args), env=ENV, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"FAIL: {' '.join(args)}\n{r.stdout}\n{r.stderr}")
    return r.stdout


def checksum(x):
    with np.errstate(over="ignore"):
        i = np.arange(x.size, dtype=np.uint64)
        z = (i * np.uint64(0x9E3779B97F4A7C15)) ^ np.ascontiguousarray(x, dtype="<f4").ravel().view(np.uint32).astype(np.uint64)
        z ^= z >> np.uint64(30); z *= np.uint64(0xBF58476D1CE4E5B9)
        z ^= z >> np.uint64(27); z *= np.uint64(0x94D049BB133111EB)
        z ^= z >> np.uint64(31)
        return int(z.sum(dtype=np.uint64))


def read_safetensors(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    out = {}
    for k, v in header.items():
        if k == "__metadata__":
            continue
        assert v["dtype"] == "F32", v
        a, b = v["data_offsets"]
        out[k] = np.frombuffer(data[a:b], dtype="<f4").reshape(v["shape"])
    return out


with tempfile.TemporaryDirectory() as t:
    run(BIN, "init-model", "--family", "gpt2", "--layers", "2", "--dim", "48", "--heads", "4", "--vocab", "96",
        "--max-seq", "32", "--seed", "2", "--out", f"{t}/model")
    run(sys.executable, f"{SRC}/scripts/make_demo_data.py", "--out", f"{t}/d.jsonl", "--docs", "120", "--vocab", "96")
    run(BIN, "data", "pack", "--jsonl", f"{t}/d.jsonl", "--out", f"{t}/d.h5", "--vocab", "96")
    with open(f"{t}/job.yaml", "w") as f:
        f.write(f"""model: {{ path: {t}/model }}
run_dir: {t}/run
train: {{ steps: 3, micro_batch: 2, seq_len: 16, lr: 1.0e-3 }}
sharding: {{ stage: 2 }}
tasks: [ {{ name: d, path: {t}/d.h5 }} ]
eval: {{ every_steps: 0 }}
monitor: {{ publish: "", control: "" }}
""")
    run("mpirun", "--oversubscribe", "-np", "3", BIN, "train", f"{t}/job.yaml")
    ck = f"{t}/run/checkpoints/step-00000003.h5"
    run(BIN, "export", f"{t}/run/checkpoints", "--out", f"{t}/exp")
    exported = read_safetensors(f"{t}/exp/model.safetensors")
    final = read_safetensors(f"{t}/run/final/model.safetensors")
    n_checked = n_transposed = 0
    with h5py.File(ck, "r") as f:
        assert f.attrs["format"] == b"shardtune-checkpoint", f.attrs["format"]
        assert int(f.attrs["version"]) == 1 and int(f.attrs["step"]) == 3 and int(f.attrs["world_size"]) == 3
        assert int(f.attrs["lr_step"]) == 3 and int(f.attrs["tokens_seen"]) == 3 * 3 * 2 * 16
        json.loads(f.attrs["model_config"])
        assert [s.decode() for s in f.attrs["task_names"]] == ["d"]
        assert list(exported) and set(exported) == set(f["model"].keys()), (sorted(exported), sorted(f["model"].keys()))
        for name, ds in f["model"].items():
            x = ds[...]
            assert ds.dtype == np.float32
            assert checksum(x) == int(ds.attrs["checksum"]), name
            hf = x.T if ds.attrs.get("hf_transposed", 0) else x
            n_transposed += int(ds.attrs.get("hf_transposed", 0))
            assert hf.shape == exported[name].shape and np.array_equal(hf, exported[name]), name
            assert np.array_equal(hf, final[name]), name  # the end-of-training checkpoint = final weights
            n_checked += 1
        for name, g in f["optim"].items():
            for k in ("exp_avg", "exp_avg_sq"):
                ds = g[k]
                assert ds.shape == f["model"][name].shape, name
                assert checksum(ds[...]) == int(ds.attrs["checksum"]), f"{name}/{k}"
                assert int(ds.attrs["step"]) == 3, f"{name}/{k} step {ds.attrs['step']}"
                assert ds.id.get_create_plist().get_nfilters() == 0  # contiguous, unfiltered (the checksum guards it)
                assert ds.id.get_create_plist().get_layout() == h5py.h5d.CONTIGUOUS
                n_checked += 1
            assert np.all(g["exp_avg_sq"][...] >= 0)
    assert n_transposed == 8, n_transposed  # 4 Conv1D weights per GPT-2 layer
    print(f"ok: {n_checked} datasets: checksums recomputed in numpy, weights equal export output ({n_transposed} transposed)")
