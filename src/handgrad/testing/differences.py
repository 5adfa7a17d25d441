"""The deliberate differences from torch: where torch's behaviour is an accident and handgrad
keeps a better one. Data, read by the differential fuzzer (``handgrad.testing.fuzz``), which
passes a disagreement only if an entry here covers it; ``docs/differences.md`` explains each
(tests/test_fuzz.py checks that every entry is there by name).

Each entry: the op, the comparison it differs in (``kinds``, the fuzzer's mismatch kinds), the
condition on the call (a predicate on ``fuzz.call.Call``: its tensor arguments are ``Spec``s,
with the float64 values of the call's storage and the call's dtype), what torch does, what
handgrad does, and why handgrad's is better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Difference", "DIFFERENCES", "covering"]


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
    from .fuzz.call import Spec
    return not isinstance(_input(call), Spec)


def _max_abs(spec) -> float:
    v = spec.base.to(spec.dtype).double()
    v = v[v.isfinite()]
    return float(v.abs().max()) if v.numel() else 0.0


def _opmath_max(dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max


def _gelu_tanh_huge(call) -> bool:
    # torch's kernel squares z: z² overflows for |z| ≥ √max (float32 1.8e19, float64 1.3e154)
    x = _input(call)
    return (not _not_tensor(call) and call.kwargs.get("approximate") == "tanh"
            and _max_abs(x) >= math.sqrt(_opmath_max(x.dtype)) / 4)


def _softplus_overflow(call) -> bool:
    # torch computes log1p(exp(βz)) below the threshold: exp overflows for βz > log(max)
    x = _input(call)
    if _not_tensor(call):
        return False
    beta, threshold = call.kwargs.get("beta", 1.0), call.kwargs.get("threshold", 20.0)
    if not isinstance(beta, (int, float)) or not isinstance(threshold, (int, float)):
        return False
    v = x.base.to(x.dtype).double() * beta
    v = v[v.isfinite()]
    return bool(((v > math.log(_opmath_max(x.dtype)) - 1) & (v <= threshold)).any())


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "non-tensor input: TypeError", "sigmoid", ("exception",), _not_tensor,
        "F.sigmoid(1.5) raises AttributeError ('float' object has no attribute 'sigmoid'): it calls "
        "input.sigmoid() without a check",
        "TypeError: sigmoid(): argument 'input' must be Tensor, not float",
        "A wrong argument type is a TypeError everywhere else in torch.nn.functional; the AttributeError "
        "is an accident of the method call and names no argument.",
        "F.sigmoid(1.5)"),
    Difference(
        "non-tensor input: TypeError", "tanh", ("exception",), _not_tensor,
        "F.tanh(1.5) raises AttributeError ('float' object has no attribute 'tanh')",
        "TypeError: tanh(): argument 'input' must be Tensor, not float",
        "As for sigmoid: the AttributeError is an accident of calling input.tanh().",
        "F.tanh(1.5)"),
    Difference(
        "gelu tanh: finite gradient at huge |z|", "gelu", ("grad",), _gelu_tanh_huge,
        "gelu(z, approximate='tanh') has gradient nan for |z| ≥ 1.8e19 in float32 (z² overflows, 0·∞)",
        "the limit: 0 for z → −∞, 1 for z → +∞",
        "The function is flat there and its derivative's limit is finite; nan would poison a whole "
        "backward pass for one large activation.",
        "F.gelu(torch.tensor([1e20], requires_grad=True), approximate='tanh').backward()"),
    Difference(
        "softplus: no overflow below a large threshold", "softplus", ("value", "grad"), _softplus_overflow,
        "softplus(z, threshold=t) computes log1p(exp(βz))/β for βz ≤ t: inf (and gradient nan) once "
        "βz > 88 in float32 (709 in float64)",
        "max(βz, 0) + log1p(e^{−|βz|}), over β: the exact value (≈ z) and gradient σ(βz) ≈ 1",
        "The function is finite and ≈ z there; the overflow is an artefact of the unstable form.",
        "F.softplus(torch.tensor([100.0]), threshold=1e4)"),
)


def covering(call, kind: str, table=DIFFERENCES) -> Difference | None:
    """The entry of ``table`` that covers a ``kind`` mismatch of ``call``, if one does."""
    for d in table:
        if d.op == call.op and kind in d.kinds and d.when(call):
            return d
    return None
