"""torch_model.py — independent PyTorch implementations of GPT-2 and the Llama family (llama, mistral,
qwen2, qwen3), written from Hugging Face semantics, used as the reference for shardtune's model math.

RoPE: rope_inv_freq() re-derives transformers' modeling_rope_utils formulas (default, linear, dynamic, yarn,
llama3, longrope) in numpy float64, rounded to fp32 once (transformers holds inv_freq in fp32); both
config generations are read (rope_parameters, or rope_theta + rope_scaling). Qwen3 applies an RMSNorm over
head_dim to every q and k head before RoPE. Sliding windows follow transformers: key j is visible to query i
when 0 <= i - j < window, on the layers that slide (Mistral: all; Qwen2/3: use_sliding_window with
layer_types or max_window_layers).

LoRA (attach_lora): peft's LoRA Linear as its forward defines it, y = base(x) + scale * (x @ A^T) @ B^T with
lora_A [r, in], lora_B [out, r] and scale = alpha / r (alpha / sqrt(r) with use_rslora); GPT-2's Conv1D
projections too (fan_in_fan_out transposes only the base weight). Adapter tensors are read by their peft
names (base_model.model.<module>.lora_A.weight) and get gradients like the base parameters. DoRA (a
<module>.lora_magnitude_vector tensor [out]) as peft's DoraLinearLayer.forward: the result is
bias + (m / ||W + scale B A||_row) * (x W^T + scale (x A^T) B^T), the norm detached from the graph.
"""
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

import st_io


# ---------------- config ----------------

