"""test_distill_int8.py — the int8 distillation teacher (distill.teacher_dtype: int8; worker/model.h
st_model_set_int8, kernels.h matmul_w8a8), through tests/tools/ref_model --teacher-precision int8.

A Llama teacher with sharp attention (q/k weights scaled so that the mean largest attention probability is
checked to be >= 0.5) over sequences of T = 128 tokens, teaching a Llama student.

1. The loss math is unchanged: loss, its KD and CE parts, the per-position loss and every student gradient
   against float64 torch autograd computed from the int8 teacher's own logits (as ref_model dumped them),
   1e-5 relative, as test_distill_torch.py.
2. The int8 teacher's logits against the float64 emulation of the quantization (every linear layer and the LM
   head: its weight rounded per output row to steps absmax/127 — in float32 as shardtune does, so the codes are
   the same — its input per token to steps absmax/127, the product of the codes rescaled, everything else
   float64). The emulation gives E = max |logits_emulation - logits_float64|, what the quantization steps do
   to this model. Checked: max |ours - emulation| <= 0.25 E (our arithmetic is that quantization; what is
   left is float32 rounding and activation codes flipped where float32 and float64 activations straddle a
   rounding midpoint, each one step of one element), max |ours - fp32 teacher| <= 1.25 E + the fp32
   teacher's own error, and ours closer to the emulation than to the float64 teacher.
Env (set by ctest): ST_BUILD_DIR (ref_model lives there)."""
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from st_cli import check, finish  # noqa: E402
from torch_model import RefModel, causal_attention  # noqa: E402
from test_distill_torch import TOL, check_, make, rel, torch_kd  # noqa: E402

REF_MODEL = os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "ref_model")
ENV = dict(os.environ, OMP_NUM_THREADS="2", OPENBLAS_NUM_THREADS="1")
V, B, T = 100, 2, 128
STUDENT = dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=V, max_position_embeddings=T, rms_norm_eps=1e-6,
               rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
TEACHER = dict(STUDENT, hidden_size=96, intermediate_size=200, num_hidden_layers=3, tie_word_embeddings=False)
QK_SCALE = 0.3  # std of the q/k projection weights: scores of std ~8 (sharp attention)


def quant_rows_f32(w_oi):
    """shardtune's weight rule in float32: per output row s = absmax / 127, q = clamp(rint(w / s))."""
    w = np.asarray(w_oi, np.float32)
    s = (np.abs(w).max(axis=1, keepdims=True) / np.float32(127.0)).astype(np.float32)
    q = np.where(s > 0, np.rint(w / np.where(s > 0, s, 1)), 0).clip(-127, 127)
    return q.astype(np.float64), s.astype(np.float64)


def int8_mm(x, w_io):
    """x [..., in] @ w_io [in, out] with w_io's columns (the [out, in] weight's rows) and x's tokens quantized."""
    q, s = quant_rows_f32(w_io.detach().numpy().T)  # [out, in], [out, 1]
    xs = x.abs().amax(-1, keepdim=True) / 127.0
    p = torch.where(xs > 0, torch.round(x / torch.where(xs > 0, xs, torch.ones_like(xs))), torch.zeros_like(x))
    p = p.clamp(-127, 127)
    return torch.matmul(p, torch.from_numpy(q.T)) * xs * torch.from_numpy(s.T)


class Logits:
    """A teacher whose logits are given (the int8 teacher's own, from ref_model)."""

    def __init__(self, logits):
        self.t = torch.from_numpy(np.asarray(logits, np.float64))

    def logits(self, ids):
        return self.t.reshape(ids.shape[0], ids.shape[1], -1)


def run(args):
    r = subprocess.run([REF_MODEL] + args, capture_output=True, text=True, env=ENV, timeout=600)
    if r.returncode != 0:
        check(False, f"ref_model {' '.join(args[-2:])} failed: {r.stderr.strip()}")
        finish()
    return r


