"""``linear``'s argument handling; the math lives in ``handgrad.ops.linear``."""
from __future__ import annotations

import torch

from ..ops.linear import LinearFn
from ._common import autocast, autocast_on, check_linear, check_tensor

__all__ = ["linear"]

Tensor = torch.Tensor


def linear(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear``: y = x Wᵀ + b, hand-derived backward (ops.linear.LinearFn)."""
    # The common call, in one cheap test (it runs every step): x (*, D_in), W (D_out, D_in),
    # b (D_out,) or None, one dtype, no autocast: nothing to cast or refuse (4.5 → 1 µs a call).
    # Anything else takes the detailed checks below.
    if (isinstance(input, Tensor) and isinstance(weight, Tensor) and weight.dim() == 2 and input.dim() >= 1
            and input.shape[-1] == weight.shape[1] and input.dtype == weight.dtype and input.is_floating_point()
            and (bias is None or (isinstance(bias, Tensor) and bias.dim() == 1 and bias.shape[0] == weight.shape[0]
                                  and bias.dtype == input.dtype))
            and not autocast_on()):
        return LinearFn.call(input, weight, bias)
    check_tensor("input", input, fn="linear")
    check_tensor("weight", weight, fn="linear")
    if bias is not None:
        check_tensor("bias", bias, fn="linear")
    if not (input.is_floating_point() or input.is_complex() or weight.is_floating_point() or weight.is_complex()):
        # integer and bool operands: nothing to differentiate, so torch's own call, whose kernel
        # choice by shape (addmm, or matmul + add_) decides what it accepts (a bool K = 0 product)
        return torch.nn.functional.linear(input, weight, bias)
    input, weight, bias = autocast("linear", input, weight, bias)
    bias = check_linear("linear", weight, bias, features=input.shape[-1] if input.dim() else 0, dtype=input.dtype,
                        input=input)
    return LinearFn.call(input, weight, bias)
