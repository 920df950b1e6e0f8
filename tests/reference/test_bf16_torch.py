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
Env (set by ctest): ST_BUILD_DIR, SHARDTUNE_BIN."""
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
from test_model_torch import (CONFIGS, ENV, REF_MODEL, SEQ, random_batch, random_weights, rel_err,  # noqa: E402
                              torch_forward_backward, write_model)
from torch_model import RefModel, causal_attention, parse_config  # noqa: E402

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


def main():
    torch.set_num_threads(2)
    check_rounding_and_torch()
    check_attention_function()
    rng = np.random.default_rng(99)
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("llama_gqa_untied", "gpt2_tied"):
            check_model(name, tmp, rng)
        check_training(tmp)
        check_lora(tmp, rng)
    if failures:
        print(f"FAILED: {len(failures)} check(s): {failures}")
        return 1
    print("all bf16 comparisons passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
