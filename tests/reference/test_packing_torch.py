"""test_packing_torch.py — train.packing documents: shardtune's document-packed model math (tests/tools/ref_model
with a "doc_pos" batch tensor: worker/model.c with the attention_docs / rope_pos / embedding_pos kernels of the
CPU backend) against float64 torch running EACH DOCUMENT ALONE (torch_model.py: its own sequence, positions
0..len-1, plain causal mask). Packed attention that never crosses a document and positions that restart per
document are exactly that, so loss, per-position loss, logits and every parameter gradient must agree.

Models: a tiny Llama (GQA, RoPE), a tiny Mistral (sliding window 24, MQA) and a tiny GPT-2 (learned positions), T = 160 with documents of 1 to 70
tokens, padding at the end of a row (its own segment, weight 0). q/k projections are scaled up so
attention is sharp: with near-uniform attention a wrong mask or position would barely move the loss.

Tolerance: per tensor rel = max|ours - ref| / max|ref| <= 2e-5. fp32 rounding (2^-24 = 6e-8 per
operation) grows with the accumulation depth: dot products of up to max(C, F, T) = 160 terms (~sqrt(160)
x 6e-8 = 8e-7 typical, 160 x 6e-8 = 1e-5 worst case) through 2 layers' forward and backward; the sharp
softmax (logit range ~10) amplifies relative score errors by up to its range. 2e-5 covers that worst case;
the control below (plain causal attention over the same packed rows) must be off by > 100x more.

Also: activation checkpointing gives bit-identical loss and gradients in documents mode, and bf16 mixed
precision stays within bf16's rounding (rel <= 3e-2 on the loss, 2^-8 = 4e-3 per operand over a few
rounding stages) of the fp32 result.
Env (set by ctest): ST_BUILD_DIR (ref_model lives there)."""
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from test_model_torch import random_weights, rel_err, run_ref_model, write_model  # noqa: E402
from torch_model import RefModel, parse_config, weighted_ce  # noqa: E402

torch.set_num_threads(2)
TOL = 2e-5
T = 160
CONFIGS = {
    "llama_gqa": dict(model_type="llama", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=100, max_position_embeddings=256,
                      rms_norm_eps=1e-6, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False),
    # a sliding window (24) shorter than the long documents: the window still applies inside a document
    "mistral_window": dict(model_type="mistral", hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=1, vocab_size=90, max_position_embeddings=256,
                           rms_norm_eps=1e-5, rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False,
                           sliding_window=24),
    "gpt2": dict(model_type="gpt2", n_embd=48, n_layer=2, n_head=4, n_inner=96, vocab_size=97, n_positions=256,
                 layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True),
}
# documents per row (lengths in positions); the rest of the row is padding
ROWS = [[50, 70, 1, 30], [8, 64, 64, 17]]

failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def sharpen(c, w):
    """Scales the q and k projections x3 (scores x9): attention becomes far from uniform."""
    for name in w:
        if c["family"] == "gpt2" and name.endswith("attn.c_attn.weight"):
            w[name][:, : 2 * c["d_model"]] *= 3.0  # Conv1D [in, out]: q | k | v columns
        elif name.endswith(("q_proj.weight", "k_proj.weight")):
            w[name] *= 3.0
    return w


def packed_batch(c, rng):
    B = len(ROWS)
    inputs = rng.integers(0, c["vocab"], (B, T)).astype(np.int32)
    targets = rng.integers(0, c["vocab"], (B, T)).astype(np.int32)
    weight = np.zeros((B, T), np.float32)
    pos = np.zeros((B, T), np.int32)
    segs = []
    for b, lens in enumerate(ROWS):
        o = 0
        for n in lens + [T - sum(lens)]:  # the last one is padding
            pos[b, o:o + n] = np.arange(n)
            if o + n <= sum(lens):
                weight[b, o:o + n] = (rng.random(n) >= 0.2) * rng.uniform(0.5, 1.5, n)
            segs.append((b, o, n))
            o += n
    weight /= weight.sum()
    return inputs, targets, weight.astype(np.float32), pos, segs


def torch_per_document(model_dir, c, batch):
    """Sum over documents of each document's own weighted CE (float64), its gradients, per-position loss
    and logits."""
    inputs, targets, weight, _, segs = batch
    ref = RefModel.load(model_dir, torch.float64)
    ref.zero_grad()
    total = 0.0
    per_pos = np.zeros(inputs.shape, np.float64)
    logits = np.zeros(inputs.shape + (c["vocab"],), np.float64)
    for b, o, n in segs:
        if n == 0:
            continue
        lg = ref.logits(torch.from_numpy(inputs[b:b + 1, o:o + n]).long())
        loss, pp = weighted_ce(lg, torch.from_numpy(targets[b:b + 1, o:o + n]), torch.from_numpy(weight[b:b + 1, o:o + n]))
        loss.backward()
        total += loss.item()
        per_pos[b, o:o + n] = pp.detach().numpy().reshape(-1)
        logits[b, o:o + n] = lg.detach().numpy()[0]
    grads = {k: p.grad.numpy() for k, p in ref.params.items() if p.grad is not None}
    return total, per_pos, logits, grads


