"""The mean over some dims. Derivation: docs/derivation.md#mean.

The reduced dims arrive normalised (non-negative, every dim for a full mean) and the result dtype
resolved, both by the functional (``handgrad.functional.mean``), in one frozen ``MeanOptions``
(STYLE.md §5: options that travel together).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._function import HandFunction

__all__ = ["MeanFn", "MeanOptions"]


@dataclass(frozen=True)
class MeanOptions:
    """D the reduced dims (non-negative; ``()`` for a 0-d input), keepdim, the result dtype."""

    dims: tuple[int, ...]
    keepdim: bool
    dtype: torch.dtype


def _count(shape, dims) -> int:
    """n = Π_{d∈D} S_d (a loop: Dynamo cannot trace ``math.prod`` of a generator, torch 2.13)."""
    n = 1
    for d in dims:
        n *= shape[d]
    return n


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
    def forward(x, options):
        # torch's mean kernel, the forward only: a float16/bfloat16 sum accumulates in float32
        # (x's values unrounded) and is rounded to the dtype once, after the division by n
        return torch.mean(x, options.dims, options.keepdim, dtype=options.dtype)   # (1/n) Σ_D X

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.o = inputs
        ctx.shape, ctx.x_dtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            n = _count(ctx.shape, ctx.o.dims)
            g = grad_y
            if not ctx.o.keepdim:
                for d in sorted(ctx.o.dims):                                    # D back as size-1 dims
                    g = g.unsqueeze(d)
            # divided after the expand, as torch's: one fresh (*S) buffer, which a leaf's .grad
            # keeps as it is (an expanded view it would copy)
            grad_x = g.expand(ctx.shape) / n                                    # expand_D(G / n)  (*S)
            if grad_x.dtype != ctx.x_dtype:
                grad_x = grad_x.to(ctx.x_dtype)                                 # rounded as torch's
        return grad_x, None

    @staticmethod
    def jvp(ctx, dx, _options):
        return torch.mean(dx, ctx.o.dims, ctx.o.keepdim, dtype=ctx.o.dtype)     # (1/n) Σ_D Ẋ
