"""The losses' argument handling: torch.nn.functional's signatures (deprecated ``size_average``
and ``reduce`` included, mapped as torch maps them), autocast, validation with torch's
exception types, and the layout the Functions in ``handgrad.ops.losses`` work on
((N, C, d1, …) → rows (M, C); unbatched (C,) → one row). No math here.
"""
from __future__ import annotations

import torch
from .._compat import is_functorch_wrapped, nn_reduction as _Reduction

from ..ops.losses import BCEWithLogitsFn, CrossEntropyFn, CrossEntropyOptions, NLLLossFn, SquaredErrorFn
from ._common import autocast, check_reduction, check_tensor, shape_str, warn

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


def _broadcast_shape(fn, a_name, a, b_name, b):
    try:
        return torch.broadcast_shapes(a.shape, b.shape)
    except RuntimeError:
        raise RuntimeError(
            f"{fn}: {b_name} of shape {shape_str(b)} does not broadcast with {a_name} of shape {shape_str(a)}"
        ) from None


def _no_grad_weight(fn, name, t):
    # torch: "The function '…' is not differentiable with respect to argument 'weight'"
    if t is not None and t.requires_grad:
        raise RuntimeError(f"{fn}: not differentiable with respect to argument '{name}' "
                           f"(shape {shape_str(t)}); this input cannot have requires_grad True")


# ---------------------------------------------------------------------------------------------
# Squared error
# ---------------------------------------------------------------------------------------------

