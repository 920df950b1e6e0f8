"""Reference check of `shardtune export --format gguf` against PyPI's gguf 0.19 (reader + quantizers),
`tokenizers`, and two independent forwards (torch_model.py on the HF weights; a numpy forward here that
reads the GGUF tensors and applies RoPE the way llama.cpp does for the architecture).

For llama / mistral (arch `llama`, GQA, untied and tied), qwen2 (q/k/v biases) and gpt2 (tied, Conv1D):
  * every metadata key llama.cpp reads, with its value and GGUF type; tensor names, shapes (ne order) and
    ggml types; 1-D tensors f32, rows that do not fill 32-element blocks fall back to f16;
  * f32: bit-exact to the HF weights (with llama.cpp's Q/K row permutation for `llama`, recomputed here from
    the converter's formula); f16 bit-exact to numpy's float16; bf16, q8_0 and q4_0 bytes identical to
    gguf.quants.quantize of the same data (including blocks of zeros, ties, f16-subnormal scales), and
    their dequantized values within the bound the block scale implies;
  * logits of the numpy llama.cpp-style forward on the f32 GGUF equal the float64 torch reference on the HF
    model (seq 128, sharp attention so RoPE pairing matters); the same forward with the other RoPE pairing
    must NOT match (the check can fail);
  * a checkpoint as SRC (a short `train` run): its GGUF holds the weights of the checkpoint's HF export, and
    the tokenizer of the run's model.path;
  * tokenizer metadata: tokens / token types / merges (byte-level BPE) or scores (SentencePiece-style BPE)
    from tokenizer.json, padded to vocab_size, special ids, chat template; for the SentencePiece case the
    llama.cpp SPM algorithm, re-implemented here over the GGUF vocab and scores, tokenizes text exactly as
    `tokenizers` does.
llama.cpp itself runs the files in llamacpp_gguf.py (scripts/pyref --llama).
"""
import json
import math
import os
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import quantize, dequantize  # noqa: E402
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers, Regex  # noqa: E402

import st_io  # noqa: E402
from st_cli import check, finish, run  # noqa: E402
import torch_model  # noqa: E402

TEXT = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
        "hello world, hello tokenizer; 12345 numbers 678", "Sphinx of black quartz, judge my vow.",
        "a an the of to in is it that for on with as was", "Ünïcödé wörds and emoji ✓ too"] * 20
QWEN_RE = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"


# ---------------- models and tokenizers ----------------

def make_config(mt, L, C, H, KV, Fd, V, tied, max_pos=256):
    if mt == "gpt2":
        return {"model_type": "gpt2", "n_embd": C, "n_layer": L, "n_head": H, "n_inner": Fd, "vocab_size": V,
                "n_positions": max_pos, "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True,
                "activation_function": "gelu_new", "bos_token_id": 0, "eos_token_id": 0}
    cfg = {"model_type": mt, "hidden_size": C, "intermediate_size": Fd, "num_hidden_layers": L,
           "num_attention_heads": H, "num_key_value_heads": KV, "vocab_size": V, "max_position_embeddings": max_pos,
           "rms_norm_eps": 1e-6, "rope_theta": 10000.0 if mt != "qwen2" else 1000000.0, "hidden_act": "silu",
           "tie_word_embeddings": tied, "bos_token_id": 1, "eos_token_id": 2}
    return cfg


def make_weights(cfg, rng):
    c = torch_model.parse_config(cfg)
    out = {}
    for name, shape in torch_model.param_shapes(c).items():
        std = 0.02
        if any(k in name for k in ("q_proj.weight", "k_proj.weight", "c_attn.weight")):
            std = 0.25  # sharp attention: position handling must matter
        if name.endswith("norm.weight") or name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        else:
            w = std * rng.standard_normal(shape)
        out[name] = w.astype(np.float32)
    return out


