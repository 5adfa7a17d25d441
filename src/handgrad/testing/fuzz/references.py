"""What each catalogue op is compared with: its torch twin, or for the ops torch has no twin of,
the torch composition the op is documented to equal.

``reference(op)`` returns (callable, None), or (None, reason) where the op cannot be compared
(a torch twin whose signature differs from handgrad's function: comparing the two would compare
different arguments).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch.nn.functional as TF

from ... import catalogue

__all__ = ["reference"]


def _activation(name):
    if name not in catalogue.activations():
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(catalogue.activations())}")
    return getattr(TF, name)


def half_squared_error(input, target, reduction="sum"):
    """Σ_n ½‖x_n − y_n‖² over the rows (last dim): ``0.5 * ((x − y) ** 2).sum(-1)``, reduced
    over the rows ('mean', or its legacy alias 'elementwise_mean' as for torch's losses: divided by
    the number of rows)."""
    reduction = "mean" if reduction == "elementwise_mean" else reduction
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{reduction} is not a valid value for reduction")
    per_row = 0.5 * ((input - target) ** 2).sum(-1)
    return {"none": per_row, "sum": per_row.sum(), "mean": per_row.mean()}[reduction]


def linear_act(input, weight, bias=None, activation="relu", **activation_kwargs):
    """``getattr(F, activation)(F.linear(input, weight, bias), **activation_kwargs)``; None: no
    activation (as ``mlp``'s ``last_activation``)."""
    f = None if activation is None else _activation(activation)
    y = TF.linear(input, weight, bias)
    return y if f is None else f(y, **activation_kwargs)


def mlp(input, weights, biases, activation="sigmoid", last_activation=None):
    """The ``nn.Sequential`` of Linear and activation layers: x_l = f(x_{l−1} W_lᵀ + b_l), the last
    layer followed by ``last_activation`` (None: nothing)."""
    weights = list(weights)
    if not weights:
        raise ValueError("mlp: weights must hold at least one layer's weight")
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError("mlp: one bias (or None) per layer")
    hidden = _activation(activation)
    last = None if last_activation is None else _activation(last_activation)
    h = input
    for l, (w, b) in enumerate(zip(weights, biases)):
        h = TF.linear(h, w, b)
        f = hidden if l < len(weights) - 1 else last
        if f is not None:
            h = f(h)
    return h


_COMPOSITIONS: dict[str, Callable] = {
    "half_squared_error": half_squared_error,
    "linear_act": linear_act,
    "mlp": mlp,
}


def _params(fn) -> list[tuple[str, object]]:
    return [(p.name, p.kind) for p in inspect.signature(fn).parameters.values()]


def reference(op: catalogue.Op) -> tuple[Callable | None, str | None]:
    if op.name in _COMPOSITIONS:
        return _COMPOSITIONS[op.name], None
    if op.torch_function is None:
        return None, f"{op.name}: no torch twin and no composition to compare with"
    if op.name == "linear_cross_entropy":
        ours, theirs = _params(op.functional), _params(op.torch_function)
        # handgrad may add handgrad-only keywords (the chunk size) after torch's
        if ours[: len(theirs)] != theirs:
            return None, (f"linear_cross_entropy: handgrad's signature {inspect.signature(op.functional)} is not "
                          f"torch's {inspect.signature(op.torch_function)} (issue 13: it is being changed)")
        extra = {name for name, _ in ours[len(theirs):]}
        if extra:
            return _without(op.torch_function, extra), None
    return op.torch_function, None


def _without(fn: Callable, extra: set[str]) -> Callable:
    """``fn`` called without handgrad's extra keywords (options torch has no twin of, such as a
    chunk size, which change how handgrad computes, not what)."""
    def call(*args, **kwargs):
        return fn(*args, **{k: v for k, v in kwargs.items() if k not in extra})

    return call
