"""The losses: squared error (``mse_loss``, the seed's ``half_squared_error``), softmax cross
entropy and negative log-likelihood (binary cross entropy with logits: ``ops.bce``).
Derivation: docs/derivation.md#losses.

Every Function here reduces with ``reduction`` ∈ {'none', 'mean', 'sum'}; with the incoming
gradient g (a scalar for 'mean'/'sum', one value per loss element for 'none') the backward
scales each element's derivative by

    ĝ = g / den   ('mean'),   g   ('sum'),   G   ('none', elementwise),

never assuming g = 1. The layout (flattening (N, C, d1, …) to rows, the unbatched (C,) case,
broadcasting) and all validation live in ``handgrad.functional._losses``; these Functions see
rows X (M, C) or elementwise tensors only. In float16/bfloat16 the math runs in float32
(``opmath``) and rounds once, as torch's kernels do.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

import torch.nn.functional as TF

from .. import kernels
from .._compat import forward_ad_active, functorch_transforms_active, is_functorch_wrapped
from ._function import HandFunction, fast_path, opmath
from ._function import accurate_sum as _sum
from .softmax import log_softmax_jvp, log_softmax_rows, log_softmax_vjp


def _to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in ``dtype``; t itself when it is already (``Tensor.to``'s own no-op test costs a µs)."""
    return t if t.dtype == dtype else t.to(dtype)


def _scale(g: torch.Tensor, reduction: str, den) -> torch.Tensor:
    """ĝ: the incoming gradient as it multiplies each element's derivative."""
    return g / den if reduction == "mean" else g           # g/den ('mean'), g ('sum'), G ('none')


def reduce_loss(loss: torch.Tensor, reduction: str, den) -> torch.Tensor:
    if reduction == "none":
        return loss                                          # ℓ
    total = _sum(loss)                                       # Σ ℓ
    return total / den if reduction == "mean" else total     # Σ ℓ / den  or  Σ ℓ


# ---------------------------------------------------------------------------------------------
# Squared error: mse_loss and half_squared_error
# ---------------------------------------------------------------------------------------------

def _se_terms(x, y, w, kind):
    """D = X − Y (broadcast shape S), c (1 for mse, ½ for the seed's loss), and the mean's den."""
    D = opmath(x) - opmath(y)                                # D = X − Y            (S)
    c = 0.5 if kind == "half" else 1.0
    if kind == "half":
        den = D.shape[:-1].numel()                           # N rows
    elif w is None:
        den = D.numel()                                      # every element
    else:
        den = _sum(opmath(w))                                # Σ W  (torch's weighted mean)
    return D, c, den


def _se_none_view(E, kind):
    """'none' output: the elementwise E (mse) or one value per row, Σ_d E (half)."""
    return _sum(E, -1) if kind == "half" else E


def _se_expand(g_hat, kind):
    """ĝ as it multiplies E: a scalar, elementwise (mse 'none'), or per row (half 'none')."""
    return g_hat.unsqueeze(-1) if kind == "half" and g_hat.dim() > 0 else g_hat


