"""The elementwise activations of ``torch.nn.functional``: the same names, arguments, defaults
and results; the math (and each f') lives in ``handgrad.ops.activations``.

``inplace=True`` (relu, leaky_relu, elu, silu) behaves as torch's does: the result is written
into ``input`` and ``input`` itself is returned; a leaf (or a view of a leaf) that requires grad
is refused with torch's RuntimeError before anything is written; a tensor that an earlier op
saved for its backward makes that backward fail with torch's version-counter error. relu,
leaky_relu (slope ≥ 0) and elu (α ≥ 0) read f' from the output, so they run truly in place
(``ops.activations.ElementwiseInplaceFn``, nothing else kept). silu needs its input: as torch
does, the input is copied first and that copy is what the backward keeps. With a negative slope
or α, torch writes the result but refuses the backward ("In-place leakyReLu backward ... negative
slope"), and so does handgrad. Under vmap, where autograd refuses an in-place custom Function
that saves its output, the out-of-place Function runs and its result is written into the input.
"""
from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD

from .._compat import is_batched_tensor
from ..ops.activations import ElementwiseFn, ElementwiseInplaceFn, get_activation, scalar
from ._common import autocast, check_tensor

__all__ = ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu", "softplus"]


def _check_floating(input: torch.Tensor, fn: str, complex_ok: bool = False) -> None:
    """torch has no integer/bool (nor, but for silu, complex) kernel for these: NotImplementedError,
    "... not implemented for 'Long'"."""
    if not (input.is_floating_point() or (complex_ok and input.is_complex())):
        raise NotImplementedError(
            f"{fn}(): argument 'input' has dtype {input.dtype}, which {fn} does not support; "
            "expected a floating point tensor"
        )


def _check_inplace(input: torch.Tensor, overlap: bool = True) -> None:
    """torch's checks before an in-place op writes anything, in torch's order, before any dtype
    check: a leaf (or a view of one) that requires grad (torch/csrc/autograd/VariableTypeUtils.h),
    then, unless ``overlap=False`` (relu, whose dtype checks come first), an input whose elements
    share memory (an expanded tensor: aten/src/ATen/MemoryOverlap.cpp)."""
    if torch.is_grad_enabled() and input.requires_grad:
        if input.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place operation.")
        base = input._base
        if base is not None and base.is_leaf and base.requires_grad:
            raise RuntimeError("a view of a leaf Variable that requires grad is being used in an in-place operation.")
    if overlap:
        _check_overlap(input)


def _check_overlap(input: torch.Tensor) -> None:
    # torch's has_internal_overlap: "Yes" exactly where a dim of size > 1 has stride 0
    if input.numel() > 0 and any(stride == 0 and size > 1 for size, stride in zip(input.shape, input.stride())):
        raise RuntimeError(
            "unsupported operation: more than one element of the written-to tensor refers to a single memory "
            "location. Please clone() the tensor before performing the operation."
        )


def _has_tangent(t: torch.Tensor) -> bool:
    return fwAD.unpack_dual(t).tangent is not None


def _apply(input: torch.Tensor, name: str, inplace: bool = False, **options) -> torch.Tensor:
    (input,) = autocast(name, input)
    act = get_activation(name, **options)
    if not inplace:
        return ElementwiseFn.call(input, act)
    _check_overlap(input)
    if input.requires_grad and not torch.is_grad_enabled():
        # A leaf that requires grad, under no_grad: no graph, just the write (through an alias, as
        # a custom Function would hand back a new tensor object here).
        ElementwiseInplaceFn.call(input.detach(), act)
        return input
    silu_graph = name == "silu" and (input.requires_grad or _has_tangent(input))
    if silu_graph or is_batched_tensor(input):
        # The out-of-place Function, then a write into the input: for silu, whose f' needs z (a
        # copy of it is kept; torch's in-place kernels save a clone of self too), and under vmap,
        # where autograd refuses an in-place custom Function that saves its output.
        z = input.clone() if act.saves == "input" else input
        return input.copy_(ElementwiseFn.call(z, act))
    # f' from y: overwrite the input, keep nothing else. (leaky_relu/elu with a negative
    # slope/α: f' needs the overwritten z, so, as torch, the result is written and the backward refused.)
    return ElementwiseInplaceFn.call(input, act)


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.sigmoid``; backward y(1 − y) from the saved output."""
    check_tensor("input", input, fn="sigmoid")
    if not input.is_floating_point() and not input.is_complex():
        input = input.to(torch.get_default_dtype())  # torch promotes integer/bool inputs
    return _apply(input, "sigmoid")


def tanh(input: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.tanh``; backward 1 − y² from the saved output."""
    check_tensor("input", input, fn="tanh")
    if not input.is_floating_point() and not input.is_complex():
        input = input.to(torch.get_default_dtype())  # torch promotes integer/bool inputs
    return _apply(input, "tanh")


