"""The losses: squared error (``mse_loss``, the seed's ``half_squared_error``), softmax cross
entropy, negative log-likelihood and binary cross entropy with logits.
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

from dataclasses import dataclass

import torch

from ._function import HandFunction, opmath
from ._function import accurate_sum as _sum


def _scale(g: torch.Tensor, reduction: str, den) -> torch.Tensor:
    """ĝ: the incoming gradient as it multiplies each element's derivative."""
    return g / den if reduction == "mean" else g           # g/den ('mean'), g ('sum'), G ('none')


def _reduce(loss: torch.Tensor, reduction: str, den) -> torch.Tensor:
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
        D, c, den = _se_terms(x, y, w, kind)                    # D (S)
        E = c * D * D if w is None else c * opmath(w) * D * D   # E = c W ⊙ D²      (S)
        if reduction == "none":
            E = _se_none_view(E, kind)
        return _reduce(E, reduction, den).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, reduction, kind = inputs
        ctx.reduction, ctx.kind = reduction, kind
        ctx.shapes = (x.shape, y.shape, None if w is None else w.shape)
        ctx.dtypes = (x.dtype, y.dtype, None if w is None else w.dtype)
        ctx.save_for_backward(x, y, w)
        ctx.save_for_forward(x, y, w)

    @staticmethod
    def backward(ctx, g):
        x, y, w = ctx.saved_tensors
        D, c, den = _se_terms(x, y, w, ctx.kind)                   # D = X − Y          (S)
        g_hat = _se_expand(_scale(opmath(g), ctx.reduction, den), ctx.kind)   # ĝ     (S or scalar)
        gx = gy = gw = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            GD = 2 * c * g_hat * D if w is None else 2 * c * g_hat * opmath(w) * D  # 2c ĝ ⊙ W ⊙ D
            GD = GD.expand(D.shape)
            if ctx.needs_input_grad[0]:
                gx = GD.sum_to_size(ctx.shapes[0]).to(ctx.dtypes[0])       # ∂L/∂X =  2c ĝ W D
            if ctx.needs_input_grad[1]:
                gy = (-GD).sum_to_size(ctx.shapes[1]).to(ctx.dtypes[1])    # ∂L/∂Y = −2c ĝ W D
        if w is not None and ctx.needs_input_grad[2]:
            GW = (c * g_hat * D * D).expand(D.shape).sum_to_size(ctx.shapes[2])  # c ĝ ⊙ D²
            if ctx.reduction == "mean":
                L = _sum(c * opmath(w) * D * D) / den                      # L = Σ W D² / ΣW
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
        dL = _reduce(dE, ctx.reduction, den)                               # Σ Ė (/ den)
        if w is not None and dw is not None and ctx.reduction == "mean":
            L = _sum(c * opmath(w) * D * D) / den
            dL = dL - L * _sum(opmath(dw)) / den                           # − L ΣẆ / ΣW
        return dL.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Softmax cross entropy and negative log-likelihood (rows X (M, C), class dim last)
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CrossEntropyOptions:
    """The non-tensor options of ``CrossEntropyFn`` (STYLE.md §5)."""

    reduction: str = "mean"
    ignore_index: int = -100
    label_smoothing: float = 0.0
    probs: bool = False           # target holds class probabilities T (M, C), not indices y (M,)


def _index_terms(y, w, ignore_index, dtype):
    """For class-index targets: the kept mask, y with ignored rows sent to class 0 (safe to
    gather), and each row's weight a_i = w_{y_i} [y_i ≠ ignore_index]."""
    keep = y != ignore_index                                              # (M,)
    y0 = y.where(keep, 0)                                                 # (M,)
    a = keep.to(dtype) if w is None else opmath(w)[y0] * keep             # a_i = w_{y_i} · keep_i  (M,)
    return keep, y0, a


