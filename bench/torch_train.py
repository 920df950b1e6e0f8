"""torch_train.py — the PyTorch side of bench/cpu_train: trains a GPT-2 or Llama-style decoder written
here from scratch (no reference test modules) on random tokens, fp32, AdamW + grad clipping, with a fixed
number of threads, and prints one JSON line: median step time after warm-up and tokens/s.

Shapes match shardtune's: GPT-2 = learned positions, LayerNorm, tanh-GELU MLP 4C, biases, tied head;
Llama = RMSNorm, RoPE (rotate_half), grouped-query attention, SwiGLU, no biases, untied head.

Run with /usr/bin/python3 (Debian's torch):
  python3 bench/torch_train.py --family gpt2 --layers 4 --dim 256 --heads 4 --vocab 50257 --batch 8 --seq 128
"""
import argparse
import json
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Attention(nn.Module):
    def __init__(self, c, h, kvh, bias, rope):
        super().__init__()
        self.h, self.kvh, self.hd = h, kvh, c // h
        self.qkv = nn.Linear(c, (h + 2 * kvh) * self.hd, bias=bias)
        self.proj = nn.Linear(h * self.hd, c, bias=bias)
        self.rope = rope

    def forward(self, x, cos, sin, mask):
        b, t, _ = x.shape
        hd = self.hd
        q, k, v = self.qkv(x).split([self.h * hd, self.kvh * hd, self.kvh * hd], dim=-1)
        q = q.view(b, t, self.h, hd).transpose(1, 2)
        k = k.view(b, t, self.kvh, hd).transpose(1, 2)
        v = v.view(b, t, self.kvh, hd).transpose(1, 2)
        if self.rope:
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if self.kvh != self.h:
            rep = self.h // self.kvh
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))
        att = att.masked_fill(mask[:t, :t], float("-inf")).softmax(dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, self.h * hd)
        return self.proj(y)


def rotate(x, cos, sin):
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class RMSNorm(nn.Module):
    def __init__(self, c, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(c))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class Block(nn.Module):
    def __init__(self, a):
        super().__init__()
        gpt2 = a.family == "gpt2"
        norm = (lambda: nn.LayerNorm(a.dim, eps=1e-5)) if gpt2 else (lambda: RMSNorm(a.dim, 1e-5))
        self.gpt2 = gpt2
        self.n1, self.n2 = norm(), norm()
        self.attn = Attention(a.dim, a.heads, a.kv_heads, bias=gpt2, rope=not gpt2)
        if gpt2:
            self.fc = nn.Linear(a.dim, a.ffn)
            self.down = nn.Linear(a.ffn, a.dim)
        else:
            self.gate_up = nn.Linear(a.dim, 2 * a.ffn, bias=False)
            self.down = nn.Linear(a.ffn, a.dim, bias=False)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.n1(x), cos, sin, mask)
        h = self.n2(x)
        if self.gpt2:
            h = F.gelu(self.fc(h), approximate="tanh")
        else:
            g, u = self.gate_up(h).chunk(2, dim=-1)
            h = F.silu(g) * u
        return x + self.down(h)


class Decoder(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a
        self.wte = nn.Embedding(a.vocab, a.dim)
        self.wpe = nn.Embedding(a.seq, a.dim) if a.family == "gpt2" else None
        self.blocks = nn.ModuleList(Block(a) for _ in range(a.layers))
        self.nf = nn.LayerNorm(a.dim, eps=1e-5) if a.family == "gpt2" else RMSNorm(a.dim, 1e-5)
        self.head = None if a.family == "gpt2" else nn.Linear(a.dim, a.vocab, bias=False)
        for p in self.parameters():
            if p.dim() == 2:
                nn.init.normal_(p, std=0.02)
        hd = a.dim // a.heads
        inv = 10000.0 ** (-torch.arange(0, hd // 2, dtype=torch.float32) * 2.0 / hd)
        ang = torch.arange(a.seq, dtype=torch.float32)[:, None] * inv[None, :]
        self.register_buffer("cos", torch.cat((ang.cos(), ang.cos()), dim=-1), persistent=False)
        self.register_buffer("sin", torch.cat((ang.sin(), ang.sin()), dim=-1), persistent=False)
        self.register_buffer("mask", torch.triu(torch.ones(a.seq, a.seq, dtype=torch.bool), 1), persistent=False)

    def forward(self, idx, targets):
        b, t = idx.shape
        x = self.wte(idx)
        if self.wpe is not None:
            x = x + self.wpe(torch.arange(t))
        for blk in self.blocks:
            x = blk(x, self.cos[:t], self.sin[:t], self.mask)
        x = self.nf(x)
        logits = x @ self.wte.weight.t() if self.head is None else self.head(x)
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--family", choices=["gpt2", "llama"], required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--dim", type=int, required=True)
    p.add_argument("--heads", type=int, required=True)
    p.add_argument("--kv-heads", type=int, default=0)
    p.add_argument("--ffn", type=int, default=0)
    p.add_argument("--vocab", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--seq", type=int, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    a.kv_heads = a.kv_heads or a.heads
    a.ffn = a.ffn or 4 * a.dim
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Decoder(a)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    times, losses = [], []
    for step in range(a.warmup + a.steps):
        tok = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(tok[:, :-1].contiguous(), tok[:, 1:].contiguous())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        dt = time.perf_counter() - t0
        losses.append(loss.item())
        if step >= a.warmup:
            times.append(dt)
    med = statistics.median(times)
    print(json.dumps({"step_ms": med * 1e3, "tokens_per_s": a.batch * a.seq / med, "loss_first": losses[0],
                      "loss_last": losses[-1], "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
