"""``max_pool2d``, ``avg_pool2d``, ``adaptive_avg_pool2d``: torch.nn.functional's arguments,
checks and output sizes; the math is ops.pool (docs/derivation.md#pooling)."""
from __future__ import annotations

import torch

from ..ops.pool import AvgPool2dFn, AvgPoolOptions, GlobalAvgPoolFn, MaxPool2dFn, MaxPoolOptions, SeparablePoolFn, adaptive_matrix, avg_pool_matrix
from ._common import check_tensor, shape_str

__all__ = ["max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"]


def _pair(fn: str, name: str, value) -> tuple[int, int]:
    t = (value, value) if isinstance(value, int) else tuple(value)
    if len(t) == 1:
        t = t * 2
    if len(t) != 2:
        raise RuntimeError(f"{fn}: {name} must either be a single int, or a tuple of two ints, but got {name}={list(t)}")
    return t


def _batched(fn: str, input, error=RuntimeError) -> torch.Tensor:
    """(N, C, H, W): a 3-D (C, H, W) input gets N = 1; every dim but N must be non-empty."""
    check_tensor("input", input, fn=fn)
    if input.dim() not in (3, 4):
        raise error(f"{fn}: expected a 3D (unbatched) or 4D (batched) input, but got input of size {shape_str(input)}")
    if any(d == 0 for d in input.shape[-3:]):
        raise RuntimeError(f"{fn}: Expected 3D or 4D (batch mode) tensor with optional 0 dim batch size for input, "
                           f"but got input of size {shape_str(input)}")
    return input.unsqueeze(0) if input.dim() == 3 else input


def _window_args(fn, kernel_size, stride, padding, dilation):
    k = _pair(fn, "kernel_size", kernel_size)
    s = k if stride is None or (not isinstance(stride, int) and len(stride) == 0) else _pair(fn, "stride", stride)
    p, d = _pair(fn, "padding", padding), _pair(fn, "dilation", dilation)
    for name, v in (("kernel_size", k), ("stride", s), ("dilation", d)):
        if any(x <= 0 for x in v):
            raise RuntimeError(f"{fn}: {name} should be greater than zero, but got {name}={list(v)}")
    if any(x < 0 for x in p):
        raise RuntimeError(f"{fn}: padding should not be negative, but got padding={list(p)}")
    return k, s, p, d


