"""test_bf16_torch.py — mixed precision (precision: bf16) against an independent PyTorch reference.

shardtune's bf16 semantics (kernels/kernels.h matmul_bf16, worker/model.c): every matmul of the model —
linear layers, the LM head and their backward products — takes both operands rounded to bf16 (round to
nearest even; weights come from a bf16 copy) and accumulates in fp32 into an fp32 result. The saved
activations are stored as bf16: the norm outputs and h2 (matmul inputs only, so storing them changes
nothing), qkv after RoPE and the MLP's first product h1 (forward goes on with the rounded values, and
their gradient passes through the rounding unchanged), and the attention output (rounded; backward's
D = rowsum(dO * O) uses the rounded O). Norms, attention math, softmax/cross-entropy, the residual stream,
the loss, weights, gradients and optimizer state are fp32.

0. Why the reference emulates instead of calling torch's bf16 matmul: torch.matmul(a.bfloat16(),
   b.bfloat16()) returns a bf16 tensor (the fp32-accumulated result rounded to bf16 once more), which is
   not our fp32 output. So the reference is: torch float64 matmul of bf16-rounded operands (the rounding
   by torch's own fp32 -> bfloat16 conversion, checked here to be round-to-nearest-even bit for bit
   against numpy), wired into every linear/head product and its backward with a custom autograd
   function; attention's products stay unrounded, as in shardtune. The stored activations are emulated by
   a rounding with an identity gradient and an attention whose output is rounded and whose backward uses
   that rounded output.
1. For a tiny Llama (GQA, untied head) and a tiny GPT-2 (tied head, biases), tests/tools/ref_model
   --precision bf16: logits, per-position losses and every gradient vs that float64 emulation. Error of
   an output tensor t: err_t = ||ours - ref||_2 / ||ref||_2. The criteria follow from the arithmetic, not
   from one machine:
   - Condition measure kappa_t: the same float64 model WITHOUT any rounding is off the emulation by
     u kappa_t (u = 2^-8, the bf16 unit roundoff): how far tensor t moves, in units of u, when every
     operand carries its bf16 rounding (~1..5 here).
   - What a correct bf16 path may differ by: it computes each value before its rounding in fp32, not
     float64 (~n 2^-24 relative for a length-n product). That changes nothing unless the value lies that
     close to a bf16 rounding midpoint; then its rounding flips by one bf16 ulp. Flips are rare (a
     fraction ~n 2^-16 of the roundings), but one flip of a large element can move a small tensor
     noticeably. Which values flip depends on the fp32 evaluation order (OpenBLAS kernel, -march=native
     code), so no single run's spread is a tolerance.
   (a) Bound: err_t <= 2 u kappa_t (or the fp32 level FP32_TOL, whichever is larger). A flip moves one
       operand element by one ulp <= 2u, at most twice the largest rounding error, and only a few
       elements flip, so the flips move a tensor by at most twice what all roundings together do
       (measured over 30 random models of each kind x 4 OpenBLAS kernels: at most 0.67 u kappa_t).
   (b) Model selection, the sharp test: ours must be closer to the bf16 emulation than to each broken
       variant of it, on every tensor that the variant changes (by more than FP32_TOL): the model without
       rounding (the bf16 path not taken), operands truncated instead of rounded to nearest even,
       activations not stored as bf16 (operands only), the backward's input-gradient products on
       unrounded operands. Flips are sparse; a broken path moves every tensor it touches by ~u kappa_t.
       (Measured: every tensor, in all 60 random models.) Not checked this way: the weight-gradient
       products on unrounded operands — at this model size that moves the weight gradients by no more
       than flip noise can (ours was closer to the emulation on only 47% of those tensors in one of the
       60 random models), so such a check would depend on the machine.
   ref_model runs under the default OpenBLAS kernel and under OPENBLAS_CORETYPE=Haswell, SkylakeX and Zen
   (each where the CPU has the instructions; the kernel is confirmed by OPENBLAS_VERBOSE): every run must
   pass (a) and (b). Perturbation checks (the criteria can fail): our own --precision fp32 run, and
   float32 emulations of each broken variant (independent of the float64 ones), must each fail (a) or
   (b), while a float32 emulation of the correct path passes both.
   ref_model --precision fp32 against the unrounded float64 model stays at the fp32 level (max-norm
   relative <= 1e-5, the suite's fp32 tolerance).
2. Training: `shardtune train ... precision=bf16` on one rank for a few dozen steps lowers the loss like
   fp32 does, with losses that differ from the fp32 run (the setting reaches the model) but stay close.
3. LoRA / QLoRA under bf16 (the base as above, fp32 adapters reading the bf16-rounded input of their base
   matmul): ref_model --adapter (Llama all 7 projections, GPT-2 c_attn/c_proj/c_fc; Llama also --qlora
   nf4-dq against the numpy-dequantized base) --precision bf16: logits, per-position losses and every
   adapter gradient pass (a) and (b) against the emulation with fp32 adapters, the broken variants being the
   unrounded model and adapters reading the unrounded input; --precision fp32 must fail.
4. DoRA, DoRA with LoRA dropout, prompt tuning, P-tuning (MLP, LSTM) and prefix tuning (with and without
   projection) under bf16: ref_model --adapter DIR [--lora-dropout P,SEED,STEP,SAMPLE] --precision bf16 against
   float64 emulations of the path (mode_emulation): DoRA as peft's DoRA on a bf16 base layer with fp32 adapters
   (the norms ||W + scale B A||_row and the base term (c - 1) x W^T from the base weight's bf16 value, x the
   bf16-rounded input of the base matmul, dropped by the masks of worker/lora.h under dropout in both terms);
   the prompts, P-tuning encoders (torch modules in float64) and prefixes fp32, the prompt rows entering the fp32
   residual stream unrounded, prefix keys/values stored as bf16 like all keys/values. Criteria (a) and (b) on
   logits, per-position losses and every adapter gradient, with the broken variants each mode can plausibly
   have (the unrounded model; DoRA: adapters on the unrounded input, norms / base term on the fp32 W, the base
   term on the undropped input; prompts rounded to bf16 as they enter); --precision fp32 must fail.
Env (set by ctest): ST_BUILD_DIR, SHARDTUNE_BIN; ST_BF16_SECTIONS (e.g. "3,4": a subset, for debugging)."""
import json
import math
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import dp_common  # noqa: E402
import st_io  # noqa: E402
from lora_masks import dropout_mask  # noqa: E402
from test_model_torch import (CONFIGS, ENV, REF_MODEL, SEQ, random_batch, random_weights, rel_err,  # noqa: E402
                              torch_forward_backward, write_model)
