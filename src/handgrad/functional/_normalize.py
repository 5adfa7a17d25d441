"""batch_norm, group_norm, rms_norm: torch.nn.functional's arguments, checks and messages.

The math is ``ops/normalize.py`` (NormFn: the normalisation over a chosen set of dims;
BatchNormEvalFn: batch norm with the running statistics).
"""
from __future__ import annotations

import math
import numbers
import operator

import torch

from ..ops.normalize import BatchNormEvalFn, Norm, NormFn, update_running_stats
from ._common import autocast, check_tensor, shape_str

__all__ = ["batch_norm", "group_norm", "rms_norm"]

_LOW = (torch.float16, torch.bfloat16)


def _check_float(fn: str, name: str, value, pos: int) -> float:
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be float, not {type(value).__name__}")
    return float(value)


def _check_floating(fn: str, input: torch.Tensor) -> None:
    if not input.is_floating_point():
        raise NotImplementedError(
            f"{fn}: argument 'input' of dtype {input.dtype} is not supported: {fn} needs a floating dtype "
            f"(torch: \"{fn}\" not implemented for '{str(input.dtype).removeprefix('torch.')}')"
        )


def _check_mixed_nonfloating(fn: str, input: torch.Tensor, **params) -> None:
    """A non-floating input with a parameter of another dtype: torch's mixed-dtype RuntimeError
    comes before its kernel's NotImplementedError."""
    if input.is_floating_point():
        return
    for name, t in params.items():
        if t is not None and t.dtype != input.dtype:
            raise RuntimeError(f"{fn}: mixed dtype (CPU): all inputs must share same datatype ({name} of dtype "
                               f"{t.dtype} with input of dtype {input.dtype})")


def _check_param_dtypes(fn: str, input: torch.Tensor, **params) -> None:
    """torch's CPU rule for batch and group norm: every parameter has the input's dtype, or all
    are float32 with a float16/bfloat16 input (its mixed-dtype kernel)."""
    given = {k: t for k, t in params.items() if t is not None}
    mixed = input.dtype in _LOW and any(t.dtype == torch.float32 for t in given.values())
    expected = torch.float32 if mixed else input.dtype
    for name, t in given.items():
        if t.dtype != expected:
            raise RuntimeError(
                f"{fn}: expected {name} to have dtype {expected} (torch: mixed dtype (CPU): expect parameter to "
                f"have scalar type of Float), but got {name} of dtype {t.dtype} with input of dtype {input.dtype}"
            )


def _verify_batch_size(size: list[int], input: torch.Tensor) -> None:
    """torch.nn.functional's own check: one value per channel has no variance."""
    if size[0] * math.prod(size[2:]) == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {input.size()}")


