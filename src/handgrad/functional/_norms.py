from __future__ import annotations

import numbers
import operator

import torch

from ..ops.norms import LayerNormFn
from ._common import autocast, check_tensor, shape_str

__all__ = ["layer_norm"]

_LOW = (torch.float16, torch.bfloat16)


def _normalized_shape(normalized_shape) -> tuple[int, ...]:
    """torch's argument parsing for ``int[]``: a list, tuple or torch.Size of ints (an int alone
    is refused here, as by ``torch.nn.functional.layer_norm``; ``torch.nn.LayerNorm`` wraps it)."""
    if not isinstance(normalized_shape, (list, tuple)):
        raise TypeError(
            "layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, "
            f"not {type(normalized_shape).__name__}"
        )
    out = []
    for i, s in enumerate(normalized_shape):
        try:
            if isinstance(s, (bool, torch.Tensor)):
                raise TypeError
            out.append(operator.index(s))
        except TypeError:
            raise TypeError(
                "layer_norm(): argument 'normalized_shape' (position 2) must be tuple of ints, "
                f"but found element of type {type(s).__name__} at pos {i}"
            ) from None
    return tuple(out)


def _check_dtypes(input: torch.Tensor, weight, bias) -> None:
    """torch's CPU rule: w and b have the input's dtype, or all the given ones are float32 with
    a float16/bfloat16 input (its mixed-dtype kernel; a float32 bias alone too). An integer input
    is torch's NotImplementedError when w and b share its dtype (no kernel), else its mixed-dtype
    RuntimeError."""
    params = [(name, t) for name, t in (("weight", weight), ("bias", bias)) if t is not None]
    if not input.is_floating_point():
        if not params or params[0][1].dtype == input.dtype:   # torch's mixed-dtype test reads the first given one
            raise NotImplementedError(
                f"layer_norm: argument 'input' of dtype {input.dtype} is not supported: layer_norm needs a "
                f"floating dtype (torch: \"LayerNormKernelImpl\" not implemented for {input.dtype})"
            )
        name, t = next((n, t) for n, t in params if t.dtype != input.dtype)
        raise RuntimeError(
            f"layer_norm: mixed dtype (CPU): {name} of dtype {t.dtype} with input of dtype {input.dtype}; "
            "expected every parameter to have the input's dtype"
        )
    # the one dtype w and b must have: float32 with a half input and a float32 weight (or no weight
    # and a float32 bias), else the input's; the message then names the one that differs
    first = weight if weight is not None else bias
    mixed = input.dtype in _LOW and first is not None and first.dtype == torch.float32
    expected = torch.float32 if mixed else input.dtype
    for name, t in params:
        if t.dtype != expected:
            also = " (or torch.float32 for all given)" if input.dtype in _LOW else ""
            raise RuntimeError(
                f"layer_norm: expected {name} to have dtype {expected}{also}, but got {name} of dtype {t.dtype} "
                f"with input of dtype {input.dtype}"
            )


def layer_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.layer_norm`` over the trailing ``normalized_shape`` dims; backward
    rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂)), gy = G ⊙ w (ops.norms.LayerNormFn)."""
    check_tensor("input", input, fn="layer_norm")
    shape = _normalized_shape(normalized_shape)
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, fn="layer_norm")
    if not isinstance(eps, numbers.Real) or isinstance(eps, bool):
        raise TypeError(f"layer_norm(): argument 'eps' (position 5) must be float, not {type(eps).__name__}")
    input, weight, bias = autocast("layer_norm", input, weight, bias)
    K = len(shape)
    if K == 0:
        raise RuntimeError(
            "layer_norm: expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
            "element, but got normalized_shape = []"
        )
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != shape:
            raise RuntimeError(
                f"layer_norm: expected {name} to be of same shape as normalized_shape, but got {name} of shape "
                f"{shape_str(t)} and normalized_shape = {list(shape)}"
            )
    if K > input.dim() or tuple(input.shape[input.dim() - K:]) != shape:
        raise RuntimeError(
            f"layer_norm: given normalized_shape={list(shape)}, expected input with shape [*, "
            f"{', '.join(map(str, shape))}], but got input of size {shape_str(input)}"
        )
    _check_dtypes(input, weight, bias)
    return LayerNormFn.call(input, weight, bias, K, float(eps))