def main():
    rng = np.random.default_rng(21)
    tmp = tempfile.mkdtemp(prefix="st_distill_int8_")
    sdir, tdir = os.path.join(tmp, "student"), os.path.join(tmp, "teacher")
    st_w = make(sdir, STUDENT, rng, 0.1)
    t_w = make(tdir, TEACHER, rng, 0.15)
    for name in list(t_w):  # sharp attention: large q and k projections
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            t_w[name] = rng.normal(0.0, QK_SCALE, t_w[name].shape).astype(np.float32)
    st_io.write(os.path.join(tdir, "model.safetensors"), t_w)
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    w = np.where(rng.random((B, T)) >= 0.2, rng.uniform(0.5, 1.5, (B, T)), 0.0)
    w = (w / w.sum()).astype(np.float32)
    batch = os.path.join(tmp, "batch.safetensors")
    st_io.write(batch, {"inputs": inputs, "targets": targets, "weight": w})
    temp, alpha = 2.0, 0.7
    common = ["--model", sdir, "--batch", batch, "--teacher", tdir, "--temperature", str(temp), "--alpha", str(alpha)]
    o8, o32 = os.path.join(tmp, "int8.safetensors"), os.path.join(tmp, "fp32.safetensors")
    run(common + ["--out", o32, "--teacher-precision", "fp32"])
    run(common + ["--out", o8, "--teacher-precision", "int8"])
    ours, fp32 = st_io.read(o8), st_io.read(o32)
    ids = torch.from_numpy(inputs).long()

    # the float64 teacher, the attention's sharpness recorded on the way
    exact = RefModel(TEACHER, t_w, torch.float64)
    sharp = []

    def attention(q, k, v):
        s = torch.matmul(q, k.transpose(-1, -2)) / q.shape[-1] ** 0.5
        s = s.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
        sharp.append(float(torch.softmax(s, -1).amax(-1)[..., 16:].mean()))  # rows with >= 17 keys
        return causal_attention(q, k, v)

    exact.attention = attention
    with torch.no_grad():
        f64 = exact.logits(ids).reshape(-1, V).numpy()
    emul = RefModel(TEACHER, t_w, torch.float64)
    emul.linear_mm = int8_mm
    with torch.no_grad():
        fq = emul.logits(ids).reshape(-1, V).numpy()
    check_("sharp attention", min(sharp) >= 0.5,
           "mean largest attention probability per layer " + ", ".join(f"{x:.2f}" for x in sharp))

    # 1. the KD loss from the int8 teacher's own logits
    loss, kd, ce, per, grads = torch_kd(RefModel(STUDENT, st_w, torch.float64), Logits(ours["teacher_logits"]),
                                        inputs, targets, w, temp, alpha)
    label = f"int8 teacher T={temp} alpha={alpha}"
    print(f"{label}: loss {ours['loss'][0]:.7f} vs float64 {loss:.7f} (kd {kd:.5f}, ce {ce:.5f}); fp32 teacher's "
          f"loss {fp32['loss'][0]:.7f}")
    check_(label + " loss", rel(ours["loss"], [loss]) < TOL, f"{rel(ours['loss'], [loss]):.2e}")
    check_(label + " kd", abs(ours["kd"][0] - kd) <= TOL * max(kd, ce), f"{ours['kd'][0]} vs {kd}")
    check_(label + " ce", rel(ours["ce"], [ce]) < TOL, f"{ours['ce'][0]} vs {ce}")
    check_(label + " loss_per_pos", rel(ours["loss_per_pos"], per) < TOL, f"{rel(ours['loss_per_pos'], per):.2e}")
    worst = max(rel(ours["grad." + n], g) for n, g in grads.items())
    check_(label + " gradients", worst < TOL, f"max rel err {worst:.2e} over {len(grads)} tensors")

    # 2. the int8 teacher's logits: the quantization's effect, and nothing else
    t8, t32 = np.asarray(ours["teacher_logits"], np.float64), np.asarray(fp32["teacher_logits"], np.float64)
    E = np.abs(fq - f64).max()
    e_emul, e_f64, e32 = np.abs(t8 - fq).max(), np.abs(t8 - f64).max(), np.abs(t32 - f64).max()
    d32 = np.abs(t8 - t32).max()
    print(f"logits range {np.abs(f64).max():.3f}; quantization effect E (emulation vs float64) {E:.3e}; int8 teacher "
          f"vs emulation {e_emul:.3e} ({e_emul / E:.3f} E), vs float64 {e_f64:.3e}, vs fp32 teacher {d32:.3e}; fp32 "
          f"teacher vs float64 {e32:.3e}")
    check_("quantization has an effect here", E > 1e3 * max(e32, 1e-12), f"E {E:.3e}, fp32 error {e32:.3e}")
    check_("int8 teacher = the emulated quantization", e_emul <= 0.25 * E, f"{e_emul:.3e} > 0.25 E = {0.25 * E:.3e}"
           if e_emul > 0.25 * E else f"{e_emul / E:.3f} E")
    check_("int8 teacher within the quantization bound of the fp32 teacher", d32 <= 1.25 * E + e32,
           f"{d32:.3e} vs 1.25 E + {e32:.1e} = {1.25 * E + e32:.3e}")
    check_("int8 teacher closer to the emulation than to float64", e_emul < e_f64, f"{e_emul:.3e} < {e_f64:.3e}")
    finish()


if __name__ == "__main__":
    main()