class SquaredErrorFn(HandFunction):
    r"""E = c · W ⊙ (X − Y)², reduced — equals ``torch.nn.functional.mse_loss(x, y, reduction=r,
    weight=w)`` (kind 'mse', c = 1) or the seed's loss ``half_squared_error`` (kind 'half',
    c = ½, summed over the last dim first: ℓ_n = ½‖x_n − y_n‖²).

    Shapes: X, Y broadcast to S (torch broadcasts them too), W None or X's shape.
    'none': E (S) for mse, Σ_d E (S[:-1]) for half; 'sum': Σ E; 'mean': Σ E / den with
    den = |S| (mse), Σ W (weighted mse, torch's rule), N = |S[:-1]| rows (half).
    Backward, D = X − Y, ĝ = g/den ('mean'), g ('sum'), G ('none', per element or per row):
        ∂L/∂X =  2c ĝ ⊙ W ⊙ D          (summed to X's shape)
        ∂L/∂Y = −2c ĝ ⊙ W ⊙ D          (summed to Y's shape)
        ∂L/∂W =  c ĝ ⊙ D² − [weighted 'mean'] g L / ΣW
    Forward mode, tangents Ẋ, Ẏ, Ẇ:
        Ė = c (Ẇ ⊙ D² + 2 W ⊙ D ⊙ (Ẋ − Ẏ)), reduced as E; weighted 'mean': (ΣĖ − L ΣẆ) / ΣW
    Saves X, Y, W (D is one subtraction, recomputed).
    Derivation: docs/derivation.md#mean-squared-error, docs/derivation.md#half-squared-error
    """

    @staticmethod
    def forward(x, y, w, reduction, kind):
        if fast_path() and w is None and x.shape == y.shape and x.numel():
            # Nothing records this: torch's forward kernel sums (X − Y)² in one pass, as the
            # expressions below do (tests/test_fast_paths.py compares the two).
            X, Y = opmath(x), opmath(y)
            if kind == "mse":
                return _to(TF.mse_loss(X, Y, reduction=reduction), x.dtype)            # Σ D² (/ |S|)
            if reduction == "none":
                return _to(torch.sub(X, Y).square_().sum(-1).mul_(0.5), x.dtype)       # ½ Σ_d D²  per row
            c = 0.5 / X.shape[:-1].numel() if reduction == "mean" else 0.5
            return _to(TF.mse_loss(X, Y, reduction="sum").mul_(c), x.dtype)           # ½ Σ D² (/ N)
        D, c, den = _se_terms(x, y, w, kind)                    # D (S)
        E = c * D * D if w is None else c * opmath(w) * D * D   # E = c W ⊙ D²      (S)
        if reduction == "none":
            E = _se_none_view(E, kind)
        return reduce_loss(E, reduction, den).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, reduction, kind = inputs
        ctx.reduction, ctx.kind = reduction, kind
        ctx.shapes = (x.shape, y.shape, None if w is None else w.shape)
        ctx.dtypes = (x.dtype, y.dtype, None if w is None else w.dtype)
        ctx.save_for_backward(x, y, w)
        if forward_ad_active() or functorch_transforms_active():  # only where a jvp can be asked for
            ctx.save_for_forward(x, y, w)

    @staticmethod
    def backward(ctx, g):
        x, y, w = ctx.saved_tensors
        D, c, den = _se_terms(x, y, w, ctx.kind)                   # D = X − Y          (S)
        gx = gy = gw = None
        if (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]) and w is None and fast_path(g):
            # 2c ĝ ⊙ D in D's buffer, 2c/den folded into one number (a scalar g: one op on it;
            # den = 0 only where D has no element)
            scale = opmath(g) * ((2 * c / den if den else math.nan) if ctx.reduction == "mean" else 2 * c)
            GD = D.mul_(_se_expand(scale, ctx.kind))                        # 2c ĝ ⊙ D
            same = ctx.shapes[0] == ctx.shapes[1] == GD.shape               # nothing to sum down
            if ctx.needs_input_grad[0]:
                gx = _to(GD if same else GD.sum_to_size(ctx.shapes[0]), ctx.dtypes[0])
            if ctx.needs_input_grad[1]:                                    # −2c ĝ D (its own buffer if ∂L/∂X took GD)
                gy = torch.neg(GD) if gx is not None else GD.neg_()
                gy = _to(gy if same else gy.sum_to_size(ctx.shapes[1]), ctx.dtypes[1])
            return gx, gy, None, None, None
        g_hat = _se_expand(_scale(opmath(g), ctx.reduction, den), ctx.kind)   # ĝ     (S or scalar)
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            GD = 2 * c * g_hat * D if w is None else 2 * c * g_hat * opmath(w) * D  # 2c ĝ ⊙ W ⊙ D
            GD = GD.expand(D.shape)
            if ctx.needs_input_grad[0]:
                gx = GD.sum_to_size(ctx.shapes[0]).to(ctx.dtypes[0])       # ∂L/∂X =  2c ĝ W D
            if ctx.needs_input_grad[1]:
                gy = (-GD).sum_to_size(ctx.shapes[1]).to(ctx.dtypes[1])    # ∂L/∂Y = −2c ĝ W D
        if w is not None and ctx.needs_input_grad[2]:
            Q = D * D                                                      # D²
            if ctx.reduction == "mean" and Q.numel():
                # the two terms below differ by D_k² − L: shifting every D² by one of them, q,
                # leaves that unchanged, and makes it exactly 0 where all D² are equal (one element)
                Q = Q - Q.reshape(-1)[0]                                   # D² − q
            GW = (c * g_hat * Q).expand(D.shape).sum_to_size(ctx.shapes[2])  # c ĝ ⊙ D²
            if ctx.reduction == "mean":
                L = _sum(c * opmath(w) * Q) / den                          # L = Σ W D² / ΣW  (less c q)
                GW = GW - opmath(g) * L / den                              # − g L / ΣW
            gw = GW.to(ctx.dtypes[2])
        return gx, gy, gw, None, None

    @staticmethod
    def jvp(ctx, dx, dy, dw, _r, _k):
        x, y, w = ctx.saved_tensors
        D, c, den = _se_terms(x, y, w, ctx.kind)                   # D (S)
        dD = torch.zeros_like(D)
        if dx is not None:
            dD = dD + opmath(dx)                                           # Ẋ
        if dy is not None:
            dD = dD - opmath(dy)                                           # − Ẏ
        dE = 2 * c * D * dD if w is None else 2 * c * opmath(w) * D * dD   # 2c W ⊙ D ⊙ (Ẋ − Ẏ)
        if dw is not None:
            dE = dE + c * opmath(dw) * D * D                               # + c Ẇ ⊙ D²
        if ctx.reduction == "none":
            return _se_none_view(dE, ctx.kind).to(x.dtype)
        dL = reduce_loss(dE, ctx.reduction, den)                               # Σ Ė (/ den)
        if w is not None and dw is not None and ctx.reduction == "mean":
            L = _sum(c * opmath(w) * D * D) / den
            dL = dL - L * _sum(opmath(dw)) / den                           # − L ΣẆ / ΣW
        return dL.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Softmax cross entropy and negative log-likelihood (rows X (M, C), class dim last)
