from __future__ import annotations

import torch

from ..ops.linear import LinearFn
from ._common import autocast, check_tensor, shape_str

__all__ = ["linear"]


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``: y = x Wᵀ + b, hand-derived backward (ops.linear.LinearFn)."""
    check_tensor("input", input, fn="linear")
    check_tensor("weight", weight, fn="linear")
    if bias is not None:
        check_tensor("bias", bias, fn="linear")
    input, weight, bias = autocast("linear", input, weight, bias)
    if input.dim() == 0 or weight.dim() == 0:
        raise RuntimeError(
            f"both arguments to linear need to be at least 1D, but input is {input.dim()}D and weight is {weight.dim()}D"
        )
    if weight.dim() > 2:
        raise RuntimeError(f"linear: weight must be 1D or 2D, but got weight of shape {shape_str(weight)}")
    if input.shape[-1] != weight.shape[-1]:
        raise RuntimeError(
            f"linear: input and weight shapes cannot be multiplied: input {shape_str(input)} has "
            f"{input.shape[-1]} features, weight {shape_str(weight)} expects {weight.shape[-1]}"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"linear: expected input and {name} to have the same dtype, but got {input.dtype} and {t.dtype}")
    if bias is not None:
        out_shape = (*input.shape[:-1], *weight.shape[:-1])
        try:
            broadcast = torch.broadcast_shapes(out_shape, bias.shape)
        except RuntimeError:
            broadcast = None
        if broadcast != torch.Size(out_shape):
            raise RuntimeError(
                f"linear: bias of shape {shape_str(bias)} does not broadcast to the output shape {list(out_shape)}"
            )
    return LinearFn.call(input, weight, bias)
