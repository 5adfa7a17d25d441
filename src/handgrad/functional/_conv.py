"""``conv1d`` / ``conv2d``: torch.nn.functional's arguments, checks and messages; the math is
ops.conv.ConvFn (docs/derivation.md#convolution)."""
from __future__ import annotations

import torch

from ..ops.conv import ConvFn, ConvOptions
from ._common import autocast, check_tensor, shape_str

__all__ = ["conv1d", "conv2d"]


def _tuple(fn: str, name: str, value, dims: int) -> tuple[int, ...]:
    """An int, or a tuple of 1 or ``dims`` ints (torch repeats a single one), as ``dims`` ints."""
    t = (value,) * dims if isinstance(value, int) else tuple(value)
    if len(t) == 1:
        t = t * dims
    if len(t) != dims:
        raise RuntimeError(f"{fn}: expected {name} to be a single integer value or a list of {dims} values to match "
                           f"the convolution dimensions, but got {name}={list(t)}")
    return t


def _padding(fn: str, padding, stride, dilation, k_size) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(lo, hi) per spatial dim. ``'same'``: total d(K − 1), lo = ⌊total/2⌋, the odd one at the end
    (as torch's ``_convolution_mode``); ``'valid'``: none."""
    dims = len(k_size)
    if isinstance(padding, str):
        if padding == "valid":
            return (0,) * dims, (0,) * dims
        if padding != "same":
            raise RuntimeError(f"{fn}: Invalid padding string: {padding!r} (expected 'same' or 'valid')")
        if any(s != 1 for s in stride):
            raise RuntimeError(f"{fn}: padding='same' is not supported for strided convolutions (stride={list(stride)})")
        total = tuple(d * (k - 1) for d, k in zip(dilation, k_size))
        lo = tuple(t // 2 for t in total)
        return lo, tuple(t - l for t, l in zip(total, lo))
    pad = _tuple(fn, "padding", padding, dims)
    if any(p < 0 for p in pad):
        raise RuntimeError(f"{fn}: negative padding is not supported (padding={list(pad)})")
    return pad, pad


def _convnd(fn: str, dims: int, input, weight, bias, stride, padding, dilation, groups) -> torch.Tensor:
    check_tensor("input", input, fn=fn)
    check_tensor("weight", weight, fn=fn)
    if bias is not None:
        check_tensor("bias", bias, fn=fn)
    input, weight, bias = autocast(fn, input, weight, bias)
    if input.dim() not in (dims + 1, dims + 2):
        raise RuntimeError(f"Expected {dims + 1}D (unbatched) or {dims + 2}D (batched) input to {fn}, "
                           f"but got input of size: {shape_str(input)}")
    if weight.dim() != dims + 2:
        raise RuntimeError(f"{fn}: expected weight to be {dims + 2}-D (out_channels, in_channels/groups, *kernel), "
                           f"but got weight of size {shape_str(weight)}")
    unbatched = input.dim() == dims + 1
    x = input.unsqueeze(0) if unbatched else input                      # (N, C_in, *S)
    # torch sends an input with no batch or no channels to its "Empty" backend before the
    # kernels' own checks: dilation 0 and an input/weight dtype mismatch pass there
    empty = x.shape[0] == 0 or x.shape[1] == 0
    k_size = tuple(weight.shape[2:])
    stride = _tuple(fn, "stride", stride, dims)
    dilation = _tuple(fn, "dilation", dilation, dims)
    if any(s <= 0 for s in stride):
        raise RuntimeError(f"{fn}: non-positive stride is not supported (stride={list(stride)})")
    if any(d < 0 or (d == 0 and not empty) for d in dilation):
        raise RuntimeError(f"{fn}: non-positive dilation is not supported (dilation={list(dilation)})")
    lo, hi = _padding(fn, padding, stride, dilation, k_size)
    if not isinstance(groups, int) or groups <= 0:
        raise RuntimeError(f"{fn}: non-positive groups is not supported (groups={groups})")
    C_out, C_g = weight.shape[:2]
    if C_out % groups:
        raise RuntimeError(f"{fn}: Given groups={groups}, expected weight to be divisible by {groups} at dimension 0, "
                           f"but got weight of size {shape_str(weight)} instead")
    if x.shape[1] != C_g * groups:
        raise RuntimeError(f"{fn}: Given groups={groups}, weight of size {shape_str(weight)}, expected "
                           f"input{shape_str(x)} to have {C_g * groups} channels, but got {x.shape[1]} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != C_out):
        raise RuntimeError(f"{fn}: Given weight of size {shape_str(weight)}, expected bias to be 1-dimensional with "
                           f"{C_out} elements, but got bias of size {shape_str(bias)} instead")
    padded = tuple(S + l + h for S, l, h in zip(x.shape[2:], lo, hi))
    effective = tuple(d * (k - 1) + 1 for d, k in zip(dilation, k_size))
    if any(p < e for p, e in zip(padded, effective)):
        raise RuntimeError(f"{fn}: Calculated padded input size per channel: ({' x '.join(map(str, padded))}). "
                           f"Kernel size: ({' x '.join(map(str, effective))}) (dilated) of weight {shape_str(weight)}. "
                           f"Kernel size can't be greater than actual input size {shape_str(input)}")
    if bias is not None and bias.dtype != x.dtype:
        if not isinstance(padding, str) or x.dtype.is_complex or bias.dtype.is_complex:
            raise RuntimeError(f"{fn}: Input type ({x.dtype}) and bias type ({bias.dtype}) should be the same")
        # torch's padding='same' / 'valid' path adds the bias in place to the output, in its dtype
        bias = bias.to(x.dtype)
    if x.dtype == torch.bool and not empty:
        # torch's CPU kernels (which take the integer types) dispatch on the input's dtype first
        raise NotImplementedError(f"{fn}: not implemented for input of dtype {x.dtype} (shape {shape_str(input)}): "
                                  "no convolution kernel takes bool")
    if (not (x.is_floating_point() or x.dtype.is_complex or x.dtype == torch.int64) and not empty
            and any(d > 1 for d in dilation)):
        # torch's dilated CPU kernel (slow_conv_dilated) dispatches on the input's dtype before the weight's check
        raise NotImplementedError(f"{fn}: not implemented for input of dtype {x.dtype} with dilation {list(dilation)} "
                                  f"(shape {shape_str(input)}): torch's dilated kernel takes floating types and int64 only")
    if weight.dtype != x.dtype and (not empty or x.dtype.is_complex):
        raise RuntimeError(f"{fn}: Input type ({x.dtype}) and weight type ({weight.dtype}) should be the same")
    opts = ConvOptions(stride, lo, hi, dilation, groups)
    if empty and (weight.dtype != x.dtype or not (x.is_floating_point() or x.dtype.is_complex) or 0 in dilation):
        y = _no_elements(x, weight, bias, opts)                          # (N, C_out, *S_out), nothing to compute
    else:
        y = ConvFn.call(x, weight, bias, opts)                           # (N, C_out, *S_out)
    return y.squeeze(0) if unbatched else y


def _no_elements(x, weight, bias, opts: ConvOptions) -> torch.Tensor:
    """The output of a convolution with no batch or no channels where ConvFn cannot take it (dilation
    0, an input/weight dtype mismatch, bool or integer dtypes), as torch's Empty backend makes it:
    its dtype that of X · W[0] (a 0-dim W[0] promotes only across kinds), plus b[0]; no element."""
    C_in = x.shape[1]
    y = x * weight.reshape(-1)[0] if C_in else x.reshape(-1) * weight.reshape(-1)   # C_in = 0: W is empty too
    if bias is not None:
        y = y + bias.reshape(-1)[0]
    # (torch's shape: C_out channels, none when C_in = 0)
    return y.reshape(x.shape[0], weight.shape[0] if C_in else 0, *opts.out_size(x.shape[2:], weight.shape[2:]))


def conv1d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``torch.nn.functional.conv1d``: Y = W_col X_col + b, hand-derived backward (ops.conv.ConvFn)."""
    return _convnd("conv1d", 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, stride=1, padding=0,
           dilation=1, groups: int = 1) -> torch.Tensor:
    """``torch.nn.functional.conv2d``: Y = W_col X_col + b, hand-derived backward (ops.conv.ConvFn)."""
    return _convnd("conv2d", 2, input, weight, bias, stride, padding, dilation, groups)