#
# The pieces below are the cross entropy's formulas, each written once: CrossEntropyFn uses
# them on all rows, ops.linear_cross_entropy.LinearCrossEntropyFn on one chunk of rows at a time.
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossEntropyOptions:
    """The non-tensor options of the cross entropy (STYLE.md §5): ``CrossEntropyFn``,
    ``NLLLossFn`` and, inside ``LCEOptions``, the fused ``LinearCrossEntropyFn``."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0  # ε ∈ [0, 1] (functional._common maps torch's ε ≤ 0 to 0)
    probs: bool = False           # target holds class probabilities T (M, C), not indices y (M,)


def ce_index_terms(y, w, ignore_index, dtype):
    """For class-index targets: the kept mask, y with ignored rows sent to class 0 (safe to
    gather), and each row's weight a_i = w_{y_i} [y_i ≠ ignore_index]."""
    keep = y != ignore_index                                              # (M,)
    y0 = y.where(keep, 0)                                                 # (M,)
    if w is None or w.numel() == 0:                                      # (no classes: every row ignored)
        return keep, y0, keep.to(dtype)
    a = opmath(w)[y0].where(keep, 0.0)                                   # a_i = w_{y_i} · keep_i  (M,), 0 exactly
    return keep, y0, a


def _picked(X, y0):
    """X_{i, y_i}   (M,); 0 with no classes (C = 0: every row is ignored, nothing to pick)."""
    if X.shape[1] == 0:
        return X.new_zeros(X.shape[0])
    return X.gather(1, y0.unsqueeze(1)).squeeze(1)


def ce_denominator(target, w, opts, dtype):
    """The 'mean' denominator: Σ_i a_i for class indices (torch's weighted mean), M for
    probabilities. Needs only the targets, so a chunked caller computes it once for all rows."""
    if opts.probs:   # torch: numel / C, so 0/0 = nan with no classes
        return target.shape[0] if target.shape[1] else math.nan
    return _sum(ce_index_terms(target, w, opts.ignore_index, dtype)[2])   # Σ_i a_i


def _smoothed(T, opts, C):
    """(1−ε) T + ε/C: the smoothed class-probability target (before the class weight)."""
    eps = opts.label_smoothing
    return (1 - eps) * opmath(T) + eps / C if eps and C else opmath(T)


def ce_losses(logp, target, w, opts):
    """ℓ_i = −Σ_c Q_ic log p_ic   (M,), with Q the weighted, smoothed target:
        class indices:        Q_ic = (1−ε) a_i δ_{c,y_i} + (ε/C) keep_i w_c
        class probabilities:  Q_ic = w_c ((1−ε) T_ic + ε/C)"""
    C = logp.shape[1]
    if opts.probs:
        Q = _smoothed(target, opts, C)
        Q = Q if w is None else Q * opmath(w)                             # Q = w ⊙ ((1−ε) T + ε/C)
        return -_sum(Q * logp, 1)                                         # −Σ_c Q_ic log p_ic
    eps = opts.label_smoothing
    keep, y0, a = ce_index_terms(target, w, opts.ignore_index, logp.dtype)   # (M,)
    loss = -(1 - eps) * a * _picked(logp, y0)                            # −(1−ε) a_i log p_{i,y_i}
    if eps:
        wlogp = logp if w is None else logp * opmath(w)                   # w_c log p_ic
        # (no classes: ε/C = ∞ times Σ = 0 is nan, as torch's, on every row)
        smooth = eps / C if C else math.inf
        loss = loss - smooth * (keep.to(logp.dtype) * _sum(wlogp, 1))     # − (ε/C) keep_i Σ_c w_c log p_ic
    # an ignored row is 0 even where its log p is not finite (0 · nan): torch skips it
    return loss.where(keep, 0.0) if C else loss


