"""fp32_error.py — how far an fp32 implementation of a float64 torch computation may land, whatever order it
sums in: the tolerance of the reference tests that compare shardtune's fp32 results with float64 torch
(tests/reference/peft_adapters.py), derived from the arithmetic instead of measured on one fp32 library.

Fp32Errors is a TorchDispatchMode. Inside it every aten op of the forward AND the backward (autograd's ops
dispatch through it too) runs in float64 as usual, then its result gets the largest error fp32 arithmetic
may make in that op for any summation order (the standard forward-error bounds, u = 2^-24, gamma_n =
n u / (1 - n u)), each element times a random sign:
  a k-term product (mm, bmm, addmm, baddbmm, mv, dot):   gamma_(k+1) * (|beta C| + |alpha| |A| |B|)
  a reduction over n terms (sum, mean):                   gamma_n * the same reduction of |x|
  softmax / log_softmax (max, n exps, a sum, a divide):   gamma_(n+2) * |y|   /   gamma_(n+2) * (1 + |y|)
  their backward (a dot product over n):                  gamma_(n+2) * |y| (|g| + sum |g| |y|) ...
  layer norm (mean, variance, normalize):                 gamma_(n+4) * (|x| + mean |x|) rstd |w| + u |y|
  every other op that computes (+, *, exp, tanh, ...):   2u |y| (one rounding, doubled for exp / tanh
                                                          approximations that are not correctly rounded)
Ops that move data (views, copies, cat, gather, indexing, in-place writes) are exact and left alone.
The errors are propagated through the model exactly (first order), sharp attention's amplification
included, which is what a bound on the last accumulation alone would miss. bound(): the largest relative
deviation (max|x - x64| / max|x64|, per tensor) over a few draws: the size of the error an fp32
implementation whose every op stays within its worst case lands at. A real fp32 library rounds each op to
well inside its box (its errors grow like sqrt(k) u, not k u), so it lands below; a wrong scale, a dropped
term or a transposed matrix is O(1) or at least 1/k of a term, far above."""
import contextlib
import math

import torch
from torch.utils._python_dispatch import TorchDispatchMode

U = 2.0 ** -24
aten = torch.ops.aten


def gamma(n):
    return n * U / (1.0 - n * U)


def _dims(x, dim):
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return list(range(x.dim()))
    return [d % max(x.dim(), 1) for d in (dim if isinstance(dim, (list, tuple)) else [dim])]


def _count(x, dims):
    return math.prod(x.shape[d] for d in dims) if x.dim() else 1