def _log_softmax(X):
    """log p = Z − log Σ_c e^{Z_c}, Z = X − max_c X (log-sum-exp: no e^{X} overflows).
    The max's own term is exactly e^0 = 1, so Σ_c e^{Z_c} = 1 + r with r = Σ_{Z_c<0} e^{Z_c} + (ties − 1)
    and log Σ = log1p(r): accurate even when one class dominates (Σ ≈ 1), where log(Σ) would
    lose the digits of r to the rounding of 1 + r."""
    Z = X - X.amax(dim=1, keepdim=True)                                   # Z ≤ 0, max_c Z = 0   (M, C)
    top = Z == 0                                                          # the max (and its ties)
    r = _sum(torch.where(top, torch.zeros_like(Z), Z.exp()), 1, keepdim=True)
    r = r + (top.sum(1, keepdim=True) - 1).to(Z.dtype)                    # r = Σ_c e^{Z_c} − 1    (M, 1)
    return Z - torch.log1p(r)                                             # log p = Z − log(1 + r)


def _ce_index(logp, y, w, opts):
    """Class-index targets: ℓ_i = −(1−ε) a_i log p_{i,y_i} − (ε/C) keep_i Σ_c w_c log p_ic
    (= −Σ_c Q_ic log p_ic with Q_ic = (1−ε) a_i δ_{c,y_i} + (ε/C) keep_i w_c), the mean's
    denominator Σ_i a_i (torch's weighted mean), and the kept rows."""
    C = logp.shape[1]
    eps = opts.label_smoothing
    keep, y0, a = _index_terms(y, w, opts.ignore_index, logp.dtype)       # (M,)
    loss = -(1 - eps) * a * logp.gather(1, y0.unsqueeze(1)).squeeze(1)    # −(1−ε) a_i log p_{i,y_i}
    if eps:
        wlogp = logp if w is None else logp * opmath(w)                   # w_c log p_ic
        loss = loss - (eps / C) * keep.to(logp.dtype) * _sum(wlogp, 1)    # − (ε/C) keep_i Σ_c w_c log p_ic
    return loss, _sum(a), keep, y0, a


def _ce_index_direction(logp, P, y, w, opts):
    """∂ℓ_i/∂X_i = P_i (Q_i 1) − Q_i for class indices, written as
        (1−ε) a_i (P_i − e_{y_i}) + (ε/C) keep_i (P_i Σ_c w_c − w)
    with P_{i,y_i} − 1 taken as expm1(log p_{i,y_i}): no cancellation when p_{i,y_i} ≈ 1."""
    C = logp.shape[1]
    eps = opts.label_smoothing
    keep, y0, a = _index_terms(y, w, opts.ignore_index, logp.dtype)
    col = y0.unsqueeze(1)                                                 # (M, 1)
    PmE = P.scatter(1, col, torch.expm1(logp.gather(1, col)))             # P − E_y            (M, C)
    R = ((1 - eps) * a).unsqueeze(1) * PmE                                # (1−ε) a_i (P_i − e_{y_i})
    if eps:
        wsum = C if w is None else _sum(opmath(w))                        # Σ_c w_c
        wc = 1 if w is None else opmath(w)                                # w   (C,)
        R = R + (eps / C) * keep.to(logp.dtype).unsqueeze(1) * (P * wsum - wc)   # + (ε/C) keep_i (P_i Σw − w)
    return R, _sum(a), keep


def _ce_probs_target(T, w, opts, C):
    """Class-probability targets: Q = w ⊙ ((1−ε) T + ε/C)   (M, C)."""
    eps = opts.label_smoothing
    Q = (1 - eps) * opmath(T) + eps / C if eps else opmath(T)             # (1−ε) T + ε/C
    return Q if w is None else Q * opmath(w)                              # ⊙ w