def _nonfinite(w) -> bool:
    """Has the class weight an infinite or nan value? Asked on the host for a CPU weight only (no
    device sync elsewhere: there the rearranged formula's ±∞ stand), not while compiling or under
    a torch.func transform (no single value)."""
    if w is None or w.device.type != "cpu" or torch.compiler.is_compiling() or is_functorch_wrapped(w):
        return False
    return not bool(torch.isfinite(w).all())


def ce_direction(logp, target, w, opts, inplace: bool = False, fast: bool = False):
    """R = ∂ℓ_i/∂X_i = P_i (Q_i 1) − Q_i   (M, C), P = exp(log p), and the kept rows (None for
    probabilities). For class indices, with c_i = (1−ε) a_i and s_i = (ε/C) keep_i, it is
        c_i (P_i − e_{y_i}) + s_i (P_i Σ_c w_c − w) = (c_i + s_i Σw) (P_i − e_{y_i}) + s_i (Σw e_{y_i} − w)
    with P_{i,y_i} − 1 taken as expm1(log p_{i,y_i}): no cancellation when p_{i,y_i} ≈ 1.
    ``inplace``: log p is a buffer the caller owns and nothing records this (a chunk's), so R
    overwrites it; the same equations, one in-place op each. ``fast``: nothing records this, but
    log p is kept (a saved tensor): R is a fresh P = exp(log p), then worked on in place."""
    C = logp.shape[1]
    if opts.probs:
        P = logp.exp()                                                    # P = softmax(X)    (M, C)
        Q = _smoothed(target, opts, C)
        Q = Q if w is None else Q * opmath(w)                             # Q = w ⊙ ((1−ε) T + ε/C)
        return P * _sum(Q, 1, keepdim=True) - Q, None                     # P ⊙ (Q 1) − Q
    eps = opts.label_smoothing
    keep, y0, a = ce_index_terms(target, w, opts.ignore_index, logp.dtype)
    if C == 0:                                                            # no classes: every row ignored
        return torch.zeros_like(logp), keep
    col = y0.unsqueeze(1)                                                 # (M, 1)
    if _nonfinite(w):
        # an infinite class weight: P (Q 1) − Q as written, torch's order (its log-softmax backward of
        # −Q), so that its ∞ − ∞ are nan where torch's are; the rearranged form would give ±∞ there
        # (ε/C) keep_i w_c (M, C): a product, 0·∞ = nan on an ignored row as in torch's backward of its
        # masked smoothing term; no term at all without smoothing
        Q = torch.zeros_like(logp) if not eps else (eps / C) * keep.to(logp.dtype).unsqueeze(1) * opmath(w)
        Q = Q.scatter_add(1, col, ((1 - eps) * a).unsqueeze(1))           # + (1−ε) a_i δ_{c,y_i}
        return logp.exp() * _sum(Q, 1, keepdim=True) - Q, keep            # P ⊙ (Q 1) − Q
    picked = torch.expm1(logp.gather(1, col))                             # p_{i,y_i} − 1      (M, 1)
    P = logp.exp_() if inplace else logp.exp()                            # P = softmax(X)    (M, C)
    inplace = inplace or fast                                             # P is this call's own buffer
    PmE = P.scatter_(1, col, picked) if inplace else P.scatter(1, col, picked)   # P − E_y     (M, C)
    c = ((1 - eps) * a).unsqueeze(1)                                      # c_i = (1−ε) a_i    (M, 1)
    if not eps:
        return (PmE.mul_(c) if inplace else c * PmE), keep                # c_i (P_i − e_{y_i})
    s = (eps / C) * keep.to(logp.dtype).unsqueeze(1)                      # s_i = (ε/C) keep_i (M, 1)
    wsum = C if w is None else _sum(opmath(w))                            # Σ_c w_c
    R = PmE.mul_(c + s * wsum) if inplace else (c + s * wsum) * PmE       # (c_i + s_i Σw)(P_i − e_{y_i})
    if w is None:
        R = R.sub_(s) if inplace else R - s                               # − s_i w   (w = 1)
    else:
        R = R.addcmul_(s, opmath(w), value=-1) if inplace else R - s * opmath(w)   # − s_i w
    sw = (s * wsum).expand(R.shape[0], 1)                                 # s_i Σw             (M, 1)
    R = R.scatter_add_(1, col, sw) if inplace else R.scatter_add(1, col, sw)   # + s_i Σw e_{y_i}
    return R, keep


