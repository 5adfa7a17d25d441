"""Layer normalisation over the trailing dims. Derivation: docs/derivation.md#layer-normalisation.

The K trailing dims given by ``normalized_shape`` are one row of D = their product elements;
every leading dim is batch (N = the product of the rest). ``mean`` and ``1`` below act along
the row: mean(A) = (1/D) Σ_j A_j, broadcast back over the row.

The row statistics μ and rstd are recomputed in backward and jvp from the saved X, not kept
from the forward. Why: backward must itself be differentiable (gradgradcheck), and ∂L/∂X
depends on X through μ and rstd as well as through x̂; a μ or rstd returned as a
non-differentiable output would cut that dependence out of the double-backward graph. The cost
is two more row reductions over X (μ, var), next to the two the backward does anyway, and X is
needed for x̂ regardless, so nothing extra is held in memory. The fast path (grad mode off:
nothing differentiates the backward) takes the forward's μ and rstd, returned as
non-differentiable outputs, instead.
"""
from __future__ import annotations

import torch

from ._function import HandFunction, fast_path, opmath
from .normalize import (Norm, cast, nan_where_overflow, native_forward_ok, normalize as normalize_over, normalize_dx, normalize_grads_fast, one_dtype,
                        save_for_norm_backward)


def normalize(X: torch.Tensor, K: int, eps: float, fast: bool = False):
    """x̂ = (X − μ)·rstd with μ = mean(X), rstd = 1/√(var(X) + eps) over the last K dims.
    Returns (x̂ (*, row), rstd (*, 1…1), μ (*, 1…1)): ops.normalize's normalisation over the
    trailing dims."""
    return normalize_over(X, tuple(range(-K, 0)), eps, nan_on_overflow=True, fast=fast)


def layer_norm_dx(xhat: torch.Tensor, rstd: torch.Tensor, gy: torch.Tensor, K: int) -> torch.Tensor:
    """rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂)): the Jacobian of x ↦ x̂ applied to gy (symmetric: the
    vjp with gy = G ⊙ w, the jvp with gy = Ẋ); ops.normalize's, over the trailing dims."""
    return normalize_dx(xhat, rstd, gy, tuple(range(-K, 0)))


