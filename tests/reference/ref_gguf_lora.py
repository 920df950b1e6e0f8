"""Reference check of `shardtune export ADAPTER --format gguf` (GGUF LoRA adapters, llama.cpp's
convert_lora_to_gguf.py layout) with PyPI's gguf 0.19 reader.

For llama (arch `llama`: Q/K row permutation, GQA) and gpt2 (Conv1D, rsLoRA), from a PEFT adapter
directory written here with numpy (non-zero A and B):
  * keys general.architecture / general.type "adapter" / adapter.type "lora" / adapter.lora.alpha with their
    GGUF types; tensor names `<base GGUF name>.lora_a|.lora_b` for exactly the adapted modules (the names
    come from a table here, not from shardtune), shapes (lora_a ne [in, r], lora_b ne [r, out], what
    llama.cpp's loader checks against the base tensor), types (f32; with q8_0, lora_b rows of r < 32
    fall back to f16 as the converter does);
  * lora_a bit-exact to peft's A, lora_b bit-exact to peft's B with LlamaModel.permute applied for q/k;
  * the math llama.cpp applies: W + alpha/r * B @ A over the tensors of the exported base GGUF equals, for
    every adapted tensor, the GGUF export of the merged model (`export ADAPTER --merge`), within float32
    rounding; merging an unpermuted lora_b into a permuted q/k base must NOT match (the check can fail);
  * a LoRA run's checkpoint as SRC: its GGUF adapter holds the tensors of its own `--format peft` export;
  * DoRA, lora_alpha 0 (llama.cpp reads it as scale 1) and a base that does not exist are errors, with no
    file left.
"""
import json
import math
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

import st_io  # noqa: E402
from st_cli import check, finish, run  # noqa: E402
from ref_gguf_export import make_config, make_weights, write_model, permute  # noqa: E402

VT = gguf.GGUFValueType
# HF module -> llama.cpp tensor (without blk.N.): an independent table, as convert_hf_to_gguf maps them
GGUF_OF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
           "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
           "mlp.down_proj": "ffn_down", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
           "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}


