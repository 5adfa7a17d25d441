"""Argument handling shared by the public functions: autocast, reductions, validation.

No math here: the math lives in ``handgrad.ops``.
"""
from __future__ import annotations

import warnings

import torch

# What torch's autocast does with each op (torch/csrc/autocast_mode.cpp): "lower" runs in the
# autocast dtype, "fp32" in float32; ops not listed run in their inputs' dtype. The registry's
# autocast test checks every op's output dtype against torch's, so this table cannot drift.
_AUTOCAST = {
    "cpu": {
        "linear": "lower",
        "mse_loss": "fp32", "nll_loss": "fp32", "cross_entropy": "fp32",
        "binary_cross_entropy_with_logits": "fp32", "half_squared_error": "fp32",
    },
    "cuda": {
        "linear": "lower",
        "softmax": "fp32", "log_softmax": "fp32", "layer_norm": "fp32", "softplus": "fp32",
        "mse_loss": "fp32", "nll_loss": "fp32", "cross_entropy": "fp32",
        "binary_cross_entropy_with_logits": "fp32", "half_squared_error": "fp32",
    },
}


def autocast(op: str, *tensors):
    """Cast ``tensors`` as torch's autocast would for ``op``; the casts are recorded by autograd
    outside the handgrad Function, so its backward sees one dtype, as native autograd does."""
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


def warn(message: str, stacklevel: int = 3) -> None:
    """``warnings.warn`` as torch's functional does, except while Dynamo traces: it cannot trace
    ``warnings.warn`` and would break the graph (torch's own warning lives in its C++ kernel)."""
    if not torch.compiler.is_compiling():
        warnings.warn(message, stacklevel=stacklevel + 1)


REDUCTIONS = ("none", "mean", "sum")


def check_reduction(reduction: str) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{reduction} is not a valid value for reduction")  # torch's own message
    return reduction


def check_tensor(name: str, t, *, fn: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{fn}(): argument '{name}' must be Tensor, not {type(t).__name__}")


def shape_str(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"
