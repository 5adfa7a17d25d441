"""The fast path of the normalisations (``ops/normalize.py``, ``ops/norms.py``): what runs where
nothing records (``fast_path()``: grad mode off, no torch.func transform), so nothing
differentiates it. The forward's μ and rstd are kept and the backward uses them; each step works
in place in one buffer the op owns; on CPU float32/float64 the passes are compiled loops
(``handgrad.kernels.norms``), elsewhere torch ops. Derivation:
docs/derivation.md#batch-group-and-rms-normalisation.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from .. import kernels
from .._compat import values_readable
from ._function import opmath

__all__ = ["cast", "eval_forward_kernel", "eval_grads_kernel", "forward_kernel", "nan_where_overflow",
           "normalize_grads_fast", "one_dtype", "rescue_overflow"]

def nan_where_overflow(y: torch.Tensor, rstd: torch.Tensor):
    """torch's kernels give rstd = 0 (so x̂ = 0, Y = b) for a set whose squares overflow
    (var = inf; rstd = 0 nowhere else): nan there instead, in Y and rstd, as ``rstd_of`` with
    ``nan_on_overflow``. One reduction over the statistics when nothing overflows (compiled: no
    data-dependent branch, the mask always applied)."""
    if kernels.usable(rstd):
        if kernels.load("norms").nonzero(kernels.arrays(rstd)[0].reshape(-1)):
            return y, rstd
    elif values_readable(rstd) and bool(rstd.all()):
        return y, rstd
    bad = rstd == 0
    return y.masked_fill_(bad, math.nan), rstd.masked_fill(bad, math.nan)


def rescue_overflow(X: torch.Tensor, dims: tuple[int, ...], mu, rstd: torch.Tensor, eps: float, center: bool = True):
    """The sets whose squares overflow (var = inf, so rstd = 0 and x̂ = 0; rstd = 0 nowhere else)
    normalised again, scaled by s = max|X − x₀| (x₀ their first element; RMS: x₀ = 0): with
    Z = (X − x₀)/s, μ = x₀ + s·mean(Z), rstd = 1/(s·√(mean((Z − mean Z)²) + eps/s²)) — the same
    x̂, no square past 1. Where the sets are finite; an infinite X keeps rstd = 0. Returns (μ, rstd)
    (μ None for RMS). The fast path's (a data-dependent branch, one reduction over the statistics
    when nothing overflows; not compiled, not under a transform: the differentiable path keeps
    x̂ = 0 there)."""
    if not values_readable(rstd) or bool(rstd.all()):
        return mu, rstd
    first = [slice(None)] * X.dim()
    for d in dims:
        first[d] = slice(0, 1)
    x0 = X[tuple(first)] if center else X.new_zeros(())                  # x₀
    D = X - x0                                                          # X − x₀
    scale = D.abs().amax(dims, keepdim=True)                            # s
    scale = scale.masked_fill(scale == 0, 1.0)
    Z = D / scale                                                       # |Z| ≤ 1
    zbar = Z.mean(dims, keepdim=True) if center else 0.0                # mean(Z)
    r = torch.rsqrt(((Z - zbar) ** 2).mean(dims, keepdim=True) + eps / scale / scale) / scale
    bad = (rstd == 0) & r.isfinite() & (r > 0)                          # the overflowed finite sets
    return (None if mu is None else torch.where(bad, x0 + scale * zbar, mu)), torch.where(bad, r, rstd)



def cast(t: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """t in ``dtype`` (a gradient in its input's dtype); None stays None, and a tensor already
    in it is not touched (``.to`` costs 0.8 µs even then)."""
    return t if t is None or t.dtype is dtype else t.to(dtype)


def one_dtype(G, x, w, mu) -> bool:
    """Do G, X (in opmath), w and the statistics share one dtype? The fast path's in-place and
    matrix-vector steps need it; mixed dtypes (a float64 w with a bfloat16 X) take the formula,
    which promotes as torch does."""
    dtype = G.dtype
    return opmath(x).dtype == dtype and mu.dtype == dtype and (w is None or opmath(w).dtype == dtype)


def normalize_grads_fast(G, X, mu, rstd, w, spec: "Norm", p_shape, need):
    """The backward of NormFn and LayerNormFn on the fast path (``fast_path()``): their equations
        ∂L/∂X = rstd·(gy + n₁ + x̂·n₂),  n₁ = −mean(gy), n₂ = −mean(gy ⊙ x̂),  gy = G ⊙ w
        (RMS: without n₁),   ∂L/∂w = Σ_rest G ⊙ x̂,   ∂L/∂b = Σ_rest G
    from the forward's μ and rstd (nothing differentiates them here, so they need not be
    recomputed from X), in one buffer B, the one ∂L/∂X is returned in (on CPU a fresh buffer's
    page faults cost more than a pass through it). B holds G ⊙ (X − μ), whose sums scaled by
    rstd give ∂L/∂w and n₂ (the means of gy need no gy: G's sums ⊙ w, or a matrix-vector product
    with w), then X − μ again, scaled by rstd·n₂ (x̂·n₂) and shifted by n₁ in place (not by
    addcmul: with a broadcast first operand it takes a path 6× slower), then + gy (see each
    ``_*_dx``).
    On CPU float32/float64 (``kernels.usable``) the same equations run as compiled loops, two
    passes (``_grads_kernel``); one-element sets keep the torch ops (x̂ = 0 exactly there).
    ``p_shape``: the shape of w and b; ``need``: (∂L/∂X, ∂L/∂w, ∂L/∂b). Returns (∂L/∂X, ∂L/∂w,
    ∂L/∂b), None where not needed."""
    m = X.numel() // rstd.numel()                                       # elements per set
    if m > 1:                                                           # (a one-element set: below)
        G = G if G.is_contiguous() else G.contiguous()
        if kernels.usable(G, X, w) and mu.is_contiguous() and rstd.is_contiguous():   # (μ, rstd: the forward's, X's dtype)
            return _grads_kernel(G, X, mu, rstd, w, spec, p_shape, need)
    need_x, need_w, need_b = need
    if spec.over == "group":                                            # (N, C, spatial): per (n, c) sums first
        N, C = X.shape[:2]
        Xv, Gv = X.reshape(N, C, -1), G.reshape(N, C, -1)
        per_c = lambda t: t.reshape(N, spec.k, 1).expand(N, spec.k, C // spec.k).reshape(N, C, 1)   # (N, G, 1) → (N, C, 1)
        mu, rstd_c, dims = per_c(mu), per_c(rstd), (-1,)
    else:
        Xv, Gv, dims = X, G, spec.view(X)[1]
        rstd_c = rstd
    Gsum = Gv.sum(dims, keepdim=True) if spec.over != "trailing" and (need_b or need_x) else None   # Σ G per (n, c) or c
    gb = None
    if need_b:                                                          # Σ_rest G
        gb = (Gsum.sum(0) if spec.over == "group" else Gsum if Gsum is not None else G.reshape(-1, m).sum(0))
        gb = gb.reshape(p_shape)
    if not (need_x or need_w):
        return None, None, gb
    B = torch.sub(Xv, mu).mul_(Gv) if spec.center else Xv * Gv          # G ⊙ (X − μ) = G ⊙ x̂ / rstd
    if spec.over == "trailing":                                         # rstd per row: into the sums over rows
        M = rstd.numel()
        S = None
        gw = (rstd.reshape(1, M) @ B.reshape(M, m)).reshape(p_shape) if need_w else None   # Σ_rows rstd·G ⊙ (X − μ)
    else:                                                               # rstd per (n, c) or c: after the sum
        S = B.sum(dims, keepdim=True).mul_(rstd_c)                      # Σ G ⊙ x̂ per (n, c) or c
        gw = (S.sum(0) if spec.over == "group" else S).reshape(p_shape) if need_w else None
    if not need_x:
        return None, gw, gb
    if m == 1 and spec.center:                                          # a one-element set: x̂ = 0, ∂L/∂X = 0
        return torch.sub(Xv, mu, out=B).mul_(0).reshape(X.shape), gw, gb
    dx = {"channel": _channel_dx, "group": _group_dx, "trailing": _trailing_dx}[spec.over]
    return dx(B, G, Xv, Gv, mu, rstd, rstd_c, w, Gsum, S, m, spec).reshape(X.shape), gw, gb


def _grads_kernel(G, X, mu, rstd, w, spec, p_shape, need):
    """normalize_grads_fast's equations by the compiled loops (``kernels.norms.*_backward``: one
    pass for the sums, one for ∂L/∂X), X and G viewed as the kernel's layout: rows (M, D),
    or (N, C, P) for groups and channels (numpy's reshapes: a torch view costs 0.9 µs)."""
    K = kernels.load("norms")
    need_x, need_w, need_b = need
    gx = torch.empty_like(X) if need_x else None
    gw = torch.empty(p_shape, dtype=X.dtype) if need_w else None
    gb = torch.empty(p_shape, dtype=X.dtype) if need_b else None
    Ga, Xa, ua, ra, wa, gxa, gwa, gba = kernels.arrays(G, X, mu, rstd, w, gx, gw, gb)
    none = _empty(Xa.dtype)
    wa, gwa, gba = (none[1] if t is None else t.reshape(-1) for t in (wa, gwa, gba))
    if spec.over == "trailing":
        M = ra.size
        shape = (M, Xa.size // M)                                       # (M, D)
        K.rows_backward(Ga.reshape(shape), Xa.reshape(shape), ua.reshape(-1) if spec.center else none[1], ra.reshape(M), wa,
                        w is not None, spec.center, none[2] if gx is None else gxa.reshape(shape), gwa, gba,
                        need_x, need_w, need_b)
    else:
        N, C = X.shape[:2]
        shape = (N, C, Xa.size // (N * C))                              # (N, C, P)
        gxa = none[3] if gx is None else gxa.reshape(shape)
        if spec.over == "group":
            K.groups_backward(Ga.reshape(shape), Xa.reshape(shape), spec.k, ua.reshape(N, spec.k), ra.reshape(N, spec.k), wa,
                              w is not None, gxa, gwa, gba, need_x, need_w, need_b)
        else:
            K.channels_backward(Ga.reshape(shape), Xa.reshape(shape), ua.reshape(C), ra.reshape(C), wa, w is not None,
                                gxa, gwa, gba, need_x, need_w, need_b)
    return gx, gw, gb


@functools.cache
def _empty(dtype):
    """Empty arrays of ``dtype`` by ndim (index 1–3): an absent operand or output of a kernel."""
    return (None, np.empty(0, dtype), np.empty((0, 0), dtype), np.empty((0, 0, 0), dtype))


def forward_kernel(x, weight, bias, spec):
    """NormFn's fast forward by the compiled loops (``kernels.norms.*_forward``): (Y, μ, rstd,
    var) as NormFn.forward returns them, or None where the kernels do not apply (then the
    torch-op path): a layer-norm-like centred row (LayerNormFn has torch's kernel), or a set
    whose variance is infinite (the kernel says so; ``rescue_overflow`` is the torch-op path's)."""
    if not (x.numel() and kernels.usable(x, weight, bias)) or (spec.over == "trailing" and spec.center):
        return None
    K = kernels.load("norms")
    y = torch.empty_like(x)                                             # (x contiguous: usable)
    if spec.over == "trailing":                                         # RMS: rows (M, D)
        D = math.prod(x.shape[x.dim() - spec.k:])
        rstd = torch.empty(x.shape[:x.dim() - spec.k] + (1,) * spec.k, dtype=x.dtype)
        xa, wa, ya, ra = kernels.arrays(x, weight, y, rstd)
        M = ra.size
        ok = K.rms_forward(xa.reshape(M, D), _empty(xa.dtype)[1] if wa is None else wa.reshape(-1), weight is not None,
                           spec.eps, ya.reshape(M, D), ra.reshape(M))
        return (y, _zero(x.dtype), rstd, _zero(x.dtype)) if ok else None
    N, C = x.shape[:2]
    shape = (N, C, x.numel() // (N * C))                                # (N, C, P)
    group = spec.over == "group"
    stat = (N, spec.k, 1) if group else (1, C) + (1,) * (x.dim() - 2)
    mu, rstd = torch.empty(stat, dtype=x.dtype), torch.empty(stat, dtype=x.dtype)
    var = _zero(x.dtype) if group else torch.empty(stat, dtype=x.dtype)
    xa, wa, ba, ya, ua, ra, va = kernels.arrays(x, weight, bias, y, mu, rstd, var)
    none = _empty(xa.dtype)[1]
    wa, ba = (none if t is None else t.reshape(-1) for t in (wa, ba))
    if group:
        ok = K.groups_forward(xa.reshape(shape), spec.k, wa, ba, weight is not None, bias is not None, spec.eps,
                              ya.reshape(shape), ua.reshape(N, spec.k), ra.reshape(N, spec.k))
    else:
        ok = K.channels_forward(xa.reshape(shape), wa, ba, weight is not None, bias is not None, spec.eps,
                                ya.reshape(shape), ua.reshape(C), va.reshape(C), ra.reshape(C))
    return (y, mu, rstd, var) if ok else None


def _zero(dtype):
    """A 0-d zero: NormFn's μ for RMS and var for group and RMS norm (only batch norm's is read)."""
    return torch.zeros((), dtype=dtype)


def eval_forward_kernel(x, running_mean, running_var, weight, bias, eps):
    """BatchNormEvalFn's fast forward by one compiled pass (``kernels.norms.eval_channels_forward``),
    or None where the kernels do not apply."""
    if not (x.numel() and kernels.usable(x, running_mean, running_var, weight, bias)):
        return None
    N, C = x.shape[:2]
    y = torch.empty_like(x)                                             # (x contiguous: usable)
    xa, ua, va, wa, ba, ya = kernels.arrays(x, running_mean, running_var, weight, bias, y)
    none = _empty(xa.dtype)[1]
    shape = (N, C, xa.size // (N * C))                                  # (N, C, P)
    kernels.load("norms").eval_channels_forward(
        xa.reshape(shape), ua.reshape(C), va.reshape(C), none if wa is None else wa.reshape(C),
        none if ba is None else ba.reshape(C), wa is not None, ba is not None, eps, ya.reshape(shape))
    return y


def eval_grads_kernel(G, x, running_mean, running_var, weight, eps, need):
    """BatchNormEvalFn's backward by one compiled pass (``kernels.norms.eval_channels_backward``),
    or None where the kernels do not apply. ``need``: (∂L/∂X, ∂L/∂w, ∂L/∂b); ``x`` (None where
    ∂L/∂w is not needed, as BatchNormEvalFn saves it) is read for ∂L/∂w alone."""
    G = G if G.is_contiguous() else G.contiguous()
    if not (G.numel() and kernels.usable(G, x, running_mean, running_var, weight)):
        return None
    need_x, need_w, need_b = need
    N, C = G.shape[:2]
    gx = torch.empty_like(G) if need_x else None
    gw = torch.empty(C, dtype=G.dtype) if need_w else None
    gb = torch.empty(C, dtype=G.dtype) if need_b else None
    Ga, Xa, ua, va, wa, gxa, gwa, gba = kernels.arrays(G, x, running_mean, running_var, weight, gx, gw, gb)
    none = _empty(Ga.dtype)
    shape = (N, C, Ga.size // (N * C))                                  # (N, C, P)
    kernels.load("norms").eval_channels_backward(
        Ga.reshape(shape), none[3] if Xa is None else Xa.reshape(shape), ua.reshape(C), va.reshape(C), none[1] if wa is None else wa.reshape(C),
        wa is not None, eps, none[3] if gx is None else gxa.reshape(shape), none[1] if gw is None else gwa,
        none[1] if gb is None else gba, need_x, need_w, need_b)
    return gx, gw, gb


def _channel_dx(B, G, Xv, Gv, mu, rstd, rstd_c, w, Gsum, S, m, spec):
    """batch norm: w is constant over each set, so ∂L/∂X = rstd·w·(G + n₁ + x̂·n₂) with
    n₁ = −mean(G), n₂ = −mean(G ⊙ x̂): G + (X − μ)·(rstd·n₂) (torch's order), then ·rstd·w and
    + rstd·w·n₁ in one pass."""
    n1, n2 = Gsum * (-1 / m), S * (-1 / m)                              # −mean(G), −mean(G ⊙ x̂)
    torch.addcmul(Gv, torch.sub(Xv, mu, out=B), n2.mul_(rstd), out=B)   # G + x̂·n₂
    scale = rstd if w is None else rstd * spec.param(w, Xv)             # rstd·w
    return B.mul_(scale).add_(n1.mul_(scale))                           # rstd·w·(G + x̂·n₂) + rstd·w·n₁


def _group_dx(B, G, Xv, Gv, mu, rstd, rstd_c, w, Gsum, S, m, spec):
    """group norm, in the (N, C, spatial) view: n₁ = −mean(G ⊙ w), n₂ = −mean(G ⊙ x̂ ⊙ w) over
    each group from the per-(n, c) sums, and ∂L/∂X = (X − μ)·(rstd·n₂)·rstd + rstd·n₁ in one pass,
    + G ⊙ (rstd·w) in another."""
    N, C = Xv.shape[:2]
    wc = None if w is None else w.reshape(1, C)
    group_mean = lambda t: (t if wc is None else t.reshape(N, C) * wc).reshape(N, spec.k, -1).sum(-1, keepdim=True).mul_(-1 / m)
    per_c = lambda t: t.reshape(N, spec.k, 1).expand(N, spec.k, C // spec.k).reshape(N, C, 1)
    n1, n2 = group_mean(Gsum), group_mean(S)                            # (N, G, 1)
    r = rstd.reshape(N, spec.k, 1)
    if values_readable(r) and bool((r < 2.0 ** -60).any()):   # rstd² underflows (a rescued set,
        torch.sub(Xv, mu, out=B).mul_(per_c(n2 * r)).add_(per_c(n1))     # rescue_overflow): n₁ + x̂·n₂ first,
        B.add_(Gv) if wc is None else B.addcmul_(Gv, wc.reshape(1, C, 1))   # + gy,
        return B.mul_(rstd_c)                                            # ·rstd, as _trailing_dx
    torch.sub(Xv, mu, out=B).mul_(per_c(n2 * r * r)).add_(per_c(n1 * r))   # rstd·(n₁ + x̂·n₂)
    return B.addcmul_(Gv, rstd_c if wc is None else rstd_c * wc.reshape(1, C, 1))      # + rstd·G ⊙ w


def _trailing_dx(B, G, Xv, Gv, mu, rstd, rstd_c, w, Gsum, S, m, spec):
    """layer and RMS norm, rows of D = m: n₁ = −(G w)/D, n₂ = −((G ⊙ x̂) w)/D (matrix-vector
    products; row sums without w), then ∂L/∂X = rstd·(gy + n₁ + x̂·n₂): n₁ + (X − μ)·(rstd·n₂)
    in one pass, + gy in another (n₁ and gy added before the scaling, as the formula's order),
    ·rstd in a third. An RMS row of one element: ∂L/∂X = gy·eps·rstd³ (``normalize_dx``)."""
    M = rstd.numel()
    G2, B2, r = G.reshape(M, m), B.reshape(M, m), rstd.reshape(M, 1)
    if not spec.center and m == 1:
        gx = torch.mul(G2, r.pow(3).mul_(spec.eps))                     # gy·eps·rstd³
        return gx if w is None else gx.mul_(w.reshape(1, 1))
    wn = None if w is None else w.reshape(m) * (-1 / m)                  # −w/D
    row = lambda t: (t @ wn if wn is not None else t.sum(-1).mul_(-1 / m)).reshape(rstd.shape)
    n2 = row(B2).mul_(rstd)                                             # n₂ = −rstd·((G ⊙ (X − μ)) w)/D
    c = n2 * rstd                                                       # rstd·n₂
    # x̂·n₂ = (X − μ)·(rstd·n₂), in X's shape (B may share X's strides); where rstd·n₂ overflows
    # and n₂ does not, x̂ first and then ·n₂ (one pass more)
    spill = values_readable(c) and not bool(c.isfinite().all())
    if spec.center:
        torch.sub(Xv, mu, out=B)                                        # X − μ
        B.mul_(rstd).mul_(n2) if spill else B.mul_(c)                   # x̂·n₂
    else:
        torch.mul(Xv, rstd, out=B).mul_(n2) if spill else torch.mul(Xv, c, out=B)   # x̂·n₂
    if spec.center:
        B.add_(row(G2))                                                 # n₁ + x̂·n₂
    B.add_(G) if w is None else B.addcmul_(G, w)                        # gy + n₁ + x̂·n₂
    return B.mul_(rstd)                                                 # ·rstd


def _affine_fast(X, Xc, rstd, w, b, spec: "Norm", shape):
    """x̂ ⊙ w + b on the fast path, in the buffer X − μ (RMS: the buffer of X², ``moments``'):
    per channel (batch norm) or per (sample, channel) (group norm) rstd·w is one factor, so
    Y = (X − μ)·(rstd·w) + b is one pass; per row (layer and RMS norm) rstd and w are two.
    ``shape``: X's; w, b as ``Norm.param`` gives them."""
    if spec.over == "trailing":
        xhat = Xc.mul_(rstd) if spec.center else torch.mul(X, rstd, out=Xc)   # x̂ = (X − μ)·rstd (RMS: X·rstd)
        scale = w
    elif spec.over == "channel":
        xhat, scale = Xc, rstd if w is None else rstd * w               # rstd·w  (1, C, 1…1)
    else:                                                               # (N, G, m) → (N, C, spatial)
        N, C = shape[:2]
        xhat = Xc.reshape(N, C, math.prod(shape[2:]))
        r = rstd.reshape(N, spec.k, 1).expand(N, spec.k, C // spec.k).reshape(N, C, 1)   # rstd per (n, c)
        scale = r if w is None else r * w.reshape(1, C, 1)              # rstd·w per (n, c)
        b = None if b is None else b.reshape(1, C, 1)
    if scale is not None:                                               # (not addcmul: with a broadcast b it
        xhat.mul_(scale)                                                # takes a slow path, 6× these two)
    y = xhat.add_(b) if b is not None else xhat                         # (X − μ)·rstd·w + b
    return y.reshape(shape)


def _group_forward_fast(x, weight, bias, spec: "Norm"):
    """group norm's fast forward: μ and rstd by torch's forward kernel (its Welford moments: a
    constant group has μ = x exactly, and a group whose squares overflow rstd = 0 or nan, as
    torch's), then Y = (X − μ)·(rstd·w) + b again in its output buffer: torch's own Y is
    X·(rstd·w) + (b − μ·rstd·w), which leaves a rounding residue for a constant group
    (handgrad.testing.differences: "group_norm: one-element groups are exact"). Two passes over
    the buffer after the kernel's, against the formula's seven (``moments``)."""
    N, C = x.shape[:2]
    x = x if x.is_contiguous() else x.contiguous()                       # (the kernel's requirement)
    y, mu, rstd = torch.native_group_norm(x, None, None, N, C, math.prod(x.shape[2:]), spec.k, spec.eps)
    mu, rstd = mu.reshape(N, spec.k, 1), rstd.reshape(N, spec.k, 1)                       # the statistics view
    mu, rstd = rescue_overflow(x.reshape(N, spec.k, -1), (-1,), mu, rstd, spec.eps)       # squares that overflow
    ones = [1] * (x.dim() - 2)
    per_c = lambda t: t.reshape(N, spec.k, 1).expand(N, spec.k, C // spec.k).reshape(N, C, *ones)   # (N, G) → (N, C, 1…1)
    scale = per_c(rstd) if weight is None else per_c(rstd) * weight.reshape(1, C, *ones)     # rstd·w per (n, c)
    torch.sub(x, per_c(mu), out=y).mul_(scale)                                               # (X − μ)·rstd·w
    if bias is not None:
        y.add_(bias.reshape(1, C, *ones))                                                    # + b
    return y, mu, rstd, rstd.new_empty(0)                                                   # (var: batch norm's alone)


