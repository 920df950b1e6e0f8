"""test_distill_torch.py — the knowledge-distillation loss (worker/distill.c, through tests/tools/ref_model
--teacher) against a float64 torch computation from both models' logits.

loss = sum_i w_i * (alpha * T^2 * KL(softmax(t_i/T) || softmax(s_i/T)) + (1 - alpha) * CE(s_i, y_i)), with
masked positions (w = 0) and uneven weights. Checked: the loss, its KD and CE parts, the per-position loss,
and every student gradient (autograd), for a teacher of another architecture and size (gpt2 teaching a
llama) and of the same family, at several temperatures and alphas (alpha 0 must reduce to plain CE).
Tolerances: fp32 forward/backward against float64, 1e-5 relative (as test_model_torch.py).
A bf16 teacher (--teacher-precision bf16: its bf16 weight copy, bf16 matmul operands and saved activations)
is checked against the float64 emulation of that precision (test_bf16_torch.py's bf16_emulation) with the
bound derived there: per tensor (loss, kd, ce, per-position loss, every student gradient), the 2-norm
relative error to the emulation is at most 2 u kappa_t (u = 2^-8, kappa_t = how far the tensor moves, in
units of u, between the unrounded float64 teacher and the emulation; a rounding flip of a value at a bf16
midpoint moves it by at most about u kappa_t) or 1e-5, and every tensor the rounding changes is closer to
the emulation than to the unrounded teacher's result (the teacher really computed in bf16).
Env (set by ctest): ST_BUILD_DIR (ref_model lives there)."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import st_io  # noqa: E402
from st_cli import check, finish  # noqa: E402
from torch_model import RefModel, param_shapes, parse_config  # noqa: E402
from test_bf16_torch import U_BF16, bf16_emulation  # noqa: E402

REF_MODEL = os.path.join(os.environ.get("ST_BUILD_DIR", "build"), "ref_model")
ENV = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
TOL = 1e-5
# fp32 gradients: within GRAD_BOUND x the error float32 torch itself makes on the same step (err <= BOUND u kappa with
# kappa measured, as test_bf16_torch's (a)), TOL the floor: a sgemm's rounding depends on the CPU's kernels (oneDNN /
# OpenBLAS on AVX2 sum in other orders than on AVX-512), so a fixed 1e-5 held on one ISA only
GRAD_BOUND = 2.0
V, B, T = 100, 2, 16
STUDENT = dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=V, max_position_embeddings=32, rms_norm_eps=1e-6,
               rope_theta=10000.0, hidden_act="silu", tie_word_embeddings=False)
TEACHERS = {
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=3, n_head=4, vocab_size=V, n_positions=32,
                 layer_norm_epsilon=1e-5, activation_function="gelu_new", tie_word_embeddings=True),
    "llama": dict(STUDENT, hidden_size=96, intermediate_size=128, num_hidden_layers=3, tie_word_embeddings=True),
}
def check_(what, ok, msg):
    print(f"  {'ok  ' if ok else '    '} {what}: {msg}")
    check(ok, f"{what}: {msg}")


def rel(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30)


def make(d, cfg, rng, scale):
    c = parse_config(cfg)
    t = {}
    for name, shape in param_shapes(c).items():
        if len(shape) == 2 or name.endswith(".bias"):
            t[name] = rng.normal(0.0, scale, shape)
        else:
            t[name] = 1.0 + rng.normal(0.0, 0.1, shape)
    t = {k: v.astype(np.float32) for k, v in t.items()}
    os.makedirs(d, exist_ok=True)
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    st_io.write(os.path.join(d, "model.safetensors"), t)
    return t


def torch_kd(student, teacher, inputs, targets, weight, temp, alpha):
    student.zero_grad()
    ids = torch.from_numpy(inputs).long()
    s = student.logits(ids).reshape(-1, V)
    with torch.no_grad():
        t = teacher.logits(ids).reshape(-1, V)
    w = torch.from_numpy(weight.reshape(-1)).double()
    logp = F.log_softmax(t / temp, -1)
    kd = temp * temp * (logp.exp() * (logp - F.log_softmax(s / temp, -1))).sum(-1)
    y = torch.from_numpy(targets.reshape(-1)).long()
    ce = F.cross_entropy(s, y, reduction="none")
    per = alpha * kd + (1 - alpha) * ce
    live = w != 0
    loss = (w * per).sum()
    loss.backward()
    grads = {n: p.grad.numpy() for n, p in student.params.items()}
    return (float(loss), float((w * kd).sum()), float((w * ce).sum()),
            torch.where(live, per, torch.zeros_like(per)).detach().numpy(), grads)


def l2(ours, ref):
    ours, ref = np.asarray(ours, np.float64).reshape(np.shape(ref)), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return np.linalg.norm(ours - ref) / scale if scale > 0 else np.linalg.norm(ours)


def as_outputs(res):
    loss, kd, ce, per, grads = res
    out = {"loss": [loss], "kd": [kd], "ce": [ce], "loss_per_pos": per}
    out.update({"grad." + n: g for n, g in grads.items()})
    return out


def check_bf16_teacher(tmp, sdir, student, batch, inputs, targets, w, tname, tdir, exact_teacher):
    """ref_model with a bf16 teacher against float64 torch with the emulated bf16 teacher (bound: docstring)."""
    temp, alpha = 2.0, 0.5
    label = f"bf16 teacher {tname} T={temp} alpha={alpha}"
    out = os.path.join(tmp, f"out_bf16_{tname}.safetensors")
    r = subprocess.run([REF_MODEL, "--model", sdir, "--batch", batch, "--out", out, "--teacher", tdir,
                        "--teacher-precision", "bf16", "--temperature", str(temp), "--alpha", str(alpha)],
                       capture_output=True, text=True, env=ENV, timeout=120)
    if r.returncode != 0:
        check_(label, False, f"ref_model failed: {r.stderr.strip()}")
        return
    ours = st_io.read(out)
    emul = as_outputs(torch_kd(student, bf16_emulation(tdir), inputs, targets, w, temp, alpha))
    exact = as_outputs(torch_kd(student, exact_teacher, inputs, targets, w, temp, alpha))
    worst, over, not_closer = (0.0, ""), [], []
    for k, ref in emul.items():
        kappa = l2(exact[k], ref) / U_BF16
        err = l2(ours[k], ref)
        bound = max(2 * U_BF16 * kappa, TOL)
        if err > bound:
            over.append(f"{k} {err:.2e} > {bound:.2e}")
        if kappa * U_BF16 > TOL and not err < l2(ours[k], exact[k]):
            not_closer.append(k)
        if kappa > 0 and err / (U_BF16 * kappa) > worst[0]:
            worst = (err / (U_BF16 * kappa), k)
    print(f"{label}: loss {ours['loss'][0]:.7f} vs emulation {emul['loss'][0]:.7f} (unrounded teacher "
          f"{exact['loss'][0]:.7f}); worst {worst[0]:.2e} u kappa at {worst[1]}")
    check_(label + " within 2 u kappa of the float64 bf16 emulation", not over, "; ".join(over) or f"{len(emul)} tensors")
    check_(label + " closer to the emulation than to the unrounded teacher", not not_closer,
           ", ".join(not_closer) or "every tensor the rounding moves")


def main():
    rng = np.random.default_rng(11)
    tmp = tempfile.mkdtemp(prefix="st_distill_")
    sdir = os.path.join(tmp, "student")
    st_w = make(sdir, STUDENT, rng, 0.1)
    inputs = rng.integers(0, V, (B, T)).astype(np.int32)
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    mask = rng.random((B, T)) >= 0.3
    mask[0, 0] = False
    mask[:, 1] = True
    w = np.where(mask, rng.uniform(0.5, 1.5, (B, T)), 0.0)
    w = (w / w.sum()).astype(np.float32)
    batch = os.path.join(tmp, "batch.safetensors")
    st_io.write(batch, {"inputs": inputs, "targets": targets, "weight": w})
    student, student32 = RefModel(STUDENT, st_w, torch.float64), RefModel(STUDENT, st_w, torch.float32)
    for tname, tcfg in TEACHERS.items():
        tdir = os.path.join(tmp, tname)
        t_w = make(tdir, tcfg, rng, 0.3)
        teacher, teacher32 = RefModel(tcfg, t_w, torch.float64), RefModel(tcfg, t_w, torch.float32)  # confident
        check_bf16_teacher(tmp, sdir, student, batch, inputs, targets, w, tname, tdir, teacher)
        for temp, alpha in ((2.0, 0.5), (1.0, 1.0), (4.0, 0.9), (2.0, 0.0)):
            label = f"{tname} T={temp} alpha={alpha}"
            out = os.path.join(tmp, f"out_{tname}_{temp}_{alpha}.safetensors")
            r = subprocess.run([REF_MODEL, "--model", sdir, "--batch", batch, "--out", out, "--teacher", tdir,
                                "--temperature", str(temp), "--alpha", str(alpha)], capture_output=True, text=True,
                               env=ENV, timeout=120)
            if r.returncode != 0:
                check_(label, False, f"ref_model failed: {r.stderr.strip()}")
                continue
            ours = st_io.read(out)
            loss, kd, ce, per, grads = torch_kd(student, teacher, inputs, targets, w, temp, alpha)
            print(f"{label}: loss {ours['loss'][0]:.7f} vs {loss:.7f} (kd {kd:.5f}, ce {ce:.5f})")
            check_(label + " loss", rel(ours["loss"], [loss]) < TOL, f"{rel(ours['loss'], [loss]):.2e}")
            check_(label + " kd", abs(ours["kd"][0] - kd) <= TOL * max(kd, ce), f"{ours['kd'][0]} vs {kd}")
            check_(label + " ce", rel(ours["ce"], [ce]) < TOL, f"{ours['ce'][0]} vs {ce}")
            check_(label + " loss_per_pos", rel(ours["loss_per_pos"], per) < TOL, f"{rel(ours['loss_per_pos'], per):.2e}")
            g32 = torch_kd(student32, teacher32, inputs, targets, w, temp, alpha)[4]
            worst = max(rel(ours["grad." + n], g) for n, g in grads.items())
            e32 = max(rel(g32[n], g) for n, g in grads.items())
            ratio = max(rel(ours["grad." + n], g) / max(TOL, GRAD_BOUND * rel(g32[n], g)) for n, g in grads.items())
            check_(label + " gradients", ratio <= 1.0, f"max rel err {worst:.2e} over {len(grads)} tensors (float32 "
                   f"torch {e32:.2e}; worst {ratio:.2f} of max({TOL:g}, {GRAD_BOUND:g} x float32 torch's))")
    # the error a user can cause: a teacher with another vocabulary
    other = os.path.join(tmp, "other")
    make(other, dict(STUDENT, vocab_size=V + 1), rng, 0.1)
    r = subprocess.run([REF_MODEL, "--model", sdir, "--batch", batch, "--out", os.path.join(tmp, "x"), "--teacher",
                        other], capture_output=True, text=True, env=ENV, timeout=120)
    check_("vocabulary mismatch refused", r.returncode != 0 and "vocabulary" in r.stderr, r.stderr.strip())
    finish()


if __name__ == "__main__":
    main()
