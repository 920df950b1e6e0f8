"""test_mfu_flops.py — the FLOPs MFU divides by are the FLOPs the step performs.

For a set of configurations (full fine-tuning, frozen lower layers, head only, attention-only modules,
LoRA, DoRA, activation checkpointing, packed documents, a sliding window, GPT-2) this counts, here in
Python from the model's shapes alone, every matmul one training forward + backward issues and the attended
(query, key) pairs, and compares with two numbers from tests/tools/flop_count: the FLOPs its counting CPU
backend saw (every be->matmul call, every attention call's pairs by brute force) and the model's own
st_model_step_flops (what train_report's MFU uses). All counts are integers far below 2^53: exact equality.
Also: for full fine-tuning the matmul count is exactly 6 x tokens x (linear + head parameters), the
textbook rule, and the old formula (6N + 12 L T C over all parameters) overstates a frozen model's work
several times, which is where the 105-163% MFU came from.
"""
import json
import os
import subprocess
import sys

import numpy as np

BUILD = os.environ.get("ST_BUILD_DIR", "build")
TOOL = os.path.join(BUILD, "flop_count")


def run(args):
    out = subprocess.run([TOOL] + args, check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def pairs(B, T, window, doc_len):
    """Attended (query, key) pairs over the batch, by enumeration."""
    i = np.arange(T)[:, None]
    j = np.arange(T)[None, :]
    ok = j <= i
    if window:
        ok &= (i - j) < window
    if doc_len:
        ok &= (j // doc_len) == (i // doc_len)  # positions restart every doc_len tokens
    return B * int(ok.sum())


def expected(cfg):
    gpt2 = cfg.get("family") == "gpt2"
    L, C, H = cfg.get("layers", 3), cfg.get("dim", 64), cfg.get("heads", 4)
    KV = H if gpt2 else cfg.get("kv_heads", 2)
    F, V, B, T = cfg.get("ffn", 160), cfg.get("vocab", 96), cfg.get("batch", 2), cfg.get("seq", 24)
    hd = C // H
    N = B * T
    first, modules = cfg.get("first", 0), cfg.get("modules", "all")
    r, dora, ckpt = cfg.get("lora", 0), cfg.get("dora", False), cfg.get("act_ckpt", False)
    window = cfg.get("window", 0) if cfg.get("window", 0) and T > cfg.get("window", 0) else 0
    doc_len = cfg.get("doc_len", 0)
    Q, A = (H + 2 * KV) * hd, H * hd
    F1 = F if gpt2 else 2 * F
    shapes = {"qkv": (C, Q), "o": (A, C), "up": (C, F1), "down": (F, C)}  # (in, out)
    lin = {k: 2 * N * i * o for k, (i, o) in shapes.items()}
    # adapters (Llama: q, k, v, o, gate, up, down): (site, in, out)
    adapters = [("qkv", C, H * hd), ("qkv", C, KV * hd), ("qkv", C, KV * hd), ("o", A, C),
                ("up", C, F), ("up", C, F), ("down", F, C)] if r else []
    if r:  # adapters on layers >= first (flop_count's --first-trained-layer), the only trainable tensors
        lowest = first
        trains = {k: False for k in lin}
        head_trains = False
    elif modules == "head":
        lowest, trains, head_trains = L, {k: False for k in lin}, True
    else:
        lowest = first
        trains = {k: modules == "all" or (modules == "attn") == (k in ("qkv", "o")) for k in lin}
        head_trains = modules == "all"

    def lora_fwd(l, site=None):
        f = 0
        for s, i, o in (adapters if l >= first else []):
            if site is not None and s != site:
                continue
            f += 2 * N * r * i + 2 * N * o * r
            if dora:
                f += 2 * o * i * r + 2 * N * o * i
        return f

    def lora_bwd(l):
        f = 0
        for _, i, o in (adapters if l >= first else []):
            f += 2 * (2 * N * o * r) + 2 * (2 * N * r * i)  # dB, du, dA, dx
            if dora:
                f += 2 * N * o * i
        return f

    mm = 0
    for l in range(L):
        fwd = sum(lin.values()) + lora_fwd(l)
        mm += fwd
        if l < lowest:
            continue
        if ckpt:
            mm += fwd - lin["down"] - lora_fwd(l, "down")
        mm += sum(lin.values()) + lora_bwd(l)
        mm += sum(v for k, v in lin.items() if trains[k])
    head = 2 * N * C * V
    mm += head + head + (head if head_trains else 0)
    p = pairs(B, T, window, doc_len)
    layers_bwd = L - lowest
    att = 4 * hd * H * p * L + (10 + (4 if ckpt else 0)) * hd * H * p * layers_bwd
    return mm, att, (L, C, H, KV, F, V, N, T)


CASES = [
    {},
    {"first": 2},
    {"first": 1, "modules": "attn"},
    {"modules": "head"},
    {"lora": 4},
    {"lora": 4, "dora": True},
    {"act_ckpt": True},
    {"act_ckpt": True, "first": 1, "lora": 2},
    {"doc_len": 5},
    {"window": 7},
    {"doc_len": 6, "window": 4, "act_ckpt": True},
    {"family": "gpt2", "act_ckpt": True, "first": 1},
    {"layers": 4, "dim": 96, "heads": 6, "kv_heads": 3, "ffn": 256, "vocab": 200, "batch": 3, "seq": 40, "first": 3},
]


def args_of(cfg):
    a = []
    names = {"family": "--family", "layers": "--layers", "dim": "--dim", "heads": "--heads", "kv_heads": "--kv-heads",
             "ffn": "--ffn", "vocab": "--vocab", "batch": "--batch", "seq": "--seq", "first": "--first-trained-layer",
             "modules": "--modules", "lora": "--lora", "doc_len": "--doc-len", "window": "--window"}
    for k, v in cfg.items():
        if k in names:
            a += [names[k], str(v)]
    if cfg.get("dora"):
        a.append("--dora")
    if cfg.get("act_ckpt"):
        a.append("--act-ckpt")
    return a


def main():
    if not os.path.exists(TOOL):
        print(f"skip: {TOOL} not built")
        sys.exit(77)
    for cfg in CASES:
        got = run(args_of(cfg))
        mm, att, (L, C, H, KV, F, V, N, T) = expected(cfg)
        assert got["matmul"] == mm, (cfg, "matmul", got["matmul"], mm)
        assert got["attention"] == att, (cfg, "attention", got["attention"], att)
        assert got["model"] == mm + att, (cfg, "model", got["model"], mm + att)
        print(f"ok: {cfg or 'full'}: {got['model'] / 1e6:.3f} MFLOP/step (matmul {mm / 1e6:.3f}, attention {att / 1e6:.3f})")
    # the textbook rule for full fine-tuning: 6 x tokens x (linear + head parameters)
    cfg = {}
    got = run(args_of(cfg))
    mm, _, (L, C, H, KV, F, V, N, T) = expected(cfg)
    hd = C // H
    params = L * (C * (H + 2 * KV) * hd + H * hd * C + C * 2 * F + F * C) + C * V
    assert got["matmul"] == 6 * N * params, (got["matmul"], 6 * N * params)
    # the old count (all parameters, 6N + 12 L T C per token) vs the work of a model frozen below its last layer
    frozen = run(args_of({"first": 2}))
    old = N * (6 * params + 12 * L * T * C)
    print(f"ok: full fine-tuning = 6 x tokens x params; frozen below layer 2: the old formula counted "
          f"{old / frozen['model']:.2f}x the work performed")
    assert old / frozen["model"] > 1.2
    print("PASS")


if __name__ == "__main__":
    main()
