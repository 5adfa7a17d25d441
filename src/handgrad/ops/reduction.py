"""The mean over some dims. Derivation: docs/derivation.md#mean.

The reduced dims arrive normalised (non-negative, every dim for a full mean) and the result dtype
resolved, both by the functional (``handgrad.functional.mean``), in one frozen ``MeanOptions``
(STYLE.md §5: options that travel together).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ._function import HandFunction

__all__ = ["MeanFn", "MeanOptions", "mean_of"]

_HALF = (torch.float16, torch.bfloat16)


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


def mean_of(x: torch.Tensor, o: MeanOptions) -> torch.Tensor:
    """(1/n) Σ_D x in ``o.dtype``, evaluated as torch's CPU mean evaluates it: the sum in the
    dtype (in float32 for float16/bfloat16: x's values are summed unrounded), divided by n,
    rounded to the dtype once."""
    n = _count(x.shape, o.dims)
    acc = torch.float32 if o.dtype in _HALF else o.dtype
    y = x.sum(o.dims, keepdim=o.keepdim, dtype=acc).div_(n)                    # (1/n) Σ_D X
    return y if acc == o.dtype else y.to(o.dtype)


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
        return mean_of(x, options)                                              # (1/n) Σ_D X

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, ctx.o = inputs
        ctx.shape, ctx.x_dtype = x.shape, x.dtype

    @staticmethod
    def backward(ctx, grad_y):
        grad_x = None
        if ctx.needs_input_grad[0]:
            n = _count(ctx.shape, ctx.o.dims)
            g = (grad_y / n).to(ctx.x_dtype)                                    # G / n, rounded as torch's
            if not ctx.o.keepdim:
                for d in sorted(ctx.o.dims):                                    # D back as size-1 dims
                    g = g.unsqueeze(d)
            grad_x = g.expand(ctx.shape)                                        # expand_D(G / n)  (*S)
        return grad_x, None

    @staticmethod
    def jvp(ctx, dx, _options):
        return mean_of(dx, ctx.o)                                               # (1/n) Σ_D Ẋ
