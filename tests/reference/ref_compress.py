"""Reference check of `shardtune compress` (structured pruning) against float64 torch.

For llama (GQA), qwen2 (q/k/v biases) and gpt2, on calibration windows packed by `shardtune data pack`:
  * an instrumented float64 forward here (torch_model.py's building blocks, checked to equal RefModel's
    logits) recomputes the importance measures of docs/compress.md: block influence per layer, residual-
    contribution norm per KV group, activation RMS x down-projection column norm per FFN channel; they
    must equal compress_report.json's, and the kept layers/groups/channels must be the ones these scores
    select (where the scores at the cut are separated by more than the fp32 tolerance);
  * the pruned model dir: config.json consistent (transformers' AutoConfig loads it; every tensor has the
    shape the config implies), each tensor bit-equal to the source tensor with the same rows/columns
    removed (computed here from the HF weights), tokenizer files copied;
  * `shardtune eval` of the pruned model equals the torch float64 loss of the reference model built from
    those independently sliced weights, and the report's loss before/after equals torch's on the
    calibration windows;
  * user errors: GPT-2 head pruning, no --calib when importance is needed, a bad fraction.
"""
import json
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from st_cli import check, finish, run  # noqa: E402
import torch_model as tm  # noqa: E402

def make_model(d, cfg, rng):
    c = tm.parse_config(cfg)
    hf = {}
    for name, shape in tm.param_shapes(c).items():
        if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_f.weight")):
            w = 1.0 + 0.1 * rng.standard_normal(shape)
        elif any(k in name for k in ("q_proj.weight", "k_proj.weight", "c_attn.weight")):
            w = 0.25 * rng.standard_normal(shape)  # sharp attention
        else:
            # per-row/column scales so heads and channels differ in importance
            w = 0.05 * rng.standard_normal(shape) * (rng.uniform(0.2, 2.0, size=shape[-1]) if len(shape) == 2 else 1)
        hf[name] = w.astype(np.float32)
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    st_io.write(os.path.join(d, "model.safetensors"), hf)
    open(os.path.join(d, "tokenizer.json"), "w").write('{"model": {"type": "BPE", "vocab": {}, "merges": []}}')
    return hf


