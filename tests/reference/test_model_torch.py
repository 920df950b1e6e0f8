"""test_model_torch.py — shardtune's model math (tests/tools/ref_model, which runs worker/model.c and
worker/optim.c on the CPU backend) against the independent PyTorch reference in torch_model.py.

For five random tiny models (GPT-2 tied / untied, Llama GQA untied, Llama tied H == KVH with an explicit
head_dim, Qwen2 with q/k/v biases), whose weights are written here from numpy with a non-trivial scale
(std 0.1 matrices, norm weights 1 + 0.1 N(0,1), non-zero biases) so every parameter matters:

 1. forward + backward: logits, loss, per-position loss and EVERY parameter gradient against a float64
    torch reference. Error measure, per tensor: rel = max|ours - ref| / max|ref| (the largest absolute
    error in units of the tensor's scale: robust to elements near zero, where an elementwise relative
    error means nothing for fp32 results). Required: rel <= 1e-5.
 2. AdamW: 5 steps (2 warmup steps, then the decay) with clipping active every step and a warmup +
    cosine (or linear) schedule. (a) The gradients ref_model used at steps 2..5, at its updated weights,
    match float64 torch at those weights (rel <= 1e-5). (b) torch.optim.AdamW with two parameter groups,
    torch.nn.utils.clip_grad_norm_ and a LambdaLR implementing worker/optim.c's st_lr_at, in float32 and
    fed those same gradients, gives ref_model's weights after every step within rel 1e-6 and its
    learning rates within 1e-6 relative (see check_adamw for why (b) takes our gradients).
 3. masked positions: changing the targets of weight-0 positions (to other ids and to -100) leaves
    loss, logits and all gradients bit-identical.
Env (set by ctest): ST_BUILD_DIR (ref_model lives there)."""
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from torch_model import RefModel, is_no_decay, param_shapes, parse_config, weighted_ce  # noqa: E402

torch.set_num_threads(2)
REF_MODEL = os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "ref_model")
ENV = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")
GRAD_TOL, STEP_TOL = 1e-5, 1e-6

CONFIGS = {
    "gpt2_tied": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, n_inner=96, vocab_size=97,
                      n_positions=32, layer_norm_epsilon=1e-5, activation_function="gelu_new",
                      tie_word_embeddings=True),
    "gpt2_untied": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=2, vocab_size=101, n_positions=16,
                        layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=False),
    "llama_gqa_untied": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                             max_position_embeddings=64, rms_norm_eps=1e-6, rope_theta=10000.0,
                             hidden_act="silu", tie_word_embeddings=False),
    "llama_tied_mha": dict(model_type="llama", hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=4, head_dim=16, vocab_size=96,
                           max_position_embeddings=32, rms_norm_eps=1e-5, rope_theta=500.0, hidden_act="silu",
                           tie_word_embeddings=True),
    "qwen2_bias": dict(model_type="qwen2", hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=2, vocab_size=103, max_position_embeddings=32,
                       rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False,
                       use_sliding_window=False),
}
SEQ = {"gpt2_tied": 12, "gpt2_untied": 16, "llama_gqa_untied": 16, "llama_tied_mha": 8, "qwen2_bias": 10}
B = 2

failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def rel_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    scale = np.abs(ref).max()
    diff = np.abs(ours - ref).max()
    return diff / scale if scale > 0 else diff


def random_weights(c, rng):
    out = {}
    for name, shape in param_shapes(c).items():
        if len(shape) == 2:
            out[name] = rng.normal(0.0, 0.1, shape)
        elif name.endswith(".bias"):
            out[name] = rng.normal(0.0, 0.1, shape)
        else:  # norm weights
            out[name] = 1.0 + rng.normal(0.0, 0.1, shape)
    return {k: v.astype(np.float32) for k, v in out.items()}


def write_model(d, config, tensors):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    st_io.write(os.path.join(d, "model.safetensors"), tensors)


def random_batch(c, T, rng):
    V = c["vocab"]
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) >= 0.3
    mask[0, 0] = False  # at least one masked and one live position in each row
    mask[1, -1] = False
    mask[:, 1] = True
    w = np.where(mask, rng.uniform(0.5, 1.5, (B, T)), 0.0)
    return inputs, targets, (w / w.sum()).astype(np.float32)