class LayerNormFn(HandFunction):
    r"""Y = x̂ ⊙ w + b,  x̂ = (X − μ)·rstd  — equals ``torch.nn.functional.layer_norm``.

    Forward, per row (the K trailing dims, D elements):
        μ = mean(X),  var = mean((X − μ)²),  rstd = 1/√(var + eps),  x̂ = (X − μ)·rstd
        Y = x̂ ⊙ w + b          (w = 1, b = 0 where not given)
    Shapes: X (*, row) with row = normalized_shape, w (row), b (row) → Y (*, row).
    Backward, G = ∂L/∂Y (*, row), gy = G ⊙ w, Σ_batch sums over the leading dims:
        ∂L/∂X = rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂))     (*, row)
        ∂L/∂w = Σ_batch G ⊙ x̂                              (row)
        ∂L/∂b = Σ_batch G                                  (row)
    Forward mode, tangents Ẋ, ẇ, ḃ:
        Ẏ = rstd·(Ẋ − mean(Ẋ) − x̂·mean(Ẋ ⊙ x̂)) ⊙ w + x̂ ⊙ ẇ + ḃ
    Returns (Y, μ, rstd), the row statistics (*, 1…1) non-differentiable outputs for the fast
    path's backward (``ops.normalize_fast.normalize_grads_fast``); saves X, μ, rstd (and w where ∂L/∂X
    needs it); the differentiable backward recomputes μ, rstd, x̂ from X (see the module docstring).
    float16/bfloat16 X runs in float32 and rounds once; w and b may be float32 with a
    float16/bfloat16 X (torch's CPU mixed-dtype kernel); each gradient has its input's dtype.
    Derivation: docs/derivation.md#layer-normalisation
    """

    @staticmethod
    def forward(x, weight, bias, K, eps):
        # fast (nothing records this): torch's forward kernel, Y, μ, rstd in one call (its Welford
        # moments give a constant row μ = x exactly, so x̂ = 0), nan where the squares overflow;
        # float16/bfloat16: x̂ and then Y in the one buffer X − x₀ (ops.normalize.moments).
        fast = fast_path()
        if fast and native_forward_ok(x, weight, bias):
            y, mu, rstd = torch.native_layer_norm(x, x.shape[x.dim() - K:], weight, bias, eps)
            y, rstd = nan_where_overflow(y, rstd)                # (*, row), (*, 1…1)
            return y, mu, rstd
        xhat, rstd, mu = normalize(opmath(x), K, eps, fast)      # x̂ = (X − μ)·rstd   (*, row)
        # Out of place unless fast: under vmap over w or b alone, x̂ is unbatched and could not
        # take them in place.
        w, b = opmath(weight), opmath(bias)
        if w is not None and b is not None:                      # x̂ ⊙ w + b (fast: not addcmul, whose
            y = xhat.mul_(w).add_(b) if fast else torch.addcmul(b, xhat, w)   # broadcast b is a slow path)
        elif w is not None:
            y = xhat.mul_(w) if fast else xhat * w               # x̂ ⊙ w
        elif b is not None:
            y = xhat.add_(b) if fast else xhat + b               # x̂ + b
        else:
            y = xhat                                             # x̂
        return y.to(x.dtype), mu, rstd

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, K, eps = inputs
        _, mu, rstd = output
        ctx.mark_non_differentiable(mu, rstd)
        ctx.set_materialize_grads(False)
        ctx.K, ctx.eps = K, eps
        ctx.has_weight, ctx.has_bias = weight is not None, bias is not None
        ctx.w_shape = None if weight is None else weight.shape
        save_for_norm_backward(ctx, x, weight, mu, rstd)
        ctx.w_dtype = None if weight is None else weight.dtype
        ctx.b_shape, ctx.b_dtype = (None, None) if bias is None else (bias.shape, bias.dtype)

    @staticmethod
    def backward(ctx, grad_y, _g_mu, _g_rstd):
        x, weight, mu, rstd = ctx.saved_tensors
        K = ctx.K
        if grad_y is None:
            return None, None, None, None, None
        G = opmath(grad_y)                                                   # (*, row)
        need = ctx.needs_input_grad[:2] + (ctx.has_bias and ctx.needs_input_grad[2],)
        if fast_path(grad_y) and G.numel() and x is not None and one_dtype(G, x, weight, mu):        # the same equations, fewer passes
            gx, gw, gb = normalize_grads_fast(G, opmath(x), mu, rstd, opmath(weight), Norm("trailing", K, True, ctx.eps),
                                              x.shape[x.dim() - K:], need)
            return cast(gx, ctx.x_dtype), cast(gw, ctx.w_dtype), cast(gb, ctx.b_dtype), None, None
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            xhat, rstd, _ = normalize(opmath(x), K, ctx.eps)                 # x̂ (*, row), rstd (*, 1…1)
        if ctx.needs_input_grad[0]:
            gy = G * opmath(weight) if weight is not None else G             # gy = G ⊙ w
            grad_x = layer_norm_dx(xhat, rstd, gy, K).to(ctx.x_dtype)        # rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂))
        if ctx.has_weight and ctx.needs_input_grad[1]:
            grad_w = (G * xhat).sum_to_size(ctx.w_shape).to(ctx.w_dtype)     # Σ_batch G ⊙ x̂
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = G.sum_to_size(ctx.b_shape).to(ctx.b_dtype)              # Σ_batch G
        return grad_x, grad_w, grad_b, None, None

    @staticmethod
    def jvp(ctx, dx, dw, db, _K, _eps):
        x, weight = ctx.saved_tensors
        xhat, rstd, _ = normalize(opmath(x), ctx.K, ctx.eps)                 # x̂, rstd
        dy = torch.zeros_like(xhat)                                          # (*, row)
        if dx is not None:
            dxhat = layer_norm_dx(xhat, rstd, opmath(dx), ctx.K)             # rstd·(Ẋ − mean(Ẋ) − x̂·mean(Ẋ ⊙ x̂))
            dy = dy + (dxhat * opmath(weight) if weight is not None else dxhat)   # ⊙ w
        if dw is not None:
            dy = dy + xhat * opmath(dw)                                      # x̂ ⊙ ẇ
        if db is not None:
            dy = dy + opmath(db)                                             # ḃ
        return dy.to(x.dtype), None, None