def parse_config(cfg):
    """HF config.json dict -> plain dict of the hyper-parameters this module uses (HF defaults)."""
    mt = cfg["model_type"]
    if mt == "gpt2":
        C, H = cfg["n_embd"], cfg["n_head"]
        assert cfg.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh")
        return dict(family="gpt2", model_type=mt, d_model=C, n_layer=cfg["n_layer"], n_head=H, n_kv_head=H,
                    head_dim=C // H, d_ff=cfg.get("n_inner") or 4 * C, vocab=cfg["vocab_size"],
                    max_pos=cfg.get("n_positions") or cfg["n_ctx"], eps=cfg.get("layer_norm_epsilon", 1e-5),
                    tied=cfg.get("tie_word_embeddings", True), qkv_bias=True)
    if mt in ("llama", "mistral", "qwen2", "qwen3"):
        C, H = cfg["hidden_size"], cfg["num_attention_heads"]
        assert cfg.get("hidden_act", "silu") == "silu"
        assert not cfg.get("attention_bias", False) and not cfg.get("mlp_bias", False)
        rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        rope.setdefault("rope_type", rope.get("type", "default"))
        rope.setdefault("rope_theta", cfg.get("rope_theta", 10000.0))
        if rope["rope_type"] in ("llama3", "yarn", "longrope"):
            if "original_max_position_embeddings" in cfg:
                rope["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
            rope.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
        hd_default = 128 if mt == "qwen3" else C // H
        # sliding windows as transformers assigns them to layers (Mistral: all; Qwen2/3: use_sliding_window,
        # then layer_types or the layers >= max_window_layers)
        L = cfg["num_hidden_layers"]
        window, sliding = 0, [False] * L
        if mt == "mistral":
            window = cfg.get("sliding_window", 4096) or 0
            sliding = [True] * L
        elif mt in ("qwen2", "qwen3") and cfg.get("use_sliding_window"):
            window = cfg.get("sliding_window", 4096) or 0
            lt = cfg.get("layer_types")
            sliding = ([t == "sliding_attention" for t in lt] if lt else
                       [i >= cfg.get("max_window_layers", 28) for i in range(L)])
        return dict(family="llama", model_type=mt, d_model=C, n_layer=cfg["num_hidden_layers"], n_head=H,
                    n_kv_head=cfg.get("num_key_value_heads") or H, head_dim=cfg.get("head_dim") or hd_default,
                    d_ff=cfg["intermediate_size"], vocab=cfg["vocab_size"], max_pos=cfg["max_position_embeddings"],
                    eps=cfg.get("rms_norm_eps", 1e-6), rope_theta=rope["rope_theta"], rope=rope,
                    tied=cfg.get("tie_word_embeddings", False), qkv_bias=mt == "qwen2", qk_norm=mt == "qwen3",
                    window=[window if s else 0 for s in sliding])
    raise ValueError(f"model_type {mt!r} is not implemented by the reference")


def param_shapes(c):
    """{HF name: shape} of every parameter a model with parsed config c has, in HF layout."""
    C, F_, V, L = c["d_model"], c["d_ff"], c["vocab"], c["n_layer"]
    s = {}
    if c["family"] == "gpt2":
        s["wte.weight"] = (V, C)
        s["wpe.weight"] = (c["max_pos"], C)
        for l in range(L):
            p = f"h.{l}."
            s.update({p + "ln_1.weight": (C,), p + "ln_1.bias": (C,),
                      p + "attn.c_attn.weight": (C, 3 * C), p + "attn.c_attn.bias": (3 * C,),
                      p + "attn.c_proj.weight": (C, C), p + "attn.c_proj.bias": (C,),
                      p + "ln_2.weight": (C,), p + "ln_2.bias": (C,),
                      p + "mlp.c_fc.weight": (C, F_), p + "mlp.c_fc.bias": (F_,),
                      p + "mlp.c_proj.weight": (F_, C), p + "mlp.c_proj.bias": (C,)})
        s["ln_f.weight"] = (C,)
        s["ln_f.bias"] = (C,)
    else:
        QD, KVD = c["n_head"] * c["head_dim"], c["n_kv_head"] * c["head_dim"]
        s["model.embed_tokens.weight"] = (V, C)
        for l in range(L):
            p = f"model.layers.{l}."
            s[p + "input_layernorm.weight"] = (C,)
            s[p + "self_attn.q_proj.weight"] = (QD, C)
            s[p + "self_attn.k_proj.weight"] = (KVD, C)
            s[p + "self_attn.v_proj.weight"] = (KVD, C)
            if c["qkv_bias"]:
                s[p + "self_attn.q_proj.bias"] = (QD,)
                s[p + "self_attn.k_proj.bias"] = (KVD,)
                s[p + "self_attn.v_proj.bias"] = (KVD,)
            s[p + "self_attn.o_proj.weight"] = (C, QD)
            if c.get("qk_norm"):
                s[p + "self_attn.q_norm.weight"] = (c["head_dim"],)
                s[p + "self_attn.k_norm.weight"] = (c["head_dim"],)
            s[p + "post_attention_layernorm.weight"] = (C,)
            s[p + "mlp.gate_proj.weight"] = (F_, C)
            s[p + "mlp.up_proj.weight"] = (F_, C)
            s[p + "mlp.down_proj.weight"] = (C, F_)
        s["model.norm.weight"] = (C,)
    if not c["tied"]:
        s["lm_head.weight"] = (V, C)
    return s


def is_no_decay(name):
    """AdamW groups: no weight decay for norms, biases and embeddings (an untied lm_head decays)."""
    return (name.endswith(".bias") or "ln_" in name or "norm" in name
            or name in ("wte.weight", "wpe.weight", "model.embed_tokens.weight"))


# ---------------- building blocks (HF semantics) ----------------

def gelu_new(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


def rms_norm(x, w, eps):
    """LlamaRMSNorm: in at least fp32, x * rsqrt(mean(x^2) + eps), cast back, then times weight."""
    h = x.to(torch.promote_types(x.dtype, torch.float32))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_inv_freq(c, T):
    """(inv_freq [hd/2] as fp32 numpy, attention_scaling) of parsed config c for a batch of length T, from
    transformers' modeling_rope_utils formulas evaluated in float64 and rounded to fp32 once."""
    r, hd, theta = c["rope"], c["head_dim"], float(c["rope_theta"])
    t = r["rope_type"]
    i = np.arange(0, hd, 2, dtype=np.float64)
    base_inv = 1.0 / theta ** (i / hd)
    att = 1.0
    if t == "default":
        inv = base_inv
    elif t == "linear":
        inv = base_inv / r["factor"]
    elif t == "dynamic":  # NTK base for seq_len = max(T, max_position_embeddings)
        L = max(T, c["max_pos"])
        b = theta * ((r["factor"] * L / c["max_pos"]) - (r["factor"] - 1)) ** (hd / (hd - 2))
        inv = 1.0 / b ** (i / hd)
    elif t == "yarn":
        omax = r["original_max_position_embeddings"]
        factor = r.get("factor") or c["max_pos"] / omax
        mscale = lambda s, m=1.0: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0  # noqa: E731
        att = r.get("attention_factor")
        if att is None:
            if r.get("mscale") and r.get("mscale_all_dim"):
                att = mscale(factor, r["mscale"]) / mscale(factor, r["mscale_all_dim"])
            else:
                att = mscale(factor)
        bf, bs = r.get("beta_fast") or 32, r.get("beta_slow") or 1
        cdim = lambda n: hd * math.log(omax / (n * 2 * math.pi)) / (2 * math.log(theta))  # noqa: E731
        lo, hi = cdim(bf), cdim(bs)
        if r.get("truncate", True):
            lo, hi = math.floor(lo), math.ceil(hi)
        lo, hi = max(lo, 0), min(hi, hd - 1)
        if lo == hi:
            hi += 0.001
        ramp = np.clip((np.arange(hd // 2, dtype=np.float64) - lo) / (hi - lo), 0, 1)
        pos_freqs = theta ** (i / hd)
        extra = 1 - ramp
        inv = (1.0 / (factor * pos_freqs)) * (1 - extra) + (1.0 / pos_freqs) * extra
    elif t == "llama3":
        omax, f = r["original_max_position_embeddings"], r["factor"]
        lo_wl, hi_wl = omax / r["low_freq_factor"], omax / r["high_freq_factor"]
        wl = 2 * math.pi / base_inv
        smooth = (omax / wl - r["low_freq_factor"]) / (r["high_freq_factor"] - r["low_freq_factor"])
        inv = np.where(wl > lo_wl, base_inv / f,
                       np.where(wl < hi_wl, base_inv, (1 - smooth) * base_inv / f + smooth * base_inv))
    elif t == "longrope":
        omax = r["original_max_position_embeddings"]
        factor = r.get("factor") or c["max_pos"] / omax
        att = r.get("attention_factor")
        if att is None:
            att = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(omax))
        ext = np.asarray(r["long_factor"] if T > omax else r["short_factor"], np.float32).astype(np.float64)
        inv = 1.0 / (ext * theta ** (i / hd))
    else:
        raise ValueError(f"rope_type {t!r} is not implemented by the reference")
    return inv.astype(np.float32), float(np.float32(att))


def rope_cos_sin(T, hd, inv_freq, att, dtype):
    """LlamaRotaryEmbedding: inv_freq is held in fp32 (as HF holds it); the angles and their cos/sin are
    evaluated in `dtype` (for float64, a more precise rendering of the same function), times the attention
    scaling (yarn, longrope)."""
    inv_freq = torch.from_numpy(np.asarray(inv_freq, np.float32))
    pos = torch.arange(T, dtype=dtype)
    freqs = pos[:, None] * inv_freq.to(dtype)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * att, emb.sin() * att


def causal_attention(q, k, v, window=0):
    """q [B,H,T,hd], k/v [B,H,T,hd] (kv heads already repeated): softmax(q k^T / sqrt(hd) + mask) v. With a
    sliding window, query i sees the keys j with 0 <= i - j < window (transformers' sliding_window_overlay)."""
    T, hd = q.shape[-2], q.shape[-1]
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)
    mask = torch.ones(T, T, dtype=torch.bool).tril()
    if window:
        mask = mask & ~torch.ones(T, T, dtype=torch.bool).tril(-window)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1).to(q.dtype)
    return torch.matmul(probs, v)


def repeat_kv(x, n_rep):
    """[B, KVH, T, hd] -> [B, KVH*n_rep, T, hd]; query head h uses kv head h // n_rep."""
    if n_rep == 1:
        return x
    B, KVH, T, hd = x.shape
    return x[:, :, None, :, :].expand(B, KVH, n_rep, T, hd).reshape(B, KVH * n_rep, T, hd)


# ---------------- the model ----------------

class RefModel:
    def __init__(self, config, tensors, dtype=torch.float64):
        self.raw_config = config
        self.c = parse_config(config)
        self.dtype = dtype
        # the product of the linear layers and the LM head (not attention's): a mixed-precision reference
        # swaps in its own (test_bf16_torch.py)
        self.linear_mm = torch.matmul
        # bf16 activation storage (test_bf16_torch.py): `saved` rounds the activations shardtune keeps as
        # bf16 (qkv after RoPE, the MLP's first product h1), `attention` may round its output too
        self.saved = lambda x: x
        self.attention = causal_attention
        want = param_shapes(self.c)
        named = {}
        for name, arr in tensors.items():
            bare = name[len("transformer."):] if name.startswith("transformer.") else name
            if bare.endswith((".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")):
                continue  # HF buffers, not parameters
            if self.c["tied"] and bare == "lm_head.weight":
                continue
            named[bare] = arr
        missing, extra = set(want) - set(named), set(named) - set(want)
        assert not missing and not extra, f"tensor set mismatch: missing {sorted(missing)}, extra {sorted(extra)}"
        self.params = {}
        self.lora, self.lora_scale = {}, 0.0  # module name (registry style) -> (A, B)
        # prompt tuning: [V, C] virtual token embeddings peft's PeftModelForCausalLM concatenates in front
        # of the token embeddings (no position_ids: positions run 0..V+T-1 over the concatenation)
        self.prompt = None
        # prefix tuning (test_bf16_torch.py): (layer, k, v) -> (k, v) with the virtual rows' keys and values
        # replaced (after RoPE, before the activations are stored); identity otherwise
        self.prefix_kv = lambda l, k, v: (k, v)
        for name, shape in want.items():
            a = np.asarray(named[name])
            assert tuple(a.shape) == shape, f"{name}: shape {a.shape}, expected {shape}"
            self.params[name] = torch.tensor(a, dtype=dtype).requires_grad_(True)

    @classmethod
    def load(cls, model_dir, dtype=torch.float64):
        with open(os.path.join(model_dir, "config.json")) as f:
            config = json.load(f)
        return cls(config, st_io.read_model(model_dir), dtype)

    def zero_grad(self):
        for p in list(self.params.values()) + [t for ab in self.lora.values() for t in ab]:
            p.grad = None

    def attach_lora(self, adapter_tensors, r, alpha, rslora=False):
        """adapter_tensors: peft state dict (numpy). Keys become registry-style module names
        (model.layers.0.self_attn.q_proj, h.0.attn.c_attn)."""
        self.lora_scale = alpha / math.sqrt(r) if rslora else alpha / r
        mods = {}
        for key, arr in adapter_tensors.items():
            assert key.startswith("base_model.model."), key
            bare = key[len("base_model.model."):]
            bare = bare[len("transformer."):] if bare.startswith("transformer.") else bare
            mod, which = bare.rsplit(".lora_", 1)
            assert which in ("A.weight", "B.weight", "magnitude_vector"), key
            mods.setdefault(mod, {})[which[0]] = torch.tensor(np.asarray(arr), dtype=self.dtype).requires_grad_(True)
        self.lora = {m: (ab["A"], ab["B"]) for m, ab in mods.items()}
        self.dora = {m: ab["m"] for m, ab in mods.items() if "m" in ab}

    def lora_delta(self, x, module):
        """scale * (x @ A^T) @ B^T for an adapted module, else 0."""
        if module not in self.lora:
            return 0.0
        A, B = self.lora[module]
        return self.lora_scale * torch.matmul(torch.matmul(x, A.t()), B.t())

    def lora_out(self, x, base, module, w_oi):
        """The adapted projection without its bias: base (= x W^T) + LoRA, or DoRA's rescaled sum.
        w_oi: the base weight as [out, in]."""
        out = base + self.lora_delta(x, module)
        if module not in getattr(self, "dora", {}):
            return out
        A, B = self.lora[module]
        norm = torch.linalg.norm(w_oi + self.lora_scale * torch.matmul(B, A).detach(), dim=1).detach()
        return (self.dora[module] / norm) * out

    def prepend_prompt(self, emb):
        if self.prompt is None:
            return emb
        return torch.cat([self.prompt[None].expand(emb.shape[0], -1, -1), emb], dim=1)

    def head_weight(self):
        if self.c["tied"]:
            return self.params["wte.weight" if self.c["family"] == "gpt2" else "model.embed_tokens.weight"]
        return self.params["lm_head.weight"]

    def logits(self, inputs):
        """inputs: int64 tensor [B, T] -> logits [B, T, V] in self.dtype."""
        h = self._gpt2(inputs) if self.c["family"] == "gpt2" else self._llama(inputs)
        return self.linear_mm(h, self.head_weight().t())

    def _gpt2(self, ids):
        P, c = self.params, self.c
        h = self.prepend_prompt(P["wte.weight"][ids])
        B, T = h.shape[:2]
        C, H, hd, eps = c["d_model"], c["n_head"], c["head_dim"], c["eps"]
        h = h + P["wpe.weight"][torch.arange(T)][None]
        for l in range(c["n_layer"]):
            p = f"h.{l}."
            a = F.layer_norm(h, (C,), P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps)
            W = P[p + "attn.c_attn.weight"]  # Conv1D: x @ W[in,out]
            qkv = self.lora_out(a, self.linear_mm(a, W), p + "attn.c_attn", W.t()) + P[p + "attn.c_attn.bias"]
            q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in qkv.split(C, dim=-1))
            k, v = self.prefix_kv(l, k, v)
            q, k, v = self.saved(q), self.saved(k), self.saved(v)  # elementwise: as rounding qkv whole
            y = self.attention(q, k, v).transpose(1, 2).reshape(B, T, C)
            W = P[p + "attn.c_proj.weight"]
            h = h + self.lora_out(y, self.linear_mm(y, W), p + "attn.c_proj", W.t()) + P[p + "attn.c_proj.bias"]
            m = F.layer_norm(h, (C,), P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps)
            W = P[p + "mlp.c_fc.weight"]
            m = gelu_new(self.saved(self.lora_out(m, self.linear_mm(m, W), p + "mlp.c_fc", W.t()) + P[p + "mlp.c_fc.bias"]))
            W = P[p + "mlp.c_proj.weight"]
            h = h + self.lora_out(m, self.linear_mm(m, W), p + "mlp.c_proj", W.t()) + P[p + "mlp.c_proj.bias"]
        return F.layer_norm(h, (C,), P["ln_f.weight"], P["ln_f.bias"], eps)

    def _llama(self, ids):
        P, c = self.params, self.c
        h = self.prepend_prompt(P["model.embed_tokens.weight"][ids])
        B, T = h.shape[:2]
        H, KVH, hd, eps = c["n_head"], c["n_kv_head"], c["head_dim"], c["eps"]
        inv_freq, att = rope_inv_freq(c, T)
        cos, sin = rope_cos_sin(T, hd, inv_freq, att, self.dtype)

        def lin(x, name, bias=False):
            W = P[name + ".weight"]
            y = self.lora_out(x, self.linear_mm(x, W.t()), name, W)
            return y + P[name + ".bias"] if bias else y

        for l in range(c["n_layer"]):
            p = f"model.layers.{l}."
            a = rms_norm(h, P[p + "input_layernorm.weight"], eps)
            q = lin(a, p + "self_attn.q_proj", c["qkv_bias"]).view(B, T, H, hd).transpose(1, 2)
            k = lin(a, p + "self_attn.k_proj", c["qkv_bias"]).view(B, T, KVH, hd).transpose(1, 2)
            v = lin(a, p + "self_attn.v_proj", c["qkv_bias"]).view(B, T, KVH, hd).transpose(1, 2)
            if c.get("qk_norm"):  # Qwen3: RMSNorm over head_dim of every q and k head, before RoPE
                q = rms_norm(q, P[p + "self_attn.q_norm.weight"], eps)
                k = rms_norm(k, P[p + "self_attn.k_norm.weight"], eps)
            q = self.saved(q * cos + rotate_half(q) * sin)
            k, v = self.prefix_kv(l, k * cos + rotate_half(k) * sin, v)
            k, v = self.saved(k), self.saved(v)
            win = c["window"][l]
            kr, vr = repeat_kv(k, H // KVH), repeat_kv(v, H // KVH)
            y = causal_attention(q, kr, vr, win) if win and T > win else self.attention(q, kr, vr)
            h = h + lin(y.transpose(1, 2).reshape(B, T, H * hd), p + "self_attn.o_proj")
            m = rms_norm(h, P[p + "post_attention_layernorm.weight"], eps)
            m = F.silu(self.saved(lin(m, p + "mlp.gate_proj"))) * self.saved(lin(m, p + "mlp.up_proj"))
            h = h + lin(m, p + "mlp.down_proj")
        return rms_norm(h, P["model.norm.weight"], eps)


def weighted_ce(logits, targets, weight):
    """loss = sum_i weight_i * CE(logits_i, target_i) over all positions; positions of weight 0 add
    exactly nothing whatever their target (even -100 or out of range). Returns (loss, per-position CE
    with 0 at weight-0 positions)."""
    V = logits.shape[-1]
    lg = logits.reshape(-1, V)
    t = targets.reshape(-1).long()
    w = weight.reshape(-1).to(lg.dtype)
    live = w != 0
    t = torch.where(live, t, torch.zeros_like(t))
    ce = F.cross_entropy(lg, t, reduction="none")
    ce = torch.where(live, ce, torch.zeros_like(ce))
    return (w * ce).sum(), ce


# ---------------- generation (no KV cache) ----------------

def repetition_penalty(logits, history, penalty):
    """transformers' RepetitionPenaltyLogitsProcessor on a [V] row: each distinct id seen so far gets its
    logit divided by `penalty` when positive, multiplied when negative."""
    if penalty == 1.0 or not history:
        return logits
    ids = torch.tensor(sorted(set(history)), dtype=torch.int64)
    s = logits[ids]
    out = logits.clone()
    out[ids] = torch.where(s < 0, s * penalty, s / penalty)
    return out


def greedy_generate(model, prompt, max_new, eos=(), penalty=1.0):
    """transformers' generate(do_sample=False) written out without a cache: every step runs the full
    forward over prompt + output so far and takes the argmax of the last position's (penalized) logits.
    Stops after an end token (kept) or max_new tokens. Returns (output ids, raw last-position logits of
    each step [n, V] as float64 numpy, the top-two gap of the processed logits of each step)."""
    ids = list(prompt)
    out, raw, gaps = [], [], []
    with torch.no_grad():
        for _ in range(max_new):
            row = model.logits(torch.tensor([ids], dtype=torch.int64))[0, -1]
            raw.append(row.double().numpy().copy())
            row = repetition_penalty(row, ids, penalty)
            top = torch.topk(row, 2).values
            gaps.append(float(top[0] - top[1]))
            nxt = int(torch.argmax(row))
            out.append(nxt)
            ids.append(nxt)
            if nxt in eos:
                break
    return out, np.array(raw), gaps
