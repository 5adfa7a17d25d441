"""mul: torch.mul's arguments, checks and messages; the math is ``ops/elementwise.py``."""
from __future__ import annotations

import numbers

import torch

from ..ops.elementwise import MulFn
from ._common import check_tensor, shape_str

__all__ = ["mul"]

_NUMBER = (numbers.Number, torch.SymInt, torch.SymFloat, torch.SymBool)


def mul(input: torch.Tensor, other) -> torch.Tensor:
    """``torch.mul`` (``Tensor.mul``, ``a * b``, ``2 * a``): Y = A ⊙ B with torch's broadcasting and
    type promotion, ``other`` a tensor or a number (``input`` may be the number, as torch takes);
    backward Σ_bc G ⊙ conj of the other operand (ops.elementwise.MulFn)."""
    if isinstance(input, _NUMBER) and isinstance(other, torch.Tensor):
        input, other = other, input            # c · B = B · c: the same values and dtype
    check_tensor("input", input, fn="mul")
    if not isinstance(other, (torch.Tensor, *_NUMBER)):
        raise TypeError(f"mul(): argument 'other' (position 2) must be Tensor, not {type(other).__name__}")
    try:
        return MulFn.call(input, other)
    except RuntimeError as e:
        if isinstance(other, torch.Tensor) and not _broadcast(input.shape, other.shape):
            raise RuntimeError(f"mul: input of shape {shape_str(input)} and other of shape {shape_str(other)} do not "
                               f"broadcast: {e}") from None
        raise


def _broadcast(a, b) -> bool:
    return all(x == y or x == 1 or y == 1 for x, y in zip(reversed(a), reversed(b)))
