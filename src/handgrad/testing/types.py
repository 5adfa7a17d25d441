"""The case types: ``Inputs`` (one call's arguments), ``BadInput`` (a call torch refuses) and
``OpCase`` (one registry entry), and ``randn``, the input maker every case uses.

They import only torch, so the checks, the registry and the case modules all read them
without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .tolerances import DEFAULT_LOWP_ULPS, TERM_SCALES

__all__ = ["Shape", "DEFAULT_SHAPES", "Inputs", "BadInput", "OpCase", "randn"]

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

    def call(self, fn: Callable) -> Any:
        """``fn(*args, **kwargs)``."""
        return fn(*self.args, **self.kwargs)

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
    # Low-precision margin in units of the dtype's eps (tolerances.LOWP_RULE); raise it only
    # with a named constant in handgrad.testing.tolerances saying why.
    lowp_ulps: float = DEFAULT_LOWP_ULPS
    lowp_dtypes: tuple[torch.dtype, ...] = (torch.float32, torch.bfloat16, torch.float16)
    # The absolute computation of its gradients' terms (tolerances.TERM_SCALES) in this case's
    # own call signature, where it is not the op's (mlp's flat parameters); None: the op's.
    lowp_terms: Callable | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def terms(self) -> Callable | None:
        """The absolute computation the ``lowp`` rule evaluates on this case's arguments."""
        return self.lowp_terms or TERM_SCALES.get(self.name.split("[")[0])

    def inputs(self, shape: Shape, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> Inputs:
        return self.make(tuple(shape), dtype, torch.device(device))

    def id(self, shape: Shape) -> str:
        return f"{self.name}-{'x'.join(map(str, shape)) or 'scalar'}"


def randn(shape, dtype, device, *, requires_grad=True, scale=1.0) -> torch.Tensor:
    """Float inputs are drawn in float64 then cast, so every dtype sees the same values."""
    t = torch.randn(shape, dtype=torch.float64) * scale
    return t.to(dtype=dtype, device=device).requires_grad_(requires_grad)
