"""dropout: torch.nn.functional's arguments and checks; the math is ``ops/dropout.py``."""
from __future__ import annotations

import numbers

import torch

from ..ops.dropout import DropoutFn, keep_mask
from ._common import check_tensor

__all__ = ["dropout"]


def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.dropout``: y = x ⊙ m / (1 − p), m ~ Bernoulli(1 − p) drawn here (the
    bool mask is what the backward keeps); ``training=False``, p = 0 or an empty input return
    ``input`` itself, p = 1 gives x · 0 (zeros; NaN where x is ±inf or NaN), all as torch.

    The random stream: the mask is drawn as torch's CPU dropout draws it
    (``empty_like(x).bernoulli_(1 − p)``), so on CPU the same seed gives torch's mask; on CUDA
    torch's fused kernel uses another stream, so masks differ there (same distribution)."""
    check_tensor("input", input, fn="dropout")
    if not isinstance(p, numbers.Real) or isinstance(p, bool):
        raise TypeError(f"dropout(): argument 'p' (position 2) must be float, not {type(p).__name__}")
    if p < 0.0 or p > 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p} (argument 'p', input of "
                         f"shape {list(input.shape)})")
    p = float(p)
    if not training or p == 0.0 or input.numel() == 0:
        return input
    if input.dtype.is_complex and p < 1.0:
        # torch draws its mask in x's dtype, and bernoulli_ refuses complex: its own error, first
        torch.empty_like(input).bernoulli_(1 - p)
    mask = torch.zeros_like(input, dtype=torch.bool) if p == 1.0 else keep_mask(input, p)
    return DropoutFn.call(input, mask, p, bool(inplace))
