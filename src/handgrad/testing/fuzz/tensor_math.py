"""What the fuzzer draws for the tensor math models write inline: ``mean`` (any shape and dtype,
integer/bool/complex inputs included, ``dim`` an int, a tuple (dims given twice now and then), an
empty list, out of range or not an int, ``dtype`` a float/complex dtype or an invalid one) and
``mul`` (the other operand a tensor of the same shape, one that broadcasts, a 0-d tensor, a
number of any kind, of another dtype, one that does not broadcast, or not a number).
``draw.py`` merges ``OPTIONS`` and ``DRAW`` into its tables.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .call import Call
from .domain import one_of as _from

__all__ = ["OPTIONS", "DRAW"]

_FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _dims(d, ctx):
    nd = max(len(ctx["shape"]), 1)
    one = lambda: d.rng.randint(-nd, nd - 1)                                  # noqa: E731
    return d.tier(
        (0.45, one),
        (0.75, lambda: tuple(one() for _ in range(d.rng.randint(1, nd)))),    # now and then a dim twice
        (0.8, lambda: list(range(nd))[: d.rng.randint(0, nd)]),               # [] is every dim
        (0.9, lambda: None),
        (1.0, lambda: d.pick((nd, -nd - 1, (0, nd), 1.5, True))),
    )


def _mean(d) -> Call:
    x = d.tensor(d.shape(), d.input_dtype(0.12))
    kw = d.options("mean", {"shape": x.shape}, p=0.6)
    if "keepdim" in kw and "dim" not in kw and d.chance(0.85):   # keepdim alone: a deliberate difference
        kw["dim"] = _dims(d, {"shape": x.shape})
    return Call("mean", (x,), kw, d.seed)


def _other(d, shape, dtype):
    """The other operand of a product."""
    fdt = dtype if dtype.is_floating_point else torch.float32
    return d.tier(
        (0.35, lambda: d.tensor(shape, dtype)),
        (0.5, lambda: d.tensor(tuple(1 if d.chance(0.5) else s for s in shape)[-d.rng.randint(0, len(shape)):]
                               if shape else (), dtype)),                     # broadcasts
        (0.6, lambda: d.tensor((), d.pick((fdt, torch.float64)))),            # 0-d: does not promote
        (0.78, lambda: d.pick((0.5, -3.0, 2, 0, True, 1e30, float("inf"), float("nan"), 1.5 - 2j))),
        (0.9, lambda: d.tensor(shape, d.pick((*_FLOATS, torch.int64, torch.bool, torch.complex64)))),
        (0.96, lambda: d.tensor((*shape[:-1], shape[-1] + 1) if shape else (2,), dtype)),   # does not broadcast
        (1.0, lambda: d.pick(("a", None, [1.0, 2.0]))),
    )


def _mul(d) -> Call:
    dtype = d.input_dtype(0.08)
    shape = d.shape()
    x, other = d.tensor(shape, dtype), _other(d, shape, dtype)
    return Call("mul", (x, other) if d.chance(0.9) or not isinstance(other, (int, float)) else (other, x), {}, d.seed)


OPTIONS: dict[str, dict[str, Callable]] = {
    "mean": {"dim": _dims, "keepdim": _from((False, True), (1, None)),
             "dtype": _from((None, *_FLOATS, torch.complex64), (torch.int64, torch.bool, "float32"), 0.15)},
    "mul": {},
}

DRAW: dict[str, Callable[[Any], Call]] = {"mean": _mean, "mul": _mul}