def relu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.relu``; backward [y > 0] from the saved output (0 at z = 0)."""
    check_tensor("input", input, fn="relu")
    if inplace:
        _check_inplace(input, overlap=False)
    if input.is_complex():
        raise NotImplementedError("relu(): argument 'input' is complex; relu is not supported for complex types")
    if input.dtype == torch.bool:
        raise RuntimeError("relu(): argument 'input' has dtype torch.bool; Boolean inputs not supported for relu")
    return _apply(input, "relu", inplace)  # integer tensors too, as torch (no gradient there)


def _with_number(input: torch.Tensor, name: str, inplace: bool, option: str, value) -> torch.Tensor:
    """An activation with one number option (leaky_relu's slope, elu's α), checked in torch's order:
    the input, the option's type, in-place constraints, then the dtype."""
    check_tensor("input", input, fn=name)
    number = scalar(value, option, name)
    if inplace:
        _check_inplace(input)
    _check_floating(input, name)
    return _apply(input, name, inplace, **{option: number})


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.leaky_relu``; f'(0) = negative_slope, as torch."""
    return _with_number(input, "leaky_relu", inplace, "negative_slope", negative_slope)


def elu(input: torch.Tensor, alpha: float = 1.0, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.elu``; for z ≤ 0, f' = α e^z = y + α (from the output when α ≥ 0)."""
    return _with_number(input, "elu", inplace, "alpha", alpha)


def gelu(input: torch.Tensor, *, approximate: str = "none") -> torch.Tensor:
    """``torch.nn.functional.gelu``, exact (erf) or ``approximate='tanh'``; backward from the input.
    ``approximate`` is keyword-only, as in torch (``gelu(x, 'tanh')`` is a TypeError there too)."""
    check_tensor("input", input, fn="gelu")
    if not isinstance(approximate, str):
        raise TypeError(f"gelu(): argument 'approximate' must be str, not {type(approximate).__name__}")
    get_activation("gelu", approximate=approximate)  # torch checks the value before the dtype
    _check_floating(input, "gelu")
    return _apply(input, "gelu", approximate=approximate)


def silu(input: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """``torch.nn.functional.silu``: z σ(z); backward σ(z)(1 + z(1 − σ(z))) from the input."""
    check_tensor("input", input, fn="silu")
    if inplace:
        _check_inplace(input)
    _check_floating(input, "silu", complex_ok=True)  # torch's silu takes complex z
    # out of place without a gradient; in place (on a non-leaf) torch differentiates it
    if not inplace and input.is_complex() and input.requires_grad and torch.is_grad_enabled():
        raise RuntimeError("silu does not support automatic differentiation for outputs with complex dtype.")
    return _apply(input, "silu", inplace)


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    """``torch.nn.functional.softplus``: linear (f' = 1) where βz > threshold, else log(1 + e^{βz})/β."""
    check_tensor("input", input, fn="softplus")
    b = scalar(beta, "beta", "softplus")
    t = scalar(threshold, "threshold", "softplus")
    _check_floating(input, "softplus")
    return _apply(input, "softplus", beta=b, threshold=t)