class Fp32Errors(TorchDispatchMode):
    """with Fp32Errors(seed): ...  perturbs every float64 op as described above (one draw per seed)."""

    def __init__(self, seed):
        super().__init__()
        self.gen = torch.Generator().manual_seed(seed)

    def sign(self, like):
        return torch.rand(like.shape, generator=self.gen, dtype=like.dtype) * 2.0 - 1.0

    def add(self, y, size):
        size = torch.nan_to_num(size, nan=0.0, posinf=0.0, neginf=0.0)
        return torch.where(torch.isfinite(y), y + size * self.sign(y), y)

    def local(self, func, args, kwargs, out):
        """The op's worst-case absolute error (a tensor like out), or None for an exact op."""
        if func in (aten.mm.default, aten.bmm.default, aten.mv.default, aten.dot.default):
            a, b = args[0], args[1]
            return gamma(a.shape[-1] + 1) * func(a.abs(), b.abs())
        if func in (aten.addmm.default, aten.baddbmm.default, aten.addmv.default):
            c, a, b = args[0], args[1], args[2]
            beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
            prod = {aten.addmm.default: aten.mm.default, aten.baddbmm.default: aten.bmm.default,
                    aten.addmv.default: aten.mv.default}[func](a.abs(), b.abs())
            return gamma(a.shape[-1] + 1) * (abs(beta) * c.abs() + abs(alpha) * prod)
        if func in (aten.sum.default, aten.sum.dim_IntList, aten.mean.default, aten.mean.dim):
            x = args[0]
            dims = _dims(x, args[1] if len(args) > 1 else None)
            return gamma(_count(x, dims)) * func(x.abs(), *args[1:], **kwargs)
        if func == aten._softmax.default:
            return gamma(args[0].shape[args[1]] + 2) * out.abs()
        if func == aten._log_softmax.default:
            return gamma(args[0].shape[args[1]] + 2) * (1.0 + out.abs())
        if func == aten._softmax_backward_data.default:
            g, y, dim = args[0], args[1], args[2]
            return gamma(g.shape[dim] + 2) * y.abs() * (g.abs() + (g.abs() * y.abs()).sum(dim, keepdim=True))
        if func == aten._log_softmax_backward_data.default:
            g, y, dim = args[0], args[1], args[2]
            return gamma(g.shape[dim] + 2) * (g.abs() + y.exp() * g.abs().sum(dim, keepdim=True))
        if func == aten.embedding_dense_backward.default:  # a scatter-add over the tokens
            return gamma(args[1].numel()) * func(args[0].abs(), *args[1:], **kwargs)
        return None

    def layer_norm(self, args, out):
        x, shape, w = args[0], args[1], args[2]
        dims = list(range(x.dim() - len(shape), x.dim()))
        n, rstd = _count(x, dims), out[2]
        ex = gamma(n + 4) * (x.abs() + x.abs().mean(dims, keepdim=True)) * rstd
        y = out[0]
        size = ex * (w.abs() if w is not None else 1.0) + 2 * U * y.abs()
        return (self.add(y, size), out[1], out[2])

    def layer_norm_backward(self, args, out):
        g, x, shape, mean, rstd, w = args[0], args[1], args[2], args[3], args[4], args[5]
        dims = list(range(x.dim() - len(shape), x.dim()))
        lead = list(range(x.dim() - len(shape)))
        n = _count(x, dims)
        xhat = ((x - mean) * rstd).abs()
        gw = g.abs() * (w.abs() if w is not None else 1.0)
        res = list(out)
        if res[0] is not None:
            size = gamma(n + 4) * rstd * (gw + gw.mean(dims, keepdim=True) + xhat * (gw * xhat).mean(dims, keepdim=True)
                                          + (gw * xhat).mean(dims, keepdim=True))
            res[0] = self.add(res[0], size + 2 * U * res[0].abs())
        nt = _count(x, lead)
        if len(res) > 1 and res[1] is not None:
            res[1] = self.add(res[1], gamma(nt + 1) * (g.abs() * xhat).sum(lead))
        if len(res) > 2 and res[2] is not None:
            res[2] = self.add(res[2], gamma(nt) * g.abs().sum(lead))
        return tuple(res)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        schema = func._schema
        if schema.is_mutable or any(r.alias_info is not None for r in schema.returns):
            return out  # in-place writes and views: data movement, or an accumulation we cannot re-bound
        if func == aten.native_layer_norm.default:
            return self.layer_norm(args, out)
        if func == aten.native_layer_norm_backward.default:
            return self.layer_norm_backward(args, out)
        if not isinstance(out, torch.Tensor) or not out.is_floating_point() or func in EXACT:
            return out
        size = self.local(func, args, kwargs, out)
        return self.add(out, size if size is not None else 2 * U * out.abs())


# ops that only move or select data (their fp32 result is exact)
EXACT = {getattr(aten, n).default for n in (
    "clone", "_to_copy", "cat", "stack", "gather", "index_select", "embedding", "where", "masked_fill",
    "zeros_like", "ones_like", "empty_like", "full_like", "new_zeros", "new_empty", "new_full", "new_ones",
    "scalar_tensor", "zeros", "ones", "full", "empty", "arange", "triu", "tril", "repeat", "neg", "abs",
    "select_backward", "slice_backward", "constant_pad_nd", "index", "lift_fresh_copy", "_unsafe_view",
    "clamp", "relu", "threshold_backward", "scatter", "flip", "roll", "maximum", "minimum", "max", "amax",
    "le", "lt", "ge", "gt", "eq", "ne", "copy", "expand_copy", "permute_copy")
    if hasattr(getattr(aten, n, None), "default")}


def bound(run, draws=3, seed=11):
    """run(ctx): (loss, {name: array}) of the float64 computation, its forward and backward inside `with ctx:`
    (the model built outside it). Returns (loss, ref, bounds): the exact float64 results and, per tensor (and
    "loss"), the largest relative deviation over `draws` draws of Fp32Errors."""
    loss, ref = run(contextlib.nullcontext())
    bounds = {k: 0.0 for k in list(ref) + ["loss"]}
    for d in range(draws):
        l2, got = run(Fp32Errors(seed + d))
        bounds["loss"] = max(bounds["loss"], abs(l2 - loss) / abs(loss))
        for k, v in ref.items():
            bounds[k] = max(bounds[k], float(abs(got[k] - v).max() / max(abs(v).max(), 1e-300)))
    return loss, ref, bounds
