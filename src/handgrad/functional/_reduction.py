"""mean: torch.mean's arguments, checks and messages; the math is ``ops/reduction.py``."""
from __future__ import annotations

import operator

import torch

from ..ops.reduction import MeanFn, MeanOptions
from ._common import check_tensor, shape_str

__all__ = ["mean"]


def _dim_list(dim, input) -> list[int]:
    """dim as a list of ints: an int, or a list/tuple of them (bools are not ints to torch)."""
    dims = list(dim) if isinstance(dim, (list, tuple)) else [dim]
    try:
        if any(isinstance(d, bool) for d in dims):
            raise TypeError
        return [operator.index(d) for d in dims]
    except TypeError:
        if any(isinstance(d, str) for d in dims):   # a named dim: torch's named tensors, not handgrad's
            raise RuntimeError(f"mean: named dims ({dim!r}) are not supported by handgrad (input of shape "
                               f"{shape_str(input)}); name the dims by position") from None
        raise TypeError(f"mean(): argument 'dim' must be int or tuple of ints, not {type(dim).__name__} "
                        f"(input of shape {shape_str(input)})") from None


def _reduced_dims(dims: list[int] | None, input) -> tuple[int, ...]:
    """The reduced dims, non-negative, in the order given: every dim for None or an empty list,
    none for a 0-d input (its one element is its mean); torch's IndexError for a dim out of range,
    its RuntimeError for a dim given twice."""
    nd = input.dim()
    if not dims:
        return tuple(range(nd))
    wrap, seen = max(nd, 1), []
    for d in dims:
        if not -wrap <= d < wrap:
            raise IndexError(f"mean(): argument 'dim' is out of range for input of shape {shape_str(input)}: Dimension "
                             f"out of range (expected to be in range of [{-wrap}, {wrap - 1}], but got {d})")
        d %= wrap
        if d in seen:
            raise RuntimeError(f"mean(): argument 'dim': dim {d} appears multiple times in the list of dims "
                               f"(input of shape {shape_str(input)})")
        seen.append(d)
    return tuple(seen) if nd else ()


def _result_dtype(input, dtype) -> torch.dtype:
    """``dtype``, or the input's: floating point or complex, else torch's RuntimeError."""
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"mean(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}")
    out = input.dtype if dtype is None else dtype
    if not (out.is_floating_point or out.is_complex):
        which = "Input dtype" if dtype is None else "Optional dtype"
        raise RuntimeError(f"mean(): could not infer output dtype. {which} must be either a floating point or complex "
                           f"dtype. Got: {out} (argument '{'input' if dtype is None else 'dtype'}', input of shape "
                           f"{shape_str(input)})")
    return out


def mean(input: torch.Tensor, dim=None, keepdim: bool = False, *, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.mean`` (and ``Tensor.mean``): Y = (1/n) Σ over ``dim`` (every dim for None), kept as
    size-1 dims with ``keepdim``; with ``dtype`` the input is read in that dtype (as torch: a
    float32 input's mean in float16 sums the float32 values); backward G/n broadcast back
    (ops.reduction.MeanFn). An empty reduction is nan, as torch's."""
    if type(dim) is int and dtype is None and isinstance(input, torch.Tensor) and isinstance(keepdim, bool) \
            and input.dtype.is_floating_point:      # the common call (one dim in range), in half the checks' time
        wrap = input.dim() or 1
        if -wrap <= dim < wrap:
            return MeanFn.call(input, MeanOptions((dim % wrap,) if input.dim() else (), keepdim, input.dtype))
    check_tensor("input", input, fn="mean")
    if not isinstance(keepdim, bool):
        raise TypeError(f"mean(): argument 'keepdim' must be bool, not {type(keepdim).__name__}")
    dims = None if dim is None else _dim_list(dim, input)      # torch's order: the argument types first,
    out_dtype = _result_dtype(input, dtype)                    # then the dtype, then the dims' range
    return MeanFn.call(input, MeanOptions(_reduced_dims(dims, input), keepdim, out_dtype))
