"""``linear``'s argument handling; the math lives in ``handgrad.ops.linear``."""
from __future__ import annotations

import torch

from ..ops.linear import LinearFn
from ._common import autocast, check_linear, check_tensor

__all__ = ["linear"]


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``: y = x Wᵀ + b, hand-derived backward (ops.linear.LinearFn)."""
    check_tensor("input", input, fn="linear")
    check_tensor("weight", weight, fn="linear")
    if bias is not None:
        check_tensor("bias", bias, fn="linear")
    input, weight, bias = autocast("linear", input, weight, bias)
    bias = check_linear("linear", weight, bias, features=input.shape[-1] if input.dim() else 0, dtype=input.dtype,
                        input=input)
    return LinearFn.call(input, weight, bias)
