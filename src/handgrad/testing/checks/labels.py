"""Input labelling: what the report calls each argument (``weight (argument 1)``, ``parameter
bias``), the one-line description of each (shape, dtype, requires_grad, layout), and how the
arguments a user passes become ``Inputs`` (what is differentiated)."""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch

from ..types import Inputs
from .measure import short


def as_callable(fn: Any) -> Callable:
    """An autograd.Function class becomes its ``call`` (handgrad's HandFunction) or ``apply``."""
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function):
        return getattr(fn, "call", fn.apply)
    return fn


def param_names(fn: Any) -> list[str] | None:
    target = fn.forward if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) else fn
    try:
        params = list(inspect.signature(target).parameters.values())
    except (TypeError, ValueError):
        return None
    if isinstance(fn, type) and issubclass(fn, torch.autograd.Function) and params and params[0].name == "ctx" \
            and fn.setup_context is torch.autograd.Function.setup_context:
        params = params[1:]  # old-style forward(ctx, ...)
    if any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
        return None
    return [p.name for p in params]


def describe(t: Any) -> str:
    if isinstance(t, torch.Tensor):
        return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}{' requires_grad' if t.requires_grad else ''}" \
               f"{'' if t.is_contiguous() else ' non-contiguous'}"
    return repr(t) if len(repr(t)) < 40 else type(t).__name__


def normalise(args: tuple, kwargs: dict | None) -> Inputs:
    """An ``Inputs`` passed alone is used as is; if no tensor requires grad, every floating one does."""
    if len(args) == 1 and isinstance(args[0], Inputs) and not kwargs:
        inputs = args[0]
    else:
        inputs = Inputs(tuple(args), dict(kwargs or {}))
    if not inputs.diff:
        def diff(t):
            is_float = isinstance(t, torch.Tensor) and t.is_floating_point()
            return t.detach().requires_grad_(True) if is_float else t

        inputs = Inputs(tuple(diff(a) for a in inputs.args), {k: diff(v) for k, v in inputs.kwargs.items()})
    return inputs


def label_inputs(inputs: Inputs, names: list[str] | None) -> tuple[list[str], list[str]]:
    labels, lines = [], []
    n = len(inputs.args)
    for k, t in enumerate((*inputs.args, *inputs.kwargs.values())):
        if k < n:
            label = f"{names[k]} (argument {k})" if names and k < len(names) else f"argument {k}"
        else:
            label = list(inputs.kwargs)[k - n]
        lines.append(f"{short(label)} {describe(t)}")
        if isinstance(t, torch.Tensor) and t.requires_grad:
            labels.append(label)
    return labels, lines


def qualname(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or type(fn).__name__