def instrumented(model, ids):
    """float64 forward collecting, per layer: residual in/out, attention output before o_proj, MLP activation
    before the down projection. Returns (final hidden, [dict per layer])."""
    P, c = model.params, model.c
    B, T = ids.shape
    H, KVH, hd, eps = c["n_head"], c["n_kv_head"], c["head_dim"], c["eps"]
    out = []
    with torch.no_grad():
        if c["family"] == "gpt2":
            C = c["d_model"]
            h = P["wte.weight"][ids] + P["wpe.weight"][torch.arange(T)][None]
            for l in range(c["n_layer"]):
                p, rec = f"h.{l}.", {"in": h}
                a = F.layer_norm(h, (C,), P[p + "ln_1.weight"], P[p + "ln_1.bias"], eps)
                q, k, v = (t.view(B, T, H, hd).transpose(1, 2) for t in
                           (a @ P[p + "attn.c_attn.weight"] + P[p + "attn.c_attn.bias"]).split(C, -1))
                y = tm.causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C)
                rec["att"] = y
                h = h + y @ P[p + "attn.c_proj.weight"] + P[p + "attn.c_proj.bias"]
                m = F.layer_norm(h, (C,), P[p + "ln_2.weight"], P[p + "ln_2.bias"], eps)
                m = tm.gelu_new(m @ P[p + "mlp.c_fc.weight"] + P[p + "mlp.c_fc.bias"])
                rec["mlp"] = m
                h = h + m @ P[p + "mlp.c_proj.weight"] + P[p + "mlp.c_proj.bias"]
                rec["out"] = h
                rec["wo"] = P[p + "attn.c_proj.weight"].t()  # [out C, in A]
                rec["wd"] = P[p + "mlp.c_proj.weight"].t()
                out.append(rec)
            return F.layer_norm(h, (C,), P["ln_f.weight"], P["ln_f.bias"], eps), out
        cos, sin = tm.rope_cos_sin(T, hd, *tm.rope_inv_freq(c, T), model.dtype)

        def lin(x, name, bias=False):
            y = x @ P[name + ".weight"].t()
            return y + P[name + ".bias"] if bias else y

        h = P["model.embed_tokens.weight"][ids]
        for l in range(c["n_layer"]):
            p, rec = f"model.layers.{l}.", {"in": h}
            a = tm.rms_norm(h, P[p + "input_layernorm.weight"], eps)
            q = lin(a, p + "self_attn.q_proj", c["qkv_bias"]).view(B, T, H, hd).transpose(1, 2)
            k = lin(a, p + "self_attn.k_proj", c["qkv_bias"]).view(B, T, KVH, hd).transpose(1, 2)
            v = lin(a, p + "self_attn.v_proj", c["qkv_bias"]).view(B, T, KVH, hd).transpose(1, 2)
            q, k = q * cos + tm.rotate_half(q) * sin, k * cos + tm.rotate_half(k) * sin
            y = tm.causal_attention(q, tm.repeat_kv(k, H // KVH), tm.repeat_kv(v, H // KVH))
            y = y.transpose(1, 2).reshape(B, T, H * hd)
            rec["att"] = y
            h = h + lin(y, p + "self_attn.o_proj")
            m = tm.rms_norm(h, P[p + "post_attention_layernorm.weight"], eps)
            m = F.silu(lin(m, p + "mlp.gate_proj")) * lin(m, p + "mlp.up_proj")
            rec["mlp"] = m
            h = h + lin(m, p + "mlp.down_proj")
            rec["out"] = h
            rec["wo"] = P[p + "self_attn.o_proj.weight"]
            rec["wd"] = P[p + "mlp.down_proj.weight"]
            out.append(rec)
        return tm.rms_norm(h, P["model.norm.weight"], eps), out


def importances(model, ids):
    c = model.c
    with torch.no_grad():
        final, recs = instrumented(model, ids)
    with torch.no_grad():
        ref_final = model._gpt2(ids) if c["family"] == "gpt2" else model._llama(ids)
    check(torch.allclose(final, ref_final.detach(), rtol=0, atol=1e-10), "instrumented forward != RefModel")
    G, rep, hd = c["n_kv_head"], c["n_head"] // c["n_kv_head"], c["head_dim"]
    bi, gs, cs = [], [], []
    for r in recs:
        x, y = r["in"].reshape(-1, r["in"].shape[-1]), r["out"].reshape(-1, r["in"].shape[-1])
        bi.append(float((1 - F.cosine_similarity(x, y, dim=-1)).mean()))
        a = r["att"].reshape(-1, r["att"].shape[-1])
        w = rep * hd
        gs.append([float((a[:, g * w:(g + 1) * w] @ r["wo"][:, g * w:(g + 1) * w].t()).norm(dim=-1).mean())
                   for g in range(G)])
        m = r["mlp"].reshape(-1, r["mlp"].shape[-1])
        cs.append((m.pow(2).mean(0).sqrt() * r["wd"].detach().norm(dim=0)).numpy())
    return np.array(bi), np.array(gs), np.array(cs)


def expected_keep(scores, keep):
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:keep]), order


def cut_is_clear(scores, keep, tol):
    s = np.sort(np.asarray(scores))[::-1]
    return keep >= len(s) or s[keep - 1] - s[keep] > tol


def slice_hf(cfg, hf, layers, groups, chans):
    """The pruned model's HF tensors, built here from the source's by removing rows/columns."""
    c = tm.parse_config(cfg)
    rep, hd = c["n_head"] // c["n_kv_head"], c["head_dim"]
    out = {}
    for name, a in hf.items():
        parts = name.split(".")
        if parts[0] == "h" or parts[:2] == ["model", "layers"]:
            li = 1 if parts[0] == "h" else 2
            src = int(parts[li])
            if src not in layers:
                continue
            nl = layers.index(src)
            new = ".".join(parts[:li] + [str(nl)] + parts[li + 1:])
            g, ch = groups[nl], chans[nl]
            qrows = [gg * rep * hd + i for gg in g for i in range(rep * hd)]
            kvrows = [gg * hd + i for gg in g for i in range(hd)]
            if "q_proj" in name:
                a = a[qrows]
            elif "k_proj" in name or "v_proj" in name:
                a = a[kvrows]
            elif "o_proj.weight" in name:
                a = a[:, qrows]
            elif "gate_proj" in name or "up_proj" in name:
                a = a[ch]
            elif "down_proj.weight" in name:
                a = a[:, ch]
            elif "mlp.c_fc" in name:  # Conv1D [in, out]: output channels are columns
                a = a[..., ch]
            elif "mlp.c_proj.weight" in name:
                a = a[ch, :]
            out[new] = np.ascontiguousarray(a)
        else:
            out[name] = a
    return out


