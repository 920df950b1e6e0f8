"""test_qlora_torch.py — QLoRA (worker/qlora.c): the quantized base against an independent numpy implementation
of the same format, and LoRA over the dequantized base against torch autograd (float64).

The format (worker/qlora.h): every 2-D weight inside the layers, flattened row-major ([out, in], HF layout for
Llama), is cut in blocks of `block` elements; NF4: absmax per block, code = nearest level of the QLoRA NF4
table (bitsandbytes' published values, written out below independently of kernels/backend.c) to w / absmax,
first on ties; int8: s = absmax / 127, q = rint(w / s). Double quantization: the block scales minus their mean
(summed in order in float64), int8 with a linear map per 256 scales (max |d| / 127, rint). Dequantization:
level[code] * scale (nf4), q * s (int8), scale = q8 * s2 + mean.

 1. ref_model --adapter A --qlora Q: "dequant.<name>" (what the model's matmuls read) equals numpy's
    dequantized weight bit for bit, for every quantized tensor, in nf4 / int8 with and without double
    quantization and at block 64 and 32; qlora_bytes reports the quantized size (nf4 + dq: under 0.14 of
    fp32's bytes, as 4 bits + 8/64 bits of scale + 32/(64*256) bits per weight predicts).
 2. The loss and every adapter gradient equal torch's LoRA (RefModel.attach_lora) over numpy's dequantized
    base, float64, T = 128, q/k scaled so attention is sharp; tolerance as test_lora_torch.py (max(1e-5,
    4 x torch fp32's own error)). A wrong code, scale or block boundary changes the base weights by a whole
    quantization step and fails (1) exactly and (2) far beyond the tolerance. And the quantized model's loss,
    logits and gradients are bit-identical to the LoRA model over numpy's dequantized base as an fp32 model
    directory (the same code path, reading the same weights), so the quantized path adds no arithmetic.
    The gradient bound is 4 x torch fp32's worst error over the case's adapter gradients (a single tensor's
    own fp32 error can be luckily small).
Env (set by ctest): ST_BUILD_DIR."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from test_lora_torch import ENV, LLAMA, LLAMA_ALL, REF_MODEL, rel_err, sharp_weights, write_adapter  # noqa: E402
from torch_model import RefModel, parse_config, weighted_ce  # noqa: E402

torch.set_num_threads(2)
TOL, T, B = 1e-5, 128, 2
# QLoRA's NF4 table, bitsandbytes functional.py get_4bit_type("nf4") / the QLoRA paper appendix E
NF4 = np.array([-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                0.7229568362236023, 1.0], np.float32)
failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


def blocks(x, block):
    n = x.size
    pad = (-n) % block
    return np.concatenate([x, np.zeros(pad, x.dtype)]).reshape(-1, block), n


def double_quant(s):
    mean = np.float32(np.cumsum(s.astype(np.float64))[-1] / s.size)
    d = (s - mean).astype(np.float32)
    db, n = blocks(d, 256)
    s2 = (np.abs(db).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(s2[:, None] > 0, np.rint(db / s2[:, None]), 0)
    q8 = np.clip(q, -127, 127).astype(np.int8).reshape(-1)[:n]
    return (q8.astype(np.float32) * np.repeat(s2, 256)[:n] + mean).astype(np.float32)


def quant_dequant(w, quant, dq, block):
    """numpy's dequantized copy of w (float32) in the format above."""
    xb, n = blocks(w.astype(np.float32).reshape(-1), block)
    amax = np.abs(xb).max(axis=1).astype(np.float32)
    if quant == "nf4":
        with np.errstate(divide="ignore", invalid="ignore"):
            x = np.where(amax[:, None] > 0, xb / amax[:, None], np.float32(0)).astype(np.float32)
        codes = np.argmin(np.abs(x[..., None] - NF4), axis=-1)  # first index on ties
        scales = amax
        vals = NF4[codes]
    else:
        scales = (amax / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q = np.where(scales[:, None] > 0, np.rint(xb / scales[:, None]), 0)
        vals = np.clip(q, -127, 127).astype(np.float32)
    if dq:
        scales = double_quant(scales)
    out = (vals * scales[:, None]).astype(np.float32).reshape(-1)[:n]
    return out.reshape(w.shape)


def quantized_names(weights):
    return [k for k, v in weights.items() if v.ndim == 2 and k.startswith("model.layers.")]


def case(tmp, name, quant, dq, block, rng):
    print(name)
    c = parse_config(LLAMA)
    mdir, adir, ddir = (os.path.join(tmp, name + s) for s in ("", "_adapter", "_deq"))
    for d in (mdir, ddir):
        os.makedirs(d)
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(LLAMA, f)
    w = sharp_weights(c, rng)
    st_io.write(os.path.join(mdir, "model.safetensors"), w)
    deq = dict(w)
    for k in quantized_names(w):
        deq[k] = quant_dequant(w[k], quant, dq, block)
    st_io.write(os.path.join(ddir, "model.safetensors"), deq)
    ad = write_adapter(adir, c, LLAMA_ALL, 4, 8.0, False, None, rng)
    V = c["vocab"]
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    tg = rng.integers(0, V, (B, T)).astype(np.int32)
    wt = np.where(rng.random((B, T)) >= 0.3, 1.0, 0.0)
    wt = (wt / wt.sum()).astype(np.float32)
    batch = os.path.join(tmp, name + "_batch.safetensors")
    st_io.write(batch, {"inputs": inputs, "targets": tg, "weight": wt})
    out = os.path.join(tmp, name + "_out.safetensors")
    r = subprocess.run([REF_MODEL, "--model", mdir, "--batch", batch, "--out", out, "--adapter", adir,
                        "--qlora", quant + ("-dq" if dq else ""), "--qblock", str(block)],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    ours = st_io.read(out)

    # 1. bit-exact dequantization
    names = quantized_names(w)
    dumped = sorted(k[len("dequant."):] for k in ours if k.startswith("dequant."))
    bad = [k for k in names if not np.array_equal(ours.get("dequant." + k), deq[k])]
    nd = sum(int(np.sum(ours["dequant." + k] != deq[k])) for k in names if "dequant." + k in ours)
    check(f"{name} dequantized base bit-exact", dumped == sorted(names) and not bad,
          f"{len(names)} tensors, {nd} differing elements {bad[:2]}")
    changed = max(float(np.abs(deq[k] - w[k]).max()) for k in names)
    check(f"{name} quantization is not the identity", changed > 1e-4, f"max |deq - w| {changed:.3g}")
    qb, fb = (float(x) for x in ours["qlora_bytes"])
    fp32 = 4 * sum(w[k].size for k in names)
    check(f"{name} quantized bytes", fb == fp32 and (quant != "nf4" or not dq or qb < 0.14 * fb),
          f"{qb:.0f} B for {fb:.0f} fp32 B ({qb / fb:.4f})")

    # 2a. the quantized model computes exactly what the LoRA model over the dequantized fp32 base computes
    plain = os.path.join(tmp, name + "_plain.safetensors")
    r = subprocess.run([REF_MODEL, "--model", ddir, "--batch", batch, "--out", plain, "--adapter", adir],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr
    plain = st_io.read(plain)
    keys = [k for k in plain if k in ("loss", "logits") or k.startswith("grad.")]
    diff = [k for k in keys if not np.array_equal(plain[k], ours.get(k))]
    check(f"{name} == LoRA over the dequantized fp32 base", not diff and len(keys) > 2,
          f"{len(keys)} outputs bit-identical, differing: {diff[:3]}")

    # 2b. LoRA over the dequantized base: torch autograd
    def torch_run(dtype):
        ref = RefModel.load(ddir, dtype)
        ref.attach_lora(ad, 4, 8.0, False)
        ref.zero_grad()
        logits = ref.logits(torch.from_numpy(inputs).long())
        loss, _ = weighted_ce(logits, torch.from_numpy(tg).long(), torch.from_numpy(wt).to(dtype))
        loss.backward()
        return ref, loss.item()

    ref, loss = torch_run(torch.float64)
    r32, loss32 = torch_run(torch.float32)
    e, e32 = abs(float(ours["loss"][0]) - loss) / abs(loss), abs(loss32 - loss) / abs(loss)
    check(f"{name} loss", e <= max(TOL, 4 * e32), f"ours {float(ours['loss'][0]):.8f} torch {loss:.8f} rel {e:.2e}")
    # the fp32 bound per case: torch fp32's worst error over the adapter gradients (one tensor's own fp32 error
    # can be luckily small; the conditioning is the network's, shared by every adapter upstream of it)
    errs, errs32, bad = {}, [], []
    for mod, (A, Bm) in ref.lora.items():
        for which, t, t32 in (("A", A, r32.lora[mod][0]), ("B", Bm, r32.lora[mod][1])):
            key = f"grad.{mod}.lora_{which}.weight"
            if key not in ours:
                bad.append(key + " missing")
                continue
            errs[key] = rel_err(ours[key], t.grad.numpy())
            errs32.append(rel_err(t32.grad.numpy(), t.grad.numpy()))
    bound = max(TOL, 4 * max(errs32))
    bad += [f"{k} rel {e:.2e}" for k, e in errs.items() if e > bound]
    check(f"{name} adapter gradients", len(errs) == len(ad) and not bad,
          f"{len(errs)} tensors, worst rel {max(errs.values()):.2e} (bound {bound:.2e}) {bad[:3]}")
    base_grads = [k for k in ours if k.startswith("grad.") and ".lora_" not in k]
    check(f"{name} no base gradients", not base_grads, f"{len(base_grads)}")


def main():
    rng = np.random.default_rng(11)
    with tempfile.TemporaryDirectory() as tmp:
        for name, quant, dq, block in [("nf4_dq_64", "nf4", True, 64), ("nf4_32", "nf4", False, 32),
                                       ("int8_dq_64", "int8", True, 64), ("int8_48", "int8", False, 48)]:
            case(tmp, name, quant, dq, block, rng)
    if failures:
        print(f"FAILED: {failures}")
        sys.exit(1)
    print("all QLoRA reference checks passed")


if __name__ == "__main__":
    main()