def write_model(d, cfg, tensors, tok_json=None, tok_cfg=None):
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    st_io.write(os.path.join(d, "model.safetensors"), tensors)
    if tok_json:
        open(os.path.join(d, "tokenizer.json"), "w").write(tok_json)
    if tok_cfg:
        json.dump(tok_cfg, open(os.path.join(d, "tokenizer_config.json"), "w"))


def bytelevel_tokenizer(pre):
    tok = Tokenizer(models.BPE())
    if pre == "gpt-2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN_RE), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tr = trainers.BpeTrainer(vocab_size=330, special_tokens=["<|endoftext|>", "<|im_start|>"],
                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, tr)
    tok.add_tokens(["<user_word>"])  # a non-special added token: USER_DEFINED
    return tok.to_str()


def spm_tokenizer():
    """SentencePiece-style BPE like Llama 2's tokenizer.json: <unk> <s> </s>, 256 byte tokens, pieces."""
    base = Tokenizer(models.BPE())
    base.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    base.pre_tokenizer = pre_tokenizers.Split(Regex("(?=▁)"), behavior="isolated")  # words, as SPM does
    tr = trainers.BpeTrainer(vocab_size=120, show_progress=False)
    base.train_from_iterator(TEXT, tr)
    j = json.loads(base.to_str())
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for t, _ in sorted(j["model"]["vocab"].items(), key=lambda kv: kv[1]):
        if t not in vocab:
            vocab[t] = len(vocab)
    merges = j["model"]["merges"]
    out = {"version": "1.0", "truncation": None, "padding": None,
           "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                             "normalized": False, "special": True} for i, t in enumerate(["<unk>", "<s>", "</s>"])],
           "normalizer": j["normalizer"], "pre_tokenizer": None, "post_processor": None,
           "decoder": {"type": "Sequence", "decoders": [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                                                        {"type": "ByteFallback"}, {"type": "Fuse"}]},
           "model": {"type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
                     "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True, "ignore_merges": False,
                     "vocab": vocab, "merges": merges}}
    s = json.dumps(out)
    Tokenizer.from_str(s)  # valid for `tokenizers`
    return s


# ---------------- expectations ----------------