def run_ref_model(model_dir, batch_path, out_path, *extra):
    r = subprocess.run([REF_MODEL, "--model", model_dir, "--batch", batch_path, "--out", out_path, *map(str, extra)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    assert r.returncode == 0, f"ref_model failed: {r.stderr}"
    return st_io.read(out_path)


def torch_forward_backward(model, inputs, targets, weight):
    model.zero_grad()
    logits = model.logits(torch.from_numpy(inputs).long())
    loss, per_pos = weighted_ce(logits, torch.from_numpy(targets), torch.from_numpy(weight))
    loss.backward()
    return logits, loss, per_pos


# ---------------- 1. forward and backward vs float64 ----------------

def check_grads(name, model_dir, c, batch, ours):
    ref = RefModel.load(model_dir, torch.float64)
    logits, loss, per_pos = torch_forward_backward(ref, *batch)
    V = c["vocab"]
    check(f"{name} logits", rel_err(ours["logits"], logits.detach().numpy().reshape(-1, V)) <= GRAD_TOL,
          f"rel {rel_err(ours['logits'], logits.detach().numpy().reshape(-1, V)):.2e}")
    e = abs(float(ours["loss"][0]) - loss.item()) / abs(loss.item())
    check(f"{name} loss", e <= GRAD_TOL, f"ours {float(ours['loss'][0]):.8f} ref {loss.item():.8f} rel {e:.2e}")
    e = rel_err(ours["loss_per_pos"], per_pos.detach().numpy())
    check(f"{name} loss_per_pos", e <= GRAD_TOL, f"rel {e:.2e}")
    worst, worst_name, n = 0.0, "", 0
    for pname, p in ref.params.items():
        key = "grad." + pname
        if key not in ours:
            check(f"{name} {key}", False, "missing from ref_model output")
            continue
        e = rel_err(ours[key], p.grad.numpy())
        n += 1
        if e > GRAD_TOL:
            check(f"{name} {key}", False, f"rel {e:.2e} (max |ref| {np.abs(p.grad.numpy()).max():.2e})")
        if e >= worst:
            worst, worst_name = e, pname
    extra = [k for k in ours if k.startswith("grad.") and k[5:] not in ref.params]
    check(f"{name} gradient set", not extra, f"{n} tensors compared" + (f", unexpected {extra}" if extra else ""))
    check(f"{name} gradients", worst <= GRAD_TOL, f"max rel {worst:.2e} ({worst_name})")
    grad_norm = math.sqrt(sum(float((p.grad ** 2).sum()) for p in ref.params.values()))
    return grad_norm


# ---------------- 2. AdamW + clipping + schedule vs torch.optim in float32 ----------------

def lr_lambda_factory(schedule, warmup, total, min_ratio):
    """worker/optim.c st_lr_at as a multiplier of the base lr, for step k = 0, 1, ..."""
    def f(step):
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        span = total - warmup
        progress = min(max((step - warmup) / span if span > 0 else 1.0, 0.0), 1.0)
        shape = 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_ratio + (1.0 - min_ratio) * shape
    return f


def check_adamw(name, model_dir, batch_path, batch, grad_norm, schedule, tmp):
    """Two links of one chain. (a) The gradients ref_model used at every step k (computed at its own
    weights after k-1 updates) equal the float64 torch gradients at those same weights (rel <= 1e-5).
    (b) torch.optim.AdamW + clip_grad_norm_ + LambdaLR in float32, fed exactly those gradients, lands on
    ref_model's weights after every step (rel <= 1e-6). Feeding torch its own fp32 gradients instead
    cannot reach 1e-6: Adam's first steps map g to ~g/(|g| + eps), so gradient elements that are zero in
    exact arithmetic (GPT-2 / Qwen2 key biases: softmax ignores a per-row constant) or ~eps in size turn
    independent rounding noise into O(lr) weight differences."""
    f32 = lambda x: float(np.float32(x))  # values exactly as the C side parses them
    steps, warmup, total, min_ratio = 5, 2, 5, 0.1
    lr, b1, b2, eps, wd = f32(1e-2), f32(0.9), f32(0.95), f32(1e-8), f32(0.1)
    clip = f32(0.1 * grad_norm)
    ours = run_ref_model(model_dir, batch_path, os.path.join(tmp, f"{name}.adam.safetensors"),
                         "--steps", steps, "--lr", repr(lr), "--beta1", repr(b1), "--beta2", repr(b2),
                         "--eps", repr(eps), "--wd", repr(wd), "--clip", repr(clip), "--schedule", schedule,
                         "--warmup", warmup, "--total", total, "--min-lr-ratio", repr(f32(min_ratio)))
    grads_of = lambda k: {n[len(f"grad{k if k > 1 else ''}."):]: a for n, a in ours.items()
                          if n.startswith(f"grad{k if k > 1 else ''}.")}
    # (a) gradients along ref_model's trajectory vs float64 torch at the same weights
    ref = RefModel.load(model_dir, torch.float64)
    worst_g = 0.0
    for k in range(2, steps + 1):
        with torch.no_grad():
            for n, p in ref.params.items():
                p.copy_(torch.from_numpy(ours[f"step{k - 1}.{n}"].astype(np.float64)))
        torch_forward_backward(ref, *batch)
        g = grads_of(k)
        worst_g = max(worst_g, max(rel_err(g[n], p.grad.numpy()) for n, p in ref.params.items()))
    check(f"{name} gradients at steps 2..{steps}", worst_g <= GRAD_TOL, f"max rel {worst_g:.2e} vs float64 torch")
    # (b) the optimizer, clipping and schedule vs torch.optim in float32
    model = RefModel.load(model_dir, torch.float32)
    decay = [p for n, p in model.params.items() if not is_no_decay(n)]
    no_decay = [p for n, p in model.params.items() if is_no_decay(n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(b1, b2), eps=eps)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda_factory(schedule, warmup, total, f32(min_ratio)))
    worst_w, worst_lr = 0.0, 0.0
    for k in range(1, steps + 1):
        g = grads_of(k)
        for n, p in model.params.items():
            p.grad = torch.from_numpy(g[n].copy())
        norm = float(torch.nn.utils.clip_grad_norm_(list(model.params.values()), clip))
        if not norm > clip:
            check(f"{name} clipping active at step {k}", False, f"grad norm {norm:.4g} <= clip {clip:.4g}")
        lr_k = opt.param_groups[0]["lr"]
        e_lr = abs(float(ours[f"lr{k}"][0]) - lr_k) / lr_k
        worst_lr = max(worst_lr, e_lr)
        opt.step()
        sched.step()
        step_worst, step_name = 0.0, ""
        for pname, p in model.params.items():
            e = rel_err(ours[f"step{k}.{pname}"], p.detach().numpy())
            if e >= step_worst:
                step_worst, step_name = e, pname
        print(f"       step {k}: lr {lr_k:.6g} (ours {float(ours[f'lr{k}'][0]):.6g}), grad norm {norm:.4g} "
              f"clip {clip:.4g}, max weight rel err {step_worst:.2e} ({step_name})")
        worst_w = max(worst_w, step_worst)
    check(f"{name} AdamW {steps} steps ({schedule}, clipped)", worst_w <= STEP_TOL and worst_lr <= STEP_TOL,
          f"max weight rel err {worst_w:.2e}, max lr rel err {worst_lr:.2e}")


# ---------------- 3. masked positions ----------------

def check_masked(name, model_dir, batch, first, tmp):
    inputs, targets, weight = batch
    rng = np.random.default_rng(7)
    t2 = targets.copy()
    masked = weight == 0
    V = int(first["logits"].shape[1])
    t2[masked] = (targets[masked] + rng.integers(1, V, masked.sum())) % V
    t2[masked & (np.arange(t2.size).reshape(t2.shape) % 2 == 0)] = -100
    assert (t2[masked] != targets[masked]).all() and (t2[~masked] == targets[~masked]).all()
    path = os.path.join(tmp, f"{name}.batch2.safetensors")
    st_io.write(path, {"inputs": inputs, "targets": t2, "weight": weight})
    second = run_ref_model(model_dir, path, os.path.join(tmp, f"{name}.out2.safetensors"))
    differ = [k for k in first if not np.array_equal(first[k].view(np.uint32), second[k].view(np.uint32))]
    check(f"{name} masked targets change nothing", not differ and set(first) == set(second),
          f"{len(first)} tensors bit-identical" if not differ else f"differ: {differ[:5]}")


def main():
    rng = np.random.default_rng(20240601)
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, config) in enumerate(CONFIGS.items()):
            c = parse_config(config)
            print(f"[{name}] {c['model_type']} L={c['n_layer']} C={c['d_model']} H={c['n_head']} "
                  f"KVH={c['n_kv_head']} hd={c['head_dim']} F={c['d_ff']} V={c['vocab']} tied={c['tied']} "
                  f"B={B} T={SEQ[name]}")
            model_dir = os.path.join(tmp, name)
            write_model(model_dir, config, random_weights(c, rng))
            batch = random_batch(c, SEQ[name], rng)
            batch_path = os.path.join(tmp, f"{name}.batch.safetensors")
            st_io.write(batch_path, dict(zip(("inputs", "targets", "weight"), batch)))
            ours = run_ref_model(model_dir, batch_path, os.path.join(tmp, f"{name}.out.safetensors"))
            grad_norm = check_grads(name, model_dir, c, batch, ours)
            check_adamw(name, model_dir, batch_path, batch, grad_norm, "linear" if i == 1 else "cosine", tmp)
            check_masked(name, model_dir, batch, ours, tmp)
    if failures:
        print(f"FAILED: {len(failures)} comparison(s): {failures}")
        return 1
    print("all model comparisons passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
