"""The mean over some dims. Derivation: docs/derivation.md#mean.

The reduced dims arrive normalised (a tuple of non-negative dims, every dim for a full mean) and
the result dtype resolved, both by the functional (``handgrad.functional.mean``).
"""
from __future__ import annotations

import math

import torch

from ._function import HandFunction

__all__ = ["MeanFn", "mean_of"]

_HALF = (torch.float16, torch.bfloat16)


def mean_of(x: torch.Tensor, dims: tuple[int, ...], keepdim: bool, dtype: torch.dtype) -> torch.Tensor:
    """(1/n) Σ_dims x in ``dtype``, evaluated as torch's CPU mean evaluates it: the sum in
    ``dtype`` (in float32 for float16/bfloat16: x's values are summed unrounded), divided by n,
    rounded to ``dtype`` once. ``dims = ()`` on a 0-d x is its only element."""
    n = math.prod(x.shape[d] for d in dims)
    acc = torch.float32 if dtype in _HALF else dtype
    return x.sum(dims, keepdim=keepdim, dtype=acc).div_(n).to(dtype)         # (1/n) Σ_D X


class MeanFn(HandFunction):
    r"""Y = (1/n) Σ_{d∈D} X — equals ``torch.mean(x, dim, keepdim, dtype=dtype)``.

    Shapes: X (*S), D the reduced dims, n = Π_{d∈D} S_d → Y (*S without D) ((*S with 1 at D)
    with keepdim), in ``dtype``.
    Backward, G = ∂L/∂Y (Y's shape): every element of X enters its mean with weight 1/n, so
        ∂L/∂X = expand_D(G / n)       G with D put back as size-1 dims, broadcast to S, in X's dtype
    It is linear in G; its own backward is the mean again. Nothing is saved but X's shape.
    Forward mode: Ẏ = (1/n) Σ_{d∈D} Ẋ.
    Derivation: docs/derivation.md#mean
    """

    @staticmethod
    def forward(x, dims, keepdim, dtype):
        return mean_of(x, dims, keepdim, dtype)                                 # (1/n) Σ_D X

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, dims, keepdim, dtype = inputs
        ctx.shape, ctx.x_dtype, ctx.dims, ctx.keepdim, ctx.dtype = x.shape, x.dtype, dims, keepdim, dtype

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            n = math.prod(ctx.shape[d] for d in ctx.dims)
            g = (grad_y / n).to(ctx.x_dtype)                                    # G / n, rounded as torch's
            if not ctx.keepdim:
                for d in sorted(ctx.dims):                                      # D back as size-1 dims
                    g = g.unsqueeze(d)
            grad_x = g.expand(ctx.shape)                                        # expand_D(G / n)  (*S)
        return grad_x, None, None, None

    @staticmethod
    def jvp(ctx, dx, _dims, _keepdim, _dtype):
        return mean_of(dx, ctx.dims, ctx.keepdim, ctx.dtype)                    # (1/n) Σ_D Ẋ
