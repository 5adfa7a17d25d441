"""The losses' argument handling: torch.nn.functional's signatures (deprecated ``size_average``
and ``reduce`` included, mapped as torch maps them), autocast, validation with torch's
exception types, and the layout the Functions in ``handgrad.ops.losses`` work on
((N, C, d1, …) → rows (M, C); unbatched (C,) → one row). No math here.
"""
from __future__ import annotations

import torch
from .._compat import functorch_transforms_active
from .._compat import nn_reduction as _Reduction

from ..ops.bce import BCEWithLogitsFn
from ..ops.losses import CrossEntropyFn, CrossEntropyOptions, NLLLossFn, SquaredErrorFn
from ._common import (autocast, check_class_target, check_class_weight, check_ignore_index, check_label_smoothing,
                      check_no_bool_subtraction, check_not_differentiable, check_reduction, check_target_range,
                      check_tensor, autocast_on, no_kernel, shape_str, warn, REDUCTIONS)

__all__ = ["mse_loss", "half_squared_error", "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits"]


def _legacy(size_average, reduce, reduction, *, check=True):
    """torch's mapping of the deprecated flags (with its deprecation warning), then the check."""
    if size_average is not None or reduce is not None:
        reduction = _Reduction.legacy_get_string(size_average, reduce)
    return check_reduction(reduction) if check else reduction


