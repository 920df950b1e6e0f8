"""llama.cpp itself runs `shardtune export ADAPTER --format gguf` LoRA adapters, k-quants included (libllama
from PyPI llama-cpp-python, built by scripts/build_llama.sh; run through `scripts/pyref --llama`).

For a small Llama (width 256, d_ff 512, GQA, the Q/K row permutation) with a PEFT adapter on all seven
projections (r 8, alpha 1, random non-zero A and B), over T = 160 tokens of text:
  * the f32 adapter, loaded with llama_adapter_lora_init on the exported f32 base GGUF and applied at scale 1,
    gives per-token NLLs within 1e-3 of llama.cpp's run of the merged model's f32 GGUF (`export --merge`,
    then `export --format gguf`) at every token; the base alone must differ by more (the check can fail);
  * for every --quant a LoRA adapter takes (q8_0, q4_0, q2_K, q3_K, q4_K, q5_K, q6_K) llama.cpp loads the
    quantized adapter (lora_a in that type: its rows of d_model / d_ff fit the blocks; lora_b, rows of
    r = 8, falls back to f16), and base + adapter matches, at every token, llama.cpp's run of an f32 GGUF of
    W + s B deq(A), where deq(A) is the adapter file's lora_a dequantized with gguf.quants: llama.cpp applies
    the quantized adapter the file holds. Not within 1e-3: for a quantized lora_a llama.cpp's CPU matmul
    rounds the activations to 8 bits (q8_0 / q8_K blocks, up to 0.4% of a block's largest value per
    element), so the adapter's contribution carries ~1% error (measured 0.6-1.1% of the adapter's largest
    per-token effect, max |diff| 0.015-0.027 for every type alike); the tolerance is 2% of the adapter's
    largest per-token effect (QTOL_FRAC). That this can fail: for q2_K the exact merge W + s B A (what a
    loader ignoring the quantization would give) is further than the tolerance;
  * the file's lora_a types are the requested ones; q4_K_M / q5_K_M (per-layer mixes for models) are
    refused for adapters with one line naming the value, and no file is left.
Exit 77 (skip) without the llama.cpp environment unless SHARDTUNE_WITH_PYREF=1 (scripts/pyref).
"""
import ctypes
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import dequantize  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402

import llama_cpp as L  # noqa: E402
from llamacpp_gguf import Llama, nll_from_logits, _quiet  # noqa: E402
from ref_gguf_export import TEXT, make_config, make_weights, write_model, spm_tokenizer  # noqa: E402
from ref_gguf_lora import write_adapter  # noqa: E402
from st_cli import check, finish, run  # noqa: E402

T = 160
TOL = 1e-3  # per token, as llamacpp_gguf.py's f32 check
QTOL_FRAC = 0.02  # quantized adapters: per token, this fraction of the adapter's largest per-token effect
ADAPTER_QUANTS = {"q8_0": QT.Q8_0, "q4_0": QT.Q4_0, "q2_K": QT.Q2_K, "q3_K": QT.Q3_K, "q4_K": QT.Q4_K,
                  "q5_K": QT.Q5_K, "q6_K": QT.Q6_K}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 8, 1.0


def run_nll(base_path, ids, adapter_path=None):
    m = Llama(base_path)
    if adapter_path:
        ad = L.llama_adapter_lora_init(m.model, adapter_path.encode())
        check(bool(ad), f"llama.cpp refused the adapter {os.path.basename(adapter_path)}")
        if not ad:
            m.close()
            return None
        rc = L.llama_set_adapters_lora(m.ctx, (L.llama_adapter_lora_p_ctypes * 1)(ad), 1, (ctypes.c_float * 1)(1.0))
        check(rc == 0, f"llama_set_adapters_lora returned {rc}")
    nll = nll_from_logits(m.logits(ids), ids)
    m.close()
    return nll


def merged_weights(hf, ab_hf, lora_a):
    """HF weights + s * B @ A for every adapted module, A taken from `lora_a` ({GGUF base name: A})."""
    out = dict(hf)
    s = ALPHA / R
    for gname, (hf_name, B) in ab_hf.items():
        A = lora_a[gname].astype(np.float64)
        out[hf_name] = (hf[hf_name].astype(np.float64) + s * (B.astype(np.float64) @ A)).astype(np.float32)
    return out


