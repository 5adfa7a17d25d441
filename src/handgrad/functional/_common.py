"""Argument handling shared by the public functions: autocast, reductions, validation.

No math here: the math lives in ``handgrad.ops``.
"""
from __future__ import annotations

import numbers

import warnings

import torch

from .._compat import any_autocast_enabled, is_functorch_wrapped

# What torch's autocast does with each op (torch/csrc/autocast_mode.cpp): "lower" runs in the
# autocast dtype, "fp32" in float32; ops not listed run in their inputs' dtype. The registry's
# autocast test checks every op's output dtype against torch's, so this table cannot drift.
_AUTOCAST = {
    "cpu": {
        "linear": "lower", "conv1d": "lower", "conv2d": "lower", "scaled_dot_product_attention": "lower",
        "mse_loss": "fp32", "nll_loss": "fp32", "cross_entropy": "fp32",
        "binary_cross_entropy_with_logits": "fp32", "half_squared_error": "fp32",
    },
    "cuda": {
        "linear": "lower", "conv1d": "lower", "conv2d": "lower", "scaled_dot_product_attention": "lower",
        "softmax": "fp32", "log_softmax": "fp32", "layer_norm": "fp32", "softplus": "fp32",
        "mse_loss": "fp32", "nll_loss": "fp32", "cross_entropy": "fp32",
        "binary_cross_entropy_with_logits": "fp32", "half_squared_error": "fp32", "group_norm": "fp32",
    },
}


def autocast(op: str, *tensors):
    """Cast ``tensors`` as torch's autocast would for ``op``; the casts are recorded by autograd
    outside the handgrad Function, so its backward sees one dtype, as native autograd does."""
    if not autocast_on():
        return tensors                                          # the common case, without a device lookup
    # (a list, not next(…, default): the Dynamo of torch 2.4/2.5 cannot trace that)
    tensor_args = [t for t in tensors if isinstance(t, torch.Tensor)]
    if not tensor_args:
        return tensors
    first = tensor_args[0]
    device = first.device.type
    if device not in _AUTOCAST or not torch.is_autocast_enabled(device):
        return tensors
    policy = _AUTOCAST[device].get(op)
    if policy is None:
        return tensors
    dtype = torch.get_autocast_dtype(device) if policy == "lower" else torch.float32
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64 else t
        for t in tensors
    )