from torch_model import RefModel, causal_attention, parse_config, weighted_ce  # noqa: E402

U_BF16 = 2.0 ** -8  # unit roundoff of bf16 (8 significant bits)
BOUND, FP32_TOL = 2.0, 1e-5  # (a): err_t <= BOUND u kappa_t
# OpenBLAS kernels to run ref_model under, with the CPU flags each one needs
CORETYPES = {"Haswell": ("avx2", "fma"), "SkylakeX": ("avx512f", "avx512bw", "avx512vl", "avx512dq"),
             "Zen": ("avx2", "fma")}
failures = []


def check(what, ok, msg):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}: {msg}")
    if not ok:
        failures.append(what)


# ---------------- 0. the rounding and torch's bf16 matmul ----------------

def np_bf16(x):
    """Round-to-nearest-even fp32 -> bf16 on the bits (an independent implementation), as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
    return r.astype(np.uint32).view(np.float32)


def bf16(x):
    """x (any float dtype) -> its fp32 value rounded to bf16, back in x's dtype. Our operands are fp32."""
    return x.float().bfloat16().to(x.dtype)


def bf16_truncated(x):
    """A broken rounding for the perturbation checks: fp32 -> bf16 by dropping the low 16 bits."""
    return (x.float().view(torch.int32) & -65536).view(torch.float32).to(x.dtype)


def unrounded(x):
    return x


def check_rounding_and_torch():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(100000) * 10.0 ** rng.uniform(-6, 6, 100000)).astype(np.float32)
    ties = (np.float32(1.0) + np.arange(1, 512, 2, dtype=np.float32) / np.float32(256.0)).astype(np.float32)
    x = np.concatenate([x, ties, -ties])
    ours = np_bf16(x)
    theirs = torch.from_numpy(x).bfloat16().float().numpy()
    check("torch fp32->bf16 is round-to-nearest-even", np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)),
          f"{x.size} values incl. {2 * ties.size} exact ties")
    a, b = torch.randn(64, 96), torch.randn(96, 48)
    out = torch.matmul(a.bfloat16(), b.bfloat16())
    emul = torch.matmul(bf16(a).double(), bf16(b).double())
    e = float((out.double() - emul).abs().max() / emul.abs().max())
    print(f"  note: torch {torch.__version__} bf16 matmul returns {out.dtype} (output rounded): "
          f"rel {e:.1e} from fp32-accumulated bf16 products -> emulate with float64 instead")


def bf16_matmul(rnd, round_dx=True, round_dw=True):
    """y = rnd(a) @ rnd(b) in the input dtype (float64); backward: dA = rnd(g) @ rnd(b)^T,
    dB = rnd(a)^T @ rnd(g) — the products shardtune's backward runs through matmul_bf16. round_dx /
    round_dw False leave one backward product unrounded (a broken path, for the perturbation checks)."""
    rx = rnd if round_dx else unrounded
    rw = rnd if round_dw else unrounded

    class BF16Matmul(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return torch.matmul(rnd(a), rnd(b))

        @staticmethod
        def backward(ctx, g):
            a, b = ctx.saved_tensors
            ga = torch.matmul(rx(g), rx(b).transpose(-1, -2))
            gb = torch.matmul(rw(a).reshape(-1, a.shape[-1]).t(), rw(g).reshape(-1, g.shape[-1]))
            return ga, gb
    return BF16Matmul.apply


def bf16_saved(rnd):
    """An activation stored as bf16: forward goes on with the rounded value; the gradient passes through."""

    class BF16Saved(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return rnd(x)

        @staticmethod
        def backward(ctx, g):
            return g
    return BF16Saved.apply


def bf16_attention(rnd):
    """Causal attention (kv heads already repeated) whose output is stored as bf16: forward returns the
    rounded O, backward computes D = rowsum(dO * O) from that rounded O (shardtune's attention_bwd reads
    the saved copy); everything else is exact in the input dtype."""

    class BF16Attention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v):
            T, hd = q.shape[-2], q.shape[-1]
            mask = torch.ones(T, T, dtype=torch.bool).tril()
            s = (torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(hd)).masked_fill(~mask, float("-inf"))
            p = torch.softmax(s, dim=-1)
            o = rnd(torch.matmul(p, v))
            ctx.save_for_backward(q, k, v, p, o)
            return o

        @staticmethod
        def backward(ctx, do):
            q, k, v, p, o = ctx.saved_tensors
            dv = torch.matmul(p.transpose(-1, -2), do)
            dp = torch.matmul(do, v.transpose(-1, -2))
            ds = p * (dp - (do * o).sum(-1, keepdim=True)) / math.sqrt(q.shape[-1])
            return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), q), dv
    return BF16Attention.apply


