"""ref_rope_models.py — RoPE variants, Qwen3 and sliding windows as real checkpoints carry them, against
transformers 5 (config classes and modeling_rope_utils) and the torch reference model (torch_model.py).

transformers' torch models are disabled in the reference venv (they need torch >= 2.6), but its config
classes work, so every config.json here is written by transformers itself (LlamaConfig / Qwen3Config /
MistralConfig .save_pretrained, both the rope_parameters and the rope_scaling spelling). modeling_rope_utils
does run once handed Debian's torch 1.13 (it only uses arange/pow/where/clamp), so:

 1. tables: for each model, shardtune's inv_freq and attention scaling (tests/tools/rope_dump, i.e.
    st_model_rope_inv_freq) equal (a) torch_model.rope_inv_freq, an independent numpy float64 re-derivation
    rounded to fp32 once, to 1 ulp, and (b) transformers' own ROPE_INIT_FUNCTIONS[rope_type](config,
    seq_len=T), which evaluates the same formulas step by step in fp32, within rel 2e-6 (a few fp32 ulp
    of accumulated rounding over ~5 fp32 operations; the attention scaling to 1e-6). The cos/sin tables the
    kernels apply equal cos/sin(pos * inv_freq) * scaling to 2e-7 absolute (fp32 rounding of values <= 1.2).
 2. model math: loss, logits and every parameter gradient of shardtune (tests/tools/ref_model: worker/model.c
    on the CPU backend, fp32) against the float64 torch reference at T = 128 with sharp attention (q/k
    projection weights scaled so the average top attention probability is > 0.5, checked), rel <= 1e-5
    (fp32 arithmetic: ~1e-7 per operation, amplified through 2 layers of sharp softmax); for logits and each
    gradient tensor the bound is max(1e-5, 4 x the error of the same torch reference run in float32), since
    sharp attention makes the gradients' fp32 error itself exceed 1e-5 (both numbers are printed).
    `shardtune eval --seq-len 128` equals the float64 reference of the eval contract within 1e-5.
    Every variant changes the reference loss by far more than the tolerance relative to default RoPE
    (checked: the test can fail), and the issue's case — a theta-500000 Llama saved with rope_parameters
    — is first: reading theta 10000 instead (the old behaviour) misses by far more than 1e-5.
 3. dynamic runs at T = 128 > max_position_embeddings = 96 (the NTK base grows, as transformers' forward
    does when seq_len exceeds the cached length); longrope at T > original_max uses long_factor.
 4. sliding windows shorter than T = 128 (Mistral 48 on every layer, Qwen2 24 on layers >=
    max_window_layers, Qwen3 56 on its sliding_attention layer_types) match the reference's masks
    (transformers' sliding_window_overlay: key j visible to query i when i - j < window), and removing the
    window changes the loss far beyond the tolerance; a window >= T is plain causal attention.
    `shardtune train` runs the dynamic model at seq_len 128 > 96 and the Mistral at 128 > its window 48.
    An unknown rope_type is refused by name.
Env (set by ctest): ST_BUILD_DIR (ref_model and rope_dump live there)."""
import json
import math
import os
import subprocess
import sys
import tempfile

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from torch_model import RefModel, param_shapes, parse_config, rope_inv_freq, weighted_ce  # noqa: E402

import transformers.modeling_rope_utils as mru  # noqa: E402
from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config  # noqa: E402

mru.torch = torch  # modeling_rope_utils only imports torch when transformers accepts its version
torch.set_num_threads(2)
BUILD = os.environ.get("ST_BUILD_DIR", "build")
REF_MODEL, ROPE_DUMP = os.path.join(BUILD, "ref_model"), os.path.join(BUILD, "rope_dump")
BIN = os.environ.get("SHARDTUNE_BIN", os.path.join(BUILD, "shardtune"))
ENV = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
T, B, V = 128, 2, 64
TOL = 1e-5
# Sharp softmax amplifies fp32 rounding in the gradients (differences of nearly equal P * (dP - D) terms)
# beyond 1e-5; a tensor's tolerance is then FP32_FACTOR times the error of the same reference evaluated in
# float32 (what any fp32 implementation of this math incurs), never below TOL.
FP32_FACTOR = 4.0

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=V, max_position_embeddings=256, rms_norm_eps=1e-6,
            tie_word_embeddings=False)
