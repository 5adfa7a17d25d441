"""The entry type of the deliberate differences, ``Difference``, and the predicates on a call
that several kinds of op share."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import math

import torch

__all__ = ["Difference"]


@dataclass(frozen=True)
class Difference:
    name: str
    op: str
    kinds: tuple[str, ...]             # the fuzzer's mismatch kinds it may show as
    when: Callable                     # Call → bool: the calls it covers
    torch: str
    handgrad: str
    why: str
    reproducer: str = ""               # a one-line call showing it


def _input(call):
    return call.args[0] if call.args else None


def _not_tensor(call) -> bool:
    from ..fuzz.call import Spec
    return not isinstance(_input(call), Spec)


def _max_abs(spec) -> float:
    v = spec.base.detach().to(spec.dtype).double()
    v = v[v.isfinite()]
    return float(v.abs().max()) if v.numel() else 0.0


def _magnitude(spec) -> float:
    """max |v| over the argument's values as its dtype holds them (inf where one is not finite)."""
    v = spec.base.detach().to(spec.dtype)
    if not v.is_floating_point() or v.numel() == 0:
        return 0.0 if v.numel() == 0 or v.is_complex() else float(v.double().abs().max())
    v = v.double()
    return math.inf if not bool(v.isfinite().all()) else float(v.abs().max())


def _opmath_max(dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max


def _specs(call, *names):
    """The call's tensor arguments (``Spec``s): positional ones, then the named keywords."""
    from ..fuzz.call import Spec
    out = [a for a in call.args if isinstance(a, Spec)]
    return out + [call.kwargs[n] for n in names if isinstance(call.kwargs.get(n), Spec)]


def _complex_argument(call) -> bool:
    return any(s.dtype.is_complex for s in _specs(call, "weight"))