def compare(name, ours, ref, tol):
    total, per_pos, logits, grads = ref
    e = abs(float(ours["loss"][0]) - total) / abs(total)
    check(f"{name} loss", e <= tol, f"ours {float(ours['loss'][0]):.8f} ref {total:.8f} rel {e:.2e}")
    e = rel_err(ours["loss_per_pos"], per_pos.reshape(-1))
    check(f"{name} loss_per_pos", e <= tol, f"rel {e:.2e}")
    e = rel_err(ours["logits"], logits.reshape(-1, logits.shape[-1]))
    check(f"{name} logits", e <= tol, f"rel {e:.2e}")
    worst, wname = 0.0, ""
    for k, g in grads.items():
        if "grad." + k not in ours:
            check(f"{name} grad.{k}", False, "missing")
            continue
        e = rel_err(ours["grad." + k], g)
        if e >= worst:
            worst, wname = e, k
    check(f"{name} gradients", worst <= tol, f"{len(grads)} tensors, max rel {worst:.2e} ({wname})")


def main():
    rng = np.random.default_rng(19)
    with tempfile.TemporaryDirectory() as tmp:
        for name, cfg in CONFIGS.items():
            print(name)
            c = parse_config(cfg)
            mdir = os.path.join(tmp, name)
            write_model(mdir, cfg, sharpen(c, random_weights(c, rng)))
            batch = packed_batch(c, rng)
            inputs, targets, weight, pos, _ = batch
            bp, plain_bp = os.path.join(tmp, name + ".b"), os.path.join(tmp, name + ".plain")
            st_io.write(bp, {"inputs": inputs, "targets": targets, "weight": weight, "doc_pos": pos})
            st_io.write(plain_bp, {"inputs": inputs, "targets": targets, "weight": weight})
            ours = run_ref_model(mdir, bp, os.path.join(tmp, name + ".o"))
            ref = torch_per_document(mdir, c, batch)
            compare(name, ours, ref, TOL)
            # control: the same packed rows with plain causal attention and positions 0..T-1
            plain = run_ref_model(mdir, plain_bp, os.path.join(tmp, name + ".po"))
            e = rel_err(plain["loss_per_pos"], ref[1].reshape(-1))
            check(f"{name} control (no document reset differs)", e > 100 * TOL, f"rel {e:.2e}")
            # shardtune itself: each document run alone (its own batch of one sequence, no doc_pos) gives the
            # packed run's per-position losses (different matmul shapes: equal within TOL, not bitwise)
            worst = 0.0
            for b, o, n in batch[4][:4]:
                if n < 2:
                    continue
                w1 = np.where(weight[b:b + 1, o:o + n] > 0, 1.0, 0.0).astype(np.float32)
                p1 = os.path.join(tmp, name + ".alone")
                st_io.write(p1, {"inputs": inputs[b:b + 1, o:o + n].copy(), "targets": targets[b:b + 1, o:o + n].copy(),
                                 "weight": w1})
                alone = run_ref_model(mdir, p1, os.path.join(tmp, name + ".ao"))
                packed = ours["loss_per_pos"].reshape(inputs.shape)[b, o:o + n]
                worst = max(worst, rel_err(alone["loss_per_pos"] * (w1[0] > 0), packed * (w1[0] > 0)))
            check(f"{name} each document alone (shardtune)", worst <= TOL, f"per-position loss max rel {worst:.2e}")
            ck = run_ref_model(mdir, bp, os.path.join(tmp, name + ".ck"), "--act-ckpt", 1)
            same = all(np.array_equal(ck[k], ours[k]) for k in ours if k == "loss" or k.startswith("grad."))
            check(f"{name} activation checkpointing", same, "loss and gradients bit-identical" if same else "differ")
            bf = run_ref_model(mdir, bp, os.path.join(tmp, name + ".bf"), "--precision", "bf16")
            e = abs(float(bf["loss"][0]) - ref[0]) / abs(ref[0])
            check(f"{name} bf16 loss", e <= 3e-2, f"rel {e:.2e}")
    if failures:
        print("FAILED:", ", ".join(failures))
        return 1
    print("all packing model checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
