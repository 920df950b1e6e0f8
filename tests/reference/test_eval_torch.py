"""test_eval_torch.py — `shardtune eval` and models written by `shardtune init-model` against the torch
reference (torch_model.py) and the numpy safetensors reader/writer (st_io.py).

 5. eval contract: for models written by `shardtune init-model` (GPT-2 tied, Llama GQA, Qwen2 with
    q/k/v biases) and one numpy-written model with larger weights (std 0.1, so losses are far from
    log V), `shardtune eval --model DIR --data D.h5 --seq-len T --json` equals the float64 torch value of
    the contract: mean loss per unmasked target over consecutive windows of T+1 tokens, stride T, in file
    order, partial last window dropped (dataset read with h5py: /tokens, /loss_mask). The dataset comes
    from `shardtune data pack --jsonl` with -100 labels; --batch is chosen so the last batch is partial.
    Required: relative error <= 1e-5 and the same target count.
 6. safetensors round trip: the tensors init-model wrote carry exactly the HF names and shapes the torch
    model expects (F32); rewriting them with st_io (reversed order) into a new dir next to a copy of
    config.json gives bit-identical eval output and bit-identical logits and gradients from ref_model.
Env (set by ctest): SHARDTUNE_BIN, ST_BUILD_DIR."""
import json
import os
import shutil
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from torch_model import RefModel, param_shapes, parse_config, weighted_ce  # noqa: E402

torch.set_num_threads(2)
BIN = os.environ.get("SHARDTUNE_BIN", "build/shardtune")
REF_MODEL = os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "ref_model")
ENV = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
VOCAB, EOS, T, EVAL_BATCH = 100, 99, 16, 5
TOL = 1e-5

INIT_MODELS = {
    "gpt2_init": ["--family", "gpt2", "--layers", "2", "--dim", "32", "--heads", "4", "--vocab", str(VOCAB),
                  "--max-seq", "64", "--seed", "11"],
    "llama_init": ["--family", "llama", "--layers", "2", "--dim", "32", "--heads", "4", "--kv-heads", "2",
                   "--ffn", "64", "--vocab", str(VOCAB), "--max-seq", "64", "--seed", "12"],
    "qwen2_init": ["--family", "llama", "--qkv-bias", "--tied", "--layers", "2", "--dim", "48", "--heads", "6",
                   "--kv-heads", "3", "--vocab", str(VOCAB), "--max-seq", "32", "--seed", "13",
                   "--rope-theta", "1000000"],
}
NUMPY_MODEL = dict(model_type="llama", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=1, vocab_size=VOCAB, max_position_embeddings=32,
                   rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)

failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def run(args, tool=BIN):
    r = subprocess.run([tool, *args], capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, f"{os.path.basename(tool)} {' '.join(args[:2])} failed: {r.stderr}"
    return r.stdout


def make_dataset(tmp, rng):
    """A packed dataset of 10 documents with -100 labels (prompt-style prefixes and scattered ones, one
    document without labels); sized so a partial window is dropped and the last eval batch is partial."""
    lines = []
    for d in range(10):
        n = int(rng.integers(8, 28))
        ids = rng.integers(0, EOS, n).tolist()
        labels = list(ids)
        prefix = int(rng.integers(0, n // 2 + 1))
        labels[:prefix] = [-100] * prefix
        for i in rng.choice(n, size=n // 6, replace=False):
            labels[int(i)] = -100
        lines.append(json.dumps({"input_ids": ids, "labels": labels} if d != 3 else {"input_ids": ids}))
    src = os.path.join(tmp, "docs.jsonl")
    with open(src, "w") as f:
        f.write("\n".join(lines) + "\n")
    out = os.path.join(tmp, "data.h5")
    print("  " + run(["data", "pack", "--jsonl", src, "--out", out, "--vocab", str(VOCAB), "--eos", str(EOS)]).strip())
    with h5py.File(out, "r") as f:
        n, masked = f["tokens"].shape[0], int((f["loss_mask"][:] == 0).sum())
    windows = (n - 1) // T
    assert (n - 1) % T != 0 and windows % EVAL_BATCH != 0 and masked > 0, (n, windows, masked)
    return out


def torch_eval(model_dir, data_path):
    """The eval contract in float64: windows of T+1 tokens at stride T; target j of window w is token
    w*T + j + 1 and counts iff loss_mask there is 1."""
    with h5py.File(data_path, "r") as f:
        tokens = f["tokens"][:].astype(np.int64)
        mask = f["loss_mask"][:].astype(np.float64)
    n_windows = (len(tokens) - 1) // T
    model = RefModel.load(model_dir, torch.float64)
    starts = np.arange(n_windows) * T
    idx = starts[:, None] + np.arange(T)[None, :]
    with torch.no_grad():
        logits = model.logits(torch.from_numpy(tokens[idx]))
        w = torch.from_numpy(mask[idx + 1])
        loss, _ = weighted_ce(logits, torch.from_numpy(tokens[idx + 1]), w)
    return loss.item() / w.sum().item(), int(w.sum().item()), n_windows, len(tokens)


def shardtune_eval(model_dir, data_path):
    out = run(["eval", "--model", model_dir, "--data", data_path, "--seq-len", str(T), "--batch", str(EVAL_BATCH),
               "--json"])
    return out, json.loads(out)


def check_eval(name, model_dir, data_path):
    ref, n_targets, n_windows, n_tokens = torch_eval(model_dir, data_path)
    out, ours = shardtune_eval(model_dir, data_path)
    e = abs(ours["loss"] - ref) / abs(ref)
    check(f"{name} eval loss", e <= TOL and ours["tokens"] == n_targets,
          f"ours {ours['loss']:.9g} ref {ref:.9g} rel {e:.2e}; targets {ours['tokens']} vs {n_targets} "
          f"({n_windows} windows of {n_tokens} tokens, batch {EVAL_BATCH})")
    return out


def check_init_model_tensors(name, model_dir):
    with open(os.path.join(model_dir, "config.json")) as f:
        c = parse_config(json.load(f))
    tensors = st_io.read(os.path.join(model_dir, "model.safetensors"))
    want = param_shapes(c)
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    bad_dtype = [k for k, v in tensors.items() if v.dtype != np.float32]
    check(f"{name} tensor names and shapes", got == want and not bad_dtype,
          f"{len(got)} tensors, HF names/shapes as expected" if got == want and not bad_dtype else
          f"missing {sorted(set(want) - set(got))}, extra {sorted(set(got) - set(want))}, "
          f"wrong shape {[k for k in want if k in got and got[k] != want[k]]}, non-F32 {bad_dtype}")
    return tensors


def check_round_trip(name, model_dir, tensors, eval_out, data_path, tmp, rng):
    copy_dir = os.path.join(tmp, name + "_st_io")
    os.makedirs(copy_dir)
    shutil.copy(os.path.join(model_dir, "config.json"), copy_dir)
    st_io.write(os.path.join(copy_dir, "model.safetensors"), dict(reversed(list(tensors.items()))))
    again = st_io.read(os.path.join(copy_dir, "model.safetensors"))
    same_np = all(np.array_equal(again[k].view(np.uint32), v.view(np.uint32)) for k, v in tensors.items())
    out2, _ = shardtune_eval(copy_dir, data_path)
    check(f"{name} st_io round trip: eval", out2 == eval_out and same_np, f"{out2.strip()} in both dirs")
    # ref_model on both dirs: logits, loss and all gradients bit-identical
    with open(os.path.join(model_dir, "config.json")) as f:
        V = parse_config(json.load(f))["vocab"]
    batch = {"inputs": rng.integers(0, V, (2, 8)).astype(np.int32),
             "targets": rng.integers(0, V, (2, 8)).astype(np.int32),
             "weight": np.full((2, 8), 1.0 / 16, np.float32)}
    bp = os.path.join(tmp, name + ".batch.safetensors")
    st_io.write(bp, batch)
    outs = []
    for i, d in enumerate((model_dir, copy_dir)):
        op = os.path.join(tmp, f"{name}.ref{i}.safetensors")
        run(["--model", d, "--batch", bp, "--out", op], tool=REF_MODEL)
        outs.append(st_io.read(op))
    differ = [k for k in outs[0] if not np.array_equal(outs[0][k].view(np.uint32), outs[1][k].view(np.uint32))]
    check(f"{name} st_io round trip: ref_model", not differ and set(outs[0]) == set(outs[1]),
          f"{len(outs[0])} output tensors bit-identical" if not differ else f"differ: {differ[:5]}")


def main():
    rng = np.random.default_rng(99)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_dataset(tmp, rng)
        for name, args in INIT_MODELS.items():
            d = os.path.join(tmp, name)
            print(f"[{name}] " + run(["init-model", *args, "--out", d]).strip())
            tensors = check_init_model_tensors(name, d)
            out = check_eval(name, d, data)
            check_round_trip(name, d, tensors, out, data, tmp, rng)
        # A model with weights large enough that the loss is far from log(V) and every weight matters.
        d = os.path.join(tmp, "llama_numpy")
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(NUMPY_MODEL, f)
        c = parse_config(NUMPY_MODEL)
        w = {n: (rng.normal(0, 0.3, s) if len(s) == 2 else 1 + rng.normal(0, 0.1, s)).astype(np.float32)
             for n, s in param_shapes(c).items()}
        st_io.write(os.path.join(d, "model.safetensors"), w)
        print(f"[llama_numpy] llama MQA (KVH=1), std 0.3 weights, log(V) = {np.log(VOCAB):.4f}")
        check_eval("llama_numpy", d, data)
    if failures:
        print(f"FAILED: {len(failures)} comparison(s): {failures}")
        return 1
    print("all eval / round-trip comparisons passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