def ce_chunk_fast(Z, y, w, opts, g, den, want_loss: bool):
    """The cross entropy of one chunk of logits Z (n, C) for class indices without smoothing, where
    nothing records it and Z is the caller's buffer (``ops.linear_cross_entropy``'s chunks):
    the losses ℓ_i = −a_i log p_{i,y_i} (``ce_losses``) and dZ = ĝ a_i (P_i − e_{y_i})
    (``ce_direction`` times ``ce_row_scale``), without forming log p, all in Z's buffer. With m the
    row max, e = e^{Z−m} and r = Σ_{j≠argmax} e_j, as ``log_softmax_rows``:
        log p_{i,y_i} = (Z − m)_{i,y_i} − log1p(r_i),    P_i = e_i / (1 + r_i)
        p_{i,y_i} − 1 = −r_i/(1 + r_i) where y_i is the argmax (no cancellation), else e_{i,y_i}/(1 + r_i) − 1
    four passes over the chunk (max, − m, exp, Σ) and one scaling, where log p, P and R take nine.
    ``g``: the incoming gradient (scalar, or (n,) for 'none'), None for the losses alone.
    Returns (ℓ (n,) or None, dZ (n, C) in Z's buffer or None)."""
    m, top = Z.max(1, keepdim=True)                                       # m, one argmax        (n, 1)
    Z = Z.sub_(m)                                                         # Z − m ≤ 0
    keep, y0, a = ce_index_terms(y, w, opts.ignore_index, Z.dtype)        # (n,)
    col = y0.unsqueeze(1)                                                 # (n, 1)
    z_y = Z.gather(1, col)                                                # (Z − m)_y            (n, 1)
    E = Z.exp_()                                                          # e                    (n, C)
    E.scatter_(1, top, 0.0)                                               # 0 at the argmax
    r = E.sum(1, keepdim=True) + (m - m)                                  # r (a row max ±inf, nan: nan)
    loss = None
    if want_loss:                                                         # −a_i log p_{i,y_i}; ignored: 0
        loss = (-a * (z_y - torch.log1p(r)).squeeze(1)).where(keep, 0.0)
    if g is None:
        return loss, None
    s = ce_row_scale(g, opts, den, keep) * a.unsqueeze(1)                 # ĝ a_i                (n, 1)
    inv = (1 + r).reciprocal_()                                           # 1/(1 + r)
    e_y = z_y.exp()                                                       # e_{y}
    pm1 = torch.where(col == top, -r * inv, e_y * inv - 1)                # p_y − 1
    dZ = E.mul_(s * inv)                                                  # ĝ a_i p_j, 0 at the argmax
    dZ.scatter_(1, top, s * inv)                                          # ĝ a_i p_argmax
    # (+ 0·ĝa·e_y: nan where torch's p_y·ĝa − ĝa is, for an infinite ĝa or a nan e_y)
    dZ.scatter_(1, col, torch.addcmul(s * pm1, s, e_y, value=0))          # ĝ a_i (p_y − 1)
    return loss, dZ


def ce_row_scale(g, opts, den, keep_rows):
    """ĝ per row (M, 1) or scalar; for index targets ignored rows get exactly 0 (torch's backward
    never touches them, even when den = 0 makes g/den infinite)."""
    s = _scale(opmath(g), opts.reduction, den)
    if keep_rows is not None and opts.reduction == "mean":
        s = torch.where(keep_rows, s, torch.zeros_like(s))               # ignored rows: 0
    return s if s.dim() == 0 else s.unsqueeze(1)                          # (M, 1) for 'none'


def nll_kernel(X, y, w, opts):
    """torch's nll_loss forward kernel on rows X (M, C), for the fast paths: the same −Σ a_i X_{i,y_i}
    (/ Σ a_i) in one pass. It refuses a class index outside [0, C) itself (the functionals then skip
    their own host check): its IndexError is completed with the class range and the shape."""
    try:
        return TF.nll_loss(X, y, None if w is None else opmath(w).reshape(-1),
                           ignore_index=opts.ignore_index, reduction=opts.reduction)
    except IndexError as e:
        raise IndexError(f"{e} (target holds class indices in [0, {X.shape[1]}), ignore_index "
                         f"{opts.ignore_index}, for rows of shape {list(X.shape)})") from None


