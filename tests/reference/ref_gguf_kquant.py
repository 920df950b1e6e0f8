"""Reference check of `shardtune export --format gguf --quant q4_K` against PyPI's gguf 0.19 (reader and
dequantizers; gguf.quants has no k-quant quantizer, so the bytes are checked through what they decode to).

For llama (GQA; ffn_down rows of 352: not a multiple of 256), qwen2 (tied: token_embd is the head), gpt2
(position_embd, the written output.weight) and a llama of width 96 (no row fits a super-block) and 72
(ffn_down rows not a multiple of 32):
  * tensor types follow the recipe (docs/compress.md): q4_K, the head q6_K, q5_0 / q8_0 for rows not a
    multiple of 256, f16 for rows not a multiple of 32 and for position_embd, 1-D f32; general.file_type 14;
  * q5_0 bytes identical to gguf.quants.quantize;
  * q4_K / q6_K decoded by gguf.quants.dequantize: every element whose value lies inside its sub-block's
    decoded range sits on the nearest level (error <= half the sub-block step d*sc, to float rounding), i.e.
    levels, scales, mins and their packing are consistent; no element is more than one sub-block step outside
    the range (the fit's candidate scales span the sub-block's own range); the mean squared error is at most
    that of the plain min/max 4-bit (6-bit) quantizer of the same sub-blocks with exact scales, times 1.25
    for the 6-bit rounding of the scales (the search minimises a weighted squared error starting from that
    quantizer, so it should not lose to it by more than the scale rounding can cost);
  * a LoRA adapter exports under `--quant q4_K` (lora_a of rows 256 in q4_K, lora_b of rows r = 4 in f16, the
    fallback), and the model-only mix `--quant q4_K_M` is refused by name;
  * a write that fails part-way (RLIMIT_FSIZE 200 kB) is one line naming it, a non-zero exit, and no file.
Bit-identity with llama.cpp's own quantizer (llama_model_quantize), every k-quant, and running the files
(adapters included) in llama.cpp: llamacpp_gguf.py, llamacpp_lora.py.
"""
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402
from gguf.quants import quantize, dequantize  # noqa: E402

from ref_gguf_export import make_config, make_weights, write_model, expected_tensors  # noqa: E402
from st_cli import check, finish, run  # noqa: E402


def recipe_type(name, a, head):
    """The q4_K recipe, written from docs/compress.md."""
    if a.ndim == 1:
        return QT.F32
    if name == "position_embd.weight":
        return QT.F16
    n = a.shape[-1]
    if n % 32:
        return QT.F16
    if head:
        return QT.Q6_K if n % 256 == 0 else QT.Q8_0
    return QT.Q4_K if n % 256 == 0 else QT.Q5_0


def f16(x):
    return np.asarray(x, np.float32).astype(np.float16).astype(np.float64)