def bf16_emulation(model_dir, dtype=torch.float64, rnd=bf16, storage=True, round_dx=True, round_dw=True):
    """The reference of shardtune's precision: bf16 in `dtype`; the keyword arguments make broken variants."""
    ref = RefModel.load(model_dir, dtype)
    ref.linear_mm = bf16_matmul(rnd, round_dx, round_dw)
    if storage:
        ref.saved = bf16_saved(rnd)
        ref.attention = bf16_attention(rnd)
    return ref


def check_attention_function():
    """The emulated attention without the rounding is the plain attention: its hand-written backward is right."""
    q, k, v = (torch.randn(2, 3, 7, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    out = bf16_attention(unrounded)(q, k, v)
    g = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), g)
    ref = torch.autograd.grad(causal_attention(q, k, v), (q, k, v), g)
    e = max(float((a - b).abs().max()) for a, b in zip(ours, ref))
    check("bf16 attention backward without rounding == autograd", e < 1e-12, f"max abs diff {e:.1e}")


# ---------------- 1. forward + backward vs the emulated reference ----------------

def outputs(model, batch, V):
    """{logits, loss_per_pos, grad.<name>} of a torch reference model on `batch`, as numpy float64. The
    per-position losses stand for the loss: the scalar sum can cancel the roundings' effects by chance."""
    logits, _, per_pos = torch_forward_backward(model, *batch)
    out = {"logits": logits.detach().double().numpy().reshape(-1, V),
           "loss_per_pos": per_pos.detach().double().numpy().reshape(-1)}
    out.update({"grad." + n: p.grad.double().numpy() for n, p in model.params.items()})
    return out


def l2_err(ours, ref):
    ours, ref = np.asarray(ours, np.float64).reshape(np.shape(ref)), np.asarray(ref, np.float64)
    scale = np.linalg.norm(ref)
    return np.linalg.norm(ours - ref) / scale if scale > 0 else np.linalg.norm(ours)


def errors(ours, ref):
    """{tensor: err} of outputs `ours` (ref_model's or a reference's) against `ref`."""
    return {k: l2_err(ours[k], r) for k, r in ref.items()}


def verdict(cand, ref, kappa, variants):
    """Criteria (a) and (b) for outputs `cand`: ({tensor: err / bound} over the bound, the worst
    err / (u kappa_t) and its tensor, {variant: tensors where cand is not closer to ref than to it})."""
    errs = errors(cand, ref)
    ratios = {k: e / max(BOUND * U_BF16 * kappa[k], FP32_TOL) for k, e in errs.items()}
    over = {k: r for k, r in ratios.items() if r > 1.0}
    wk = max(errs, key=lambda k: errs[k] / (U_BF16 * kappa[k]))
    closer = {}
    for what, (vout, changed) in variants.items():
        ev = errors(cand, vout)
        closer[what] = [k for k in changed if not errs[k] < ev[k]]
    return over, (errs[wk] / (U_BF16 * kappa[wk]), wk), closer


def coretypes():
    """[(label, env overrides)]: the default OpenBLAS kernel and each forced one the CPU can run."""
    flags = set()
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    out = [("default kernel", {})]
    for core, need in CORETYPES.items():
        if all(n in flags for n in need):
            out.append((f"OPENBLAS_CORETYPE={core}", {"OPENBLAS_CORETYPE": core}))
        else:
            print(f"  note: OPENBLAS_CORETYPE={core} not run: the CPU lacks {[n for n in need if n not in flags]}")
    return out