def fast_index_scale(g, col, C, opts):
    """ĝ for index targets without a class weight, where nothing records it: (M, 1), 0 exactly on
    ignored rows (g/den, g or g_i elsewhere; den = the kept rows), and y with ignored rows sent to
    class 0. ``col``: y as (M, 1), its kept indices in [0, C) (the forward's kernel checked them)."""
    keep = col != opts.ignore_index                                       # (M, 1)
    y0 = col.clamp(0, C - 1)                                              # ignored rows: a class in range
    if opts.reduction == "mean":
        g = g / keep.sum()                                                # g / den
    elif opts.reduction == "none":
        g = g.unsqueeze(1)                                                # g_i      (M, 1)
    return torch.where(keep, g, 0.0), y0                                  # ĝ, 0 on ignored rows


class CrossEntropyFn(HandFunction):
    r"""ℓ_i = −Σ_c Q_ic log softmax(X)_ic, reduced — equals
    ``torch.nn.functional.cross_entropy(x, target, weight, ignore_index=…, reduction=…,
    label_smoothing=ε)`` on rows: log-softmax and NLL in one Function.

    Shapes: X (M, C); target y (M,) int64 class indices or T (M, C) class probabilities;
    w (C,) or None → ℓ (M,) for 'none', a scalar otherwise. Q (M, C) is the weighted, smoothed
    target distribution:
        class indices:        Q_ic = (1−ε) a_i δ_{c,y_i} + (ε/C) keep_i w_c,  a_i = w_{y_i} keep_i
        class probabilities:  Q_ic = w_c ((1−ε) T_ic + ε/C)
    'mean' divides by Σ_i a_i (index targets: torch's weighted mean, nan when every row is
    ignored) or by M (probabilities). Stable forward: ``ops.softmax.log_softmax_rows``.
    Backward, P = softmax(X) = exp(log p), ĝ per row (g/den, g, or G_i; 0 on ignored rows):
        ∂L/∂X = ĝ ⊙ (P ⊙ (Q 1) − Q)                       (M, C)   [= ĝ (P − Y) when Q = Y, one-hot]
        ∂L/∂T = −(1−ε) ĝ ⊙ (log P ⊙ w)                    (M, C)   (probability targets)
        ∂L/∂w = −Σ_i ĝ_i ((1−ε) T_i + ε/C) ⊙ log p_i      (C,)     (probability targets; torch
                                                                    refuses a w with grad for indices)
    The second output, log p, is returned so that it can be saved and stay connected to X: in
    the double backward its gradient G_lp arrives here and adds the log-softmax backward
        ∂L/∂X += G_lp − P ⊙ (G_lp 1).
    Forward mode, tangents Ẋ, Ṫ, ẇ:
        ℓ̇_i = (P_i (Q_i 1) − Q_i) · Ẋ_i − Σ_c (Q̇_ic) log p_ic,  Q̇ = (1−ε) Ṫ ⊙ w + ((1−ε) T + ε/C) ⊙ ẇ
        (log p)˙ = Ẋ − (P ⊙ Ẋ) 1
    Saves log p (M, C) (float32 for half inputs), the target and w.
    Derivation: docs/derivation.md#cross-entropy
    """

    @staticmethod
    def forward(x, target, w, opts):
        if fast_path() and not opts.probs and not opts.label_smoothing and x.numel():
            # Nothing records this: torch's forward kernels (not backward ones) compute the same
            # log p and −Σ a_i log p_{i,y_i} / den in two passes; the expressions below are the
            # same forward, taken under the torch.func transforms (tests/test_fast_paths.py).
            logp = torch.log_softmax(opmath(x), 1)                        # log p       (M, C)
            return _to(nll_kernel(logp, target, w, opts), x.dtype), logp
        logp = log_softmax_rows(opmath(x))                                # log p       (M, C)
        loss = ce_losses(logp, target, w, opts)                           # ℓ           (M,)
        den = ce_denominator(target, w, opts, logp.dtype)
        return reduce_loss(loss, opts.reduction, den).to(x.dtype), logp

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, w, opts = inputs
        ctx.opts, ctx.x_dtype, ctx.t_dtype = opts, x.dtype, target.dtype
        ctx.w_dtype = None if w is None else w.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], target, w)
        if forward_ad_active() or functorch_transforms_active():  # only where a jvp can be asked for
            ctx.save_for_forward(output[1], target, w)

    @staticmethod
    def backward(ctx, g, g_logp):
        # the saved tensors are unpacked once (non-reentrant checkpointing allows no more)
        opts = ctx.opts
        logp, target, w = ctx.saved_tensors
        need_x = ctx.needs_input_grad[0]
        need_t, need_w = (ctx.needs_input_grad[1] and opts.probs), (ctx.needs_input_grad[2] and opts.probs)
        gx = gt = gw = None
        fast = g_logp is None and fast_path(g)                           # R and ∂L/∂X: one buffer
        if g is not None and need_x and fast and not opts.probs and logp.shape[1] and (
                not opts.label_smoothing or not _nonfinite(w)) and kernels.usable(logp, g, w):
            # the compiled kernel (kernels/losses.py): ĝ ⊙ (P ⊙ (Q 1) − Q), one row pass, p_y − 1 as
            # −Σ_{j≠y} p_j (torch's log p, as below); smoothing too, for a finite class weight
            gx = torch.empty_like(logp)                                   # (M, C)
            y = target if target.is_contiguous() else target.contiguous()
            kernels.load("losses").cross_entropy_grad(*kernels.arrays(logp, y, w, g), opts.ignore_index,
                                                      opts.reduction == "mean", float(opts.label_smoothing), gx.numpy())
        elif g is not None and need_x and fast and not opts.probs and not opts.label_smoothing and logp.shape[1]:
            # log p is torch's here (the forward's kernel), whose log p_y rounds at the scale of
            # 1 where p_y ≈ 1, so p_y − 1 is taken as −Σ_{j≠y} p_j (the same number, Σ p = 1):
            # a sum of small terms, no cancellation, instead of expm1(log p_y).
            if w is None:
                s, col = fast_index_scale(opmath(g), target.unsqueeze(1), logp.shape[1], opts)   # ĝ (a_i = keep_i), y  (M, 1)
            else:
                keep, y0, a = ce_index_terms(target, w, opts.ignore_index, logp.dtype)   # (M,)
                col = y0.unsqueeze(1)                                     # (M, 1)
                s = ce_row_scale(g, opts, _sum(a), keep) * a.unsqueeze(1)  # ĝ a_i   (M, 1)
            # (+ 0·p_y·ĝa: nan where torch's p_y·ĝa − ĝa is, for a nan p_y (an infinite logit) or an
            # infinite ĝa (class weight): the undefined values stay undefined, as torch's)
            P = logp.exp()                                                # P                  (M, C)
            p_y = P.gather(1, col)                                        # p_y                (M, 1)
            P.scatter_(1, col, 0.0)                                       # P, 0 at y
            P.scatter_(1, col, P.sum(1, keepdim=True).neg_().addcmul_(p_y, s, value=0))   # P − E_y
            gx = P.mul_(s)                                                # ĝ a_i (P_i − e_{y_i})
        elif g is not None and need_x:
            R, keep = ce_direction(logp, target, w, opts, fast=fast)      # P (Q 1) − Q      (M, C)
            den = ce_denominator(target, w, opts, logp.dtype)
            s = ce_row_scale(g, opts, den, keep)
            gx = R.mul_(s) if fast else s * R                             # ĝ ⊙ (P (Q 1) − Q)
        if g is not None and (need_t or need_w):
            s = ce_row_scale(g, opts, logp.shape[0], None)                # ĝ
            if need_t:
                wlogp = logp if w is None else logp * opmath(w)           # log P ⊙ w
                gt = (-(1 - opts.label_smoothing) * s * wlogp).to(ctx.t_dtype)   # −(1−ε) ĝ ⊙ log P ⊙ w
            if need_w:
                S = _smoothed(target, opts, logp.shape[1])                # (1−ε) T + ε/C
                gw = (-_sum(s * S * logp, 0)).to(ctx.w_dtype)                 # −Σ_i ĝ_i S_i ⊙ log p_i
        if g_logp is not None and need_x:
            back = log_softmax_vjp(logp, opmath(g_logp), 1)               # G_lp − P ⊙ (G_lp 1)
            gx = back if gx is None else gx + back
        if gx is not None:
            gx = _to(gx, ctx.x_dtype)
        return gx, gt, gw, None

    @staticmethod
    def jvp(ctx, dx, dt, dw, _opts):
        opts = ctx.opts
        logp, target, w = ctx.saved_tensors
        dloss = torch.zeros_like(logp[:, 0])                              # (M,)
        dlogp = torch.zeros_like(logp)                                    # (M, C)
        den = ce_denominator(target, w, opts, logp.dtype)
        if dx is not None:
            R, _ = ce_direction(logp, target, w, opts)
            dX = opmath(dx)
            dloss = dloss + _sum(R * dX, 1)                                   # (P (Q 1) − Q) · Ẋ
            dlogp = log_softmax_jvp(logp, dX, 1)                              # Ẋ − (P ⊙ Ẋ) 1
        if opts.probs and (dt is not None or dw is not None):
            dQ = 0
            if dt is not None:
                dQ = (1 - opts.label_smoothing) * opmath(dt)                  # (1−ε) Ṫ
                dQ = dQ if w is None else dQ * opmath(w)                      # ⊙ w
            if dw is not None:
                dQ = dQ + _smoothed(target, opts, logp.shape[1]) * opmath(dw)     # + ((1−ε) T + ε/C) ⊙ ẇ
            dloss = dloss - _sum(dQ * logp, 1)                                # − Q̇ · log p
        return reduce_loss(dloss, opts.reduction, den).to(ctx.x_dtype), dlogp