def q4k_fields(raw):
    """Per sub-block step d*sc and offset dmin*m of Q4_K blocks ([nblocks, 144] uint8)."""
    d = f16(raw[:, 0:2].copy().view(np.float16)[:, 0])
    dmin = f16(raw[:, 2:4].copy().view(np.float16)[:, 0])
    s = raw[:, 4:16].astype(np.int64)
    sc = np.zeros((len(raw), 8), np.int64)
    m = np.zeros((len(raw), 8), np.int64)
    sc[:, :4] = s[:, 0:4] & 63
    m[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    m[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return d[:, None] * sc, dmin[:, None] * m  # [nb, 8] each


def plain_mse(x, levels, affine):
    """Mean squared error of the min/max quantizer with exact float64 scales over groups (rows of x)."""
    if affine:
        lo, hi = np.minimum(x.min(1, keepdims=True), 0), x.max(1, keepdims=True)
        step = np.where(hi > lo, (hi - lo) / levels, 1)
        q = np.clip(np.rint((x - lo) / step), 0, levels)
        return np.mean((q * step + lo - x) ** 2)
    amax = np.abs(x).max(1, keepdims=True)
    step = np.where(amax > 0, amax / (levels // 2), 1)
    q = np.clip(np.rint(x / step), -(levels // 2), levels // 2 - 1)
    return np.mean((q * step - x) ** 2)


def check_q4k(name, a, t, label):
    x = a.reshape(-1, 32).astype(np.float64)
    deq = dequantize(t.data, QT.Q4_K).reshape(-1, 32).astype(np.float64)
    raw = np.asarray(t.data).view(np.uint8).reshape(-1, 144)
    step, off = q4k_fields(raw)
    step, off = step.reshape(-1, 1), off.reshape(-1, 1)
    lo, hi = -off, 15 * step - off
    err = np.abs(deq - x)
    inside = (x >= lo) & (x <= hi)
    tol = 1e-6 * (np.abs(x) + off + 15 * step)
    check((err[inside] <= 0.5 * step.repeat(32, 1)[inside] + tol[inside]).all(),
          f"{label}: {name} q4_K: an in-range element is not on its nearest level")
    outside = np.maximum(lo - x, x - hi).clip(0)
    # the fit may clip by up to a step; the 6-bit rounding of its scale (d/2 per level, 15 levels) and of its
    # min (dmin/2) move the decoded range's ends by up to 7.5 d + 0.5 dmin more
    d = f16(raw[:, 0:2].copy().view(np.float16)[:, 0]).repeat(8)[:, None]
    dmin = f16(raw[:, 2:4].copy().view(np.float16)[:, 0]).repeat(8)[:, None]
    check((outside <= step + 7.5 * d + 0.5 * dmin + tol).all(), f"{label}: {name} q4_K: an element lies over a step outside its range "
          f"(worst {float((outside / np.maximum(step, 1e-30)).max()):.2f} steps)")
    mse, ref = np.mean((deq - x) ** 2), plain_mse(x, 15, True)
    print(f"{label}: {name} q4_K mse {mse:.3e} (plain min/max 4-bit: {ref:.3e})")
    check(mse <= 1.25 * ref, f"{label}: {name} q4_K mse {mse:.3e} above 1.25x the plain quantizer's {ref:.3e}")


def check_q6k(name, a, t, label):
    x = a.reshape(-1, 16).astype(np.float64)
    deq = dequantize(t.data, QT.Q6_K).reshape(-1, 16).astype(np.float64)
    raw = np.asarray(t.data).view(np.uint8).reshape(-1, 210)
    d = f16(raw[:, 208:210].copy().view(np.float16)[:, 0])
    sc = raw[:, 192:208].view(np.int8).astype(np.float64)
    step = np.abs((d[:, None] * sc).reshape(-1, 1))
    err = np.abs(deq - x)
    q = np.where(step > 0, x / np.where(step > 0, step, 1), 0)  # |level| the value needs
    inside = np.abs(q) <= 31
    tol = 1e-6 * (np.abs(x) + 32 * step)
    check((err[inside] <= 0.5 * step.repeat(16, 1)[inside] + tol[inside]).all(),
          f"{label}: {name} q6_K: an in-range element is not on its nearest level")
    # the fit may clip by up to a step; the int8 rounding of the scale (d/2) moves the range end by 32 d / 2
    dd = np.repeat(d, 16)[:, None]
    check((err <= 1.5 * step + 16 * dd + tol).all(), f"{label}: {name} q6_K: an element lies too far outside its range")
    mse, ref = np.mean((deq - x) ** 2), plain_mse(x, 64, False)
    print(f"{label}: {name} q6_K mse {mse:.3e} (plain absmax 6-bit: {ref:.3e})")
    check(mse <= 1.25 * ref, f"{label}: {name} q6_K mse {mse:.3e} above 1.25x the plain quantizer's {ref:.3e}")


def main():
    rng = np.random.default_rng(11)
    tmp = tempfile.mkdtemp(prefix="st_gguf_k_")
    cases = [
        ("llama", make_config("llama", 2, 256, 4, 2, 352, 300, False)),
        ("qwen2_tied", make_config("qwen2", 1, 256, 4, 2, 512, 280, True)),
        ("gpt2", make_config("gpt2", 1, 256, 4, 4, 1024, 290, True)),
        ("llama96", make_config("llama", 1, 96, 4, 2, 72, 260, False)),
    ]
    for label, cfg in cases:
        d = os.path.join(tmp, label)
        hf = make_weights(cfg, rng)
        # a few blocks of the edge cases: zeros, one spike, all-positive, constant
        first = next((k for k in hf if hf[k].ndim == 2 and hf[k].shape[-1] % 256 == 0), None)
        if first:
            w = hf[first]
            w[0, :256] = 0
            w[1, :256] = 0
            w[1, 7] = 3.0
            w[2, :256] = np.abs(w[2, :256])
            w[3, :256] = 0.125
        write_model(d, cfg, hf)
        out = os.path.join(tmp, f"{label}.q4_K.gguf")
        p = run("export", d, "--out", out, "--format", "gguf", "--quant", "q4_K", "--no-tokenizer")
        print(p.stdout.strip())
        r = gguf.GGUFReader(out)
        ft = r.fields["general.file_type"].contents()
        check(ft == 14, f"{label}: general.file_type {ft}, expected 14 (MOSTLY_Q4_K_S)")
        exp = expected_tensors(cfg, hf)
        got = {t.name: t for t in r.tensors}
        check(set(got) == set(exp), f"{label}: tensor names differ: {sorted(set(got) ^ set(exp))}")
        for name, a in exp.items():
            t = got.get(name)
            if t is None:
                continue
            head = name == "output.weight" or (name == "token_embd.weight" and "output.weight" not in exp)
            et = recipe_type(name, a, head)
            check(t.tensor_type == et, f"{label}: {name} is {t.tensor_type.name}, the recipe says {et.name}")
            if t.tensor_type != et:
                continue
            if et == QT.Q5_0:
                ref = quantize(a, QT.Q5_0)
                check(np.array_equal(np.asarray(t.data).view(np.uint8).reshape(ref.shape), ref),
                      f"{label}: {name} q5_0 bytes differ from gguf.quants.quantize")
            elif et == QT.Q4_K:
                check_q4k(name, a, t, label)
            elif et == QT.Q6_K:
                check_q6k(name, a, t, label)
            elif et == QT.Q8_0:
                ref = quantize(a, QT.Q8_0)
                check(np.array_equal(np.asarray(t.data).view(np.uint8).reshape(ref.shape), ref),
                      f"{label}: {name} q8_0 bytes differ from gguf.quants.quantize")
            elif et == QT.F16:
                check(np.array_equal(np.asarray(t.data).view(np.uint16).reshape(a.shape),
                                     a.astype(np.float16).view(np.uint16)), f"{label}: {name} f16 bits differ")
    # a LoRA adapter: single k-quants apply (lora_b rows of r fall back); the per-layer mixes are refused
    ad = os.path.join(tmp, "adapter")
    os.makedirs(ad)
    import json
    json.dump({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"],
               "base_model_name_or_path": os.path.join(tmp, "llama")}, open(os.path.join(ad, "adapter_config.json"), "w"))
    import st_io
    cfg = make_config("llama", 2, 256, 4, 2, 352, 300, False)
    lw = {}
    for layer in range(2):
        pre = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        lw[pre + ".lora_A.weight"] = (0.1 * rng.standard_normal((4, 256))).astype(np.float32)
        lw[pre + ".lora_B.weight"] = (0.1 * rng.standard_normal((256, 4))).astype(np.float32)
    st_io.write(os.path.join(ad, "adapter_model.safetensors"), lw)
    run("export", ad, "--out", os.path.join(tmp, "a.gguf"), "--format", "gguf", "--quant", "q4_K")
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(os.path.join(tmp, "a.gguf")).tensors}
    want = {f"blk.{i}.attn_q.weight.lora_{ab}": QT.Q4_K if ab == "a" else QT.F16 for i in range(2) for ab in "ab"}
    check(types == want, f"LoRA q4_K: tensor types {types}, expected {want}")
    p = run("export", ad, "--out", os.path.join(tmp, "m.gguf"), "--format", "gguf", "--quant", "q4_K_M", ok=False)
    msg = (p.stdout + p.stderr).strip()
    check(p.returncode != 0 and "q4_K_M" in msg and "LoRA" in msg and msg.count("\n") == 0,
          f"LoRA q4_K_M: expected one line naming q4_K_M and LoRA, got rc {p.returncode}: {msg!r}")
    check(not os.path.exists(os.path.join(tmp, "m.gguf")), "LoRA q4_K_M: a file was written")
    # a write that fails part-way (the file size limit: the writer thread's fwrite comes short): one line,
    # non-zero exit, neither the file nor its .partial left
    import resource
    import signal
    import subprocess
    from st_cli import BIN

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    full = os.path.join(tmp, "full.gguf")
    p = subprocess.run([BIN, "export", os.path.join(tmp, "llama"), "--out", full, "--format", "gguf", "--quant",
                        "q4_K_M", "--no-tokenizer"], capture_output=True, text=True, preexec_fn=small_files)
    msg = (p.stdout + p.stderr).strip()
    check(p.returncode != 0 and "write failed" in msg and msg.count("\n") == 0,
          f"a failed write: expected one line 'write failed', got rc {p.returncode}: {msg!r}")
    check(not os.path.exists(full) and not os.path.exists(full + ".partial"), "a failed write left a file")
    finish()


if __name__ == "__main__":
    main()