def _promote(*tensors):
    """Cast the floating tensors (and integer targets of an elementwise loss) to one result type,
    as torch's elementwise kernels promote; the casts are recorded outside the Function."""
    present = [t for t in tensors if t is not None]
    dtype = present[0].dtype
    for t in present[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def _same_floats(input, target) -> bool:
    """The common call of an elementwise loss, in one cheap test (it runs every step): two
    tensors of one shape and one floating dtype, no autocast: nothing to warn about, cast or
    refuse."""
    return (type(input) is torch.Tensor and type(target) is torch.Tensor and input.shape == target.shape
            and input.dtype == target.dtype and input.is_floating_point() and not autocast_on())


def _check_floating(fn, kernel, input, target, weight=None):
    """torch's elementwise loss kernels compute in the floating result type of (input, target):
    NotImplementedError for an integer, bool or complex one (the weighted mse_loss too, where
    torch's composite path computes integers: docs/differences.md)."""
    for t in (input, target, weight):
        if t is not None and t.is_complex():
            no_kernel(fn, t, kernel=kernel)
    if not (input.is_floating_point() or target.is_floating_point() or (weight is not None and weight.is_floating_point())):
        no_kernel(fn, input, kernel=kernel)


def _broadcast_shape(fn, a_name, a, b_name, b):
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise RuntimeError(
            f"{fn}: {b_name} of shape {shape_str(b)} does not broadcast with {a_name} of shape {shape_str(a)}"
        ) from None


# ---------------------------------------------------------------------------------------------
# Squared error
# ---------------------------------------------------------------------------------------------

def mse_loss(input: torch.Tensor, target: torch.Tensor, size_average: bool | None = None, reduce: bool | None = None,
             reduction: str = "mean", weight: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.mse_loss``: w ⊙ (x − y)², reduced; 'mean' with ``weight`` divides by
    Σ w, as torch does. Hand-derived backward for input, target and weight (ops.losses.SquaredErrorFn)."""
    if weight is None and size_average is None and reduce is None and _same_floats(input, target) and (
            reduction in REDUCTIONS):
        return SquaredErrorFn.call(input, target, None, reduction, "mse")     # every check below passes
    check_tensor("input", input, fn="mse_loss")
    check_tensor("target", target, fn="mse_loss")
    if weight is not None:
        check_tensor("weight", weight, fn="mse_loss")
    input, target, weight = autocast("mse_loss", input, target, weight)
    if target.shape != input.shape:
        warn(
            f"Using a target size ({target.size()}) that is different to the input size ({input.size()}). "
            "This will likely lead to incorrect results due to broadcasting. "
            "Please ensure they have the same size.",
            stacklevel=2,
        )
    # torch's order: the flags, the broadcast, the weight's shape, and only then the reduction
    reduction = _legacy(size_average, reduce, reduction, check=False)
    _broadcast_shape("mse_loss", "input", input, "target", target)
    if weight is not None and weight.shape != input.shape:
        raise ValueError(f"mse_loss: weight of shape {shape_str(weight)} must have the input's shape {shape_str(input)} "
                         "(Weights and input must have the same size.)")
    if weight is not None:
        check_no_bool_subtraction("mse_loss", input, target)    # torch's weighted path computes input − target
    if weight is not None and reduction == "elementwise_mean":
        # torch's weighted path has no legacy alias
        raise ValueError("mse_loss: Invalid reduction mode: elementwise_mean. Expected one of 'none', 'mean', 'sum'. "
                         f"(with weight of shape {shape_str(weight)})")
    reduction = check_reduction(reduction)
    _check_floating("mse_loss", "mse_cpu", input, target, weight)
    input, target, weight = _promote(input, target, weight)
    return SquaredErrorFn.call(input, target, weight, reduction, "mse")


def half_squared_error(input: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The seed's loss Σ_n ½‖x_n − y_n‖² over the rows x_n (last dim): 'none' gives one value per
    row (shape input.shape[:-1]), 'mean' divides by the number of rows N. Broadcasts as
    ``0.5 * ((x − y) ** 2).sum(-1)`` does. Hand-derived backward (ops.losses.SquaredErrorFn)."""
    if _same_floats(input, target) and input.dim() and reduction in REDUCTIONS:
        return SquaredErrorFn.call(input, target, None, reduction, "half")    # every check below passes
    check_tensor("input", input, fn="half_squared_error")
    check_tensor("target", target, fn="half_squared_error")
    input, target = autocast("half_squared_error", input, target)
    reduction = check_reduction(reduction)
    if input.dim() == 0:
        raise ValueError("half_squared_error: input must have at least 1 dimension (the features), got shape []")
    _broadcast_shape("half_squared_error", "input", input, "target", target)
    check_no_bool_subtraction("half_squared_error", input, target)   # its composition's x − y
    if input.is_complex() or target.is_complex():
        no_kernel("half_squared_error", input if input.is_complex() else target)   # a squared error is real
    input, target = _promote(input, target)
    return SquaredErrorFn.call(input, target, None, reduction, "half")


# ---------------------------------------------------------------------------------------------
# Cross entropy and NLL: validation and layout
# ---------------------------------------------------------------------------------------------

def _rows(input, target, probs):
    """(N, C, d1, …) → X (M, C) with the class dim last; targets → (M,) or (M, C); unbatched → one row."""
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if input.dim() == 1:
        X = input.unsqueeze(0)                                          # (1, C)
        Y = target.reshape(1, C) if probs else target.reshape(1)        # (1, C) or (1,)
    elif input.dim() == 2:
        X, Y = input, target                                            # (M, C), (M,) or (M, C)
    else:
        M = (input.shape[:1] + input.shape[2:]).numel()                 # N·d1·… (C may be 0)
        X = input.movedim(1, -1).reshape(M, C)                          # (M, C)
        Y = target.movedim(1, -1).reshape(M, C) if probs else target.reshape(M)
    if not probs and Y.dtype != torch.int64:
        Y = Y.long()                                                    # Byte targets index too
    return X, Y


def _loss_shape(input):
    """The 'none' output shape: one loss per position, (N, d1, …); [] for an unbatched (C,) input
    (whatever the target's shape, () or (1,), as torch)."""
    return input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])


