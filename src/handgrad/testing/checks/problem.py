"""The problem the checks share: ``Problem`` (fn and reference at a dtype, the inputs and their
labels) and ``Ctx`` (one run: the options, the float64 copies, the seeded output gradients and
the numerical Jacobian, each computed once)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..tolerances import EXACT_ATOL, EXACT_RTOL, FD_ATOL, FD_RTOL
from ..types import BadInput, Inputs
from .jacobians import jac_numerical, outputs
from .measure import Worst, grad_label, locate, short
from .options import CheckOptions


# The output gradients' random stream: options.seed offset by this, so that G is not the stream of
# torch.manual_seed(seed), which inputs are drawn from (the registry's after torch.manual_seed(0),
# and most users'): G = x up to a scale made a norm's gradient vanish, rstd·(v − mean v − x̂·mean(v ⊙ x̂))
# = 0 at G ∝ x̂, and its lowp check compared rounding residues of a zero truth.
G_STREAM = 1_000_003


class Unsupported(Exception):
    """fn lacks a feature (jvp, vmap rule, one Dynamo graph): skip, or fail when strict."""


# What torch says when an autograd.Function has no vmap support (no ``vmap`` staticmethod, no
# ``generate_vmap_rule``, or an old-style forward(ctx, ...) without setup_context).
VMAP_UNSUPPORTED = ("does not have vmap support", "must override the setup_context", "vmap staticmethod")


@dataclass
class Problem:
    """What the checks need: fn and reference at a dtype, the inputs, and a label per input."""

    name: str
    fn_at: Callable[[torch.dtype | None], Callable]           # dtype None: as given
    ref_at: Callable[[torch.dtype | None], Callable] | None
    inputs: Inputs                                             # as given; diff tensors require grad
    labels: list[str]                                          # one per differentiable tensor
    arg_lines: list[str]
    fn: Callable                                               # as given, for the bad inputs
    reference: Callable | None
    bad_inputs: tuple[BadInput, ...] = ()
    names: list[str] | None = None                             # fn's parameters, to name torch's indices


@dataclass
class Ctx:
    """The float64 run every check shares (computed once, lazily)."""

    problem: Problem
    options: CheckOptions
    _cache: dict = field(default_factory=dict)

    def __post_init__(self):
        self.x64 = self.problem.inputs.map(lambda t: t.to(torch.float64))
        self.f = self.x64.bind(self.problem.fn_at(torch.float64))      # f(*diff) → fn's output
        self.ref = self.x64.bind(self.problem.ref_at(torch.float64)) if self.problem.ref_at else None
        self.diff = [t.detach() for t in self.x64.diff]
        self.labels = self.problem.labels
        self.strict = self.options.strict

    @property
    def device(self) -> torch.device:
        return self.diff[0].device if self.diff else torch.device("cpu")

    def worst(self, kind: str) -> Worst:
        """A fresh running worst at the tolerances of ``kind``: "fd" (against finite differences)
        or "exact" (two float64 computations of one quantity); ``atol``/``rtol`` replace both."""
        atol, rtol = (FD_ATOL, FD_RTOL) if kind == "fd" else (EXACT_ATOL, EXACT_RTOL)
        o = self.options
        return Worst(atol if o.atol is None else o.atol, rtol if o.rtol is None else o.rtol)

    def leaves(self) -> list[torch.Tensor]:
        return [t.clone().requires_grad_(True) for t in self.diff]

    def flat(self, f: Callable) -> Callable[..., list[torch.Tensor]]:
        return lambda *xs: outputs(f(*xs))

    @property
    def out_shapes(self) -> list[torch.Size]:
        if "out_shapes" not in self._cache:
            with torch.no_grad():
                self._cache["out_shapes"] = [o.shape for o in self.flat(self.f)(*self.diff)]
        return self._cache["out_shapes"]

    def out_label(self, o: int) -> str:
        return "output" if len(self.out_shapes) == 1 else f"output {o}"

    def grad_outputs(self, batch: int | None = None) -> list[torch.Tensor]:
        """Random output gradients G, seeded so every check (and every run) sees the same ones."""
        gen = torch.Generator().manual_seed(G_STREAM + self.options.seed + (batch or 0))
        lead = (batch,) if batch else ()
        dev = self.diff[0].device if self.diff else "cpu"
        return [torch.randn((*lead, *s), generator=gen, dtype=torch.float64).to(dev) for s in self.out_shapes]

    def jac_numerical(self) -> list[list[torch.Tensor]]:
        if "jnum" not in self._cache:
            self._cache["jnum"] = jac_numerical(self.flat(self.f), self.diff)
        return self._cache["jnum"]

    def compare(self, w: Worst, outs, grads, ref_outs, ref_grads) -> None:
        """Outputs and gradients against another computation's, element by element, into ``w``."""
        c = self
        if len(outs) != len(ref_outs):
            raise AssertionError(f"fn returns {len(outs)} floating-point outputs, the reference {len(ref_outs)}")
        for o, (a, b) in enumerate(zip(outs, ref_outs)):
            if a.shape != b.shape:
                raise AssertionError(f"{c.out_label(o)} has shape {list(a.shape)}, expected {list(b.shape)}")
            w.add(a, b, f"the {c.out_label(o)}", locate(b.shape, c.out_label(o)))
        for i, (a, b) in enumerate(zip(grads, ref_grads)):
            x = c.diff[i]
            a = torch.zeros_like(x) if a is None else a
            b = torch.zeros_like(x) if b is None else b
            w.add(a, b, grad_label(c.labels[i]), locate(x.shape, short(c.labels[i])))
