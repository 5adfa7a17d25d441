"""Registry cases of the tensor math models write inline: the mean (``x.mean(dim=1)``) and the
elementwise product (``F.silu(a) * b``, ``x * 0.5``).

The reference is torch's own function (``torch.mean``, ``torch.mul``). Options of ``dtype`` (a
cast before the mean) and type promotion across operands of different dtypes are not registry
cases, since every check recasts all inputs to one dtype; ``tests/test_tensor_math.py`` checks
them against torch by name.
"""
from __future__ import annotations

import torch

from ... import functional as F
from ..types import DEFAULT_SHAPES, BadInput, Inputs, OpCase, randn


def _mean(**kw):
    return lambda shape, dtype, device: Inputs((randn(shape, dtype, device),), dict(kw))


def _mean_bad(what, x, names, **kw):
    return BadInput(what, lambda: Inputs((x() if callable(x) else torch.randn(x),), kw), names)


_MEAN_BAD = (
    _mean_bad("dim out of range", (2, 3), ("dim", "[2, 3]", "got 2"), dim=2),
    _mean_bad("dim given twice", (2, 3), ("dim", "multiple times", "[2, 3]"), dim=(1, -1)),
    _mean_bad("dim not an int", (2, 3), ("dim", "float"), dim=1.5),
    _mean_bad("keepdim not a bool", (2, 3), ("keepdim", "int"), dim=1, keepdim=1),
    _mean_bad("integer input", lambda: torch.arange(6).reshape(2, 3), ("input", "torch.int64", "[2, 3]")),
    _mean_bad("integer dtype", (2, 3), ("dtype", "torch.int64", "[2, 3]"), dtype=torch.int64),
)


def _mul(other):
    """x and ``other(shape, dtype, device)``: a tensor requiring grad, or a number."""
    def make(shape, dtype, device):
        return Inputs((randn(shape, dtype, device), other(shape, dtype, device)))

    return make


_SAME = lambda shape, dtype, device: randn(shape, dtype, device)                     # noqa: E731
_ROW = lambda shape, dtype, device: randn(shape[-1:], dtype, device)                 # noqa: E731  broadcast over rows
_ZERO_D = lambda shape, dtype, device: randn((), dtype, device)                      # noqa: E731
_NUMBER = lambda shape, dtype, device: 0.37                                          # noqa: E731  a wrapped scalar

_MUL_BAD = (
    BadInput("shapes that do not broadcast", lambda: Inputs((torch.randn(2, 3), torch.randn(4))),
             ("input", "other", "[2, 3]", "[4]")),
    BadInput("other a string", lambda: Inputs((torch.randn(2, 3), "a")), ("other", "str")),
    BadInput("other a list", lambda: Inputs((torch.randn(2, 3), [1.0, 2.0, 3.0])), ("other", "list")),
)

# Both are computed in torch's order (the mean as torch's CPU kernel: Σ in the dtype, float32 for
# float16/bfloat16, then ÷ n; the product is torch's multiplication), so the default margin holds.
CASES = [
    OpCase("mean", F.mean, torch.mean, _mean(), shapes=((2, 3), (7, 13), (2, 5, 13), (13,), ()),
           bad_inputs=_MEAN_BAD),
    OpCase("mean[dim=1]", F.mean, torch.mean, _mean(dim=1), shapes=((2, 3), (7, 13), (2, 5, 13), (0, 13))),
    OpCase("mean[dim=(0,-1),keepdim]", F.mean, torch.mean, _mean(dim=(0, -1), keepdim=True),
           shapes=((2, 3), (7, 13), (2, 5, 13), (2, 0, 3))),
    OpCase("mean[dim=-1]", F.mean, torch.mean, _mean(dim=-1), shapes=(*DEFAULT_SHAPES, ())),
    OpCase("mul", F.mul, torch.mul, _mul(_SAME), shapes=(*DEFAULT_SHAPES, ()), bad_inputs=_MUL_BAD),
    OpCase("mul[broadcast]", F.mul, torch.mul, _mul(_ROW), shapes=DEFAULT_SHAPES),
    OpCase("mul[0-d other]", F.mul, torch.mul, _mul(_ZERO_D), shapes=((2, 3), (2, 5, 13), (0, 13))),
    OpCase("mul[number]", F.mul, torch.mul, _mul(_NUMBER), shapes=DEFAULT_SHAPES),
]