def _class_options(fn, input, target, weight, ignore_index, reduction, label_smoothing, *, allow_probs,
                   none_is_default=False):
    """Every cross-entropy option validated, in torch's order, by its one function in ``_common``:
    returns (C, weight (C,) or None, CrossEntropyOptions)."""
    eps = check_label_smoothing(fn, label_smoothing)          # its type, then its range: torch's first checks
    if allow_probs and target.shape == input.shape and target.is_floating_point() and input.dim():
        # torch's probability path: ignore_index, then the weight's shape, then log_softmax's dtype
        check_ignore_index(fn, ignore_index, target, probs=True, none_is_default=none_is_default)
        if weight is not None and not input.is_floating_point():
            check_class_weight(fn, weight, input, input.shape[1] if input.dim() >= 2 else input.shape[0], probs=True)
    C, probs = check_class_target(fn, input, target, allow_probs=allow_probs, weight=weight)
    ignore_index = check_ignore_index(fn, ignore_index, target, probs=probs, none_is_default=none_is_default)
    if eps and not probs and weight is not None and weight.dim() != 1 and input.dim() > 2 and (
            weight.shape[0] != weight.numel() or (reduction == "mean" and bool((target != ignore_index).any()))):
        # torch's label-smoothing path views the weight by its first dim as (1, C, 1, …): (1, C) fails;
        # its 'mean' gathers the weight at the targets kept, which a 2-D weight fails if there are any
        raise RuntimeError(f"{fn}: with label_smoothing, weight of shape {shape_str(weight)} must be 1-D (C,) "
                           f"for input of shape {shape_str(input)}")
    weight = check_class_weight(fn, weight, input, C, probs=probs)
    if not probs and not input.is_floating_point():
        no_kernel(fn, input, kernel="nll_loss")                 # the kernel's dispatch on the input's dtype
    return C, weight, CrossEntropyOptions(reduction, ignore_index, eps, probs)


_COMMON_OPTIONS: dict = {}


def _common_class_call(input, target, weight, size_average, reduce, reduction, ignore_index, label_smoothing):
    """The common call of cross_entropy / nll_loss, in one cheap test (it runs every step):
    input (N, C) floating, target (N,) int64, no class weight, no legacy flags, a valid reduction,
    an int ignore_index, no smoothing, no autocast. Every check of ``_class_args`` passes on it, so
    its options come from a cache (None: anything else, which takes the detailed checks)."""
    if not (weight is None and size_average is None and reduce is None and type(input) is torch.Tensor
            and type(target) is torch.Tensor and input.dim() == 2 and target.dim() == 1
            and target.dtype == torch.int64 and input.is_floating_point() and target.shape[0] == input.shape[0]
            and type(ignore_index) is int and type(label_smoothing) in (float, int) and label_smoothing == 0
            and not autocast_on()):
        return None
    opts = _COMMON_OPTIONS.get((reduction, ignore_index))
    if opts is None:
        if reduction not in REDUCTIONS:
            return None
        opts = _COMMON_OPTIONS[(reduction, ignore_index)] = CrossEntropyOptions(reduction, ignore_index)
    return opts


def _kernel_checks_range(input) -> bool:
    """Does the Function's forward take its fast path, torch's nll_loss kernel, which refuses an
    out-of-range class index itself (IndexError, its message completed by the Function)? Then the
    functional's own host check would be a second pass over the target."""
    return input.numel() > 0 and not functorch_transforms_active()


def _class_args(fn, input, target, weight, size_average, reduce, reduction, ignore_index, label_smoothing, *,
                allow_probs):
    """cross_entropy's and nll_loss's arguments: tensors, autocast, the legacy flags, then every
    option (``_class_options``). Returns (input, target, weight, opts, C)."""
    check_tensor("input", input, fn=fn)
    check_tensor("target", target, fn=fn)
    if weight is not None:
        check_tensor("weight", weight, fn=fn)
    input, target, weight = autocast(fn, input, target, weight)
    reduction = _legacy(size_average, reduce, reduction)
    C, weight, opts = _class_options(fn, input, target, weight, ignore_index, reduction, label_smoothing,
                                     allow_probs=allow_probs)
    return input, target, weight, opts, C


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy``: log-softmax and NLL in one Function
    (ops.losses.CrossEntropyFn), class-index or class-probability targets, K-dim and unbatched
    inputs, ``weight``, ``ignore_index``, ``label_smoothing``; torch's numbers in every case."""
    opts = _common_class_call(input, target, weight, size_average, reduce, reduction, ignore_index, label_smoothing)
    if opts is not None:
        if not _kernel_checks_range(input):
            check_target_range("cross_entropy", target, input.shape[1], ignore_index, input)
        return CrossEntropyFn.call(input, target, None, opts)[0]
    input, target, weight, opts, C = _class_args("cross_entropy", input, target, weight, size_average, reduce,
                                                 reduction, ignore_index, label_smoothing, allow_probs=True)
    return class_loss("cross_entropy", input, target, weight, opts, C)


