"""Binary cross entropy with logits, in the stable softplus form.
Derivation: docs/derivation.md#binary-cross-entropy-with-logits.
"""
from __future__ import annotations

import torch

import torch.nn.functional as TF

from .._compat import forward_ad_active, functorch_transforms_active
from ._function import HandFunction, fast_path, opmath
from .losses import _scale, reduce_loss


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
        if fast_path() and x.numel():                                     # torch's forward: the same stable form
            return TF.binary_cross_entropy_with_logits(
                opmath(x), opmath(t), opmath(w), reduction=reduction, pos_weight=opmath(p)).to(x.dtype)
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
        return reduce_loss(loss, reduction, loss.numel()).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, t, w, p, reduction = inputs
        ctx.reduction, ctx.dtypes = reduction, (x.dtype, t.dtype)
        ctx.save_for_backward(x, t, w, p)
        if forward_ad_active() or functorch_transforms_active():  # only where a jvp can be asked for
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
        G = opmath(g)
        x, t, w, p = ctx.saved_tensors
        if need_x and not need_t and p is None and fast_path(g):          # σ(X) − T, ⊙ w, ⊙ ĝ: one buffer
            dX = torch.sigmoid(opmath(x)).sub_(opmath(t))                 # σ(X) − T
            if w is not None:
                dX.mul_(opmath(w))                                        # ⊙ w
            dX.mul_(G)                                                    # ĝ ⊙ ∂ℓ/∂X
            if ctx.reduction == "mean":
                dX.div_(x.numel())                                        # / |S| last, in torch's order
            return dX.to(ctx.dtypes[0]), None, None, None, None
        dX, dT, n = BCEWithLogitsFn._partials(ctx, need_x, need_t)
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
        return reduce_loss(dl, ctx.reduction, n).to(ctx.dtypes[0])
