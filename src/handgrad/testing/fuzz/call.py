"""One fuzzed call, as data: tensor arguments described by their values and layout, so the same
call can be built three times (for torch, for handgrad, and in float64 for the truth).

A ``Spec`` is one tensor argument: the float64 (or integer/bool/complex) values of its storage,
the dtype the call uses, a view applied after the leaf is made (transposed, sliced, expanded) and
whether it requires grad. Building it rounds the values to the call's dtype first, so the float64
truth sees exactly the low-precision values the call saw.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Spec", "Call", "build", "describe", "wobble"]


@dataclass(frozen=True)
class Spec:
    base: torch.Tensor                  # the leaf's values (float64 for floating dtypes), contiguous
    dtype: torch.dtype                  # the dtype the call uses
    view: tuple = ()                    # ("t",), ("slice",) or ("expand", shape): applied to the leaf
    requires_grad: bool = False
    leaf: bool = True                   # False: the argument is leaf * 1 (a non-leaf, for in-place ops)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(_view(self.base, self.view).shape)

    def build(self, dtype: torch.dtype | None = None, perturb: tuple | None = None
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the argument, the leaf whose gradient is compared, or None). ``dtype``: the same values
        in that dtype; ``perturb`` (generator, ε): each float64 value moved by up to ε relatively
        (zeros, signs and ±inf stay: the kinks are kept)."""
        t = self.base.to(self.dtype)                                      # the call's rounding
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)                                               # the same values, in dtype
        if perturb is not None and t.dtype == torch.float64:
            t = wobble(t, *perturb)
        rg = self.requires_grad and (t.is_floating_point() or t.is_complex())
        leaf = t.requires_grad_(rg)
        x = leaf if self.leaf else (leaf * 1 if t.is_floating_point() or t.is_complex() else leaf.clone())
        return _view(x, self.view), (leaf if rg else None)


def wobble(t: torch.Tensor, gen: torch.Generator, eps: float) -> torch.Tensor:
    """t moved by up to ``eps`` relatively, at random: one rounding of each value."""
    return t * (1 + eps * (torch.rand(t.shape, generator=gen, dtype=torch.float64) * 2 - 1))


def _view(x: torch.Tensor, view: tuple) -> torch.Tensor:
    if not view:
        return x
    if view[0] == "t":
        return x.transpose(-1, -2)
    if view[0] == "slice":
        return x[..., ::2]
    if view[0] == "expand":
        return x.expand(view[1])
    raise ValueError(f"unknown view {view!r}")


@dataclass
class Call:
    op: str
    args: tuple
    kwargs: dict = field(default_factory=dict)
    seed: int = 0                       # the per-call seed that drew it: ``--call op:seed`` redraws it

    def precision(self) -> torch.dtype | None:
        """The least precise floating dtype the call computes in: of its floating tensors and of a
        ``dtype=`` option; None if it has none."""
        dtypes = [s.dtype for s in nested((self.args, self.kwargs), Spec) if s.dtype.is_floating_point]
        dtypes += [v for v in self.kwargs.values() if isinstance(v, torch.dtype) and v.is_floating_point]
        return max(dtypes, key=lambda d: torch.finfo(d).eps, default=None)

    def specs(self) -> list[Spec]:
        return list(nested((self.args, self.kwargs), Spec))

    def first(self) -> Spec | None:
        """The first tensor argument (the ``input``), if it is one."""
        return self.args[0] if self.args and isinstance(self.args[0], Spec) else None


def nested(value, kind: type):
    """Every ``kind`` object inside ``value``, a nest of lists, tuples and dicts, in order."""
    if isinstance(value, kind):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from nested(v, kind)
    elif isinstance(value, dict):
        for v in value.values():
            yield from nested(v, kind)


def build(call: Call, dtype: torch.dtype | None = None, perturb: tuple | None = None
          ) -> tuple[tuple, dict, list[torch.Tensor]]:
    """The call's (args, kwargs) as tensors, and the tensors whose gradients are compared, in
    order: the arguments that require grad (their views, as the op sees them), or for an
    in-place call the leaves (the arguments are overwritten). ``dtype``:
    every floating tensor, and a floating ``dtype=`` option, in that dtype instead (the float64
    truth); ``perturb`` (generator, ε): every float64 value moved by up to ε relatively."""
    leaves: list[torch.Tensor] = []
    views: list[torch.Tensor] = []

    def one(v: Any):
        if isinstance(v, Spec):
            x, leaf = v.build(dtype, perturb)
            if leaf is not None:
                leaves.append(leaf)
                views.append(x)
            return x
        if isinstance(v, list):
            return [one(a) for a in v]
        if isinstance(v, tuple):
            return tuple(one(a) for a in v)
        return v

    args = tuple(one(a) for a in call.args)
    kwargs = {k: one(v) for k, v in call.kwargs.items()}
    if dtype is not None:
        kwargs = {k: dtype if isinstance(v, torch.dtype) and v.is_floating_point else v for k, v in kwargs.items()}
    return args, kwargs, (leaves if call.kwargs.get("inplace") else views)


def describe(call: Call) -> str:
    """A one-line, readable form of the call, e.g. ``elu(float32[3, 0] t rg, alpha=-0.5)``."""

    def one(v):
        if isinstance(v, Spec):
            s = f"{str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
            if v.view:
                s += " " + v.view[0]
            if v.requires_grad:
                s += " rg"
            if not v.leaf:
                s += " nonleaf"
            if v.base.numel() <= 4 and v.base.numel() > 0:
                s += f" {v.base.flatten().tolist()}"
            return s
        if isinstance(v, list):
            return "[" + ", ".join(one(a) for a in v) + "]"
        if isinstance(v, tuple):
            return "(" + ", ".join(one(a) for a in v) + ("," if len(v) == 1 else "") + ")"
        if isinstance(v, torch.dtype):
            return str(v)
        return repr(v)

    parts = [one(a) for a in call.args] + [f"{k}={one(v)}" for k, v in call.kwargs.items()]
    return f"{call.op}({', '.join(parts)})"