HALF = 8  # head_dim 16 / 2
MODELS = [
    # the case first: transformers 5 writes theta inside rope_parameters
    ("llama_theta500k", LlamaConfig, dict(rope_parameters={"rope_type": "default", "rope_theta": 500000.0})),
    ("llama_linear", LlamaConfig, dict(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0})),
    ("llama_dynamic", LlamaConfig, dict(max_position_embeddings=96,
                                        rope_parameters={"rope_type": "dynamic", "factor": 3.0, "rope_theta": 10000.0})),
    ("llama_yarn_legacy", LlamaConfig, dict(rope_theta=10000.0, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "beta_fast": 16.0})),
    ("llama31_llama3", LlamaConfig, dict(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 32})),
    ("llama_longrope", LlamaConfig, dict(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 64, "factor": 4.0,
        "short_factor": [1.0 + 0.1 * i for i in range(HALF)], "long_factor": [1.0 + 0.9 * i for i in range(HALF)]})),
    # the "new user" case: a Qwen2 with theta 1e6 (the window is declared but no layer slides: 2 < 28)
    ("qwen2_theta1e6", Qwen2Config, dict(use_sliding_window=True, sliding_window=64, rope_parameters={
        "rope_type": "default", "rope_theta": 1000000.0})),
    ("qwen3", Qwen3Config, dict(head_dim=32, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    ("qwen3_yarn", Qwen3Config, dict(head_dim=16, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0, "original_max_position_embeddings": 64})),
    ("mistral_window", MistralConfig, dict(sliding_window=256, rope_parameters={"rope_type": "default",
                                                                                  "rope_theta": 10000.0})),
    # sliding windows shorter than the sequence: every Mistral layer; Qwen2's layers >= max_window_layers;
    # Qwen3's sliding_attention layers of layer_types
    ("mistral_window48", MistralConfig, dict(sliding_window=48, rope_parameters={"rope_type": "default",
                                                                                 "rope_theta": 10000.0})),
    ("qwen2_window24", Qwen2Config, dict(use_sliding_window=True, sliding_window=24, max_window_layers=1,
                                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    ("qwen3_window56", Qwen3Config, dict(head_dim=16, use_sliding_window=True, sliding_window=56,
                                         layer_types=["full_attention", "sliding_attention"],
                                         rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
]

failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}", flush=True)
    if not ok:
        failures.append(what)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max()
    return np.abs(ours - ref).max() / scale if scale > 0 else np.abs(ours - ref).max()


def run(tool, *args, ok=True):
    r = subprocess.run([tool, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=300)
    if ok:
        assert r.returncode == 0, f"{os.path.basename(tool)} failed: {r.stderr}"
    return r


def make_model(d, cls, extra, rng):
    """config.json by transformers' own config class; weights from numpy with sharp attention."""
    kw = dict(BASE)
    kw.update(extra)
    cls(**kw).save_pretrained(d)
    with open(os.path.join(d, "config.json")) as f:
        config = json.load(f)
    c = parse_config(config)
    tensors = {}
    for name, shape in param_shapes(c).items():
        if name.endswith(".bias"):
            tensors[name] = rng.normal(0.0, 0.1, shape)
        elif len(shape) == 2:
            std = 0.45 if ("q_proj" in name or "k_proj" in name) else 0.1
            tensors[name] = rng.normal(0.0, std, shape)
        elif "q_norm" in name or "k_norm" in name:  # Qwen3 normalizes q/k per head: sharpness comes from here
            tensors[name] = 3.0 + rng.normal(0.0, 0.1, shape)
        else:
            tensors[name] = 1.0 + rng.normal(0.0, 0.1, shape)
    st_io.write(os.path.join(d, "model.safetensors"), {k: v.astype(np.float32) for k, v in tensors.items()})
    return config, c


def batch(rng):
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    w = np.where(rng.random((B, T)) >= 0.2, 1.0, 0.0)
    w[:, -1] = 1.0
    return inputs, targets, (w / w.sum()).astype(np.float32)


def transformers_inv_freq(config_dict, cls):
    cfg = cls(**{k: v for k, v in config_dict.items() if k not in ("architectures", "transformers_version")})
    t = cfg.rope_parameters["rope_type"]
    if t == "default":  # the default is computed inside each model's RotaryEmbedding: same formula
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        inv = 1.0 / (cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
        return inv.numpy(), 1.0
    inv, att = mru.ROPE_INIT_FUNCTIONS[t](cfg, "cpu", seq_len=T if t in ("dynamic", "longrope") else None)
    return inv.numpy(), float(att)


def check_tables(name, d, config, c, cls, tmp):
    out = os.path.join(tmp, f"{name}.rope.safetensors")
    run(ROPE_DUMP, "--model", d, "--seq-len", T, "--out", out)
    ours = st_io.read(out)
    inv_ref, att_ref = rope_inv_freq(c, T)
    ulps = np.abs(ours["inv_freq"].view(np.int32).astype(np.int64) - inv_ref.view(np.int32).astype(np.int64)).max()
    check(f"{name} inv_freq vs numpy re-derivation", ulps <= 1, f"max {ulps} ulp")
    check(f"{name} attention scaling vs numpy", abs(float(ours["attention_scaling"][0]) - att_ref) <= 1e-7 * att_ref,
          f"ours {float(ours['attention_scaling'][0]):.8f} ref {att_ref:.8f}")
    inv_tf, att_tf = transformers_inv_freq(config, cls)
    e = float(np.max(np.abs(ours["inv_freq"].astype(np.float64) - inv_tf) / np.abs(inv_tf)))
    check(f"{name} inv_freq vs transformers {c['rope']['rope_type']}", e <= 2e-6, f"max rel {e:.2e}")
    check(f"{name} attention scaling vs transformers", abs(float(ours["attention_scaling"][0]) - att_tf) <= 1e-6 * att_tf,
          f"ours {float(ours['attention_scaling'][0]):.8f} transformers {att_tf:.8f}")
    if c["rope"]["rope_type"] == "dynamic":  # within max_position_embeddings dynamic is plain RoPE
        short = os.path.join(tmp, f"{name}.short.safetensors")
        run(ROPE_DUMP, "--model", d, "--seq-len", c["max_pos"] // 2, "--out", short)
        plain = rope_inv_freq(dict(c, rope={"rope_type": "default"}), T)[0]
        check(f"{name} at T <= max_position_embeddings equals default RoPE",
              np.array_equal(st_io.read(short)["inv_freq"], plain), f"T = {c['max_pos'] // 2}")
    ang = np.arange(T, dtype=np.float64)[:, None] * ours["inv_freq"].astype(np.float64)[None, :]
    a = float(ours["attention_scaling"][0])
    e = max(np.abs(ours["cos"] - np.cos(ang) * a).max(), np.abs(ours["sin"] - np.sin(ang) * a).max())
    check(f"{name} cos/sin tables", e <= 2e-7, f"max abs err {e:.1e}")


def ref_loss(d, inputs, targets, weight, override=None, dtype=torch.float64):
    ref = RefModel.load(d, dtype)
    if override:
        ref.c.update(override)
    ref.zero_grad()
    logits = ref.logits(torch.from_numpy(inputs).long())
    loss, per_pos = weighted_ce(logits, torch.from_numpy(targets), torch.from_numpy(weight))
    return ref, logits, loss, per_pos


def attention_sharpness(ref, inputs):
    """Mean over layer-0 query rows (t >= 16) of the largest attention probability."""
    P, c = ref.params, ref.c
    from torch_model import rms_norm, rotate_half, rope_cos_sin, repeat_kv
    with torch.no_grad():
        h = P["model.embed_tokens.weight"][torch.from_numpy(inputs).long()]
        a = rms_norm(h, P["model.layers.0.input_layernorm.weight"], c["eps"])
        H, KVH, hd = c["n_head"], c["n_kv_head"], c["head_dim"]
        q = (a @ P["model.layers.0.self_attn.q_proj.weight"].t()).view(B, T, H, hd).transpose(1, 2)
        k = (a @ P["model.layers.0.self_attn.k_proj.weight"].t()).view(B, T, KVH, hd).transpose(1, 2)
        if c.get("qk_norm"):
            q = rms_norm(q, P["model.layers.0.self_attn.q_norm.weight"], c["eps"])
            k = rms_norm(k, P["model.layers.0.self_attn.k_norm.weight"], c["eps"])
        cos, sin = rope_cos_sin(T, hd, *rope_inv_freq(c, T), torch.float64)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        s = q @ repeat_kv(k, H // KVH).transpose(-1, -2) / math.sqrt(hd)
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        return float(torch.softmax(s, -1).max(-1).values[..., 16:].mean())


def check_model(name, d, c, tmp, rng):
    inputs, targets, weight = batch(rng)
    bp, op = os.path.join(tmp, f"{name}.batch.safetensors"), os.path.join(tmp, f"{name}.out.safetensors")
    st_io.write(bp, {"inputs": inputs, "targets": targets, "weight": weight})
    ours = st_io.read(run(REF_MODEL, "--model", d, "--batch", bp, "--out", op) and op)
    ref, logits, loss, per_pos = ref_loss(d, inputs, targets, weight)
    loss.backward()
    # the error any fp32 evaluation of this function incurs: the same reference in float32
    r32, logits32, loss32, _ = ref_loss(d, inputs, targets, weight, dtype=torch.float32)
    loss32.backward()
    sharp = attention_sharpness(ref, inputs)
    check(f"{name} sharp attention", sharp > 0.5, f"mean top probability {sharp:.2f}")
    e = abs(float(ours["loss"][0]) - loss.item()) / abs(loss.item())
    check(f"{name} loss", e <= TOL, f"ours {float(ours['loss'][0]):.8f} ref {loss.item():.8f} rel {e:.2e}")
    ref_lg = logits.detach().numpy().reshape(-1, V)
    e, e32 = rel_err(ours["logits"], ref_lg), rel_err(logits32.detach().numpy().reshape(-1, V), ref_lg)
    tol = max(TOL, FP32_FACTOR * e32)
    check(f"{name} logits", e <= tol, f"rel {e:.2e} (fp32 torch {e32:.2e}, tolerance {tol:.1e})")
    worst, worst_name, ok = 0.0, "", True
    for pname, p in ref.params.items():
        g = ours.get("grad." + pname)
        e = rel_err(g, p.grad.numpy()) if g is not None else float("inf")
        e32 = rel_err(r32.params[pname].grad.numpy(), p.grad.numpy())
        tol = max(TOL, FP32_FACTOR * e32)
        if e > tol:
            ok = False
            print(f"    {pname}: rel {e:.2e} > tolerance {tol:.1e} (fp32 torch {e32:.2e})")
        if e >= worst:
            worst, worst_name, worst32 = e, pname, e32
    check(f"{name} gradients ({len(ref.params)} tensors)", ok,
          f"max rel {worst:.2e} ({worst_name}; fp32 torch {worst32:.2e} there)")
    # sensitivity: the same weights with default RoPE at theta 10000 (what an implementation ignoring
    # the RoPE settings computes) must be far outside the tolerance
    plain = dict(rope={"rope_type": "default", "rope_theta": 10000.0}, rope_theta=10000.0)
    if any(0 < w < T for w in c["window"]):  # the same weights attending to every earlier key
        with torch.no_grad():
            alt = ref_loss(d, inputs, targets, weight, dict(window=[0] * len(c["window"])))[2].item()
        e = abs(alt - loss.item()) / abs(loss.item())
        check(f"{name} window matters", e > 100 * TOL, f"full-attention loss {alt:.6f} differs by rel {e:.2e}")
    if c["rope"]["rope_type"] != "default" or c["rope_theta"] != 10000.0:
        with torch.no_grad():
            alt = ref_loss(d, inputs, targets, weight, plain)[2].item()
        e = abs(alt - loss.item()) / abs(loss.item())
        check(f"{name} variant matters", e > 100 * TOL, f"default-RoPE loss {alt:.6f} differs by rel {e:.2e}")
    return loss.item()


def make_data(tmp, rng):
    """A packed dataset of 6 documents (-100 labels on each prompt-like prefix) for `shardtune eval`."""
    with open(os.path.join(tmp, "docs.jsonl"), "w") as f:
        for _ in range(6):
            ids = rng.integers(0, V, int(rng.integers(100, 200))).tolist()
            k = int(rng.integers(0, 20))
            labels = [-100] * k + ids[k:]
            f.write(json.dumps({"input_ids": ids, "labels": labels}) + "\n")
    data = os.path.join(tmp, "eval.h5")
    run(BIN, "data", "pack", "--jsonl", os.path.join(tmp, "docs.jsonl"), "--out", data, "--vocab", V)
    return data


def check_eval(name, d, data):
    """`shardtune eval` (the contract: windows of T+1 tokens, stride T, mean loss per unmasked target)
    against the float64 reference on the same windows."""
    with h5py.File(data, "r") as f:
        tokens = f["tokens"][:].astype(np.int64)
        mask = f["loss_mask"][:].astype(np.float64)
    n = (len(tokens) - 1) // T
    idx = np.arange(n)[:, None] * T + np.arange(T)[None, :]
    ref = RefModel.load(d, torch.float64)
    with torch.no_grad():
        w = torch.from_numpy(mask[idx + 1])
        loss, _ = weighted_ce(ref.logits(torch.from_numpy(tokens[idx])), torch.from_numpy(tokens[idx + 1]), w)
    want = loss.item() / w.sum().item()
    ours = json.loads(run(BIN, "eval", "--model", d, "--data", data, "--seq-len", T, "--batch", 2, "--json").stdout)
    e = abs(ours["loss"] - want) / want
    check(f"{name} shardtune eval", e <= TOL and ours["tokens"] == int(w.sum().item()),
          f"ours {ours['loss']:.8f} ref {want:.8f} rel {e:.2e} over {n} windows")


def train_job(tmp, name, d, data, seq_len):
    """`shardtune train` for 2 steps at seq_len on one rank; returns the CompletedProcess."""
    y = os.path.join(tmp, f"{name}.yaml")
    with open(y, "w") as f:
        f.write(f"model: {{ path: {d} }}\nrun_dir: {os.path.join(tmp, name + '_run')}\nseed: 1\n"
                f"train: {{ steps: 2, micro_batch: 1, grad_accum: 1, seq_len: {seq_len}, lr: 1.0e-3, "
                "warmup_steps: 0, log_every: 1000 }\nsharding: { stage: 1 }\n"
                f"tasks: [ {{ name: t, path: {data} }} ]\neval: {{ every_steps: 0 }}\n"
                "checkpoint: { every_steps: 0, keep_last: 0 }\nmonitor: { publish: \"\", control: \"\" }\n")
    return run(BIN, "train", y, ok=False)


def check_train_limits(tmp, data):
    """Training follows the same rule as the model: dynamic RoPE trains past max_position_embeddings (96 < 128);
    a window shorter than seq_len trains with windowed attention."""
    r = train_job(tmp, "dyn", os.path.join(tmp, "llama_dynamic"), data, T)
    check("dynamic RoPE trains at seq_len 128 > max_position_embeddings 96", r.returncode == 0,
          r.stderr.strip()[-200:] if r.returncode else "2 steps")
    r = train_job(tmp, "win", os.path.join(tmp, "mistral_window48"), data, T)
    check("Mistral trains at seq_len 128 > sliding_window 48", r.returncode == 0,
          r.stderr.strip()[-200:] if r.returncode else "2 steps")


def check_refusals(tmp, rng):
    d = os.path.join(tmp, "su_rope")
    make_model(d, LlamaConfig, {}, rng)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["rope_parameters"] = {"rope_type": "proportional", "rope_theta": 10000.0, "factor": 2.0}
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    r = run(ROPE_DUMP, "--model", d, "--seq-len", 8, "--out", os.path.join(tmp, "y.safetensors"), ok=False)
    check("unknown rope_type refused by name", r.returncode != 0 and "rope_type 'proportional'" in r.stderr,
          r.stderr.strip())


def main():
    rng = np.random.default_rng(14)
    with tempfile.TemporaryDirectory() as tmp:
        data = make_data(tmp, rng)
        for name, cls, extra in MODELS:
            print(f"{name}:", flush=True)
            d = os.path.join(tmp, name)
            config, c = make_model(d, cls, extra, rng)
            check_tables(name, d, config, c, cls, tmp)
            check_model(name, d, c, tmp, rng)
            check_eval(name, d, data)
        check_refusals(tmp, rng)
        check_train_limits(tmp, data)
    if failures:
        print(f"FAILED: {len(failures)} checks: {', '.join(failures)}")
        return 1
    print("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