def _out_size(size: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> int:
    """torch's pooling_output_shape: ⌊ or ⌈(size + 2p − d(k − 1) − 1)/s⌉ + 1, and in ceil_mode
    the last window is dropped when it would start in the end padding."""
    out = (size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= size + p:
        out -= 1
    return out


def empty_window(size: int, out: int, k: int, s: int, p: int, d: int) -> bool:
    """Does some window's every tap, o·s − p + j·d (j < k), fall outside [0, size)? Never without
    padding (tap 0 of window o is o·s < size); with d = 1 the taps are one run, so the first and the
    last window decide; else each window is asked (Python, per call: only where it must be)."""
    if p == 0:
        return False
    if d == 1:
        return not (k - 1 - p >= 0 and (out - 1) * s - p < size)
    return any(not any(0 <= o * s - p + j * d < size for j in range(k)) for o in range(out))


def _out_shape(fn, x, k, s, p, d, ceil_mode, half_of):
    """(H_out, W_out), after torch's checks: padding at most half the (effective) kernel, an output
    of at least one element."""
    for i in range(2):
        if p[i] > half_of[i] // 2:
            raise RuntimeError(f"{fn}: pad should be at most half of effective kernel size, but got padding={list(p)}, "
                               f"kernel_size={list(k)} and dilation={list(d)}")
    out = tuple(_out_size(x.shape[2 + i], k[i], s[i], p[i], d[i], ceil_mode) for i in range(2))
    if any(o < 1 for o in out):
        raise RuntimeError(f"{fn}: Given input of size {shape_str(x)} and kernel_size={list(k)}, the calculated output "
                           f"size {list(out)} is too small")
    return out


def max_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode: bool = False,
               return_indices: bool = False):
    """``torch.nn.functional.max_pool2d``: the max over each window; backward scatters G to the
    argmax (ops.pool.MaxPool2dFn). ``return_indices=True`` also returns the argmax indices (int64)."""
    x = _batched("max_pool2d", input)                                  # (N, C, H, W)
    k, s, p, d = _window_args("max_pool2d", kernel_size, stride, padding, dilation)
    out = _out_shape("max_pool2d", x, k, s, p, d, ceil_mode, tuple((ki - 1) * di + 1 for ki, di in zip(k, d)))
    for i in range(2):
        if empty_window(x.shape[2 + i], out[i], k[i], s[i], p[i], d[i]):
            # torch's kernel returns -inf with an argmax outside the input there, and its
            # backward writes G through it, out of bounds (heap corruption on CPU)
            raise RuntimeError(f"max_pool2d: a window holds no element of the input (only padding, between its "
                               f"dilated taps): input of size {shape_str(input)}, kernel_size={list(k)}, stride={list(s)}, "
                               f"padding={list(p)}, dilation={list(d)}, ceil_mode={bool(ceil_mode)}")
    y, idx = MaxPool2dFn.call(x, MaxPoolOptions(k, s, p, d, bool(ceil_mode)))
    if input.dim() == 3:
        y, idx = y.squeeze(0), idx.squeeze(0)
    return (y, idx) if return_indices else y


def avg_pool2d(input: torch.Tensor, kernel_size, stride=None, padding=0, ceil_mode: bool = False,
               count_include_pad: bool = True, divisor_override: int | None = None) -> torch.Tensor:
    """``torch.nn.functional.avg_pool2d``: Y = A_h X A_wᵀ with torch's windows and divisors
    (ops.pool.AvgPool2dFn)."""
    if divisor_override is not None and (isinstance(divisor_override, bool)
                                         or not isinstance(divisor_override, (int, torch.Tensor))):
        # torch's binding: before any check of the tensors or the window
        raise TypeError(f"avg_pool2d(): argument 'divisor_override' must be int, not {type(divisor_override).__name__}")
    x = _batched("avg_pool2d", input, IndexError)                     # (N, C, H, W); torch: IndexError for 2-D
    k, s, p, d = _window_args("avg_pool2d", kernel_size, stride, padding, 1)
    if divisor_override is not None and divisor_override == 0:
        raise RuntimeError(f"avg_pool2d: divisor must be not zero (divisor_override={divisor_override})")
    H_out, W_out = _out_shape("avg_pool2d", x, k, s, p, d, ceil_mode, k)
    if not input.is_floating_point():
        _no_kernel("avg_pool2d", input)          # (torch's CPU kernel also truncates int64 averages: differences.md)
    H, W = x.shape[2:]
    a_h = avg_pool_matrix(H, H_out, k[0], s[0], p[0], count_include_pad, divisor_override, x)   # (H_out, H)
    a_w = avg_pool_matrix(W, W_out, k[1], s[1], p[1], count_include_pad, divisor_override, x)   # (W_out, W)
    if divisor_override is not None:
        a_h = a_h / divisor_override                                                           # once, on A_h
    opts = AvgPoolOptions(k, s, p, bool(ceil_mode), bool(count_include_pad),
                          None if divisor_override is None else int(divisor_override))
    y = AvgPool2dFn.call(x, opts, a_h, a_w)                            # (N, C, H_out, W_out)
    return y.squeeze(0) if input.dim() == 3 else y


def adaptive_avg_pool2d(input: torch.Tensor, output_size) -> torch.Tensor:
    """``torch.nn.functional.adaptive_avg_pool2d``: Y = A_h X A_wᵀ with windows
    [⌊i·H/H_out⌋, ⌈(i + 1)·H/H_out⌉) (ops.pool.SeparablePoolFn). A None size keeps the input's."""
    fn = "adaptive_avg_pool2d"
    check_tensor("input", input, fn=fn)
    size = _output_size(fn, output_size, input)
    if input.dim() not in (3, 4):
        raise RuntimeError(f"{fn}(): Expected 3D or 4D tensor, but got input of size {shape_str(input)}")
    if any(d == 0 for d in input.shape[-2:]):  # torch's rule: H and W (N and C may be empty)
        raise RuntimeError(f"{fn}(): Expected input to have non-zero size for non-batch dimensions, but input has "
                           f"sizes {shape_str(input)}")
    x = input.unsqueeze(0) if input.dim() == 3 else input             # (N, C, H, W)
    H, W = x.shape[2:]
    H_out, W_out = (H if size[0] is None else size[0]), (W if size[1] is None else size[1])
    if H_out < 0 or W_out < 0:
        raise RuntimeError(f"{fn}: elements of output_size must be greater than or equal to 0 but got {list(size)}")
    out_shape = (*input.shape[:-2], H_out, W_out)
    if not input.is_floating_point():
        if input.numel() and H_out * W_out:
            _no_kernel(fn, input)
        if input.is_complex() and input.requires_grad:
            raise RuntimeError(f"{fn}: does not support automatic differentiation for outputs with complex dtype "
                               f"(input of size {shape_str(input)})")
        return input.new_empty(out_shape)                               # no element to compute: torch's too
    if H_out == W_out == 1:
        y = GlobalAvgPoolFn.call(x)                                     # (N, C, 1, 1): the mean, as torch's
    else:
        y = SeparablePoolFn.call(x, adaptive_matrix(H, H_out, x), adaptive_matrix(W, W_out, x))   # (N, C, H_out, W_out)
    return y.squeeze(0) if input.dim() == 3 else y


def _output_size(fn: str, output_size, input) -> tuple:
    """torch's parsing, in its order: an int is (n, n); a sequence is filled from the input's last
    dims where None (ValueError if it is longer than the input has dims, TypeError for what has no
    length), its elements ints (TypeError), two of them (RuntimeError)."""
    if isinstance(output_size, int) and not isinstance(output_size, bool):
        return output_size, output_size
    try:
        n = len(output_size)
    except TypeError:
        raise TypeError(f"{fn}: object of type '{type(output_size).__name__}' has no len() "
                        f"(output_size={output_size!r})") from None
    if input.dim() <= n:
        raise ValueError(f"{fn}: Input dimension should be at least {n + 1} (output_size={output_size!r}, "
                         f"input of size {shape_str(input)})")
    size = tuple(output_size)
    for v in size:
        integral = isinstance(v, int) or (isinstance(v, torch.Tensor) and v.dim() == 0
                                          and not v.is_floating_point() and not v.is_complex())
        if v is not None and not integral:
            raise TypeError(f"{fn}(): argument 'output_size' must be tuple of ints, but found element of type "
                            f"{type(v).__name__} (output_size={output_size!r})")
    if len(size) != 2:
        raise RuntimeError(f"{fn}: output_size must be 2, but got output_size={list(size)}")
    return tuple(None if v is None else int(v) for v in size)


def _no_kernel(fn: str, input) -> None:
    """torch's NotImplementedError: pooling computes in floating types only."""
    raise NotImplementedError(f'{fn}: "{fn}" not implemented for {input.dtype} (input of size {shape_str(input)}): '
                              "it computes in floating types only")