def main():
    L.llama_log_set(_quiet, ctypes.c_void_p())
    L.llama_backend_init()
    rng = np.random.default_rng(7)
    tmp = tempfile.mkdtemp(prefix="st_llamacpp_lora_")
    tok = spm_tokenizer()
    tk = Tokenizer.from_str(tok)
    cfg = make_config("llama", 2, 256, 4, 2, 512, 0, False)
    cfg["vocab_size"] = tk.get_vocab_size(with_added_tokens=True)
    hf = make_weights(cfg, rng)
    hf["lm_head.weight"] = (hf["lm_head.weight"] * 2.0).astype(np.float32)
    for n in hf:  # attention scores of std ~1.6 (llamacpp_gguf.py's ATTN_STD note)
        if "q_proj.weight" in n or "k_proj.weight" in n:
            hf[n] = (hf[n] * (0.08 / 0.25)).astype(np.float32)
    d = os.path.join(tmp, "base")
    write_model(d, cfg, hf, tok)
    ad = os.path.join(tmp, "adapter")
    ab = write_adapter(ad, cfg, d, TARGETS, R, ALPHA, False, rng)
    # GGUF base name -> (HF weight name, B) for merging here
    ab_hf = {g: (f"model.layers.{g.split('.')[1]}.{m}.weight", B) for g, (A, B, m) in ab.items()}
    ids = np.array(tk.encode(" ".join(TEXT[:30]), add_special_tokens=False).ids[:T])
    check(len(ids) == T, f"the text gives {len(ids)} tokens, need {T}")

    base_gguf = os.path.join(tmp, "base.f32.gguf")
    run("export", d, "--out", base_gguf, "--format", "gguf", "--quant", "f32")
    run("export", ad, "--merge", "--out", os.path.join(tmp, "merged"))
    merged_gguf = os.path.join(tmp, "merged.f32.gguf")
    run("export", os.path.join(tmp, "merged"), "--out", merged_gguf, "--format", "gguf", "--quant", "f32")
    ref = run_nll(merged_gguf, ids)
    plain = run_nll(base_gguf, ids)
    effect = np.abs(plain - ref).max()
    print(f"the adapter moves llama.cpp's per-token NLL by up to {effect:.3e} (mean {np.abs(plain - ref).mean():.3e})")
    check(effect > 10 * TOL, f"the adapter changes the NLL by only {effect:.3e}: the check could not fail")
    qtol = QTOL_FRAC * effect

    for quant in ("f32",) + tuple(ADAPTER_QUANTS):
        path = os.path.join(tmp, f"adapter.{quant}.gguf")
        run("export", ad, "--out", path, "--format", "gguf", "--quant", quant)
        r = gguf.GGUFReader(path)
        lora_a, types = {}, set()
        for t in r.tensors:
            if t.name.endswith(".lora_a"):
                types.add(t.tensor_type)
                shape = (int(t.shape[1]), int(t.shape[0]))  # ne [in, r] -> A [r, in]
                lora_a[t.name[:-len(".lora_a")]] = dequantize(t.data, t.tensor_type).reshape(shape)
        want = {QT.F32} if quant == "f32" else {ADAPTER_QUANTS[quant]}
        check(types == want, f"{quant}: lora_a types {sorted(x.name for x in types)}, expected {want}")
        if quant == "f32":
            target = ref
        else:  # llama.cpp must apply the quantized A the file holds: W + s B deq(A), run as an f32 file
            md = os.path.join(tmp, f"merged_{quant}")
            write_model(md, cfg, merged_weights(hf, ab_hf, lora_a), tok)
            mp = os.path.join(tmp, f"merged_{quant}.f32.gguf")
            run("export", md, "--out", mp, "--format", "gguf", "--quant", "f32")
            target = run_nll(mp, ids)
        got = run_nll(base_gguf, ids, path)
        if got is None:
            continue
        diff, tol = np.abs(got - target), TOL if quant == "f32" else qtol
        exact = np.abs(got - ref)
        print(f"adapter {quant}: llama.cpp base + adapter vs the merged f32 file{' of deq(A)' if quant != 'f32' else ''}"
              f": per-token NLL max |diff| {diff.max():.2e} ({100 * diff.max() / effect:.2f}% of the adapter's "
              f"effect), mean {diff.mean():.2e}; vs the exact merge max {exact.max():.2e}; tolerance {tol:.3g} per token")
        check(diff.max() <= tol, f"adapter {quant}: per-token NLL differs by {diff.max():.3e} > {tol:.3g}")
        if quant == "q2_K":
            check(exact.max() > tol, f"q2_K adapter: the exact merge is within {tol:.3g} too ({exact.max():.3e}): "
                  "the check cannot tell the quantized A apart")

    for quant in ("q4_K_M", "q5_K_M"):
        path = os.path.join(tmp, f"adapter.{quant}.gguf")
        p = run("export", ad, "--out", path, "--format", "gguf", "--quant", quant, ok=False)
        check(p.returncode != 0 and quant in p.stderr and len(p.stderr.strip().splitlines()) == 1,
              f"adapter {quant}: rc {p.returncode}, {p.stderr!r}")
        check(not os.path.exists(path) and not os.path.exists(path + ".partial"), f"adapter {quant}: a file is left")
    L.llama_backend_free()
    finish()


if __name__ == "__main__":
    main()