def torch_loss(cfg, tensors, inp, tgt):
    m = tm.RefModel(cfg, tensors, torch.float64)
    with torch.no_grad():
        logits = m.logits(torch.tensor(inp))
        loss, _ = tm.weighted_ce(logits, torch.tensor(tgt), torch.ones(tgt.shape, dtype=torch.float64))
    return float(loss) / tgt.size


def main():
    rng = np.random.default_rng(3)
    tmp = tempfile.mkdtemp(prefix="st_compress_")
    V, T, NW = 256, 128, 6
    toks = rng.integers(0, V, size=NW * T + 50)
    # a repetitive stream so that attention has something to look at
    toks[200:400] = toks[0:200]
    with open(os.path.join(tmp, "c.jsonl"), "w") as f:
        f.write(json.dumps({"input_ids": [int(t) for t in toks]}) + "\n")
    data = os.path.join(tmp, "c.h5")
    run("data", "pack", "--jsonl", os.path.join(tmp, "c.jsonl"), "--out", data, "--vocab", str(V))
    inp = np.stack([toks[w * T:(w + 1) * T] for w in range(NW)]).astype(np.int64)
    tgt = np.stack([toks[w * T + 1:(w + 1) * T + 1] for w in range(NW)]).astype(np.int64)
    base = {"hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 8, "intermediate_size": 96,
            "vocab_size": V, "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
            "hidden_act": "silu", "tie_word_embeddings": False}
    cases = [
        ("llama", dict(base, model_type="llama", num_key_value_heads=4), ["--drop-layers", "auto:1", "--prune-heads",
                                                                            "0.5", "--prune-ffn", "0.25"]),
        ("qwen2", dict(base, model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=True),
         ["--drop-layers", "0", "--prune-heads", "0.5", "--prune-ffn", "0.5"]),
        ("gpt2", {"model_type": "gpt2", "n_embd": 64, "n_layer": 3, "n_head": 4, "vocab_size": V, "n_positions": 256,
                  "layer_norm_epsilon": 1e-5}, ["--drop-layers", "auto:1", "--prune-ffn", "0.3"]),
    ]
    from transformers import AutoConfig
    for label, cfg, flags in cases:
        src, dst = os.path.join(tmp, label), os.path.join(tmp, label + "_p")
        hf = make_model(src, cfg, rng)
        p = run("compress", "--model", src, "--out", dst, "--calib", data, "--seq-len", str(T),
                "--calib-windows", str(NW), "--batch", "4", *flags)
        print(label, p.stdout.strip())
        rep = json.load(open(os.path.join(dst, "compress_report.json")))
        model = tm.RefModel(cfg, hf, torch.float64)
        bi, gs, cs = importances(model, torch.tensor(inp))
        c = model.c
        for nm, mine, theirs in (("block influence", bi, rep["layer_block_influence"]),
                                 ("group score", gs, rep["group_score"]), ("channel score", cs, rep["channel_score"])):
            theirs = np.array(theirs)
            err = np.abs(theirs - mine).max() / np.abs(mine).max()
            print(f"  {nm}: max rel err {err:.2e}")
            check(theirs.shape == mine.shape and err < 1e-4, f"{label}: {nm} differs ({err:.2e})")
        # what should be kept, from the reference scores
        L, G, Fd = c["n_layer"], c["n_kv_head"], c["d_ff"]
        fl = dict(zip(flags[::2], flags[1::2]))
        spec = fl.get("--drop-layers", "")
        if spec.startswith("auto:"):
            k = int(spec[5:])
            keep_l, _ = expected_keep(bi, L - k)
            check(cut_is_clear(bi, L - k, 1e-4 * abs(bi).max()), f"{label}: layer scores too close to test")
        else:
            keep_l = [l for l in range(L) if str(l) not in spec.split(",")]
        check(rep["kept_layers"] == keep_l, f"{label}: kept layers {rep['kept_layers']} != {keep_l}")
        gk = G - int(np.floor(float(fl.get("--prune-heads", 0)) * G + 1e-9))
        fk = Fd - int(np.floor(float(fl.get("--prune-ffn", 0)) * Fd + 1e-9))
        for nl, l in enumerate(keep_l):
            for what, sc, k, got in (("groups", gs[l], gk, rep["kept_groups"][nl]),
                                     ("channels", cs[l], fk, rep["kept_channels"][nl])):
                want, _ = expected_keep(sc, k)
                if cut_is_clear(sc, k, 1e-4 * abs(sc).max()):
                    check(got == want, f"{label}: layer {l} kept {what} {got} != {want}")
                else:  # a near-tie at the cut: any choice among the tied is right
                    check(min(sc[got]) >= np.max(np.delete(sc, got), initial=-1) - 1e-4 * abs(sc).max(),
                          f"{label}: layer {l} kept {what} not the top-scoring")
        # the output model: config, tensors, side files
        new_cfg = json.load(open(os.path.join(dst, "config.json")))
        ac = AutoConfig.from_pretrained(dst)
        check(ac.model_type == cfg["model_type"], f"{label}: AutoConfig model_type {ac.model_type}")
        exp = slice_hf(cfg, hf, rep["kept_layers"], rep["kept_groups"], rep["kept_channels"])
        got = st_io.read_model(dst)
        if c["tied"]:
            got.pop("lm_head.weight", None)
        check(set(got) == set(exp), f"{label}: tensor names differ: {sorted(set(got) ^ set(exp))[:6]}")
        for n in exp:
            if n in got:
                check(got[n].shape == exp[n].shape and np.array_equal(got[n], exp[n]), f"{label}: {n} differs")
        nc = tm.parse_config(new_cfg)
        check(nc["n_layer"] == len(keep_l) and nc["n_kv_head"] == gk and nc["n_head"] == gk * (c["n_head"] // G)
              and nc["d_ff"] == fk and nc["head_dim"] == c["head_dim"], f"{label}: config {nc}")
        check(getattr(ac, "num_hidden_layers", getattr(ac, "n_layer", None)) == nc["n_layer"],
              f"{label}: AutoConfig layers")
        if c["family"] != "gpt2":  # what transformers' attention will use as the head size
            hd = getattr(ac, "head_dim", None) or ac.hidden_size // ac.num_attention_heads
            check(hd == c["head_dim"] and ac.num_attention_heads == nc["n_head"] and
                  ac.num_key_value_heads == nc["n_kv_head"] and ac.intermediate_size == nc["d_ff"],
                  f"{label}: AutoConfig head_dim {hd}, heads {ac.num_attention_heads}/{ac.num_key_value_heads}")
        check(os.path.exists(os.path.join(dst, "tokenizer.json")), f"{label}: tokenizer.json not copied")
        # losses: shardtune eval of the pruned dir == torch float64 on the independently sliced weights
        before = torch_loss(cfg, hf, inp, tgt)
        after = torch_loss(new_cfg, exp, inp, tgt)
        ev = run("eval", "--model", dst, "--data", data, "--seq-len", str(T), "--json")
        ev_loss = json.loads(ev.stdout)["loss"]
        n_all = (len(toks) - 1) // T
        all_in = np.stack([toks[w * T:(w + 1) * T] for w in range(n_all)])
        all_tg = np.stack([toks[w * T + 1:(w + 1) * T + 1] for w in range(n_all)])
        ev_ref = torch_loss(new_cfg, exp, all_in, all_tg)
        print(f"  loss before {before:.6f} after {after:.6f}; eval {ev_loss:.6f} vs torch {ev_ref:.6f}")
        for nm, a, b in (("eval", ev_loss, ev_ref), ("report before", rep["loss_before"], before),
                         ("report after", rep["loss_after"], after)):
            check(abs(a - b) <= 2e-5 * abs(b), f"{label}: {nm} loss {a} != torch {b}")
    # user errors
    g = os.path.join(tmp, "gpt2")
    for args, needle in ((["--prune-heads", "0.5", "--calib", data], "GPT-2"),
                         (["--prune-ffn", "0.5"], "--calib"),
                         (["--prune-ffn", "1.5", "--calib", data], "--prune-ffn"),
                         (["--drop-layers", "0-2"], "every layer")):
        r = run("compress", "--model", g, "--out", os.path.join(tmp, "bad"), *args, ok=False)
        check(r.returncode != 0 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1,
              f"compress {args}: rc {r.returncode} {r.stderr!r}")
        check(not os.path.exists(os.path.join(tmp, "bad", "config.json")), f"compress {args}: left output")
    finish()


if __name__ == "__main__":
    main()