def batch_norm(input: torch.Tensor, running_mean: torch.Tensor | None, running_var: torch.Tensor | None,
               weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, training: bool = False,
               momentum: float = 0.1, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.batch_norm``. Training: batch statistics over every dim but 1, and
    ``running_mean``/``running_var`` (where given) updated in place with ``momentum`` (the
    running variance unbiased, ×n/(n − 1)); eval: the running statistics (ops.normalize)."""
    check_tensor("input", input, fn="batch_norm")
    for name, t in (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, fn="batch_norm")
    if training:                                   # torch's order: these before any type check
        _verify_batch_size(list(input.size()), input)
        if not isinstance(eps, str) and eps is not None and eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    momentum = _check_float("batch_norm", "momentum", momentum, 7)
    eps = _check_float("batch_norm", "eps", eps, 8)
    input, weight, bias = autocast("batch_norm", input, weight, bias)
    if input.numel() == 0:
        # torch's _batch_norm_impl_index returns before any other check: x, times w[0], plus b[0]
        # (an IndexError for an empty w or b); nothing to normalise, the running stats untouched
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        return out if bias is None else out + bias[0]
    if input.dim() < 2:
        raise RuntimeError(f"batch_norm: expected input of shape (N, C, *) with at least 2 dims, but got input of "
                           f"size {shape_str(input)}")
    C = input.shape[1]
    if not training:
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is None:
                raise RuntimeError(f"{name} must be defined in evaluation mode")
    for name, t in (("weight", weight), ("bias", bias), ("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and t.numel() != C:  # torch checks the count only (a (C, 1) weight passes)
            raise RuntimeError(f"batch_norm: {name} should contain {C} elements, the channels of input of size "
                               f"{shape_str(input)}, but got {name} of shape {shape_str(t)}")
    if training and (running_mean is None) != (running_var is None):
        raise ValueError(f"batch_norm: running_mean and running_var must either both be None or neither be None "
                         f"(running_mean {'None' if running_mean is None else shape_str(running_mean)}, running_var "
                         f"{'None' if running_var is None else shape_str(running_var)})")
    _check_floating("batch_norm", input)                 # the kernel's dispatch, after the shape checks
    _check_param_dtypes("batch_norm", input, weight=weight, bias=bias, running_mean=running_mean,
                        running_var=running_var)
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:
                raise RuntimeError(f"batch_norm is not differentiable with respect to argument '{name}'. This input "
                                   "cannot have requires_grad True (as torch's native_batch_norm).")
    if not training:
        return BatchNormEvalFn.call(input, running_mean, running_var, weight, bias, eps)
    update_running_stats(running_mean, running_var, input, momentum)
    return NormFn.call(input, weight, bias, Norm("channel", 0, True, eps))


def group_norm(input: torch.Tensor, num_groups: int, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``torch.nn.functional.group_norm``: each sample's C channels in ``num_groups`` groups,
    normalised over the group's channels and spatial dims, then w, b per channel (ops.normalize)."""
    check_tensor("input", input, fn="group_norm")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            check_tensor(name, t, fn="group_norm")
    if input.dim() < 2:
        raise RuntimeError(f"Expected at least 2 dimensions for input tensor but received {input.dim()} "
                           f"(group_norm: input of size {shape_str(input)})")
    N, C = input.shape[:2]
    # torch's Python checks (N·C // num_groups, for any number), then its binding's types
    if isinstance(num_groups, numbers.Real) and not isinstance(num_groups, bool):
        if num_groups == 0:
            raise ZeroDivisionError(f"group_norm: num_groups=0 groups of input of size {shape_str(input)} "
                                    "(integer division or modulo by zero)")
        _verify_batch_size([N * C // num_groups, num_groups, *input.shape[2:]], input)
    if isinstance(num_groups, bool) or not isinstance(num_groups, numbers.Integral):
        raise TypeError(f"group_norm(): argument 'num_groups' (position 2) must be int, not {type(num_groups).__name__}")
    num_groups = operator.index(num_groups)
    eps = _check_float("group_norm", "eps", eps, 5)
    input, weight, bias = autocast("group_norm", input, weight, bias)
    if num_groups < 0 or C % num_groups != 0:
        raise RuntimeError(f"Expected number of channels in input to be divisible by num_groups, but got input of "
                           f"shape {shape_str(input)} and num_groups={num_groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and (t.dim() != 1 or t.numel() != C):
            raise RuntimeError(f"Expected {name} to be a vector of size equal to the number of channels in input, "
                               f"but got {name} of shape {shape_str(t)} and input of shape {shape_str(input)}")
    _check_mixed_nonfloating("group_norm", input, weight=weight, bias=bias)
    _check_floating("group_norm", input)                 # the kernel's dispatch, after the shape checks
    _check_param_dtypes("group_norm", input, weight=weight, bias=bias)
    return NormFn.call(input, weight, bias, Norm("group", num_groups, True, eps))


def _int_list(fn: str, name: str, value, pos: int) -> tuple[int, ...]:
    """torch's argument parsing for ``int[]``: a list, tuple or torch.Size of ints."""
    if not isinstance(value, (list, tuple)):
        raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be tuple of ints, not {type(value).__name__}")
    out = []
    for i, s in enumerate(value):
        if isinstance(s, (bool, torch.Tensor)) or not isinstance(s, numbers.Integral):
            raise TypeError(f"{fn}(): argument '{name}' (position {pos}) must be tuple of ints, but found element "
                            f"of type {type(s).__name__} at pos {i}")
        out.append(operator.index(s))
    return tuple(out)


def rms_norm(input: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
             eps: float | None = None) -> torch.Tensor:
    """``torch.nn.functional.rms_norm``: y = x / √(mean(x²) + eps) ⊙ w over the trailing
    ``normalized_shape`` dims. ``eps=None`` is torch's: the machine epsilon of the dtype the
    norm is computed in (float64's for float64, float32's for float32/float16/bfloat16, as
    torch's ``_fused_rms_norm`` decomposition), not of the input's own dtype."""
    check_tensor("input", input, fn="rms_norm")
    shape = _int_list("rms_norm", "normalized_shape", normalized_shape, 2)
    if weight is not None:
        check_tensor("weight", weight, fn="rms_norm")
    if eps is not None:
        eps = _check_float("rms_norm", "eps", eps, 4)
    input, weight = autocast("rms_norm", input, weight)
    K = len(shape)
    if K == 0:
        raise RuntimeError("Expected normalized_shape to be at least 1-dimensional, i.e., containing at least one "
                           "element, but got normalized_shape = []")
    if weight is not None and tuple(weight.shape) != shape:
        raise RuntimeError(f"Expected weight to be of same shape as normalized_shape, but got weight of shape "
                           f"{shape_str(weight)} and normalized_shape = {list(shape)}")
    if K > input.dim() or tuple(input.shape[input.dim() - K:]) != shape:
        raise RuntimeError(f"Given normalized_shape={list(shape)}, expected input with shape "
                           f"[*, {', '.join(map(str, shape))}], but got input of size {shape_str(input)}")
    _check_floating("rms_norm", input)                   # after the shapes, as torch's (complex: differences.md)
    if eps is None:
        eps = torch.finfo(torch.float64 if input.dtype == torch.float64 else torch.float32).eps
    return NormFn.call(input, weight, None, Norm("trailing", K, False, eps))
