"""Dropout with a given keep mask. Derivation: docs/derivation.md#dropout.

The mask is drawn by the functional (``handgrad.functional.dropout``) and passed in, so the
Function is a pure function of (X, mask): nothing random happens inside it, and backward,
double backward and jvp reuse the saved bool mask.
"""
from __future__ import annotations

import torch

from ._function import HandFunction

__all__ = ["DropoutFn", "keep_mask", "keep_scale", "masked_scale"]


def keep_mask(x: torch.Tensor, p: float) -> torch.Tensor:
    """m ~ Bernoulli(1 − p), elementwise, as bool. Drawn as torch's CPU dropout draws its noise
    (``torch.empty_like(x).bernoulli_(1 − p)``), so on CPU, from the same generator state, it is
    torch's own mask; on CUDA torch's fused kernel draws differently."""
    return torch.empty_like(x, dtype=torch.bool).bernoulli_(1 - p)     # (the same draws as into x's dtype)


def keep_scale(mask: torch.Tensor, p: float, dtype: torch.dtype) -> torch.Tensor:
    """m / (1 − p) in ``dtype`` (0 everywhere for p = 1), rounded as torch's ``noise.div_(1 − p)``."""
    if p == 1:
        return torch.zeros((), dtype=dtype, device=mask.device)
    return mask.to(dtype).div_(1 - p)


_SCALES: dict[tuple, torch.Tensor] = {}


def scale_of(p: float, dtype: torch.dtype, device) -> torch.Tensor:
    """1 / (1 − p) as a 0-d tensor of ``dtype`` (0 for p = 1), rounded as ``keep_scale``'s kept
    elements (the same division of 1 by 1 − p), made once per (p, dtype, device) (while Dynamo
    traces, made in the graph: it keys no dict on a dtype or device, torch 2.4)."""
    if torch.compiler.is_compiling():
        return keep_scale(torch.ones((), dtype=torch.bool, device=device), p, dtype)
    key = (p, dtype, device)
    c = _SCALES.get(key)
    if c is None:
        c = _SCALES[key] = keep_scale(torch.ones((), dtype=torch.bool, device=device), p, dtype)
    return c


def masked_scale(t: torch.Tensor, mask: torch.Tensor, p: float, inplace: bool = False) -> torch.Tensor:
    """t ⊙ m / (1 − p) as (t ⊙ m) · c, c = 1 / (1 − p) rounded as in m / (1 − p): the same values
    as t ⊙ (m / (1 − p)) (m is 0 or 1, so t ⊙ m is exact), in two passes and no noise buffer."""
    c = scale_of(p, t.dtype, t.device)
    return (t.mul_(mask) if inplace else torch.mul(t, mask)).mul_(c)


class DropoutFn(HandFunction):
    r"""Y = X ⊙ m / (1 − p) with the keep mask m given — equals ``torch.nn.functional.dropout``
    with the mask torch drew (p = 1: Y = X · 0).

    Shapes: X (*), m (*) bool → Y (*).
    Backward, G = ∂L/∂Y:    ∂L/∂X = G ⊙ m / (1 − p)
    Forward mode:            Ẏ = Ẋ ⊙ m / (1 − p)
    Saves the bool mask (one byte per element), not the scaled noise. ``inplace`` writes Y into
    X (marked dirty), as ``torch.nn.functional.dropout(..., inplace=True)``.
    Derivation: docs/derivation.md#dropout
    """

    @staticmethod
    def forward(x, mask, p, inplace):
        return masked_scale(x, mask, p, inplace)                             # X ⊙ m / (1 − p)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, mask, p, inplace = inputs
        ctx.p, ctx.inplace = p, inplace
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(mask)
        ctx.save_for_forward(mask)

    @staticmethod
    def backward(ctx, grad_y):
        (mask,) = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = masked_scale(grad_y, mask, ctx.p)                       # G ⊙ m / (1 − p)
        return grad_x, None, None, None

    @staticmethod
    def jvp(ctx, dx, _dmask, _p, _inplace):
        (mask,) = ctx.saved_tensors
        return masked_scale(dx, mask, ctx.p, ctx.inplace)                    # Ẋ ⊙ m / (1 − p)
