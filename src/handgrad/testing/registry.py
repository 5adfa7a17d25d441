"""The registry of op cases: one entry per op (or per option variant of an op).

Both ``tests/`` and ``handgrad-check`` are driven from it (STYLE.md §6): an entry names the
handgrad callable, the torch reference, an input maker and the shapes to try, so adding an op
costs one entry.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

Shape = tuple[int, ...]
# tiny, odd, batched, empty batch (STYLE.md §6)
DEFAULT_SHAPES: tuple[Shape, ...] = ((2, 3), (7, 13), (2, 5, 13), (0, 13))


@dataclass(frozen=True)
class Inputs:
    """One call's arguments; the tensors that require grad are the ones checked."""

    args: tuple
    kwargs: dict = field(default_factory=dict)

    @property
    def diff(self) -> tuple[torch.Tensor, ...]:
        """The differentiable tensors, in order (positional, then keyword)."""
        return tuple(t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad)

    def bind(self, fn: Callable) -> Callable:
        """``fn`` as a function of the differentiable tensors alone (for gradcheck, torch.func)."""
        slots = [i for i, t in enumerate((*self.args, *self.kwargs.values())) if isinstance(t, torch.Tensor) and t.requires_grad]
        keys = list(self.kwargs)
        n = len(self.args)

        def bound(*diff):
            values = [*self.args, *self.kwargs.values()]
            for slot, t in zip(slots, diff):
                values[slot] = t
            return fn(*values[:n], **dict(zip(keys, values[n:])))

        return bound

    def map(self, f: Callable[[torch.Tensor], torch.Tensor]) -> "Inputs":
        """Apply ``f`` to every floating tensor (e.g. a dtype or device cast), keeping requires_grad."""

        def one(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                return f(t.detach()).requires_grad_(t.requires_grad)
            return t

        return Inputs(tuple(one(a) for a in self.args), {k: one(v) for k, v in self.kwargs.items()})


@dataclass(frozen=True)
class BadInput:
    """An input torch refuses; handgrad must raise the same exception type, naming ``names``."""

    what: str
    make: Callable[[], Inputs]
    names: tuple[str, ...]  # every one must appear in the message (the argument, the shapes)


@dataclass(frozen=True)
class OpCase:
    name: str
    fn: Callable                      # the handgrad callable
    reference: Callable               # the torch callable it must equal
    make: Callable[[Shape, torch.dtype, torch.device], Inputs]
    shapes: tuple[Shape, ...] = DEFAULT_SHAPES
    bad_inputs: tuple[BadInput, ...] = ()
    # Low-precision parity margin in units of the dtype's eps (see tests/test_ops.py); raise it
    # only with a comment saying why.
    lowp_ulps: float = 2.0
    lowp_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    extra: dict[str, Any] = field(default_factory=dict)

    def inputs(self, shape: Shape, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Inputs:
        return self.make(tuple(shape), dtype, torch.device(device))

    def id(self, shape: Shape) -> str:
        return f"{self.name}-{'x'.join(map(str, shape)) or 'scalar'}"


LOWP_RULE = "|ours − truth| ≤ 2·max|reference − truth| + ulps·eps·(|truth| + mean|truth|)"


def allowed_lowp_error(ref_err: torch.Tensor, truth: torch.Tensor, eps: float, ulps: float) -> torch.Tensor:
    """STYLE.md §7, the one rule every low-precision comparison uses (``LOWP_RULE``): at each
    element, the error allowed to handgrad given the reference's errors ``ref_err`` against the
    float64 ``truth``. The reference's error is its worst over the tensor: rounding in another
    order moves the error between elements (most where a row sum nearly cancels), so an
    element-by-element comparison would fail at random. It is counted twice (another order may
    round as badly, and the two need not cancel), plus ``ulps`` roundings at the element's own
    size or at the tensor's typical size. Non-finite truth elements are the caller's to mask."""
    finite = truth.isfinite()
    worst = ref_err[finite].max() if finite.any() else ref_err.new_zeros(())
    typical = truth[finite].abs().mean() if finite.any() else truth.new_zeros(())
    return 2 * worst + ulps * eps * (truth.abs() + typical)


def randn(shape, dtype, device, *, requires_grad=True, scale=1.0) -> torch.Tensor:
    """Float inputs are drawn in float64 then cast, so every dtype sees the same values."""
    t = torch.randn(shape, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)


def all_cases() -> list[OpCase]:
    from .cases import CASES

    return list(CASES)


def get_case(name: str) -> OpCase:
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(f"no op case named {name!r}; known: {[c.name for c in all_cases()]}")