def permute(w, n_head):
    """convert_hf_to_gguf LlamaModel.permute: per head, rows [2, hd/2] -> [hd/2, 2]."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def expected_tensors(cfg, hf):
    """{gguf name: float32 array in GGUF row layout [ne1, ne0]} from the HF tensors."""
    c = torch_model.parse_config(cfg)
    out = {}
    if c["family"] == "gpt2":
        top = {"wte.weight": "token_embd.weight", "wpe.weight": "position_embd.weight",
               "ln_f.weight": "output_norm.weight", "ln_f.bias": "output_norm.bias"}
        lay = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
        for n, a in hf.items():
            if n in top:
                out[top[n]] = a
                continue
            l, rest = n.split(".", 2)[1], n.split(".", 2)[2]
            stem, kind = rest.rsplit(".", 1)
            out[f"blk.{l}.{lay[stem]}.{kind}"] = a.T.copy() if a.ndim == 2 else a  # Conv1D [in,out] -> [out,in]
        out["output.weight"] = hf["wte.weight"]
        return out
    arch_llama = cfg["model_type"] != "qwen2"
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    lay = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for n, a in hf.items():
        if n in top:
            out[top[n]] = a
            continue
        l, rest = n.split(".", 3)[2], n.split(".", 3)[3]
        stem, kind = rest.rsplit(".", 1)
        if arch_llama and n.endswith("q_proj.weight"):
            a = permute(a, c["n_head"])
        if arch_llama and n.endswith("k_proj.weight"):
            a = permute(a, c["n_kv_head"])
        out[f"blk.{l}.{lay[stem]}.{kind}"] = a
    return out


def expected_type(a, quant):
    if a.ndim == 1:
        return QT.F32
    q = {"f32": QT.F32, "f16": QT.F16, "bf16": QT.BF16, "q8_0": QT.Q8_0, "q4_0": QT.Q4_0}[quant]
    if q in (QT.Q8_0, QT.Q4_0) and a.shape[-1] % 32:
        return QT.F16  # llama.cpp's converter falls back to F16 on QuantError
    return q


def quant_bound(a, qt):
    """Per-element error bound of q8_0 / q4_0 from the block scale (d exact, d16 its f16 rounding)."""
    blocks = a.reshape(-1, 32).astype(np.float64)
    if qt == QT.Q8_0:
        d = np.abs(blocks).max(1, keepdims=True) / 127
        d16 = d.astype(np.float16).astype(np.float64)
        b = 0.5 * d * (1 + 1e-6) + 127 * np.abs(d16 - d)
    else:
        idx = np.abs(blocks).argmax(1)
        d = np.abs(blocks[np.arange(len(blocks)), idx])[:, None] / 8
        d16 = d.astype(np.float16).astype(np.float64)
        b = d * (1 + 1e-6) + 8 * np.abs(d16 - d)  # clipping at 15 costs up to one step
    return np.broadcast_to(b, blocks.shape).reshape(a.shape)


# ---------------- numpy forward over GGUF tensors, llama.cpp semantics ----------------

def rope(x, pos, base, neox):
    """x [T, H, hd]. llama (normal): pairs (2i, 2i+1); NEOX (qwen2, gpt-neox): pairs (i, i+hd/2)."""
    hd = x.shape[-1]
    theta = pos[:, None] * base ** (-np.arange(0, hd, 2, dtype=np.float64) / hd)[None, :]  # [T, hd/2]
    cos, sin = np.cos(theta)[:, None, :], np.sin(theta)[:, None, :]
    y = x.copy()
    if neox:
        a, b = x[..., : hd // 2], x[..., hd // 2:]
        y[..., : hd // 2], y[..., hd // 2:] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0::2], x[..., 1::2]
        y[..., 0::2], y[..., 1::2] = a * cos - b * sin, a * sin + b * cos
    return y


def attention(q, k, v):
    T, H, hd = q.shape
    rep = H // k.shape[1]
    k, v = np.repeat(k, rep, axis=1), np.repeat(v, rep, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v).reshape(T, H * hd)


def gguf_forward(path, ids, neox_override=None):
    r = gguf.GGUFReader(path)
    f = {k: v.contents() for k, v in r.fields.items() if not k.startswith("tokenizer.")}
    W = {t.name: dequantize(t.data, t.tensor_type).astype(np.float64) for t in r.tensors}
    arch = f["general.architecture"]
    L, H = f[f"{arch}.block_count"], f[f"{arch}.attention.head_count"]
    T = len(ids)

    def lin(x, n):
        y = x @ W[n + ".weight"].T
        return y + W[n + ".bias"] if n + ".bias" in W else y

    if arch == "gpt2":
        eps = f["gpt2.attention.layer_norm_epsilon"]

        def ln(x, n):
            m, v = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
            return (x - m) / np.sqrt(v + eps) * W[n + ".weight"] + W[n + ".bias"]

        x = W["token_embd.weight"][ids] + W["position_embd.weight"][:T]
        C = x.shape[1]
        for l in range(L):
            b = f"blk.{l}."
            q, k, v = np.split(lin(ln(x, b + "attn_norm"), b + "attn_qkv"), 3, axis=1)
            hd = C // H
            x = x + lin(attention(q.reshape(T, H, hd), k.reshape(T, H, hd), v.reshape(T, H, hd)), b + "attn_output")
            h = lin(ln(x, b + "ffn_norm"), b + "ffn_up")
            h = 0.5 * h * (1 + np.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
            x = x + lin(h, b + "ffn_down")
        return ln(x, "output_norm") @ W["output.weight"].T
    eps, base = f[f"{arch}.attention.layer_norm_rms_epsilon"], f[f"{arch}.rope.freq_base"]
    KV, hd = f[f"{arch}.attention.head_count_kv"], f[f"{arch}.rope.dimension_count"]
    neox = (arch == "qwen2") if neox_override is None else neox_override

    def rms(x, n):
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * W[n + ".weight"]

    pos = np.arange(T, dtype=np.float64)
    x = W["token_embd.weight"][ids]
    for l in range(L):
        b = f"blk.{l}."
        a = rms(x, b + "attn_norm")
        q = rope(lin(a, b + "attn_q").reshape(T, H, hd), pos, base, neox)
        k = rope(lin(a, b + "attn_k").reshape(T, KV, hd), pos, base, neox)
        v = lin(a, b + "attn_v").reshape(T, KV, hd)
        x = x + lin(attention(q, k, v), b + "attn_output")
        a = rms(x, b + "ffn_norm")
        g = lin(a, b + "ffn_gate")
        x = x + lin(g / (1 + np.exp(-g)) * lin(a, b + "ffn_up"), b + "ffn_down")
    head = W.get("output.weight", W["token_embd.weight"])
    return rms(x, "output_norm") @ head.T


# ---------------- llama.cpp's SPM tokenizer over the GGUF vocab ----------------

def spm_tokenize(text, tokens, scores, types):
    """llm_tokenizer_spm: '▁' for spaces with a leading '▁', then repeatedly merge the adjacent pair whose
    concatenation is a token with the highest score (leftmost on ties); symbols left that are not tokens
    become their UTF-8 byte tokens."""
    ids = {t: i for i, t in reversed(list(enumerate(tokens)))}
    syms = list("▁" + text.replace(" ", "▁"))
    while True:
        best, at = None, -1
        for i in range(len(syms) - 1):
            t = syms[i] + syms[i + 1]
            if t in ids and types[ids[t]] == 1 and (best is None or scores[ids[t]] > best):
                best, at = scores[ids[t]], i
        if at < 0:
            break
        syms[at:at + 2] = [syms[at] + syms[at + 1]]
    out = []
    for s in syms:
        if s in ids:
            out.append(ids[s])
        else:
            out.extend(ids[f"<0x{b:02X}>"] for b in s.encode("utf-8"))
    return out


# ---------------- the checks ----------------

def check_file(path, cfg, hf, quant, tok_expect, label):
    r = gguf.GGUFReader(path)
    f = {k: v for k, v in r.fields.items()}
    val = {k: v.contents() for k, v in f.items()}
    c = torch_model.parse_config(cfg)
    arch = "gpt2" if c["family"] == "gpt2" else ("qwen2" if cfg["model_type"] == "qwen2" else "llama")
    VT = gguf.GGUFValueType
    want = {"general.architecture": (VT.STRING, arch), "general.alignment": (VT.UINT32, 32),
            "general.file_type": (VT.UINT32, {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 7, "bf16": 32}[quant]),
            f"{arch}.context_length": (VT.UINT32, c["max_pos"]), f"{arch}.embedding_length": (VT.UINT32, c["d_model"]),
            f"{arch}.block_count": (VT.UINT32, c["n_layer"]), f"{arch}.feed_forward_length": (VT.UINT32, c["d_ff"]),
            f"{arch}.attention.head_count": (VT.UINT32, c["n_head"]), f"{arch}.vocab_size": (VT.UINT32, c["vocab"])}
    if arch == "gpt2":
        want[f"{arch}.attention.layer_norm_epsilon"] = (VT.FLOAT32, np.float32(c["eps"]))
    else:
        want.update({f"{arch}.attention.head_count_kv": (VT.UINT32, c["n_kv_head"]),
                     f"{arch}.attention.layer_norm_rms_epsilon": (VT.FLOAT32, np.float32(c["eps"])),
                     f"{arch}.rope.freq_base": (VT.FLOAT32, np.float32(c["rope_theta"])),
                     f"{arch}.rope.dimension_count": (VT.UINT32, c["head_dim"])})
    for k, (t, v) in want.items():
        check(k in f, f"{label}: key {k} missing")
        if k in f:
            check(f[k].types[0] == t, f"{label}: {k} type {f[k].types} != {t}")
            check(val[k] == v, f"{label}: {k} = {val[k]!r}, expected {v!r}")
    exp = expected_tensors(cfg, hf)
    got = {t.name: t for t in r.tensors}
    check(set(got) == set(exp), f"{label}: tensor names {sorted(set(got) ^ set(exp))} differ")
    nq = 0
    for name, a in exp.items():
        if name not in got:
            continue
        t = got[name]
        et = expected_type(a, quant)
        check(t.tensor_type == et, f"{label}: {name} type {t.tensor_type.name}, expected {et.name}")
        check(list(t.shape) == list(a.shape[::-1]), f"{label}: {name} ne {list(t.shape)} != {list(a.shape[::-1])}")
        check(t.data_offset % 32 == 0, f"{label}: {name} not 32-byte aligned")
        if t.tensor_type != et:
            continue
        deq = dequantize(t.data, et).reshape(a.shape)
        if et == QT.F32:
            check(np.array_equal(deq.view(np.uint32), a.view(np.uint32)), f"{label}: {name} f32 not bit-exact")
        elif et == QT.F16:
            with np.errstate(over="ignore"):  # the edge case's 70000 is meant to become inf
                f16 = a.astype(np.float16).view(np.uint16)
            check(np.array_equal(np.asarray(t.data).view(np.uint16).reshape(a.shape), f16),
                  f"{label}: {name} f16 bits differ")
        else:
            ref = quantize(a, et)
            check(np.array_equal(np.asarray(t.data).view(np.uint8).reshape(ref.shape), ref),
                  f"{label}: {name} {et.name} bytes differ from gguf.quants.quantize")
            if et == QT.BF16:
                err_ok = np.abs(deq - a) <= np.abs(a) * 2.0 ** -8
            else:
                err_ok = np.abs(deq.astype(np.float64) - a) <= quant_bound(a, et)
                nq += 1
            check(err_ok.all(), f"{label}: {name} dequantized error above the block bound")
    if tok_expect is None:
        check(not any(k.startswith("tokenizer.") for k in f), f"{label}: tokenizer keys without a tokenizer")
    else:
        for k, v in tok_expect.items():
            if v is None:
                check(k not in f, f"{label}: key {k} present")
                continue
            check(k in f, f"{label}: key {k} missing")
            if k not in f:
                continue
            g = val[k]
            if isinstance(v, list) and v and isinstance(v[0], float):
                check(np.array_equal(np.asarray(g, np.float32), np.asarray(v, np.float32)), f"{label}: {k} differs")
            else:
                check(g == v, f"{label}: {k} differs: {str(g)[:80]} vs {str(v)[:80]}")
    return r


def tok_expectations(tok_str, V, spm, pre, cfg, tcfg):
    j = json.loads(tok_str)
    vocab = dict(j["model"]["vocab"])
    text = {i: t for t, i in vocab.items()}
    types = {i: (6 if spm and t.startswith("<0x") and len(t) == 6 else 1) for t, i in vocab.items()}
    for a in j["added_tokens"]:
        text[a["id"]] = a["content"]
        types[a["id"]] = 3 if a["special"] else 4
    unk = j["model"].get("unk_token")
    if unk is not None:
        types[vocab[unk]] = 2
    tokens = [text.get(i, f"[PAD{i}]") for i in range(V)]
    ttypes = [types.get(i, 5) for i in range(V)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    e = {"tokenizer.ggml.model": "llama" if spm else "gpt2", "tokenizer.ggml.tokens": tokens,
         "tokenizer.ggml.token_type": ttypes, "tokenizer.ggml.bos_token_id": cfg["bos_token_id"],
         "tokenizer.ggml.eos_token_id": cfg["eos_token_id"]}
    for k in ("bos", "eos"):  # config.json's ids; absent when it has none (and no tokenizer_config says)
        if cfg.get(f"{k}_token_id") is None:
            e[f"tokenizer.ggml.{k}_token_id"] = None
    if spm:
        scores = [0.0] * V
        seen = set()
        for r, m in enumerate(merges):
            t = m.replace(" ", "", 1)
            if t in vocab and vocab[t] not in seen:
                scores[vocab[t]] = -float(r)
                seen.add(vocab[t])
        e["tokenizer.ggml.scores"] = scores
        e["tokenizer.ggml.unknown_token_id"] = vocab[unk]
    else:
        e["tokenizer.ggml.merges"] = merges
        e["tokenizer.ggml.pre"] = pre
    if tcfg and "chat_template" in tcfg:
        e["tokenizer.chat_template"] = tcfg["chat_template"]
    if tcfg and "add_bos_token" in tcfg:
        e["tokenizer.ggml.add_bos_token"] = tcfg["add_bos_token"]
    return e


def special_values(rng, shape):
    """Weights that exercise the encoders' edges: zero blocks, exact ties, f16-subnormal scales, a lone
    large value, halves (x/d + 8.5 exactly on an integer)."""
    a = (0.02 * rng.standard_normal(shape)).astype(np.float32).reshape(-1, 32)
    a[0] = 0
    a[1] = np.linspace(-1, 1, 32, dtype=np.float32)
    a[2] = (1e-6 * rng.standard_normal(32)).astype(np.float32)  # d below f16's normal range
    a[3] = 0
    a[3, 5] = -3.0
    a[4] = np.float32(0.5) * np.arange(-16, 16, dtype=np.float32)
    a[5] = -a[4]
    a[6] = (1e-9 * rng.standard_normal(32)).astype(np.float32)  # d rounds to zero in f16
    return a.reshape(shape)


def main():
    rng = np.random.default_rng(7)
    tmp = tempfile.mkdtemp(prefix="st_gguf_")
    bl_gpt2 = bytelevel_tokenizer("gpt-2")
    bl_qwen = bytelevel_tokenizer("qwen2")
    spm = spm_tokenizer()
    chat = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    cases = [  # label, config, tokenizer json, tokenizer_config, spm?, pre name
        ("llama", make_config("llama", 2, 64, 4, 2, 96, 400, False), spm, {"add_bos_token": True}, True, None),
        ("mistral_tied", make_config("mistral", 1, 64, 4, 4, 72, 384, True), spm, None, True, None),
        ("qwen2", make_config("qwen2", 2, 64, 4, 2, 96, 352, True), bl_qwen, {"chat_template": chat}, False, "qwen2"),
        ("gpt2", make_config("gpt2", 2, 64, 4, 4, 256, 340, True), bl_gpt2, None, False, "gpt-2"),
    ]
    T = 128
    for label, cfg, tok, tcfg, is_spm, pre in cases:
        d = os.path.join(tmp, label)
        hf = make_weights(cfg, rng)
        write_model(d, cfg, hf, tok, tcfg)
        V = cfg["vocab_size"]
        tok_e = tok_expectations(tok, V, is_spm, pre, cfg, tcfg)
        for quant in ("f32", "f16", "bf16", "q8_0", "q4_0"):
            out = os.path.join(tmp, f"{label}.{quant}.gguf")
            p = run("export", d, "--out", out, "--format", "gguf", "--quant", quant)
            check("tokenizer " + ("llama" if is_spm else "gpt2") in p.stdout, f"{label}: export says {p.stdout!r}")
            check_file(out, cfg, hf, quant, tok_e, f"{label}/{quant}")
        # the forward: llama.cpp semantics on the f32 file vs torch float64 on the HF weights
        ids = rng.integers(0, V, size=T)
        ref = torch_model.RefModel(cfg, hf, torch.float64).logits(torch.tensor(ids[None])).detach().numpy()[0]
        path = os.path.join(tmp, f"{label}.f32.gguf")
        got = gguf_forward(path, ids)
        err = np.abs(got - ref).max() / np.abs(ref).max()
        print(f"{label}: f32 GGUF forward vs torch float64: max rel err {err:.2e}")
        check(err < 1e-5, f"{label}: GGUF forward differs from the torch reference ({err:.2e})")
        if cfg["model_type"] != "gpt2":
            wrong = gguf_forward(path, ids, neox_override=cfg["model_type"] != "qwen2")
            werr = np.abs(wrong - ref).max() / np.abs(ref).max()
            print(f"{label}: with the other RoPE pairing: {werr:.2e} (must be large)")
            check(werr > 1e-2, f"{label}: the forward check cannot tell RoPE pairings apart ({werr:.2e})")
        for quant in ("q8_0", "q4_0"):
            g = gguf_forward(os.path.join(tmp, f"{label}.{quant}.gguf"), ids)
            print(f"{label}: {quant} logits max abs diff {np.abs(g - ref).max():.3e} (logit scale {np.abs(ref).max():.2f})")
        if is_spm:
            r = gguf.GGUFReader(os.path.join(tmp, f"{label}.f32.gguf"))
            toks = r.fields["tokenizer.ggml.tokens"].contents()
            scores = r.fields["tokenizer.ggml.scores"].contents()
            types = r.fields["tokenizer.ggml.token_type"].contents()
            hft = Tokenizer.from_str(tok)
            for s in TEXT[:6] + ["unseen wörds: zebra ✓ ☃ 42", "  double  spaces "]:
                a, b = spm_tokenize(s, toks, scores, types), hft.encode(s, add_special_tokens=False).ids
                check(a == b, f"{label}: SPM tokenization of {s!r} differs: {a} vs {b}")
    # encoders on edge values: bytes identical to gguf.quants for every type
    cfg = make_config("llama", 1, 64, 2, 2, 64, 256, True)
    hf = make_weights(cfg, rng)
    for n in hf:
        if hf[n].ndim == 2:
            hf[n] = special_values(rng, hf[n].shape)
    hf["model.embed_tokens.weight"][7, :3] = [70000.0, -1e-7, 6.1e-5]  # f16 overflow, subnormal, near min normal
    d = os.path.join(tmp, "edges")
    write_model(d, cfg, hf)
    for quant in ("f16", "bf16", "q8_0", "q4_0"):
        out = os.path.join(tmp, f"edges.{quant}.gguf")
        run("export", d, "--out", out, "--format", "gguf", "--quant", quant)
        check_file(out, cfg, hf, quant, None, f"edges/{quant}")
    # a checkpoint as SRC: the GGUF holds the same weights as the checkpoint's HF export
    ck = os.path.join(tmp, "ck")
    run("init-model", "--family", "llama", "--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2",
        "--vocab", "384", "--max-seq", "64", "--out", os.path.join(ck, "model"))
    with open(os.path.join(ck, "d.jsonl"), "w") as fj:
        for _ in range(40):
            fj.write(json.dumps({"input_ids": [int(t) for t in rng.integers(0, 384, 40)]}) + "\n")
    run("data", "pack", "--jsonl", os.path.join(ck, "d.jsonl"), "--out", os.path.join(ck, "d.h5"), "--vocab", "384")
    with open(os.path.join(ck, "job.yaml"), "w") as fj:
        fj.write(f"model: {{ path: {ck}/model }}\nrun_dir: {ck}/run\nseed: 1\n"
                 "train: { steps: 2, micro_batch: 2, grad_accum: 1, seq_len: 16, lr: 1.0e-2, warmup_steps: 0 }\n"
                 f"tasks: [ {{ name: t, path: {ck}/d.h5 }} ]\neval: {{ every_steps: 0 }}\n"
                 "checkpoint: { every_steps: 2, keep_last: 0 }\n"
                 "monitor: { publish: \"\", control: \"\" }\n")
    run("train", os.path.join(ck, "job.yaml"))
    ckdir = os.path.join(ck, "run", "checkpoints")
    run("export", ckdir, "--out", os.path.join(ck, "hf"))
    open(os.path.join(ck, "model", "tokenizer.json"), "w").write(spm)  # found through the job's model.path
    p = run("export", ckdir, "--out", os.path.join(ck, "ck.gguf"), "--format", "gguf", "--quant", "f32")
    check("model.path" in p.stderr, f"checkpoint export: {p.stderr!r}")
    ck_cfg = json.load(open(os.path.join(ck, "hf", "config.json")))
    ck_hf = st_io.read_model(os.path.join(ck, "hf"))
    init_hf = st_io.read_model(os.path.join(ck, "model"))
    check(any(not np.array_equal(ck_hf[n], init_hf[n]) for n in ck_hf), "checkpoint: training changed nothing")
    tok_e = tok_expectations(spm, 384, True, None, ck_cfg, None)
    check_file(os.path.join(ck, "ck.gguf"), ck_cfg, ck_hf, "f32", tok_e, "checkpoint/f32")
    # errors a user can cause: one line, non-zero exit, no file left
    bad = run("export", d, "--out", os.path.join(tmp, "x.gguf"), "--format", "gguf", "--quant", "q5_1", ok=False)
    check(bad.returncode != 0 and "q5_1" in bad.stderr and not os.path.exists(os.path.join(tmp, "x.gguf")),
          f"bad --quant: rc {bad.returncode}, {bad.stderr!r}")
    bad = run("export", d, "--out", os.path.join(tmp, "y.gguf"), "--format", "gguf", "--tokenizer", tmp, ok=False)
    check(bad.returncode != 0 and "tokenizer.json" in bad.stderr, f"missing tokenizer: {bad.stderr!r}")
    wp = os.path.join(tmp, "wp")
    os.makedirs(wp)
    open(os.path.join(wp, "tokenizer.json"), "w").write(json.dumps({"model": {"type": "WordPiece", "vocab": {}}}))
    bad = run("export", d, "--out", os.path.join(tmp, "z.gguf"), "--format", "gguf", "--tokenizer", wp, ok=False)
    check(bad.returncode != 0 and "WordPiece" in bad.stderr and not os.path.exists(os.path.join(tmp, "z.gguf")),
          f"WordPiece tokenizer: {bad.stderr!r}")
    # a split pattern with no known llama.cpp name: an error naming it unless --tokenizer-pre names it
    odd = os.path.join(tmp, "odd_pre")
    os.makedirs(odd)
    tj = json.loads(bl_gpt2)
    tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "[A-Za-z]+|\\s+"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    Tokenizer.from_str(json.dumps(tj))  # valid for `tokenizers`
    open(os.path.join(odd, "tokenizer.json"), "w").write(json.dumps(tj))
    g2 = os.path.join(tmp, "gpt2")
    bad = run("export", g2, "--out", os.path.join(tmp, "p.gguf"), "--format", "gguf", "--tokenizer", odd, ok=False)
    check(bad.returncode != 0 and "[A-Za-z]+|\\s+" in bad.stderr and "--tokenizer-pre" in bad.stderr
          and not os.path.exists(os.path.join(tmp, "p.gguf")), f"unknown split pattern: {bad.stderr!r}")
    run("export", g2, "--out", os.path.join(tmp, "p.gguf"), "--format", "gguf", "--tokenizer", odd,
        "--tokenizer-pre", "default")
    r = gguf.GGUFReader(os.path.join(tmp, "p.gguf"))
    check(r.fields["tokenizer.ggml.pre"].contents() == "default", "--tokenizer-pre did not set tokenizer.ggml.pre")
    p = run("export", g2, "--out", os.path.join(tmp, "q.gguf"), "--format", "gguf", "--tokenizer-pre", "gpt-4o")
    r = gguf.GGUFReader(os.path.join(tmp, "q.gguf"))
    check(r.fields["tokenizer.ggml.pre"].contents() == "gpt-4o", "--tokenizer-pre must override a recognised one")
    finish()


if __name__ == "__main__":
    main()