def mse_loss(input: torch.Tensor, target: torch.Tensor, size_average: bool | None = None, reduce: bool | None = None,
             reduction: str = "mean", weight: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.mse_loss``: w ⊙ (x − y)², reduced; 'mean' with ``weight`` divides by
    Σ w, as torch does. Hand-derived backward for input, target and weight (ops.losses.SquaredErrorFn)."""
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
    check_reduction(reduction)
    input, target, weight = _promote(input, target, weight)
    return SquaredErrorFn.call(input, target, weight, reduction, "mse")


def half_squared_error(input: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The seed's loss Σ_n ½‖x_n − y_n‖² over the rows x_n (last dim): 'none' gives one value per
    row (shape input.shape[:-1]), 'mean' divides by the number of rows N. Broadcasts as
    ``0.5 * ((x − y) ** 2).sum(-1)`` does. Hand-derived backward (ops.losses.SquaredErrorFn)."""
    check_tensor("input", input, fn="half_squared_error")
    check_tensor("target", target, fn="half_squared_error")
    input, target = autocast("half_squared_error", input, target)
    reduction = check_reduction(reduction)
    if input.dim() == 0:
        raise ValueError("half_squared_error: input must have at least 1 dimension (the features), got shape []")
    _broadcast_shape("half_squared_error", "input", input, "target", target)
    input, target = _promote(input, target)
    return SquaredErrorFn.call(input, target, None, reduction, "half")


# ---------------------------------------------------------------------------------------------
# Cross entropy and NLL: validation and layout
# ---------------------------------------------------------------------------------------------

def _check_classes(fn, input, target, weight, *, allow_probs):
    """Validate as torch does, in torch's order; returns C and whether ``target`` holds class
    probabilities (torch takes that path exactly when the shapes are equal)."""
    probs = allow_probs and target.shape == input.shape
    if probs and not target.is_floating_point():
        raise RuntimeError(f"{fn}: Expected floating point type for target with class probabilities "
                           f"(target of shape {shape_str(target)}), got {target.dtype}")
    if input.dim() == 0:
        if probs:  # torch's probability path asks for the class dim 1 first
            raise IndexError(f"{fn}: Dimension specified as 1 but input of shape {shape_str(input)} has no dimensions")
        raise ValueError(f"{fn}: Expected 1 or more dimensions (got 0) for input of shape {shape_str(input)}")
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if weight is not None:
        if weight.dim() != 1 or weight.numel() != C:
            raise RuntimeError(f"{fn}: weight tensor should be defined either for all {C} classes or no classes "
                               f"but got weight of shape {shape_str(weight)} (input of shape {shape_str(input)})")
        if weight.dtype != input.dtype:
            raise RuntimeError(f"{fn}: expected weight of scalar type {input.dtype} (the input's) but found {weight.dtype}")
        _no_grad_weight(fn, "weight", weight)
    if probs:
        return C, True
    if input.dim() == 1:
        if target.dim() > 1 or target.numel() != 1:
            raise RuntimeError(f"{fn}: 0D or 1D target tensor expected, multi-target not supported: "
                               f"target of shape {shape_str(target)} for unbatched input of shape {shape_str(input)}")
    elif input.dim() == 2 and target.dim() != 1:
        raise RuntimeError(f"{fn}: 0D or 1D target tensor expected, multi-target not supported: "
                           f"target of shape {shape_str(target)} for input of shape {shape_str(input)}")
    if input.dim() >= 2:
        if target.dim() == 0 or target.shape[0] != input.shape[0]:
            n_t = target.shape[0] if target.dim() else 0
            raise ValueError(f"{fn}: Expected input batch_size ({input.shape[0]}) to match target batch_size ({n_t}): "
                             f"input of shape {shape_str(input)}, target of shape {shape_str(target)}")
        expected = input.shape[:1] + input.shape[2:]
        if target.shape != expected:
            raise RuntimeError(f"{fn}: Expected target size {list(expected)}, got {list(target.shape)} "
                               f"(target of shape {shape_str(target)} for input of shape {shape_str(input)})")
    if target.dtype not in (torch.int64, torch.uint8):
        raise RuntimeError(f"{fn}: expected target dtype to be Long or Byte, but got {target.dtype} "
                           f"(target of shape {shape_str(target)})")
    return C, False


def _is_wrapped(t):
    """True for a functorch-wrapped (vmap/grad) tensor, whose values Python cannot branch on."""
    return is_functorch_wrapped(t)


def _check_range(fn, y, C, ignore_index, input):
    """IndexError for a class index outside [0, C) that is not ignore_index (torch: "Target 5 is out
    of bounds."). Checked on CPU, where it costs no sync; on CUDA the gather asserts on the device,
    as torch's kernel does. Skipped while compiling (a data-dependent branch) and under vmap."""
    if torch.compiler.is_compiling() or y.device.type != "cpu" or _is_wrapped(y) or y.numel() == 0:
        return
    bad = (y != ignore_index) & ((y < 0) | (y >= C))
    if bad.any():
        value = int(y[bad][0])
        raise IndexError(f"{fn}: Target {value} is out of bounds: target holds class indices in [0, {C}) for input "
                         f"of shape {shape_str(input)}")


def _rows(input, target, probs):
    """(N, C, d1, …) → X (M, C) with the class dim last; targets → (M,) or (M, C); unbatched → one row."""
    C = input.shape[1] if input.dim() >= 2 else input.shape[0]
    if input.dim() == 1:
        X = input.unsqueeze(0)                                          # (1, C)
        Y = target.reshape(1, C) if probs else target.reshape(1)        # (1, C) or (1,)
    elif input.dim() == 2:
        X, Y = input, target                                            # (M, C), (M,) or (M, C)
    else:
        X = input.movedim(1, -1).reshape(-1, C)                         # (N·d1·…, C)
        Y = target.movedim(1, -1).reshape(-1, C) if probs else target.reshape(-1)
    if not probs and Y.dtype != torch.int64:
        Y = Y.long()                                                    # Byte targets index too
    return X, Y


def _loss_shape(input, target, probs):
    """The 'none' output shape: one loss per position."""
    if probs:
        return input.shape[:1] + input.shape[2:] if input.dim() >= 2 else torch.Size([])
    return target.shape


def cross_entropy(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                  size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
                  reduction: str = "mean", label_smoothing: float = 0.0) -> torch.Tensor:
    """``torch.nn.functional.cross_entropy``: log-softmax and NLL in one Function
    (ops.losses.CrossEntropyFn), class-index or class-probability targets, K-dim and unbatched
    inputs, ``weight``, ``ignore_index``, ``label_smoothing``; torch's numbers in every case."""
    check_tensor("input", input, fn="cross_entropy")
    check_tensor("target", target, fn="cross_entropy")
    if weight is not None:
        check_tensor("weight", weight, fn="cross_entropy")
    input, target, weight = autocast("cross_entropy", input, target, weight)
    reduction = _legacy(size_average, reduce, reduction)
    if not label_smoothing <= 1.0:
        raise RuntimeError(f"cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")
    C, probs = _check_classes("cross_entropy", input, target, weight, allow_probs=True)
    if probs:
        if ignore_index >= 0:
            raise RuntimeError(f"cross_entropy: ignore_index ({ignore_index}) is not supported for floating point "
                               f"target (target of shape {shape_str(target)})")
        input, target = _promote(input, target)
    X, Y = _rows(input, target, probs)
    if not probs:
        _check_range("cross_entropy", Y, C, ignore_index, input)
    opts = CrossEntropyOptions(reduction, ignore_index, float(label_smoothing), probs)
    loss, _ = CrossEntropyFn.call(X, Y, weight, opts)
    return loss.reshape(_loss_shape(input, target, probs)) if reduction == "none" else loss


def nll_loss(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
             size_average: bool | None = None, ignore_index: int = -100, reduce: bool | None = None,
             reduction: str = "mean") -> torch.Tensor:
    """``torch.nn.functional.nll_loss``: −w_y x_y (ops.losses.NLLLossFn), K-dim and unbatched
    inputs, ``weight``, ``ignore_index``; 'mean' divides by the kept rows' weights, as torch does."""
    check_tensor("input", input, fn="nll_loss")
    check_tensor("target", target, fn="nll_loss")
    if weight is not None:
        check_tensor("weight", weight, fn="nll_loss")
    input, target, weight = autocast("nll_loss", input, target, weight)
    reduction = _legacy(size_average, reduce, reduction)
    C, _ = _check_classes("nll_loss", input, target, weight, allow_probs=False)
    X, Y = _rows(input, target, False)
    _check_range("nll_loss", Y, C, ignore_index, input)
    loss = NLLLossFn.call(X, Y, weight, reduction, ignore_index)
    return loss.reshape(target.shape) if reduction == "none" else loss


# ---------------------------------------------------------------------------------------------
# Binary cross entropy with logits
# ---------------------------------------------------------------------------------------------

def binary_cross_entropy_with_logits(input: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None,
                                     size_average: bool | None = None, reduce: bool | None = None,
                                     reduction: str = "mean", pos_weight: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.nn.functional.binary_cross_entropy_with_logits`` in the stable softplus form
    (ops.losses.BCEWithLogitsFn); ``weight`` and ``pos_weight`` broadcast to the input's shape."""
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
    if not target.is_floating_point():
        raise RuntimeError(f"{fn}: target must be floating point (result type {input.dtype} can't be cast to the "
                           f"target's {target.dtype}), target of shape {shape_str(target)}")
    for name, t in (("weight", weight), ("pos_weight", pos_weight)):
        if t is not None:
            if _broadcast_shape(fn, "input", input, name, t) != input.shape:
                raise RuntimeError(f"{fn}: {name} of shape {shape_str(t)} broadcasts beyond the input's shape "
                                   f"{shape_str(input)}")
            _no_grad_weight(fn, name, t)
    input, target, weight, pos_weight = _promote(input, target, weight, pos_weight)
    return BCEWithLogitsFn.call(input, target, weight, pos_weight, reduction)