def _row_scale(g, opts, den, keep_rows):
    """ĝ per row (M, 1) or scalar; for index targets ignored rows get exactly 0 (torch's backward
    never touches them, even when den = 0 makes g/den infinite)."""
    s = _scale(opmath(g), opts.reduction, den)
    if keep_rows is not None and opts.reduction == "mean":
        s = torch.where(keep_rows, s, torch.zeros_like(s))               # ignored rows: 0
    return s if s.dim() == 0 else s.unsqueeze(1)                          # (M, 1) for 'none'


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
    ignored) or by M (probabilities). Stable forward: see ``_log_softmax`` (log-sum-exp).
    Backward, P = softmax(X) = exp(log p), ĝ per row (g/den, g, or G_i; 0 on ignored rows):
        ∂L/∂X = ĝ ⊙ (P ⊙ (Q 1) − Q)                       (M, C)   [= ĝ (P − Y) when Q = Y, one-hot]
        ∂L/∂T = −(1−ε) ĝ ⊙ (log P ⊙ w)                    (M, C)   (probability targets)
    The second output, log p, is returned so that it can be saved and stay connected to X: in
    the double backward its gradient G_lp arrives here and adds the log-softmax backward
        ∂L/∂X += G_lp − P ⊙ (G_lp 1).
    Forward mode, tangents Ẋ, Ṫ:
        ℓ̇_i = (P_i (Q_i 1) − Q_i) · Ẋ_i − (1−ε) Σ_c w_c Ṫ_ic log p_ic   (reduced as ℓ)
        (log p)˙ = Ẋ − (P ⊙ Ẋ) 1
    Saves log p (M, C) (float32 for half inputs), the target and w.
    Derivation: docs/derivation.md#cross-entropy
    """

    @staticmethod
    def forward(x, target, w, opts):
        logp = _log_softmax(opmath(x))                                    # log p       (M, C)
        if opts.probs:
            Q = _ce_probs_target(target, w, opts, logp.shape[1])          # (M, C)
            loss, den = -_sum(Q * logp, 1), logp.shape[0]                 # ℓ_i = −Σ_c Q_ic log p_ic
        else:
            loss, den, *_ = _ce_index(logp, target, w, opts)              # (M,)
        return _reduce(loss, opts.reduction, den).to(x.dtype), logp

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, target, w, opts = inputs
        ctx.opts, ctx.x_dtype, ctx.t_dtype = opts, x.dtype, target.dtype
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(output[1], target, w)
        ctx.save_for_forward(output[1], target, w)

    @staticmethod
    def _direction(ctx, logp, target, w):
        """R = P ⊙ (Q 1) − Q (M, C), the mean's denominator and the kept rows (None for probs).
        Takes the saved tensors from its caller: non-reentrant checkpointing allows them to be
        unpacked only once per backward."""
        P = logp.exp()                                                    # P = softmax(X)    (M, C)
        if ctx.opts.probs:
            Q = _ce_probs_target(target, w, ctx.opts, logp.shape[1])
            return P * _sum(Q, 1, keepdim=True) - Q, logp.shape[0], None      # P ⊙ (Q 1) − Q
        return _ce_index_direction(logp, P, target, w, ctx.opts)

    @staticmethod
    def backward(ctx, g, g_logp):
        opts = ctx.opts
        logp, target, w = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1] and opts.probs
        gx = gt = None
        if g is not None and need_x:
            R, den, keep = CrossEntropyFn._direction(ctx, logp, target, w)
            gx = _row_scale(g, opts, den, keep) * R                       # ĝ ⊙ (P (Q 1) − Q)
        if g is not None and need_t:
            s = _row_scale(g, opts, logp.shape[0], None)                  # ĝ
            wlogp = logp if w is None else logp * opmath(w)               # log P ⊙ w
            gt = (-(1 - opts.label_smoothing) * s * wlogp).to(ctx.t_dtype)   # −(1−ε) ĝ ⊙ log P ⊙ w
        if g_logp is not None and ctx.needs_input_grad[0]:
            G = opmath(g_logp)
            back = G - logp.exp() * _sum(G, 1, keepdim=True)                  # G_lp − P ⊙ (G_lp 1)
            gx = back if gx is None else gx + back
        if gx is not None:
            gx = gx.to(ctx.x_dtype)
        return gx, gt, None, None

    @staticmethod
    def jvp(ctx, dx, dt, _w, _opts):
        opts = ctx.opts
        logp, target, w = ctx.saved_tensors
        dloss = torch.zeros_like(logp[:, 0])                              # (M,)
        dlogp = torch.zeros_like(logp)                                    # (M, C)
        den = logp.shape[0]
        if dx is not None:
            R, den, _ = CrossEntropyFn._direction(ctx, logp, target, w)
            dX = opmath(dx)
            dloss = dloss + _sum(R * dX, 1)                                   # (P (Q 1) − Q) · Ẋ
            dlogp = dX - _sum(logp.exp() * dX, 1, keepdim=True)               # Ẋ − (P ⊙ Ẋ) 1
        elif not opts.probs:
            den = _sum(_index_terms(target, w, opts.ignore_index, logp.dtype)[2])
        if dt is not None and opts.probs:
            dQ = (1 - opts.label_smoothing) * opmath(dt)                  # Q̇ = (1−ε) Ṫ ⊙ w
            if w is not None:
                dQ = dQ * opmath(w)
            dloss = dloss - _sum(dQ * logp, 1)                                # − Q̇ · log p
        return _reduce(dloss, opts.reduction, den).to(ctx.x_dtype), dlogp


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
    def forward(x, y, w, reduction, ignore_index):
        X = opmath(x)                                                     # (M, C)
        keep, y0, a = _index_terms(y, w, ignore_index, X.dtype)           # (M,)
        picked = X.gather(1, y0.unsqueeze(1)).squeeze(1)                  # X_{i, y_i}      (M,)
        loss = -a * picked                                                # ℓ_i = −a_i X_{i, y_i}
        return _reduce(loss, reduction, _sum(a)).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, y, w, reduction, ignore_index = inputs
        ctx.reduction, ctx.ignore_index = reduction, ignore_index
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(y, w)
        ctx.save_for_forward(y, w)

    @staticmethod
    def _terms(ctx, g):
        y, w = ctx.saved_tensors
        dtype = opmath(g).dtype
        keep, y0, a = _index_terms(y, w, ctx.ignore_index, dtype)         # (M,)
        opts = CrossEntropyOptions(ctx.reduction, ctx.ignore_index)
        s = _row_scale(g, opts, _sum(a), keep)                            # ĝ  (M, 1) or scalar
        return y0, s * a.unsqueeze(1)                                     # ĝ ⊙ a   (M, 1)

    @staticmethod
    def backward(ctx, g):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        y0, sa = NLLLossFn._terms(ctx, g)                                 # (M,), (M, 1)
        zeros = sa.new_zeros(ctx.x_shape)                                 # (M, C)
        gx = zeros.scatter(1, y0.unsqueeze(1), -sa)                       # −(ĝ ⊙ a) ⊙ E_y
        return gx.to(ctx.x_dtype), None, None, None, None

    @staticmethod
    def jvp(ctx, dx, _y, _w, _r, _i):
        y, w = ctx.saved_tensors
        dX = opmath(dx)
        keep, y0, a = _index_terms(y, w, ctx.ignore_index, dX.dtype)
        dloss = -a * dX.gather(1, y0.unsqueeze(1)).squeeze(1)             # ℓ̇_i = −a_i Ẋ_{i, y_i}
        return _reduce(dloss, ctx.reduction, _sum(a)).to(ctx.x_dtype)


# ---------------------------------------------------------------------------------------------
# Binary cross entropy with logits
# ---------------------------------------------------------------------------------------------

def _softplus(X):
    """softplus(X) = log(1 + e^{X}), stable: max(X, 0) + log1p(e^{−|X|})."""
    return torch.clamp_min(X, 0) + torch.log1p(torch.exp(-X.abs()))


class BCEWithLogitsFn(HandFunction):
    r"""ℓ = −w ⊙ [p ⊙ T ⊙ log σ(X) + (1 − T) ⊙ log(1 − σ(X))], reduced — equals
    ``torch.nn.functional.binary_cross_entropy_with_logits(x, t, weight=w, pos_weight=p)``.

    Stable form: log σ(X) = −softplus(−X), log(1 − σ(X)) = −softplus(X), and with
    softplus(±X) = max(±X, 0) + log1p(e^{−|X|}):
        ℓ = w ⊙ [(1 − T) ⊙ max(X, 0) + p ⊙ T ⊙ max(−X, 0) + λ ⊙ log1p(e^{−|X|})],  λ = 1 + (p − 1) ⊙ T
    Every term is ≥ 0 (T ∈ [0, 1], p ≥ 0), so nothing cancels and e^{X} never overflows.
    Shapes: X, T (S); w, p None or broadcastable to S → ℓ (S) or a scalar ('mean' over |S|).
    Backward, ĝ = g/|S|, g or G:
        ∂L/∂X = ĝ ⊙ w ⊙ (λ ⊙ σ(X) − p ⊙ T)                            (S)   [= ĝ w (σ(X) − T) when p = 1]
        ∂L/∂T = ĝ ⊙ w ⊙ (p ⊙ softplus(−X) − softplus(X))              (S)   [= −ĝ w X when p = 1]
    (torch does not differentiate w or p; neither does this: the functional refuses them with
    requires_grad, as torch does.)
    Forward mode: ℓ̇ = ∂ℓ/∂X ⊙ Ẋ + ∂ℓ/∂T ⊙ Ṫ (the two bracketed factors above), reduced as ℓ.
    Saves X, T, w, p.
    Derivation: docs/derivation.md#binary-cross-entropy-with-logits
    """

    @staticmethod
    def forward(x, t, w, p, reduction):
        X, T = opmath(x), opmath(t)                                       # (S)
        log1p_term = torch.log1p(torch.exp(-X.abs()))                     # log1p(e^{−|X|})
        if p is None:
            loss = (1 - T) * torch.clamp_min(X, 0) + T * torch.clamp_min(-X, 0) + log1p_term
        else:
            P = opmath(p)
            lam = 1 + (P - 1) * T                                         # λ = 1 + (p − 1) T
            loss = (1 - T) * torch.clamp_min(X, 0) + P * T * torch.clamp_min(-X, 0) + lam * log1p_term
        if w is not None:
            loss = loss * opmath(w)                                       # ⊙ w
        return _reduce(loss, reduction, loss.numel()).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w, p, reduction = inputs
        ctx.reduction, ctx.dtypes = reduction, (x.dtype, t.dtype)
        ctx.save_for_backward(x, t, w, p)
        ctx.save_for_forward(x, t, w, p)

    @staticmethod
    def _partials(ctx, need_x, need_t):
        """∂ℓ/∂X and ∂ℓ/∂T elementwise (before ĝ), as far as asked."""
        x, t, w, p = ctx.saved_tensors
        X, T = opmath(x), opmath(t)
        dX = dT = None
        if need_x:
            if p is None:
                dX = torch.sigmoid(X) - T                                 # σ(X) − T
            else:
                PT = opmath(p) * T                                        # p T
                dX = (PT + 1 - T) * torch.sigmoid(X) - PT                 # λ σ(X) − p T,  λ = p T + 1 − T
        if need_t:
            dT = -X if p is None else opmath(p) * _softplus(-X) - _softplus(X)   # p softplus(−X) − softplus(X)
        if w is not None:
            W = opmath(w)
            dX = None if dX is None else dX * W                           # ⊙ w
            dT = None if dT is None else dT * W
        return dX, dT, X.numel()

    @staticmethod
    def backward(ctx, g):
        need_x, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_x or need_t):
            return None, None, None, None, None
        dX, dT, n = BCEWithLogitsFn._partials(ctx, need_x, need_t)
        G = opmath(g)
        # ĝ ⊙ ∂ℓ/∂X, ĝ ⊙ ∂ℓ/∂T, dividing by |S| last ('mean'), in torch's order of rounding
        gx = None if dX is None else _scale(G * dX, ctx.reduction, n).to(ctx.dtypes[0])
        gt = None if dT is None else _scale(G * dT, ctx.reduction, n).to(ctx.dtypes[1])
        return gx, gt, None, None, None

    @staticmethod
    def jvp(ctx, dx, dt, _w, _p, _r):
        dX, dT, n = BCEWithLogitsFn._partials(ctx, dx is not None, dt is not None)
        dl = 0
        if dx is not None:
            dl = dl + dX * opmath(dx)                                     # ∂ℓ/∂X ⊙ Ẋ
        if dt is not None:
            dl = dl + dT * opmath(dt)                                     # ∂ℓ/∂T ⊙ Ṫ
        return _reduce(dl, ctx.reduction, n).to(ctx.dtypes[0])
