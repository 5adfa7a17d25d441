"""Batch, group and RMS normalisation: one normalisation over a chosen set of dims.
Derivation: docs/derivation.md#batch-group-and-rms-normalisation.

Each op normalises X over a set of dims ``S`` (the *statistics view*) and then applies a
per-feature affine map:

=============  ==============================  ==================  ================
op             statistics over                 centred (− μ)       w, b per
=============  ==============================  ==================  ================
batch_norm     every dim but 1: (N, *spatial)  yes                 channel (dim 1)
group_norm     each sample's group of C/G      yes                 channel (dim 1)
               channels × spatial
rms_norm       the K trailing dims             no (mean square)    trailing row
layer_norm     the K trailing dims             yes                 trailing row
=============  ==============================  ==================  ================

``mean`` below is the mean over S, broadcast back; ``m`` the number of elements in S.
(layer_norm is the fourth row; its Function lives in ``ops/norms.py``.)

As in ``ops/norms.py``, μ and rstd are recomputed in the differentiable backward and jvp from the
saved X rather than kept: ∂L/∂X depends on X through them, and a non-differentiable saved μ would
cut that dependence out of the double-backward graph. The fast path (grad mode off: nothing
differentiates the backward) uses the forward's μ and rstd instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from .._compat import values_readable
from ._function import HandFunction, fast_path, opmath
from .normalize_fast import (_affine_fast, _group_forward_fast, cast, eval_forward_kernel, eval_grads_kernel, forward_kernel, nan_where_overflow,
                             normalize_grads_fast, one_dtype, rescue_overflow)

__all__ = ["Norm", "NormFn", "BatchNormEvalFn", "cast", "moments", "native_forward_ok", "nan_where_overflow", "normalize",
           "normalize_dx", "normalize_grads_fast", "rescue_overflow", "update_running_stats"]


# --- the normalisation, written once --------------------------------------------------------------


def moments(X: torch.Tensor, dims: tuple[int, ...], center: bool = True, fast: bool = False):
    """(X − μ, μ, var) over ``dims`` (keepdim), var = mean((X − μ)²); without ``center``,
    (X, None, mean(X²)). Two passes, not mean(X²) − μ² (which cancels for data far from 0); also
    several times faster than torch.var_mean's Welford kernel on CPU (measured 5–10×, 512×1024
    float32, one thread, for layer norm's rows). The set is first shifted by its first element
    x₀: X − μ = (X − x₀) − mean(X − x₀), so a constant set gives X − μ = 0 exactly (x̂ = 0; mean(X)
    alone rounds: x̂ was −0.019 for a float32 batch of 1000.1s, torch's batch norm gives −0.0066,
    its group norm 0), and the mean is taken of values near 0, where it rounds least.
    ``fast`` (``fast_path()``: nothing records this): one buffer of X's size, the squares formed
    in it and then X − μ formed again there (RMS: X·X, for the caller's x̂): two more passes, where
    a second buffer's page faults cost more (measured: 5 ms for 8 MB, against 0.3 ms a pass, on a
    loaded VM). (‖X − μ‖²/m by a norm kernel would write no square, but rounds var to 5–10 ulps
    (130 over batch norm's strided dims): batch norm's float32 ∂L/∂X then missed the
    low-precision rule.)"""
    if not center:
        if fast:
            sq = X * X
            return sq, None, sq.mean(dims, keepdim=True)                 # a buffer, mean(X²)
        return X, None, (X * X).mean(dims, keepdim=True)                 # mean(X²)
    first = [slice(None)] * X.dim()
    for d in dims:
        first[d] = slice(0, 1)
    x0 = X[tuple(first)]                                                 # x₀ (keepdim; 0 in an empty dim)
    Xs = X - x0                                                          # X − x₀
    shift = Xs.mean(dims, keepdim=True)                                  # mean(X − x₀) = μ − x₀
    if fast:
        var = Xs.sub_(shift).square_().mean(dims, keepdim=True)         # mean((X − μ)²), in the buffer
        return torch.sub(X, x0, out=Xs).sub_(shift), x0 + shift, var     # X − μ again, the same roundings
    Xc = Xs - shift                                                      # X − μ
    return Xc, x0 + shift, (Xc * Xc).mean(dims, keepdim=True)            # X − μ, μ, var = mean((X − μ)²)


def native_forward_ok(x: torch.Tensor, *params) -> bool:
    """May the fast forward be torch's own forward kernel (``torch.native_layer_norm`` /
    ``native_group_norm``: Y and the statistics μ, rstd in one call, the values torch's
    ``F.layer_norm``/``F.group_norm`` give)? For a non-empty float32/float64 X with parameters of
    its dtype; a float16/bfloat16 X keeps the formula (there torch's statistics are rounded to
    X's dtype unless w is float32, and the backward wants them in float32)."""
    return x.dtype in (torch.float32, torch.float64) and x.numel() > 0 and all(
        p is None or p.dtype == x.dtype for p in params)


def rstd_of(var: torch.Tensor, eps: float, nan_on_overflow: bool = False) -> torch.Tensor:
    """rstd = 1/√(var + eps); with ``nan_on_overflow``, nan where var = inf (see ``normalize``)."""
    rstd = torch.rsqrt(var + eps)                                    # 1/√(var + eps)
    return rstd + (var - var) if nan_on_overflow else rstd           # + 0, or nan where var = inf


def normalize(X: torch.Tensor, dims: tuple[int, ...], eps: float, center: bool = True,
              nan_on_overflow: bool = False, fast: bool = False):
    """x̂ = (X − μ)·rstd, rstd = 1/√(var + eps) over ``dims`` (RMS: x̂ = X·rstd, rstd = 1/√(mean(X²) + eps)).
    Returns (x̂, rstd (keepdim), μ (keepdim; None for RMS)); built from torch ops, so it is
    differentiable (``fast``: x̂ overwrites the buffer X − μ, see ``moments``).
    ``nan_on_overflow``: a set whose squares overflow (var = inf) gives nan, as torch's layer norm
    does, instead of x̂ = 0 from rstd = 0 (torch's batch and RMS norms give the 0)."""
    Xc, mu, var = moments(X, dims, center, fast)
    rstd = rstd_of(var, eps, nan_on_overflow)                        # 1/√(var + eps)
    if fast:                                                         # x̂, in moments' buffer
        return (Xc.mul_(rstd) if center else torch.mul(X, rstd, out=Xc)), rstd, mu
    return Xc * rstd, rstd, mu                                       # x̂


def normalize_dx(xhat: torch.Tensor, rstd: torch.Tensor, v: torch.Tensor, dims: tuple[int, ...],
                 center: bool = True, eps: float | None = None) -> torch.Tensor:
    """The Jacobian of X ↦ x̂ applied to v: rstd·(v − mean(v) − x̂·mean(v ⊙ x̂)) (RMS: no mean(v)).
    It is symmetric, so this one helper is the vjp (v = G ⊙ w) and the jvp (v = Ẋ).
    An RMS set of one element (``eps`` given): rstd·v·(1 − x̂²) = v·eps·rstd³ exactly (1 − x̂² would
    cancel: x̂² = x²/(x² + eps) ≈ 1)."""
    if not center and eps is not None and xhat.numel() == rstd.numel():
        return v * (eps * rstd ** 3)                                 # v·eps/(x² + eps)^{3/2}
    proj = xhat * (v * xhat).mean(dims, keepdim=True)                # x̂·mean(v ⊙ x̂)
    if center:
        return rstd * (v - v.mean(dims, keepdim=True) - proj)        # rstd·(v − mean(v) − x̂·mean(v ⊙ x̂))
    return rstd * (v - proj)                                         # rstd·(v − x̂·mean(v ⊙ x̂))


def update_running_stats(running_mean, running_var, mu: torch.Tensor, var: torch.Tensor, n: int,
                         momentum: float) -> None:
    """In place, not differentiated (torch's batch norm does not differentiate it either):
    r_μ ← (1 − m)·r_μ + m·μ,  r_var ← (1 − m)·r_var + m·var·n/(n − 1), the unbiased variance,
    μ and var (1, C, 1…1) over every dim but 1 (n elements per channel): the batch statistics
    NormFn's forward returns. An empty batch leaves them (as torch)."""
    if n == 0:
        return
    if kernels.usable(running_mean, running_var, mu, var) and (running_mean is not None or running_var is not None):
        rm, rv, ma, va = kernels.arrays(running_mean, running_var, mu, var)   # one compiled loop, not 7 ops
        none = ma.reshape(-1)[:0]
        kernels.load("norms").running_update(none if rm is None else rm.reshape(-1), none if rv is None else rv.reshape(-1),
                                             ma.reshape(-1), va.reshape(-1), momentum, n / (n - 1), rm is not None, rv is not None)
        for t in (running_mean, running_var):                        # what copy_ records: a change in place
            if t is not None:
                torch.autograd.graph.increment_version(t)
        return
    with torch.no_grad():
        if running_mean is not None:
            running_mean.copy_(momentum * mu.reshape(-1) + (1 - momentum) * running_mean)
        if running_var is not None:
            running_var.copy_(momentum * var.reshape(-1) * (n / (n - 1)) + (1 - momentum) * running_var)


# --- which dims, which parameter shape --------------------------------------------------------------


@dataclass(frozen=True)
class Norm:
    """What is normalised: ``over`` = "channel" (batch norm: every dim but 1), "group" (``k``
    groups of channels per sample) or "trailing" (the last ``k`` dims); ``center`` = subtract
    the mean (False: RMS); ``eps`` inside the square root."""

    over: str
    k: int
    center: bool
    eps: float

    #: a set whose squares overflow normalises to x̂ = 0 (rstd = 0), as torch's batch and RMS
    #: norms do; torch's group norm gives that for most sets but nan for some (its Welford
    #: kernel's order), so it follows the common case (docs/differences.md)
    nan_on_overflow = False

    def view(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """x as its statistics view and the dims to reduce there."""
        if self.over == "channel":                                   # (N, C, *spatial): over all but 1
            return x, (0, *range(2, x.dim()))
        if self.over == "group":                                     # (N, C, *) → (N, G, C/G·Π*)
            return x.reshape(x.shape[0], self.k, x.shape[1] // self.k * math.prod(x.shape[2:])), (-1,)
        return x, tuple(range(-self.k, 0))                           # (*, row): over the row

    def param_shape(self, shape, ndim: int) -> tuple[int, ...]:
        """The shape a w or b of ``shape`` takes to broadcast against an X of ``ndim`` dims:
        (C, 1…1) per channel, the row as it is."""
        if self.over == "trailing":
            return tuple(shape)
        return (shape[0], *([1] * (ndim - 2)))                       # (C, 1…1)

    def param(self, t: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor | None:
        """w or b viewed to broadcast against x."""
        return None if t is None else t.reshape(self.param_shape(t.shape, x.dim()))


def _xhat(x: torch.Tensor, spec: Norm, fast: bool = False):
    """x̂ and rstd in x's shape (rstd broadcastable), from the statistics view."""
    X = opmath(x)
    Xs, dims = spec.view(X)
    xhat, rstd, _ = normalize(Xs, dims, spec.eps, spec.center, spec.nan_on_overflow, fast)
    return xhat.reshape(X.shape), rstd, dims


def _affine(xhat, w, b):
    """x̂ ⊙ w + b, out of place (under vmap over w or b alone x̂ is unbatched)."""
    if w is not None and b is not None:
        return torch.addcmul(b, xhat, w)
    y = xhat * w if w is not None else xhat
    return y + b if b is not None else y


def save_for_norm_backward(ctx, x, weight, mu, rstd) -> None:
    """What every normalising layer's backward reads: x̂ (from X, μ, rstd) feeds ∂L/∂X and ∂L/∂w;
    w feeds ∂L/∂X only; ∂L/∂b needs G alone. Forward mode reads X and w."""
    needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    keep = needs_x or needs_w
    ctx.save_for_backward(x if keep else None, weight if needs_x else None, mu if keep else None,
                          rstd if keep else None)
    ctx.save_for_forward(x, weight)
    ctx.x_dtype = x.dtype


class NormFn(HandFunction):
    r"""Y = x̂ ⊙ w + b,  x̂ = (X − μ)·rstd over the dims ``spec`` names — equals
    ``torch.nn.functional.batch_norm`` (training), ``group_norm`` and ``rms_norm`` (``center=False``,
    x̂ = X·rstd, no b).

    Forward, over S (the statistics view of X, m elements each):
        μ = mean(X),  var = mean((X − μ)²),  rstd = 1/√(var + eps),  x̂ = (X − μ)·rstd
        (RMS: var = mean(X²), x̂ = X·rstd)
        Y = x̂ ⊙ w + b          (w, b broadcast per channel (C, 1…1) or per row)
    Shapes: X (N, C, *) or (*, row); w, b (C,) or (row) → Y X's shape.
    Backward, G = ∂L/∂Y, gy = G ⊙ w, Σ_rest = Σ over the dims w does not have:
        ∂L/∂X = rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂))     (RMS: without mean(gy))
        ∂L/∂w = Σ_rest G ⊙ x̂
        ∂L/∂b = Σ_rest G
    Forward mode, tangents Ẋ, ẇ, ḃ:
        Ẏ = rstd·(Ẋ − mean(Ẋ) − x̂·mean(Ẋ ⊙ x̂)) ⊙ w + x̂ ⊙ ẇ + ḃ
    Returns (Y, μ, rstd, var): the statistics (keepdim, in the statistics view; μ = 0 for RMS)
    are non-differentiable outputs, for batch
    norm's running statistics and the fast path's backward (``normalize_grads_fast``).
    Saves X, μ, rstd (and w where ∂L/∂X needs it); the differentiable backward recomputes μ, rstd
    and x̂ from X (see the module docstring). float16/bfloat16 X runs in
    float32 and rounds once; each gradient has its input's dtype.
    Derivation: docs/derivation.md#batch-group-and-rms-normalisation
    """

    @staticmethod
    def forward(x, weight, bias, spec):
        fast = fast_path()
        out = forward_kernel(x, weight, bias, spec) if fast else None        # the compiled loops
        if out is not None:
            return out
        if fast and spec.over == "group" and native_forward_ok(x, weight, bias):
            return _group_forward_fast(x, weight, bias, spec)
        Xs, dims = spec.view(opmath(x))
        Xc, mu, var = moments(Xs, dims, spec.center, fast)                  # X − μ, μ, var over S
        rstd = rstd_of(var, spec.eps, spec.nan_on_overflow)                  # 1/√(var + eps)
        if fast:                                                             # squares that overflow
            mu2, rstd = rescue_overflow(Xs, dims, mu, rstd, spec.eps, spec.center)
            if mu2 is not mu:
                mu = mu2
                torch.sub(Xs, mu, out=Xc)                                    # X − μ again
        w, b = spec.param(opmath(weight), x), spec.param(opmath(bias), x)
        if fast:                                                             # X − μ is this op's buffer
            y = _affine_fast(Xs, Xc, rstd, w, b, spec, x.shape)
        else:
            y = _affine((Xc * rstd).reshape(x.shape), w, b)                  # x̂ ⊙ w + b
        return y.to(x.dtype), (mu if mu is not None else var.new_zeros(())), rstd, var

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, spec = inputs
        _, mu, rstd, var = output
        ctx.mark_non_differentiable(mu, rstd, var)
        ctx.set_materialize_grads(False)
        ctx.spec = spec
        save_for_norm_backward(ctx, x, weight, mu, rstd)
        ctx.w = None if weight is None else (weight.shape, weight.dtype)
        ctx.b = None if bias is None else (bias.shape, bias.dtype)

    @staticmethod
    def backward(ctx, grad_y, _g_mu, _g_rstd, _g_var):
        x, weight, mu, rstd = ctx.saved_tensors
        if grad_y is None:
            return None, None, None, None
        ndim = grad_y.dim()
        spec = ctx.spec
        G = opmath(grad_y)                                                   # X's shape
        if fast_path(grad_y) and G.numel() and x is not None and one_dtype(G, x, weight, mu):   # the same equations, fewer passes
            need = (ctx.needs_input_grad[0], ctx.w is not None and ctx.needs_input_grad[1],
                    ctx.b is not None and ctx.needs_input_grad[2])
            p_shape = x.shape[x.dim() - spec.k:] if spec.over == "trailing" else x.shape[1:2]
            gx, gw, gb = normalize_grads_fast(G, opmath(x), mu, rstd, opmath(weight), spec, p_shape, need)
            return cast(gx, ctx.x_dtype), cast(gw, ctx.w and ctx.w[1]), cast(gb, ctx.b and ctx.b[1]), None
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            xhat, rstd, dims = _xhat(x, spec)                                # x̂, rstd
        if ctx.needs_input_grad[0]:
            w = spec.param(opmath(weight), x)
            gy = G * w if w is not None else G                               # gy = G ⊙ w
            gys, _ = spec.view(gy)
            xhs, _ = spec.view(xhat)
            grad_x = normalize_dx(xhs, rstd, gys, dims, spec.center, spec.eps)   # rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂))
            grad_x = grad_x.reshape(x.shape).to(ctx.x_dtype)
        if ctx.w is not None and ctx.needs_input_grad[1]:
            shape = spec.param_shape(ctx.w[0], ndim)
            grad_w = (G * xhat).sum_to_size(shape).reshape(ctx.w[0]).to(ctx.w[1])   # Σ_rest G ⊙ x̂
        if ctx.b is not None and ctx.needs_input_grad[2]:
            shape = spec.param_shape(ctx.b[0], ndim)
            grad_b = G.sum_to_size(shape).reshape(ctx.b[0]).to(ctx.b[1])           # Σ_rest G
        return grad_x, grad_w, grad_b, None

    @staticmethod
    def jvp(ctx, dx, dw, db, _spec):
        x, weight = ctx.saved_tensors
        spec = ctx.spec
        xhat, rstd, dims = _xhat(x, spec)                                    # x̂, rstd
        dy = torch.zeros_like(xhat)
        if dx is not None:
            dxs, _ = spec.view(opmath(dx))
            xhs, _ = spec.view(xhat)
            dxhat = normalize_dx(xhs, rstd, dxs, dims, spec.center, spec.eps).reshape(xhat.shape)  # rstd·(Ẋ − mean(Ẋ) − x̂·mean(Ẋ ⊙ x̂))
            w = spec.param(opmath(weight), x)
            dy = dy + (dxhat * w if w is not None else dxhat)                # ⊙ w
        if dw is not None:
            dy = dy + xhat * spec.param(opmath(dw), x)                       # x̂ ⊙ ẇ
        if db is not None:
            dy = dy + spec.param(opmath(db), x)                              # ḃ
        return dy.to(x.dtype), None, None, None


class BatchNormEvalFn(HandFunction):
    r"""Y = X ⊙ α + β,  α = w·r_rstd,  β = b − r_μ·α  (r_rstd = 1/√(r_var + eps)): x̂ ⊙ w + b with
    x̂ = (X − r_μ)·r_rstd, the running statistics fixed — equals
    ``torch.nn.functional.batch_norm(..., training=False)``.

    An affine map per channel: the statistics are constants (torch refuses a running mean or
    variance that requires grad), so the Jacobian in X is diagonal. Written as torch's kernel
    writes it (one pass over X; an infinite w gives torch's inf − inf = nan where X and r_μ
    share a sign).
    Shapes: X (N, C, *), r_μ, r_var, w, b (C,) → Y (N, C, *).
    Backward, G = ∂L/∂Y, Σ_rest = Σ over every dim but 1:
        ∂L/∂X = G ⊙ w·r_rstd
        ∂L/∂w = Σ_rest G ⊙ x̂
        ∂L/∂b = Σ_rest G
    Forward mode: Ẏ = Ẋ ⊙ w·r_rstd + x̂ ⊙ ẇ + ḃ
    Derivation: docs/derivation.md#batch-group-and-rms-normalisation
    """

    @staticmethod
    def forward(x, running_mean, running_var, weight, bias, eps):
        y = eval_forward_kernel(x, running_mean, running_var, weight, bias, eps) if fast_path() else None
        if y is not None:                                                    # the compiled pass
            return y
        X = opmath(x)
        alpha = torch.rsqrt(opmath(running_var) + eps)                       # r_rstd (C,)
        if weight is not None:
            alpha = alpha * opmath(weight)                                   # α = w·r_rstd
        beta = -opmath(running_mean) * alpha                                 # β = b − r_μ·α
        if bias is not None:
            beta = beta + opmath(bias)
        if fast_path():                                                      # (addcmul with a broadcast β: a slow path)
            return torch.mul(X, _per_channel(alpha, x)).add_(_per_channel(beta, x)).to(x.dtype)
        return torch.addcmul(_per_channel(beta, x), X, _per_channel(alpha, x)).to(x.dtype)   # X ⊙ α + β

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, running_mean, running_var, weight, bias, eps = inputs
        ctx.eps = eps
        ctx.save_for_backward(x if ctx.needs_input_grad[3] else None, running_mean, running_var, weight)
        ctx.save_for_forward(x, running_mean, running_var, weight)
        ctx.x_dtype = x.dtype
        ctx.w = None if weight is None else (weight.shape, weight.dtype)
        ctx.b = None if bias is None else (bias.shape, bias.dtype)

    @staticmethod
    def backward(ctx, grad_y):
        x, running_mean, running_var, weight = ctx.saved_tensors
        G = opmath(grad_y)                                                   # (N, C, *)
        need = (ctx.needs_input_grad[0], ctx.w is not None and ctx.needs_input_grad[3],
                ctx.b is not None and ctx.needs_input_grad[4])
        out = eval_grads_kernel(G, x, running_mean, running_var, weight, ctx.eps, need) if (
            fast_path(grad_y)) else None                                     # the compiled pass
        if out is not None:
            gx, gw, gb = out
            return (gx, None, None, None if gw is None else gw.reshape(ctx.w[0]),
                    None if gb is None else gb.reshape(ctx.b[0]), None)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            scale = _per_channel(torch.rsqrt(opmath(running_var) + ctx.eps), G)   # r_rstd (C, 1…1)
            if weight is not None:
                scale = scale * _per_channel(opmath(weight), G)              # w·r_rstd
            grad_x = (G * scale).to(ctx.x_dtype)                             # G ⊙ w·r_rstd
        if ctx.w is not None and ctx.needs_input_grad[3] and fast_path(grad_y):   # r_rstd after the sum: one buffer
            rstd = torch.rsqrt(opmath(running_var) + ctx.eps)                # r_rstd (C,)
            B = torch.sub(opmath(x), _per_channel(opmath(running_mean), x)).mul_(G)   # G ⊙ (X − r_μ)
            s = _channel_sum(B)                                              # Σ_rest G ⊙ (X − r_μ)
            if s.dtype == torch.float32 and values_readable(s) and not bool(s.isfinite().all()):
                # partial sums past float32's range (|X − r_μ| near its max) where the whole may
                # cancel back into it: the sum again in float64, rounded once
                s = _channel_sum(torch.sub(x.double(), _per_channel(running_mean.double(), x)).mul_(G.double()))
            grad_w = (s * rstd).reshape(ctx.w[0]).to(ctx.w[1])              # Σ_rest G ⊙ x̂
        elif ctx.w is not None and ctx.needs_input_grad[3]:
            xhat, _ = _eval_xhat(x, running_mean, running_var, ctx.eps)
            grad_w = _channel_sum(G * xhat).reshape(ctx.w[0]).to(ctx.w[1])   # Σ_rest G ⊙ x̂
        if ctx.b is not None and ctx.needs_input_grad[4]:
            grad_b = _channel_sum(G).reshape(ctx.b[0]).to(ctx.b[1])          # Σ_rest G
        return grad_x, None, None, grad_w, grad_b, None

    @staticmethod
    def jvp(ctx, dx, _dm, _dv, dw, db, _eps):
        x, running_mean, running_var, weight = ctx.saved_tensors
        xhat, rstd = _eval_xhat(x, running_mean, running_var, ctx.eps)       # x̂, r_rstd (C, 1…1)
        dy = torch.zeros_like(xhat)
        if dx is not None:
            scale = rstd * _per_channel(opmath(weight), x) if weight is not None else rstd
            dy = dy + opmath(dx) * scale                                     # Ẋ ⊙ w·r_rstd
        if dw is not None:
            dy = dy + xhat * _per_channel(opmath(dw), x)                     # x̂ ⊙ ẇ
        if db is not None:
            dy = dy + _per_channel(opmath(db), x)                            # ḃ
        return dy.to(x.dtype)


def _per_channel(t, x):
    """(C,) → (C, 1…1), to broadcast along dim 1 of x (N, C, *)."""
    return None if t is None else t.reshape(-1, *([1] * (x.dim() - 2)))


def _channel_sum(t):
    """Σ over every dim but 1: (N, C, *) → (C,)."""
    return t.sum((0, *range(2, t.dim())))


def _eval_xhat(x, running_mean, running_var, eps):
    """x̂ = (X − r_μ)·r_rstd and r_rstd (C, 1…1), from the running statistics."""
    rstd = _per_channel(torch.rsqrt(opmath(running_var) + eps), x)
    return (opmath(x) - _per_channel(opmath(running_mean), x)) * rstd, rstd