def autocast_on() -> bool:
    """Is autocast on for a device ``_AUTOCAST`` covers? (0.1 µs when none is on, the common case)"""
    return any_autocast_enabled() and (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda"))


def warn(message: str, stacklevel: int = 3) -> None:
    """``warnings.warn`` as torch's functional does, except while Dynamo traces: it cannot trace
    ``warnings.warn`` and would break the graph (torch's own warning lives in its C++ kernel)."""
    if not torch.compiler.is_compiling():
        warnings.warn(message, stacklevel=stacklevel + 1)


# ---------------------------------------------------------------------------------------------
# Each option torch's losses and linear layers take, validated by one function, used by every
# op that takes it (torch's exception types, messages naming the argument and the shapes).
# ---------------------------------------------------------------------------------------------

REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> str:
    """'none' | 'mean' | 'sum'; torch's legacy alias 'elementwise_mean' is 'mean', with torch's
    deprecation warning; anything else is torch's ValueError."""
    if reduction == "elementwise_mean":
        warn("reduction='elementwise_mean' is deprecated. Please use reduction='mean' instead.")
        return "mean"
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")  # torch's own message
    return reduction


def check_label_smoothing_type(fn: str, label_smoothing) -> None:
    """A number (or a 0-d tensor): torch's binding refuses anything else with a TypeError, before
    it looks at the tensors."""
    if not isinstance(label_smoothing, (numbers.Real, torch.Tensor)):
        raise TypeError(f"{fn}(): argument 'label_smoothing' must be float, not {type(label_smoothing).__name__}")


def check_label_smoothing(fn: str, label_smoothing: float) -> float:
    """ε ∈ [0, 1]. torch refuses ε > 1 (RuntimeError) and applies the smoothing only when ε > 0:
    a negative ε (or nan) is no smoothing at all, so it is mapped to 0 here."""
    check_label_smoothing_type(fn, label_smoothing)
    eps = float(label_smoothing)
    if eps > 1.0:
        raise RuntimeError(f"{fn}: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    return eps if eps > 0.0 else 0.0


def check_ignore_index(fn: str, ignore_index, target, *, probs: bool, none_is_default: bool = False) -> int:
    """The class index whose targets are ignored. With class-probability targets,
    ``cross_entropy`` refuses one ≥ 0 (its default −100 is allowed); ``linear_cross_entropy``
    (``none_is_default``: its default is None, meaning −100) refuses any given value."""
    if none_is_default:
        if ignore_index is not None and probs:
            raise RuntimeError(f"{fn}: ignore_index cannot be specified when target contains probabilities "
                               f"(target of shape {shape_str(target)}, ignore_index={ignore_index})")
        return -100 if ignore_index is None else int(ignore_index)
    if probs and ignore_index >= 0:
        raise RuntimeError(f"{fn}: ignore_index ({ignore_index}) is not supported for floating point target "
                           f"(target of shape {shape_str(target)})")
    return int(ignore_index)


def check_not_differentiable(fn: str, name: str, t) -> None:
    """torch refuses a weight it does not differentiate when it requires grad and grad mode is
    on (under ``no_grad`` it is accepted: nothing is recorded)."""
    if t is not None and t.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{fn}: not differentiable with respect to argument '{name}' "
                           f"(shape {shape_str(t)}); this input cannot have requires_grad True")


def check_class_weight(fn: str, weight, input, C: int, *, probs: bool):
    """The class weight w: C values, returned as (C,) or None. torch's rules: a 1-D (C,) tensor,
    except for K-dim inputs (N, C, d1, …) with class indices, where any shape of C elements
    passes (torch's nll_loss2d/nd flatten it); the input's dtype for class indices (for
    probabilities torch promotes instead); differentiated only for probability targets."""
    if weight is None:
        return None
    if probs or input.dim() <= 2:
        if weight.dim() != 1 or weight.numel() != C:
            raise RuntimeError(f"{fn}: weight tensor should be defined either for all {C} classes or no classes "
                               f"but got weight of shape {shape_str(weight)} (input of shape {shape_str(input)})")
    elif weight.numel() != C:
        raise RuntimeError(f"{fn}: weight tensor should be defined either for all {C} classes or no classes, "
                           f"but got weight of shape {shape_str(weight)} (input of shape {shape_str(input)})")
    if not probs:
        if not input.is_floating_point():
            no_kernel(fn, input, kernel="nll_loss")                 # the kernel's dispatch, before its dtype check
        if weight.dtype != input.dtype:
            raise RuntimeError(f"{fn}: expected weight of scalar type {input.dtype} (the input's) but found {weight.dtype}")
        check_not_differentiable(fn, "weight", weight)
    return weight.reshape(C)


def check_class_target(fn: str, input, target, *, allow_probs: bool, weight=None) -> tuple[int, bool]:
    """Validate (input, target) as torch's cross_entropy / nll_loss do, in torch's order; returns C
    and whether ``target`` holds class probabilities (torch takes that path exactly when the
    shapes are equal). ``input`` may be a meta tensor (linear_cross_entropy's logits' shape).
    torch's order: the probability target's dtype; cross_entropy's log-softmax (NotImplementedError
    for a non-floating input with elements); nll_loss_nd's dims and batch size (ValueError); the
    autograd check of a class ``weight`` requiring grad; nll_loss's shape checks; the target's
    dtype; then the kernel's dispatch on the input's dtype (NotImplementedError)."""
    probs = allow_probs and target.shape == input.shape
    if probs and not target.is_floating_point():
        raise RuntimeError(f"{fn}: Expected floating point type for target with class probabilities "
                           f"(target of shape {shape_str(target)}), got {target.dtype}")
    if allow_probs and not input.is_floating_point():
        if input.numel():
            no_kernel(fn, input, kernel="log_softmax")
        if input.is_complex() and input.requires_grad:       # log_softmax of no element, then autograd's check
            raise RuntimeError(f"{fn}: _log_softmax does not support automatic differentiation for outputs with "
                               f"complex dtype (input of shape {shape_str(input)})")
    if input.dim() == 0:
        if probs:  # torch's probability path asks for the class dim 1 first
            raise IndexError(f"{fn}: Dimension specified as 1 but input of shape {shape_str(input)} has no dimensions")
        raise ValueError(f"{fn}: Expected 1 or more dimensions (got 0) for input of shape {shape_str(input)}")
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if probs:
        return C, True
    if input.dim() >= 2 and (target.dim() == 0 or target.shape[0] != input.shape[0]):
        n_t = target.shape[0] if target.dim() else 0
        raise ValueError(f"{fn}: Expected input batch_size ({input.shape[0]}) to match target batch_size ({n_t}): "
                         f"input of shape {shape_str(input)}, target of shape {shape_str(target)}")
    check_not_differentiable(fn, "weight", weight)
    if input.dim() <= 2 and target.dim() > 1:
        raise RuntimeError(f"{fn}: 0D or 1D target tensor expected, multi-target not supported: "
                           f"target of shape {shape_str(target)} for input of shape {shape_str(input)}")
    if input.dim() == 1 and target.numel() != 1:
        raise ValueError(f"{fn}: For 1D input, 1D target must have size 1, but got target size: {target.numel()} "
                         f"(target of shape {shape_str(target)} for unbatched input of shape {shape_str(input)})")
    if input.dim() >= 2:
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected or (input.dim() not in (2, 4) and C == 0 and target.numel()):
            # (torch views a K-dim input but 4-D as (N, C, 1, −1): with C = 0 no size fits the target)
            raise RuntimeError(f"{fn}: Expected target size {list(expected)}, got {list(target.shape)} "
                               f"(target of shape {shape_str(target)} for input of shape {shape_str(input)}"
                               f"{'; size mismatch with 0 classes' if target.shape == expected else ''})")
    if input.dim() > 2 and not input.is_floating_point():
        # K-dim (torch views any as 4-D): nll_loss2d checks the target's dtype (Long or Byte), the weight's size, then dispatches
        # on the input's dtype, and only then refuses a Byte K-dim target
        if target.dtype not in (torch.int64, torch.uint8):
            _target_dtype_error(fn, target, input)
        if weight is not None and weight.numel() != C:
            raise RuntimeError(f"{fn}: weight tensor should be defined either for all {C} classes or no classes, "
                               f"but got weight of shape {shape_str(weight)} (input of shape {shape_str(input)})")
        no_kernel(fn, input, kernel="nll_loss2d")
    if target.dtype != torch.int64 and not (target.dtype == torch.uint8 and (input.dim() <= 2 or not target.numel())):
        # torch: Byte targets only for 1-D/2-D input (its K-dim kernels take Long alone, and run for no element)
        _target_dtype_error(fn, target, input)
    return C, False


def _target_dtype_error(fn: str, target, input):
    scalar = torch.empty(0, dtype=target.dtype).type().split(".")[-1].removesuffix("Tensor")   # torch's 'Float'
    raise RuntimeError(f"{fn}: expected target dtype to be Long or Byte, but got {scalar} ({target.dtype}) "
                       f"(target of shape {shape_str(target)} for input of shape {shape_str(input)}"
                       f"{'; Byte only for 1-D or 2-D input' if target.dtype == torch.uint8 else ''})")


def _is_wrapped(t) -> bool:
    """True for a functorch-wrapped (vmap/grad) tensor, whose values Python cannot branch on."""
    return is_functorch_wrapped(t)


def check_target_range(fn: str, y, C: int, ignore_index: int, input) -> None:
    """IndexError for a class index outside [0, C) that is not ignore_index (torch: "Target 5 is
    out of bounds."), compared as int64 (a Byte target never wraps against C > 255).

    One policy for every op with class indices: checked on the host only for CPU targets, where
    it costs no device sync. On CUDA reading the answer back would stall every step on a sync
    torch does not make; there the gather of the out-of-range index asserts on the device, as
    torch's own kernel does. Skipped while compiling (a data-dependent branch), under vmap (no
    single value) and for empty targets."""
    if torch.compiler.is_compiling() or y.device.type != "cpu" or _is_wrapped(y) or y.numel() == 0:
        return
    lo, hi = torch.aminmax(y)                                   # one pass; the rest only when out of [0, C)
    if lo >= 0 and hi < C:
        return
    y = y.long()
    bad = (y != ignore_index) & ((y < 0) | (y >= C))
    if bad.any():
        value = int(y[bad][0])
        raise IndexError(f"{fn}: Target {value} is out of bounds: target holds class indices in [0, {C}) for input "
                         f"of shape {shape_str(input)}")


def check_linear(fn: str, weight, bias, *, features: int, dtype: torch.dtype, input=None, layer: int | None = None,
                 names: tuple[str, str] = ("weight", "bias")):
    """A linear layer's weight and bias, torch's RuntimeError for what ``linear`` refuses, naming
    the argument and the shapes; returns the bias to use.

    ``input`` given (``linear`` itself): torch's rules. W is 1-D or 2-D with ``features`` columns,
    of the input's dtype. torch adds b one of two ways (aten/native/Linear.cpp): by addmm for a
    2-D input, or a contiguous input with a b along the last dim only: b of the input's dtype,
    and W 2-D; else in place on the product (``output.add_(b)``): b of any dtype that casts into
    the output's (cast here, so the hand-derived Function sees one dtype). Either way b
    broadcasts to the output without growing it.
    ``input`` None (a fused layer; ``layer`` its index in an mlp): W (D_out, D_in), b (D_out,),
    one dtype. ``names``: the arguments' names (linear_cross_entropy's ``linear_weight``, …)."""
    w_name, b_name = names if layer is None else (f"weights[{layer}]", f"biases[{layer}]")
    check_tensor(w_name, weight, fn=fn)
    if bias is not None:
        check_tensor(b_name, bias, fn=fn)
    if input is not None and (input.dim() == 0 or weight.dim() == 0):
        raise RuntimeError(f"{fn}: both arguments to linear need to be at least 1D, but input is {input.dim()}D "
                           f"and weight is {weight.dim()}D")
    if weight.dim() > 2 or (input is None and weight.dim() != 2):
        raise RuntimeError(f"{fn}: {w_name} must be {'1-D or ' if input is not None else ''}2-D (D_out, D_in), "
                           f"but got shape {shape_str(weight)}")
    if weight.shape[-1] != features:
        what = "input" if layer in (None, 0) else f"the output of layer {layer - 1}"
        what = what if input is None else f"input {shape_str(input)}"
        raise RuntimeError(f"{fn}: {w_name} of shape {shape_str(weight)} expects {weight.shape[-1]} features, "
                           f"but {what} has {features} (input and weight shapes cannot be multiplied)")
    if weight.dtype != dtype:
        raise RuntimeError(f"{fn}: expected input and {w_name} to have the same dtype, but got {dtype} and {weight.dtype}")
    if bias is None:
        return None
    if input is None:
        if bias.dim() <= 1 and bias.numel() == 1:
            bias = bias.reshape(1).expand(weight.shape[0])      # () or (1,): broadcast to (D_out,), as linear's
        if bias.shape != weight.shape[:1]:
            raise RuntimeError(f"{fn}: {b_name} of shape {shape_str(bias)} does not match {w_name} "
                               f"{shape_str(weight)}: expected [{weight.shape[0]}]")
        if bias.dtype != dtype:
            raise RuntimeError(f"{fn}: expected input and {b_name} to have the same dtype, but got {dtype} and {bias.dtype}")
        return bias
    if weight.dim() == 2 and bias.dim() == 1 and bias.shape[0] == weight.shape[0] and bias.dtype == dtype:
        return bias        # the common (D_out,) bias: broadcasts to any (*, D_out), either path (no broadcast_shapes: 11 µs)
    out_shape = torch.Size((*input.shape[:-1], *weight.shape[:-1]))
    # torch's addmm path (Linear.cpp; measured on torch 2.13): a 2-D input, or a contiguous one with a
    # contiguous bias of one dim that is not 1 ((D_out,), (1,), (1, D_out), (k, 1), …): the input flattened to
    # (N, D_in), b expanded to (N, D_out), the result viewed as the output. Else matmul, then
    # output.add_(b) in place: b broadcasts to the output without growing it, of any dtype that casts.
    addmm = input.dim() == 2 or (input.is_contiguous() and bias.is_contiguous() and (
        bias.dim() == 1 or sum(n != 1 for n in bias.shape) == 1))
    if addmm and weight.dim() == 1:
        raise RuntimeError(f"{fn}: a 1-D weight {shape_str(weight)} with bias {shape_str(bias)} on input "
                           f"{shape_str(input)}: mat2 must be a matrix, got 1-D tensor (torch's addmm path)")
    rows = torch.Size((input.shape[:-1].numel(), out_shape[-1] if weight.dim() == 2 else 1))
    target = rows if addmm else out_shape
    try:
        broadcast = torch.broadcast_shapes(target, bias.shape)
    except RuntimeError:
        broadcast = None
    if broadcast != target:
        raise RuntimeError(f"{fn}: bias of shape {shape_str(bias)} does not broadcast to the "
                           f"{'flattened output' if addmm else 'output'} shape {list(target)} (output {list(out_shape)})")
    if addmm and input.dim() != 2 and bias.dim() > 1:
        bias = bias.expand(rows).reshape(out_shape)             # b per flattened row, as the output's view
    if bias.dtype == dtype:
        return bias
    if addmm or not torch.can_cast(torch.result_type(torch.empty((1,), dtype=dtype), bias), dtype):
        raise RuntimeError(f"{fn}: expected input and bias to have the same dtype, but got {dtype} and {bias.dtype} "
                           f"(bias of shape {shape_str(bias)}, input of shape {shape_str(input)})")
    return bias.to(dtype)                                       # torch's output.add_(bias) casts


def no_kernel(fn: str, t, *, name: str = "input", kernel: str | None = None) -> None:
    """torch's NotImplementedError for a dtype its kernel has no instance for ("mse_cpu" not
    implemented for 'Long'): handgrad computes in floating types only."""
    raise NotImplementedError(f'{fn}: "{kernel or fn}" not implemented for {t.dtype} (argument \'{name}\' of shape '
                              f"{shape_str(t)}): handgrad computes in floating types only")


def check_no_bool_subtraction(fn: str, input, target) -> None:
    """torch's RuntimeError where its formula subtracts a bool tensor (x − y of a composite path)."""
    for name, t in (("input", input), ("target", target)):
        if t is not None and t.dtype == torch.bool:
            raise RuntimeError(f"{fn}: Subtraction, the `-` operator, with a bool tensor is not supported "
                               f"({name} of dtype torch.bool, shape {shape_str(t)})")


def check_tensor(name: str, t, *, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(t).__name__}")


def shape_str(t) -> str:
    """A tensor's shape as torch prints it, ``[2, 3]``; an object that describes itself (the
    never-materialised logits of linear_cross_entropy) says what it stands for."""
    text = "[" + ", ".join(str(s) for s in t.shape) + "]"
    describe = getattr(t, "describe", None)
    return text if describe is None else f"{text} ({describe})"
