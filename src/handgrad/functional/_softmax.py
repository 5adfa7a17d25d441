from __future__ import annotations

import torch

from ..ops.softmax import LogSoftmaxFn, SoftmaxFn
from ._common import autocast, autocast_on, check_tensor, shape_str, warn

__all__ = ["softmax", "log_softmax"]


def _implicit_dim(name: str, ndim: int, stacklevel: int) -> int:
    """torch's legacy rule (``torch.nn.functional._get_softmax_dim``), with its warning: dim 0 for
    0-d, 1-d and 3-d inputs, dim 1 otherwise."""
    warn(
        f"Implicit dimension choice for {name} has been deprecated. "
        "Change the call to include dim=X as an argument.",
        stacklevel=stacklevel,
    )
    return 0 if ndim in (0, 1, 3) else 1


def _prepare(name: str, input, dim, stacklevel: int, dtype):
    """Validate as torch does (type, then dim, then dtype) and return (input, non-negative dim);
    dim None for an empty non-floating input (torch returns it, empty, without a kernel).

    ``stacklevel`` is the caller's ``_stacklevel``, counted from ``softmax``/``log_softmax`` as in
    torch; this helper adds one frame, so the warning is raised one level further up."""
    if dtype is None and type(dim) is int and isinstance(input, torch.Tensor) and input.is_floating_point() \
            and not autocast_on():                   # the common call, in a third of the checks' time
        ndim = input.dim() or 1
        if -ndim <= dim < ndim:
            return input, dim % ndim
    check_tensor("input", input, fn=name)
    if dim is None:
        dim = _implicit_dim(name, input.dim(), stacklevel + 1)
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{name}(): argument 'dim' (position 1) must be int, not {type(dim).__name__}")
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise TypeError(f"{name}(): argument 'dtype' must be torch.dtype, not {type(dtype).__name__}")
    ndim = max(input.dim(), 1)  # a 0-d tensor has the dims of a 1-d one, as in torch's wrap rule
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{name}(): argument 'dim' is out of range for input of shape {shape_str(input)}: Dimension out of "
            f"range (expected to be in range of [{-ndim}, {ndim - 1}], but got {dim})"
        )
    if dtype is not None:
        input = input.to(dtype)  # recorded by autograd: the gradient comes back through the cast
    else:
        # CUDA autocast runs softmax in float32 unless dtype is given (torch's fp32_set_opt_dtype)
        input, = autocast(name, input)
    if not input.is_floating_point():
        if input.numel() == 0:  # torch: an empty result of any dtype; no kernel runs, so none is refused
            if input.is_complex() and input.requires_grad and torch.is_grad_enabled():
                raise RuntimeError(f"_{name} does not support automatic differentiation for outputs with complex dtype.")
            return input, None
        what = f"argument 'dtype' {dtype}" if dtype is not None else f"argument 'input' of dtype {input.dtype}"
        raise NotImplementedError(
            f"{name}(): {what} is not supported: {name} needs a floating dtype (torch: \"{name}_kernel_impl\" "
            f"not implemented for {input.dtype})"
        )
    return input, dim % ndim


def softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3,
            dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.nn.functional.softmax``; backward Y ⊙ (G − (G ⊙ Y)1) from the saved output
    (ops.softmax.SoftmaxFn)."""
    input, dim = _prepare("softmax", input, dim, _stacklevel, dtype)
    return torch.empty_like(input) if dim is None else SoftmaxFn.call(input, dim)


def log_softmax(input: torch.Tensor, dim: int | None = None, _stacklevel: int = 3,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``torch.nn.functional.log_softmax``; backward G − exp(Y) ⊙ (G)1 from the saved output
    (ops.softmax.LogSoftmaxFn)."""
    input, dim = _prepare("log_softmax", input, dim, _stacklevel, dtype)
    return torch.empty_like(input) if dim is None else LogSoftmaxFn.call(input, dim)