def adapter_modules(cfg, targets):
    """{(layer, HF module): (in, out)} of the adapted projections."""
    C = cfg.get("hidden_size", cfg.get("n_embd"))
    if cfg["model_type"] == "gpt2":
        F = cfg["n_inner"]
        dims = {"attn.c_attn": (C, 3 * C), "attn.c_proj": (C, C), "mlp.c_fc": (C, F), "mlp.c_proj": (F, C)}
        L = cfg["n_layer"]
    else:
        F, H, KV = cfg["intermediate_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        kvd = C // H * KV
        dims = {"self_attn.q_proj": (C, C), "self_attn.k_proj": (C, kvd), "self_attn.v_proj": (C, kvd),
                "self_attn.o_proj": (C, C), "mlp.gate_proj": (C, F), "mlp.up_proj": (C, F), "mlp.down_proj": (F, C)}
        L = cfg["num_hidden_layers"]
    return {(l, m): io for l in range(L) for m, io in dims.items() if m.split(".")[1] in targets}


def write_adapter(d, cfg, base, targets, r, alpha, rslora, rng, dora=False):
    os.makedirs(d, exist_ok=True)
    pre = "base_model.model.transformer.h" if cfg["model_type"] == "gpt2" else "base_model.model.model.layers"
    tensors, ab = {}, {}
    for (l, m), (i, o) in adapter_modules(cfg, targets).items():
        A = rng.normal(0, 0.2, (r, i)).astype(np.float32)
        B = rng.normal(0, 0.2, (o, r)).astype(np.float32)
        tensors[f"{pre}.{l}.{m}.lora_A.weight"], tensors[f"{pre}.{l}.{m}.lora_B.weight"] = A, B
        if dora:
            tensors[f"{pre}.{l}.{m}.lora_magnitude_vector"] = rng.uniform(0.5, 1.5, o).astype(np.float32)
        ab[f"blk.{l}.{GGUF_OF[m]}.weight"] = (A, B, m)
    st_io.write(os.path.join(d, "adapter_model.safetensors"), tensors)
    json.dump(dict(peft_type="LORA", task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0,
                   target_modules=targets, use_rslora=rslora, use_dora=dora, bias="none",
                   fan_in_fan_out=cfg["model_type"] == "gpt2", base_model_name_or_path=base),
              open(os.path.join(d, "adapter_config.json"), "w"))
    return ab


def tensors_of(path):
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        a = np.asarray(t.data)
        out[t.name] = (t, a.reshape([int(x) for x in t.shape[::-1]]) if t.tensor_type == QT.F32 else a)
    return r, out


def check_adapter(path, cfg, ab, r, scale, quant, label):
    rd, ts = tensors_of(path)
    f = rd.fields
    arch = "gpt2" if cfg["model_type"] == "gpt2" else "llama"
    want = {"general.architecture": (VT.STRING, arch), "general.type": (VT.STRING, "adapter"),
            "adapter.type": (VT.STRING, "lora"), "adapter.lora.alpha": (VT.FLOAT32, np.float32(scale * r))}
    for k, (t, v) in want.items():
        check(k in f, f"{label}: key {k} missing")
        if k in f:
            check(f[k].types[0] == t, f"{label}: {k} GGUF type {f[k].types[0]}, expected {t}")
            got = f[k].contents()
            ok = np.float32(got) == v if t == VT.FLOAT32 else got == v
            check(ok, f"{label}: {k} = {got!r}, expected {v!r}")
    check(not any(k.startswith("tokenizer.") for k in f), f"{label}: tokenizer keys in an adapter")
    names = {n + s for n in ab for s in (".lora_a", ".lora_b")}
    check(set(ts) == names, f"{label}: tensors {sorted(set(ts) ^ names)[:6]} differ from the adapted modules")
    heads = {"self_attn.q_proj": cfg.get("num_attention_heads"), "self_attn.k_proj": cfg.get("num_key_value_heads")}
    for n, (A, B, m) in ab.items():
        if n + ".lora_a" not in ts:
            continue
        (ta, a), (tb, b) = ts[n + ".lora_a"], ts[n + ".lora_b"]
        check(list(ta.shape) == [A.shape[1], r] and list(tb.shape) == [r, B.shape[0]],
              f"{label}: {n} ne {list(ta.shape)} / {list(tb.shape)}")
        ea = QT.F32 if quant == "f32" else QT.Q8_0
        eb = QT.F32 if quant == "f32" else QT.F16  # rows of r < 32 do not fill a q8_0 block
        check(ta.tensor_type == ea and tb.tensor_type == eb, f"{label}: {n} types {ta.tensor_type.name}/{tb.tensor_type.name}")
        if quant != "f32":
            continue
        eB = permute(B, heads[m]) if arch == "llama" and m in heads else B
        check(np.array_equal(a, A), f"{label}: {n}.lora_a is not peft's A")
        check(np.array_equal(b, eB), f"{label}: {n}.lora_b is not peft's B{' permuted' if eB is not B else ''}")
    return ts


def check_merge(base_g, lora_g, merged_g, ab, r, alpha, label):
    """llama.cpp's W + alpha/r * B @ A in GGUF layout equals the GGUF export of the merged model."""
    _, base = tensors_of(base_g)
    _, lora = tensors_of(lora_g)
    _, merged = tensors_of(merged_g)
    s = alpha / r
    worst = 0.0
    for n in base:
        W, M = base[n][1].astype(np.float64), merged[n][1].astype(np.float64)
        if n not in ab:
            check(np.array_equal(W, M), f"{label}: {n} is not adapted but changed by the merge")
            continue
        A, B = lora[n + ".lora_a"][1].astype(np.float64), lora[n + ".lora_b"][1].astype(np.float64)
        want = W + s * (B @ A)
        # float32 merge: r products and one add, each rounded (2^-24 relative) on magnitudes below this
        tol = 4 * (r + 2) * 2.0 ** -24 * (np.abs(W) + s * (np.abs(B) @ np.abs(A)))
        err = np.abs(want - M)
        worst = max(worst, float((err / (tol + 1e-30)).max()))
        check((err <= tol).all(), f"{label}: {n}: W + alpha/r B A differs from the merged export by {err.max():.2e}")
        if n.endswith(("attn_q.weight", "attn_k.weight")) and "gpt2" not in label:
            bad = W + s * (ab[n][1].astype(np.float64) @ A)  # peft's B without the permutation
            check(np.abs(bad - M).max() > 1e3 * tol.max(), f"{label}: {n}: an unpermuted lora_b also matches")
    print(f"{label}: merge check over {len(ab)} adapted tensors, worst error / bound {worst:.3f}")


def main():
    rng = np.random.default_rng(11)
    tmp = tempfile.mkdtemp(prefix="st_gguf_lora_")
    cases = [  # label, config, targets, r, alpha, rslora
        ("llama", make_config("llama", 2, 64, 4, 2, 96, 320, False),
         ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], 4, 8.0, False),
        ("gpt2", make_config("gpt2", 2, 64, 4, 4, 256, 320, True), ["c_attn", "c_proj", "c_fc"], 8, 16.0, True),
    ]
    for label, cfg, targets, r, alpha, rslora in cases:
        d, ad = os.path.join(tmp, label), os.path.join(tmp, label + "_adapter")
        write_model(d, cfg, make_weights(cfg, rng))
        ab = write_adapter(ad, cfg, d, targets, r, alpha, rslora, rng)
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        for quant in ("f32", "q8_0"):
            out = os.path.join(tmp, f"{label}.lora.{quant}.gguf")
            p = run("export", ad, "--out", out, "--format", "gguf", "--quant", quant)
            check("lora adapter" in p.stdout, f"{label}: export says {p.stdout!r}")
            check_adapter(out, cfg, ab, r, scale, quant, f"{label}/{quant}")
        run("export", d, "--out", os.path.join(tmp, f"{label}.base.gguf"), "--format", "gguf", "--quant", "f32")
        run("export", ad, "--merge", "--out", os.path.join(tmp, label + "_merged"))
        run("export", os.path.join(tmp, label + "_merged"), "--out", os.path.join(tmp, f"{label}.merged.gguf"),
            "--format", "gguf", "--quant", "f32")
        # the GGUF's own alpha and rank, as llama.cpp reads them
        g_alpha = float(gguf.GGUFReader(os.path.join(tmp, f"{label}.lora.f32.gguf")).fields["adapter.lora.alpha"].contents())
        check_merge(os.path.join(tmp, f"{label}.base.gguf"), os.path.join(tmp, f"{label}.lora.f32.gguf"),
                    os.path.join(tmp, f"{label}.merged.gguf"), ab, r, g_alpha, label)
    # a LoRA run's checkpoint: the GGUF adapter holds its own peft export's tensors
    ck = os.path.join(tmp, "ck")
    run("init-model", "--family", "llama", "--layers", "2", "--dim", "64", "--heads", "4", "--kv-heads", "2",
        "--vocab", "256", "--max-seq", "64", "--out", os.path.join(ck, "model"))
    with open(os.path.join(ck, "d.jsonl"), "w") as fj:
        for _ in range(40):
            fj.write(json.dumps({"input_ids": [int(t) for t in rng.integers(0, 256, 40)]}) + "\n")
    run("data", "pack", "--jsonl", os.path.join(ck, "d.jsonl"), "--out", os.path.join(ck, "d.h5"), "--vocab", "256")
    with open(os.path.join(ck, "job.yaml"), "w") as fj:
        fj.write(f"model: {{ path: {ck}/model }}\nrun_dir: {ck}/run\nseed: 1\n"
                 "finetune: { mode: lora, lora: { r: 4, alpha: 16, targets: [q_proj, k_proj, v_proj, down_proj] } }\n"
                 "train: { steps: 2, micro_batch: 2, grad_accum: 1, seq_len: 16, lr: 1.0e-2, warmup_steps: 0 }\n"
                 f"tasks: [ {{ name: t, path: {ck}/d.h5 }} ]\neval: {{ every_steps: 0 }}\n"
                 "checkpoint: { every_steps: 2, keep_last: 0 }\n"
                 "monitor: { publish: \"\", control: \"\" }\n")
    run("train", os.path.join(ck, "job.yaml"))
    ckdir = os.path.join(ck, "run", "checkpoints")
    run("export", ckdir, "--out", os.path.join(ck, "peft"), "--format", "peft")
    run("export", ckdir, "--out", os.path.join(ck, "ck.gguf"), "--format", "gguf", "--quant", "f32")
    pt = st_io.read(os.path.join(ck, "peft", "adapter_model.safetensors"))
    mcfg = json.load(open(os.path.join(ck, "model", "config.json")))
    ab = {}
    for k, A in pt.items():
        if k.endswith(".lora_A.weight"):
            stem = k[len("base_model.model.model.layers."):-len(".lora_A.weight")]
            l, m = stem.split(".", 1)
            ab[f"blk.{l}.{GGUF_OF[m]}.weight"] = (A, pt[k.replace("lora_A", "lora_B")], m)
    check(len(ab) == 8, f"checkpoint: {len(ab)} adapted modules in the peft export, expected 8")
    check(any(np.abs(B).max() > 0 for _, B, _ in ab.values()), "checkpoint: training left every B at zero")
    check_adapter(os.path.join(ck, "ck.gguf"), mcfg, ab, 4, 16.0 / 4, "f32", "checkpoint")
    # errors a user can cause: one line, non-zero exit, no file left
    dora = os.path.join(tmp, "dora")
    write_adapter(dora, cases[0][1], os.path.join(tmp, "llama"), ["q_proj"], 4, 8.0, False, rng, dora=True)
    bad = run("export", dora, "--out", os.path.join(tmp, "d.gguf"), "--format", "gguf", ok=False)
    check(bad.returncode != 0 and "DoRA" in bad.stderr and not os.path.exists(os.path.join(tmp, "d.gguf")),
          f"DoRA adapter: rc {bad.returncode}, {bad.stderr!r}")
    zero = os.path.join(tmp, "alpha0")
    write_adapter(zero, cases[0][1], os.path.join(tmp, "llama"), ["q_proj"], 4, 0.0, False, rng)
    bad = run("export", zero, "--out", os.path.join(tmp, "z.gguf"), "--format", "gguf", ok=False)
    check(bad.returncode != 0 and "alpha" in bad.stderr and not os.path.exists(os.path.join(tmp, "z.gguf")),
          f"lora_alpha 0: rc {bad.returncode}, {bad.stderr!r}")
    bad = run("export", os.path.join(tmp, "llama_adapter"), "--out", os.path.join(tmp, "e.gguf"), "--format", "gguf",
              "--model", os.path.join(tmp, "nowhere"), ok=False)
    check(bad.returncode != 0 and "nowhere" in bad.stderr and not os.path.exists(os.path.join(tmp, "e.gguf")),
          f"missing base: rc {bad.returncode}, {bad.stderr!r}")
    finish()


if __name__ == "__main__":
    main()