class NLLLossFn(HandFunction):
    r"""ℓ_i = −w_{y_i} X_{i, y_i} (0 where y_i = ignore_index), reduced — equals
    ``torch.nn.functional.nll_loss(x, y, weight, ignore_index=…, reduction=…)`` on rows.

    Shapes: X (M, C) log-probabilities, y (M,) int64, w (C,) or None → ℓ (M,) or a scalar.
    'mean' divides by Σ_i a_i, a_i = w_{y_i} [y_i ≠ ignore_index] (torch's weighted mean;
    all rows ignored gives 0/0 = nan, as torch does).
    Backward, ĝ per row (g/Σa, g or G_i; 0 on ignored rows), E_y (M, C) the one-hot rows of y:
        ∂L/∂X = −(ĝ ⊙ a) ⊙ E_y                            (M, C)
    Forward mode: ℓ̇_i = −a_i Ẋ_{i, y_i}, reduced as ℓ.
    The loss is linear in X, so nothing of X is saved: only y and w.
    Derivation: docs/derivation.md#negative-log-likelihood
    """

    @staticmethod
    def forward(x, y, w, opts):
        if fast_path() and x.numel():                                     # torch's forward kernel: the same sum
            return _to(nll_kernel(opmath(x), y, w, opts), x.dtype)
        X = opmath(x)                                                     # (M, C)
        keep, y0, a = ce_index_terms(y, w, opts.ignore_index, X.dtype)    # (M,)
        picked = _picked(X, y0)                                           # X_{i, y_i}      (M,)
        loss = (-a * picked).where(keep, 0.0)                             # ℓ_i = −a_i X_{i, y_i}; ignored: 0 exactly
        return reduce_loss(loss, opts.reduction, _sum(a)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, opts = inputs
        ctx.opts = opts
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(y, w)
        if forward_ad_active() or functorch_transforms_active():  # only where a jvp can be asked for
            ctx.save_for_forward(y, w)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        y, w = ctx.saved_tensors
        if ctx.x_shape[1] and fast_path(g) and g.dtype == ctx.x_dtype and kernels.usable(g, w):
            # the compiled kernel (kernels/losses.py): −ĝ_i a_i at (i, y_i) into zeros, one pass over y
            gx = torch.zeros(ctx.x_shape, dtype=g.dtype)                  # (M, C)
            y = y if y.is_contiguous() else y.contiguous()
            kernels.load("losses").nll_grad_(*kernels.arrays(y, w, g), ctx.opts.ignore_index,
                                             ctx.opts.reduction == "mean", gx.numpy())
            return gx, None, None, None                                   # −(ĝ ⊙ a) ⊙ E_y
        if w is None and ctx.x_shape[1] and fast_path(g):                # a_i = keep_i; in place on fresh buffers
            sa, col = fast_index_scale(opmath(g), y.unsqueeze(1), ctx.x_shape[1], ctx.opts)   # ĝ ⊙ a, y   (M, 1)
            gx = sa.new_zeros(ctx.x_shape).scatter_(1, col, sa.neg_())    # −(ĝ ⊙ a) ⊙ E_y
            return _to(gx, ctx.x_dtype), None, None, None
        keep, y0, a = ce_index_terms(y, w, ctx.opts.ignore_index, opmath(g).dtype)   # (M,)
        sa = ce_row_scale(g, ctx.opts, _sum(a), keep) * a.unsqueeze(1)    # ĝ ⊙ a   (M, 1)
        zeros = sa.new_zeros(ctx.x_shape)                                 # (M, C)
        scatter = zeros.scatter_ if fast_path(g) else zeros.scatter       # in place on the fresh zeros
        gx = scatter(1, y0.unsqueeze(1), -sa) if ctx.x_shape[1] else zeros   # −(ĝ ⊙ a) ⊙ E_y
        return gx.to(ctx.x_dtype), None, None, None

    @staticmethod
    def jvp(ctx, dx, _y, _w, _opts):
        y, w = ctx.saved_tensors
        dX = opmath(dx)
        keep, y0, a = ce_index_terms(y, w, ctx.opts.ignore_index, dX.dtype)
        dloss = -a * _picked(dX, y0)                                      # ℓ̇_i = −a_i Ẋ_{i, y_i}
        return reduce_loss(dloss, ctx.opts.reduction, _sum(a)).to(ctx.x_dtype)