def run_ref_model(model_dir, batch_path, out_path, env_extra, *extra):
    """tests/tools/ref_model under `env_extra`; returns (outputs, the OpenBLAS core it reported)."""
    env = dict(ENV, OPENBLAS_VERBOSE="2", **env_extra)
    r = subprocess.run([REF_MODEL, "--model", model_dir, "--batch", batch_path, "--out", out_path, *map(str, extra)],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, f"ref_model failed: {r.stderr}"
    m = re.search(r"Core: (\w+)", r.stdout + r.stderr)
    return st_io.read(out_path), (m.group(1) if m else "?")


def check_model(name, tmp, rng):
    config = CONFIGS[name]
    c = parse_config(config)
    V = c["vocab"]
    model_dir = os.path.join(tmp, name)
    write_model(model_dir, config, random_weights(c, rng))
    batch = random_batch(c, SEQ[name], rng)
    batch_path = os.path.join(tmp, f"{name}.batch.safetensors")
    st_io.write(batch_path, dict(zip(("inputs", "targets", "weight"), batch)))
    ref = outputs(bf16_emulation(model_dir), batch, V)
    exact_model = outputs(RefModel.load(model_dir, torch.float64), batch, V)
    kappa = {k: e / U_BF16 for k, e in errors(exact_model, ref).items()}
    kmin, kmax = min(kappa, key=kappa.get), max(kappa, key=kappa.get)
    print(f"[{name}] {len(ref)} tensors; condition kappa_t = err_t(unrounded float64 model) / u: "
          f"{kappa[kmin]:.2f} ({kmin}) .. {kappa[kmax]:.2f} ({kmax})")
    broken = {"no rounding": dict(model=exact_model),
              "operands truncated, not rounded to nearest even": dict(rnd=bf16_truncated),
              "activations not stored as bf16": dict(storage=False),
              "input-gradient products unrounded": dict(round_dx=False)}
    variants = {}
    for what, kw in broken.items():
        vout = kw.pop("model", None) or outputs(bf16_emulation(model_dir, **kw), batch, V)
        variants[what] = (vout, [k for k, e in errors(vout, ref).items() if e > FP32_TOL])

    def judge(what, cand, must_pass, note=""):
        over, (wr, wk), closer = verdict(cand, ref, kappa, variants)
        not_closer = {v: ks for v, ks in closer.items() if ks}
        ok = not over and not not_closer
        detail = (f"(a) worst err {wr:.3f} u kappa at {wk}, {len(over)} tensors over {BOUND:g} u kappa; (b) "
                  + ("closer to the emulation than to every broken variant on every tensor it changes" if
                     not not_closer else "not closer than to: " +
                     "; ".join(f"{v} on {len(ks)} of {len(variants[v][1])} tensors" for v, ks in not_closer.items())))
        if must_pass:
            check(f"{name} {what}{note}", ok, detail)
        else:
            check(f"{name} rejects {what}", not ok, detail)

    # ours, under every BLAS kernel
    for label, env in coretypes():
        ours, core = run_ref_model(model_dir, batch_path, os.path.join(tmp, f"{name}.bf16.safetensors"), env,
                                   "--precision", "bf16")
        forced = env.get("OPENBLAS_CORETYPE")
        check(f"{name} OpenBLAS kernel {label}", forced is None or core == forced, f"OpenBLAS reports core {core}")
        judge(f"bf16 ({label})", ours, True)
    # perturbation checks: the criteria can fail
    ours32, _ = run_ref_model(model_dir, batch_path, os.path.join(tmp, f"{name}.fp32.safetensors"), {},
                              "--precision", "fp32")
    judge("our --precision fp32 run (bf16 path not taken)", ours32, False)
    for what, kw in broken.items():
        if kw:
            judge(f"a float32 emulation with {what}", outputs(bf16_emulation(model_dir, torch.float32, **kw),
                                                               batch, V), False)
    judge("float32 emulation of the correct bf16 path", outputs(bf16_emulation(model_dir, torch.float32), batch, V),
          True, " (positive control)")
    exact = RefModel.load(model_dir, torch.float64)
    torch_forward_backward(exact, *batch)
    w32, k32 = max((rel_err(ours32["grad." + n], p.grad.numpy()), "grad." + n) for n, p in exact.params.items())
    check(f"{name} fp32 unchanged", w32 <= FP32_TOL,
          f"ref_model --precision fp32 vs float64: max rel {w32:.1e} ({k32})")


# ---------------- 2. bf16 training lowers the loss ----------------

def train_losses(tmp, model, data, precision, steps=40):
    run_dir = os.path.join(tmp, f"run_{precision}")
    job = dp_common.write_job(os.path.join(tmp, f"job_{precision}.yaml"), model, run_dir,
                              [{"name": "seq", "path": data}])
    r = dp_common.train(job, 1, [f"precision={precision}", f"train.steps={steps}", "train.log_every=1",
                                 "checkpoint.every_steps=0"], mpirun=False, timeout=300)
    rows = [m for m in dp_common.losses(run_dir) if "loss" in m and m.get("split", "train") == "train"]
    return [float(m["loss"]) for m in rows], r.stdout


def check_training(tmp):
    model = dp_common.init_model(os.path.join(tmp, "tiny"), "llama", 2, dim=64, heads=4, kv=2, vocab=128,
                                 max_seq=64)
    data = dp_common.make_dataset(os.path.join(tmp, "seq.h5"), 128, 300, seed=5)
    l32, _ = train_losses(tmp, model, data, "fp32")
    l16, _ = train_losses(tmp, model, data, "bf16")
    n = min(len(l16), len(l32))
    check("training logged losses", n >= 30, f"fp32 {len(l32)} and bf16 {len(l16)} step losses")
    if n < 30:
        return
    head16, tail16 = np.mean(l16[:3]), np.mean(l16[-5:])
    head32, tail32 = np.mean(l32[:3]), np.mean(l32[-5:])
    print(f"  fp32: {head32:.4f} -> {tail32:.4f}   bf16: {head16:.4f} -> {tail16:.4f}  ({n} steps)")
    check("bf16 training lowers the loss", tail16 < 0.8 * head16, f"{head16:.4f} -> {tail16:.4f}")
    check("bf16 learns like fp32", abs(tail16 - tail32) <= 0.1 * tail32, f"final {tail16:.4f} vs {tail32:.4f}")
    d1 = abs(l16[0] - l32[0]) / l32[0]
    differ = any(a != b for a, b in zip(l16[:n], l32[:n]))
    check("precision=bf16 reaches the model", differ and d1 < 1e-2,
          f"step-1 loss bf16 {l16[0]:.6f} vs fp32 {l32[0]:.6f} (rel {d1:.1e}); runs differ: {differ}")


# ---------------- 3. LoRA and QLoRA adapters under bf16 ----------------

def lora_emulation(model_dir, ad, r, alpha, rnd=bf16, round_input=True):
    """shardtune's bf16 LoRA (worker/model.c, worker/lora.c): the base as in bf16_emulation (rnd None: the
    unrounded float64 model), each adapter's scale * (x A^T) B^T unrounded (fp32 adapters) on the input the
    base matmul reads, i.e. x stored as bf16 (rounded, the gradient passing through); round_input False: a
    broken variant whose adapters read the unrounded x."""
    ref = bf16_emulation(model_dir, rnd=rnd) if rnd else RefModel.load(model_dir, torch.float64)
    ref.attach_lora(ad, r, alpha)
    if rnd and round_input:
        delta, store = ref.lora_delta, bf16_saved(rnd)
        ref.lora_delta = lambda x, module: delta(store(x), module)
    return ref


def lora_outputs(model, batch, V):
    """{logits, loss_per_pos, grad.<module>.lora_A/B.weight}: the adapters are the trainable tensors."""
    logits, _, per_pos = torch_forward_backward(model, *batch)  # a fresh model: the adapter grads start empty
    out = {"logits": logits.detach().double().numpy().reshape(-1, V),
           "loss_per_pos": per_pos.detach().double().numpy().reshape(-1)}
    for mod, (A, B) in model.lora.items():
        out[f"grad.{mod}.lora_A.weight"], out[f"grad.{mod}.lora_B.weight"] = A.grad.numpy(), B.grad.numpy()
    return out


def check_lora(tmp, rng):
    """ref_model --adapter [--qlora nf4-dq] --precision bf16 against lora_emulation with criteria (a) and (b)
    of section 1 (default OpenBLAS kernel). QLoRA: the emulation's base is test_qlora_torch's numpy
    dequantization of the weights (its independent implementation of the format), since QLoRA under bf16
    rounds the dequantized layer to bf16 for every base matmul."""
    from test_lora_torch import write_adapter
    from test_qlora_torch import quant_dequant
    for name, targets in (("llama_gqa_untied", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"]), ("gpt2_tied", ["c_attn", "c_proj", "c_fc"])):
        lora_case(tmp, rng, name, targets, quant_dequant, write_adapter)


def lora_case(tmp, rng, name, targets, quant_dequant, write_adapter):
    config, r, alpha = CONFIGS[name], 4, 8.0
    c = parse_config(config)
    V = c["vocab"]
    weights = random_weights(c, rng)
    batch = random_batch(c, SEQ[name], rng)
    batch_path = os.path.join(tmp, f"lora_{name}.batch.safetensors")
    st_io.write(batch_path, dict(zip(("inputs", "targets", "weight"), batch)))
    adir = os.path.join(tmp, f"lora_{name}_adapter")
    ad = write_adapter(adir, c, targets, r, alpha, False, None, rng)
    deq = {k: (quant_dequant(v, "nf4", True, 64) if v.ndim == 2 and k.startswith("model.layers.") else v)
           for k, v in weights.items()}
    # QLoRA on the Llama only: GPT-2's Conv1D weights are stored transposed, so their blocks are another story
    runs = [("LoRA", weights, [])] + ([("QLoRA nf4-dq", deq, ["--qlora", "nf4-dq", "--qblock", "64"])]
                                      if c["family"] == "llama" else [])
    for label, w, extra in runs:
        model_dir = os.path.join(tmp, f"lora_{name}_{label.split()[0]}")
        write_model(model_dir, config, w)  # QLoRA: ref_model quantizes the fp32 weights, the emulation reads deq
        if extra:
            write_model(model_dir + "_src", config, weights)
        ref = lora_outputs(lora_emulation(model_dir, ad, r, alpha), batch, V)
        exact = lora_outputs(lora_emulation(model_dir, ad, r, alpha, rnd=None), batch, V)
        kappa = {k: max(e, FP32_TOL) / U_BF16 for k, e in errors(exact, ref).items()}
        variants = {}
        for what, vout in (("no rounding", exact),
                           ("adapters on the unrounded input",
                            lora_outputs(lora_emulation(model_dir, ad, r, alpha, round_input=False), batch, V))):
            variants[what] = (vout, [k for k, e in errors(vout, ref).items() if e > FP32_TOL])
        src = model_dir + "_src" if extra else model_dir
        for prec, must in (("bf16", True), ("fp32", False)):
            ours, _ = run_ref_model(src, batch_path, os.path.join(tmp, f"lora.{prec}.safetensors"), {},
                                    "--adapter", adir, "--precision", prec, *extra)
            ours = {k: ours[k] for k in ref}
            over, (wr, wk), closer = verdict(ours, ref, kappa, variants)
            not_closer = {v: ks for v, ks in closer.items() if ks}
            ok = not over and not not_closer
            detail = (f"{len(ref)} tensors; (a) worst err {wr:.3f} u kappa at {wk}, {len(over)} over {BOUND:g} u "
                      f"kappa; (b) " + ("closer to the emulation than to every broken variant" if not not_closer else
                                        "; ".join(f"not closer than {v} on {len(ks)} of {len(variants[v][1])}"
                                                  for v, ks in not_closer.items())))
            check(f"{name} {label} --precision {prec} {'matches' if must else 'is rejected by'} the bf16 emulation",
                  ok == must, detail)


# ---------------- 4. DoRA and prompt learning under bf16 ----------------

def tensor_leaves(arrs, dtype=torch.float64):
    return {k: torch.tensor(np.asarray(v), dtype=dtype).requires_grad_(True) for k, v in arrs.items()}


def lin(x, t, name):
    return x @ t[name + ".weight"].t() + t[name + ".bias"]


def prompt_encoder(t, kind):
    """peft's encoders on the tensors t (shardtune's registry names = peft's state dict), in t's dtype:
    P-tuning MLP (Linear, ReLU, Linear, ReLU, Linear), P-tuning LSTM (a 2-layer bidirectional torch LSTM, then
    Linear, ReLU, Linear), prefix projection (Linear, Tanh, Linear); the input is the embedding table."""
    e = t["prompt_encoder.embedding.weight"]
    if kind == "mlp":
        h = torch.relu(lin(e, t, "prompt_encoder.mlp_head.0"))
        return lin(torch.relu(lin(h, t, "prompt_encoder.mlp_head.2")), t, "prompt_encoder.mlp_head.4")
    if kind == "proj":
        return lin(torch.tanh(lin(e, t, "prompt_encoder.transform.0")), t, "prompt_encoder.transform.2")
    H = t["prompt_encoder.lstm_head.weight_hh_l0"].shape[1]
    lstm = torch.nn.LSTM(e.shape[1], H, num_layers=2, bidirectional=True, batch_first=True).to(e.dtype)
    for name in [n for n, _ in lstm.named_parameters()]:  # the leaves themselves, so their gradients land there
        delattr(lstm, name)
        setattr(lstm, name, t["prompt_encoder.lstm_head." + name])
    lstm._flat_weights = [getattr(lstm, n) for n in lstm._flat_weights_names]
    h = lstm(e[None])[0][0]
    return lin(torch.relu(lin(h, t, "prompt_encoder.mlp_head.0")), t, "prompt_encoder.mlp_head.2")


def dora_bf16_out(ref, rnd, round_input=True, w_rounded=True, masks=None, base_dropped=True):
    """shardtune's DoRA under bf16 (worker/lora.c) as a RefModel.lora_out: the base product from the bf16
    operands (BF16Matmul), plus (c - 1) x W^T + c * scale * (x A^T) B^T with x the bf16-rounded input of the base
    matmul (identity gradient) and W the base weight's bf16 value — peft's DoRA (dora.py) on a bf16 base
    layer with fp32 adapters: c = m / ||W + scale B A||_row (detached); the rest unrounded (fp32 adapters).
    masks {module: [B, T, in]}: LoRA dropout, x := mask * x in both DoRA terms (peft's DoraLinearVariant in
    training). round_input / w_rounded / base_dropped False: broken variants (the adapters on the unrounded x;
    DoRA on the fp32 W; DoRA's base term on the undropped x)."""
    store = bf16_saved(rnd)

    def out(x, base, module, w_oi):
        if module not in ref.lora:
            return base
        xr = store(x) if round_input else x
        xd = xr * masks[module] if masks else xr
        A, B = ref.lora[module]
        delta = ref.lora_scale * torch.matmul(torch.matmul(xd, A.t()), B.t())
        if module not in ref.dora:
            return base + delta
        W = rnd(w_oi.detach()) if w_rounded else w_oi.detach()
        c = ref.dora[module] / torch.linalg.norm(W + ref.lora_scale * torch.matmul(B, A).detach(), dim=1).detach()
        return base + (c - 1) * torch.matmul(xd if base_dropped else xr, W.t()) + c * delta
    return out


def mode_emulation(model_dir, mode, arrs, r=4, alpha=8.0, rnd=bf16, **broken):
    """(RefModel, {name: leaf}, V) of shardtune's bf16 path for an adapter `mode` with tensors `arrs`
    (rnd None: the unrounded float64 model). Prompt learning: the prompt rows are the fp32 (here float64)
    prompt or encoder output put into the fp32 residual stream unrounded; prefix tuning: the virtual rows
    are token 0's embedding and every layer's keys/values of those rows are the prefix's, stored as bf16
    like every key/value. broken: round_input / w_rounded (DoRA), round_prompt (the prompt rounded to bf16 as
    it enters the residual stream, what peft on a bf16 model does; shardtune's residual stream is fp32)."""
    ref = bf16_emulation(model_dir, rnd=rnd) if rnd else RefModel.load(model_dir, torch.float64)
    leaves = tensor_leaves(arrs)
    if mode.startswith("dora"):
        ref.attach_lora(arrs, r, alpha)
        leaves = {}
        for mod, (A, B) in ref.lora.items():
            leaves[f"{mod}.lora_A.weight"], leaves[f"{mod}.lora_B.weight"] = A, B
            leaves[f"{mod}.lora_magnitude_vector"] = ref.dora[mod]
        masks = broken.get("masks")
        if rnd or masks:  # unrounded with dropout: the same function on the identity rounding
            ref.lora_out = dora_bf16_out(ref, rnd or unrounded, broken.get("round_input", True),
                                         broken.get("w_rounded", True),
                                         {m: torch.from_numpy(v) for m, v in masks.items()} if masks else None,
                                         broken.get("base_dropped", True))
        return ref, leaves, 0
    c = ref.c
    if mode == "prompt":
        table = leaves["prompt_embeddings"]
    elif mode in ("mlp", "lstm", "proj"):
        table = prompt_encoder(leaves, mode)
    else:
        table = leaves["prompt_embeddings"]
    V = table.shape[0]
    if mode in ("prefix", "proj"):
        emb = ref.params["wte.weight" if c["family"] == "gpt2" else "model.embed_tokens.weight"]
        ref.prompt = emb[0].detach()[None].expand(V, -1)
        KVH, hd = c["n_kv_head"], c["head_dim"]
        kv = table.view(V, c["n_layer"], 2, KVH, hd).permute(1, 2, 3, 0, 4)  # [L, 2, KVH, V, hd]

        def prefix_kv(l, k, v):
            B = k.shape[0]
            pk, pv = (kv[l, j][None].expand(B, -1, -1, -1) for j in (0, 1))
            return torch.cat([pk, k[:, :, V:]], 2), torch.cat([pv, v[:, :, V:]], 2)
        ref.prefix_kv = prefix_kv
    else:
        ref.prompt = bf16_saved(rnd)(table) if broken.get("round_prompt") else table
    return ref, leaves, V


def mode_outputs(ref, leaves, V, batch, vocab):
    """{logits (every row, the virtual ones first), loss_per_pos (the real rows), grad.<adapter tensor>}."""
    inputs, targets, weight = batch
    Bn = inputs.shape[0]
    pad_t = np.concatenate([np.zeros((Bn, V), np.int64), targets], axis=1)
    pad_w = np.concatenate([np.zeros((Bn, V), np.float32), weight], axis=1)
    logits = ref.logits(torch.from_numpy(inputs).long())
    loss, per_pos = weighted_ce(logits, torch.from_numpy(pad_t), torch.from_numpy(pad_w).double())
    loss.backward()
    out = {"logits": logits.detach().numpy().reshape(-1, vocab),
           "loss_per_pos": per_pos.detach().numpy().reshape(Bn, -1)[:, V:].reshape(-1)}
    out.update({"grad." + k: t.grad.numpy().copy() for k, t in leaves.items()})
    return out


def mode_adapter(adir, c, mode, rng, V=4):
    """A random adapter directory for `mode` (peft's layout, as checkpoints/peft_dir.c and peft_prompt.c read it)
    and its tensors. P-tuning / prefix projection: the encoder's own tensors (shardtune's P_TUNING / PREFIX_TUNING
    directory of an encoder, as peft_adapters.py's check_encoder writes one)."""
    from test_lora_torch import write_adapter
    from test_prompt_torch import write_prompt_adapter
    if mode.startswith("dora"):
        targets = (["c_attn", "c_proj", "c_fc"] if c["family"] == "gpt2" else
                   ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        return write_adapter(adir, c, targets, 4, 8.0, False, None, rng, dora=True)
    if mode == "prompt":
        return {"prompt_embeddings": write_prompt_adapter(adir, c, V, rng)}
    C, L, KVD = c["d_model"], c["n_layer"], c["n_kv_head"] * c["head_dim"]

    def u(shape, fan_in):
        return rng.uniform(-1, 1, shape).astype(np.float32) / np.float32(math.sqrt(fan_in))
    cfg = dict(task_type="CAUSAL_LM", num_virtual_tokens=V, num_transformer_submodules=1, num_layers=L,
               inference_mode=False)
    if mode in ("prefix", "proj"):
        cfg.update(peft_type="PREFIX_TUNING", token_dim=KVD, num_attention_heads=c["n_kv_head"],
                   prefix_projection=mode == "proj", encoder_hidden_size=KVD)
        t = ({"prompt_embeddings": rng.normal(0, 1, (V, 2 * L * KVD)).astype(np.float32)} if mode == "prefix" else
             {"prompt_encoder.embedding.weight": rng.normal(0, 1, (V, KVD)).astype(np.float32),
              "prompt_encoder.transform.0.weight": u((KVD, KVD), KVD), "prompt_encoder.transform.0.bias": u(KVD, KVD),
              "prompt_encoder.transform.2.weight": u((2 * L * KVD, KVD), KVD),
              "prompt_encoder.transform.2.bias": u(2 * L * KVD, KVD)})
    else:
        cfg.update(peft_type="P_TUNING", token_dim=C, num_attention_heads=c["n_head"], encoder_hidden_size=C,
                   encoder_reparameterization_type=mode.upper(), encoder_num_layers=2, encoder_dropout=0.0)
        t = {"prompt_encoder.embedding.weight": rng.normal(0, 1, (V, C)).astype(np.float32)}
        if mode == "mlp":
            for j, (o, i) in enumerate([(C, C), (C, C), (C, C)]):
                t[f"prompt_encoder.mlp_head.{2 * j}.weight"], t[f"prompt_encoder.mlp_head.{2 * j}.bias"] = u((o, i), i), u(o, i)
        else:
            H = C
            for layer in range(2):
                for sfx in ("", "_reverse"):
                    n = f"prompt_encoder.lstm_head.%s_l{layer}{sfx}"
                    t[n % "weight_ih"] = u((4 * H, C if layer == 0 else 2 * H), H)
                    t[n % "weight_hh"], t[n % "bias_ih"], t[n % "bias_hh"] = u((4 * H, H), H), u(4 * H, H), u(4 * H, H)
            t["prompt_encoder.mlp_head.0.weight"], t["prompt_encoder.mlp_head.0.bias"] = u((2 * H, 2 * H), 2 * H), u(2 * H, 2 * H)
            t["prompt_encoder.mlp_head.2.weight"], t["prompt_encoder.mlp_head.2.bias"] = u((C, 2 * H), 2 * H), u(C, 2 * H)
    os.makedirs(adir, exist_ok=True)
    st_io.write(os.path.join(adir, "adapter_model.safetensors"), t)
    with open(os.path.join(adir, "adapter_config.json"), "w") as f:
        json.dump(cfg, f)
    return t


MODE_CASES = [("llama_gqa_untied", "dora"), ("gpt2_tied", "dora"), ("llama_gqa_untied", "dora_dropout"),
              ("gpt2_tied", "dora_dropout"), ("llama_gqa_untied", "prompt"), ("gpt2_tied", "prompt"),
              ("gpt2_tied", "mlp"), ("llama_gqa_untied", "lstm"), ("llama_gqa_untied", "prefix"), ("gpt2_tied", "prefix"),
              ("llama_gqa_untied", "proj")]
MODE_NAMES = {"dora": "DoRA", "dora_dropout": "DoRA with LoRA dropout 0.2", "prompt": "prompt tuning", "mlp": "P-tuning (MLP)", "lstm": "P-tuning (LSTM)",
              "prefix": "prefix tuning", "proj": "prefix tuning (projection)"}


def lora_order(mdir, bpath, adir, extra, tmp):
    """The adapted modules in shardtune's registry order (the index k of the dropout masks): the order of
    ref_model's lora_A gradients."""
    got, _ = run_ref_model(mdir, bpath, os.path.join(tmp, "order.safetensors"), {}, "--adapter", adir, *extra)
    return [k[len("grad."):-len(".lora_A.weight")] for k in got if k.endswith(".lora_A.weight")]


def check_modes(tmp, rng):
    """ref_model --adapter DIR --precision bf16 for DoRA and the prompt-learning modes against mode_emulation with
    criteria (a) and (b) of section 1 (default OpenBLAS kernel): logits, per-position losses and every adapter
    gradient (exactly the adapter's tensors have one). Broken variants: the unrounded model; DoRA: the adapters on
    the unrounded input, DoRA's norms and base term on the fp32 W; prompt / P-tuning: the prompt rounded to bf16 as
    it enters; DoRA with dropout (ref_model --lora-dropout, the masks recomputed in numpy, lora_masks.py): DoRA's
    base term on the undropped input (the unrounded model here has the same masks). --precision fp32 must fail."""
    for name, mode in MODE_CASES:
        config = CONFIGS[name]
        c = parse_config(config)
        vocab = c["vocab"]
        label = f"{name} {MODE_NAMES[mode]}"
        mdir = os.path.join(tmp, f"mode_{name}_{mode}")
        write_model(mdir, config, random_weights(c, rng))
        adir = mdir + "_adapter"
        arrs = mode_adapter(adir, c, mode, rng)
        batch = random_batch(c, SEQ[name], rng)
        bpath = mdir + ".batch.safetensors"
        st_io.write(bpath, dict(zip(("inputs", "targets", "weight"), batch)))
        extra, kw0 = [], {}
        if mode == "dora_dropout":  # ref_model --lora-dropout: the masks of worker/lora.h, recomputed in numpy
            p, seed, step, sample = 0.2, 7, 3, 11
            extra = ["--lora-dropout", f"{p},{seed},{step},{sample}"]
            Bn, T = batch[0].shape
            kw0["masks"] = {mod: dropout_mask(p, seed, step, sample, k, Bn, T, arrs[f"base_model.model.{'transformer.' if c['family'] == 'gpt2' else ''}{mod}.lora_A.weight"].shape[1])
                            for k, mod in enumerate(lora_order(mdir, bpath, adir, extra, tmp))}
        ref = mode_outputs(*mode_emulation(mdir, mode, arrs, **kw0), batch, vocab)
        exact = mode_outputs(*mode_emulation(mdir, mode, arrs, rnd=None, **kw0), batch, vocab)
        kappa = {k: max(e, FP32_TOL) / U_BF16 for k, e in errors(exact, ref).items()}
        broken = ({"adapters on the unrounded input": dict(round_input=False),
                   "DoRA's norms and base term on the fp32 W": dict(w_rounded=False)} if mode == "dora" else
                  {"DoRA's base term on the undropped input": dict(base_dropped=False)} if mode == "dora_dropout" else
                  {"the prompt rounded to bf16 as it enters": dict(round_prompt=True)}
                  if mode in ("prompt", "mlp", "lstm") else {})
        variants = {"no rounding": (exact, [k for k, e in errors(exact, ref).items() if e > FP32_TOL])}
        for what, kw in broken.items():
            vout = mode_outputs(*mode_emulation(mdir, mode, arrs, **kw0, **kw), batch, vocab)
            variants[what] = (vout, [k for k, e in errors(vout, ref).items() if e > FP32_TOL])
        for prec, must in (("bf16", True), ("fp32", False)):
            got, _ = run_ref_model(mdir, bpath, os.path.join(tmp, f"mode.{prec}.safetensors"), {}, "--adapter", adir,
                                   "--precision", prec, *extra)
            grads = {k for k in got if k.startswith("grad.")}
            want = {k for k in ref if k.startswith("grad.")}
            if grads != want:
                check(f"{label} --precision {prec}: gradients of exactly the adapter's tensors", False,
                      f"ours only {sorted(grads - want)[:3]}, reference only {sorted(want - grads)[:3]}")
                continue
            ours = {k: got[k] for k in ref}
            over, (wr, wk), closer = verdict(ours, ref, kappa, variants)
            not_closer = {v: ks for v, ks in closer.items() if ks}
            ok = not over and not not_closer
            detail = (f"{len(ref)} tensors; (a) worst err {wr:.3f} u kappa at {wk}, {len(over)} over {BOUND:g} u "
                      f"kappa; (b) " + ("closer to the emulation than to " + ", ".join(variants) if not not_closer else
                                        "; ".join(f"not closer than {v} on {len(ks)} of {len(variants[v][1])}: {ks[:2]}"
                                                  for v, ks in not_closer.items())))
            check(f"{label} --precision {prec} {'matches' if must else 'is rejected by'} the bf16 emulation",
                  ok == must, detail)

def main():
    torch.set_num_threads(2)
    check_rounding_and_torch()
    check_attention_function()
    rng = np.random.default_rng(99)
    only = os.environ.get("ST_BF16_SECTIONS", "1,2,3,4").split(",")  # a subset of the sections (debugging)
    with tempfile.TemporaryDirectory() as tmp:
        if "1" in only:
            for name in ("llama_gqa_untied", "gpt2_tied"):
                check_model(name, tmp, rng)
        if "2" in only:
            check_training(tmp)
        if "3" in only:
            check_lora(tmp, rng)
        if "4" in only:
            check_modes(tmp, rng)
    if failures:
        print(f"FAILED: {len(failures)} check(s): {failures}")
        return 1
    print("all bf16 comparisons passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