def class_loss(fn, input, target, weight, opts, C):
    """cross_entropy on validated arguments (also linear_cross_entropy's unchunked path)."""
    if opts.probs:
        input, target, weight = _promote(input, target, weight)   # torch promotes the probability path
    X, Y = _rows(input, target, opts.probs)
    if not opts.probs and (opts.label_smoothing or not _kernel_checks_range(X)):
        check_target_range(fn, Y, C, opts.ignore_index, input)
    loss, _ = CrossEntropyFn.call(X, Y, weight, opts)
    return loss.reshape(_loss_shape(input)) if opts.reduction == "none" else loss


def nll_loss(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
             size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """``torch.nn.functional.nll_loss``: −w_y x_y (ops.losses.NLLLossFn), K-dim and unbatched
    inputs, ``weight``, ``ignore_index``; 'mean' divides by the kept rows' weights, as torch does."""
    opts = _common_class_call(input, target, weight, size_average, reduce, reduction, ignore_index, 0.0)
    if opts is not None:
        if not _kernel_checks_range(input):
            check_target_range("nll_loss", target, input.shape[1], ignore_index, input)
        return NLLLossFn.call(input, target, None, opts)
    input, target, weight, opts, C = _class_args("nll_loss", input, target, weight, size_average, reduce,
                                                 reduction, ignore_index, 0.0, allow_probs=False)
    X, Y = _rows(input, target, False)
    check_target_range("nll_loss", Y, C, opts.ignore_index, input)
    loss = NLLLossFn.call(X, Y, weight, opts)
    return loss.reshape(_loss_shape(input)) if opts.reduction == "none" else loss


# ---------------------------------------------------------------------------------------------
# Binary cross entropy with logits
# ---------------------------------------------------------------------------------------------

def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits`` in the stable softplus form
    (ops.bce.BCEWithLogitsFn); ``weight`` and ``pos_weight`` broadcast to the input's shape."""
    fn = "binary_cross_entropy_with_logits"
    check_tensor("input", input, fn=fn)
    check_tensor("target", target, fn=fn)
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            check_tensor(name, t, fn=fn)
    input, target, weight, pos_weight = autocast(fn, input, target, weight, pos_weight)
    reduction = _legacy(size_average, reduce, reduction)
    if target.shape != input.shape:
        raise ValueError(f"{fn}: Target size ({target.size()}) must be the same as input size ({input.size()}): "
                         f"target of shape {shape_str(target)}, input of shape {shape_str(input)}")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        check_not_differentiable(fn, name, t)                    # torch's autograd, before any kernel
    if not input.is_floating_point():
        no_kernel(fn, input, kernel="log_sigmoid_cpu")         # torch's first kernel: log σ(x)
    if not target.is_floating_point():
        raise RuntimeError(f"{fn}: target must be floating point (result type {input.dtype} can't be cast to the "
                           f"target's {target.dtype}), target of shape {shape_str(target)}")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            if _broadcast_shape(fn, "input", input, name, t) != input.shape:
                raise RuntimeError(f"{fn}: {name} of shape {shape_str(t)} broadcasts beyond the input's shape "
                                   f"{shape_str(input)}")
            if t.is_complex() or (name == "pos_weight" and t.dtype == torch.bool):
                # torch: a complex result cannot be cast back; its (pos_weight − 1) refuses bool
                raise RuntimeError(f"{fn}: {name} of dtype {t.dtype} is not supported (shape {shape_str(t)}): "
                                   f"{'result type Complex' if t.is_complex() else 'Subtraction with a bool tensor'}")
    out_dtype = target.dtype     # torch's loss is (1 − T) ⊙ X − …, written into T's dtype
    input, target, weight, pos_weight = _promote(input, target, weight, pos_weight)
    loss = BCEWithLogitsFn.call(input, target, weight, pos_weight, reduction)
    return loss if loss.dtype == out_dtype else loss.to(out_dtype)
