"""Error measurement: the running worst mismatch of one check (``Worst``), where an element lies
(``locate``, ``locate_jac``), and the short texts a report quotes (labels, exception messages).

Errors are measured the same way by every check: absolute ``|got − expected|``; relative
``|got − expected| / max(|expected|, atol)``; a comparison fails where
``|got − expected| > atol + rtol·|expected|`` (``tolerances`` gives atol and rtol).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from ..report import CheckResult


@dataclass
class Worst:
    """The running worst mismatch over every comparison one check makes."""

    atol: float
    rtol: float
    max_abs: float = 0.0
    max_rel: float = 0.0
    ratio: float = -1.0                # worst |got − expected| / (atol + rtol|expected|); > 1 fails
    subject: str | None = None
    index: list[int] | None = None
    where: str | None = None
    got: float | None = None
    expected: float | None = None
    compared: bool = False

    def add(self, got: torch.Tensor, expected: torch.Tensor, subject: str,
            where: Callable[[int], tuple[list[int], str]]) -> None:
        """Compare two tensors of the same number of elements; ``where(k)`` locates flat index k."""
        self.compared = True
        a, e = got.detach().double().reshape(-1).cpu(), expected.detach().double().reshape(-1).cpu()
        if a.numel() == 0:
            return
        both_nan = a.isnan() & e.isnan()
        same_inf = a.isinf() & (a == e)
        diff = torch.where(both_nan | same_inf, 0.0, (a - e).abs()).nan_to_num(nan=math.inf)
        allowed = self.atol + self.rtol * e.abs().nan_to_num(nan=0.0, posinf=math.inf)
        ratio = torch.where(diff == 0, 0.0, diff / allowed)
        rel = diff / e.abs().clamp_min(self.atol if self.atol > 0 else torch.finfo(torch.float64).tiny)
        self.max_abs = max(self.max_abs, diff.max().item())
        self.max_rel = max(self.max_rel, rel.nan_to_num(nan=math.inf).max().item())
        k = int(ratio.argmax())
        if ratio[k].item() > max(self.ratio, 0.0):  # an exact match locates nothing
            self.ratio = ratio[k].item()
            self.index, self.where = where(k)
            self.subject, self.got, self.expected = subject, a[k].item(), e[k].item()

    @property
    def failed(self) -> bool:
        return self.ratio > 1

    def tolerance(self) -> str:
        return f"|got − expected| ≤ {self.atol:g} + {self.rtol:g}·|expected|"

    def describe(self, what: str) -> str:
        off = abs(self.got - self.expected)
        return (f"{what}: {self.subject} is wrong at {self.where}: got {self.got:.6g}, expected {self.expected:.6g}, "
                f"off by {off:.3g} (relative {off / max(abs(self.expected), self.atol):.3g}; allowed {self.tolerance()}); "
                f"largest error anywhere {self.max_abs:.3g}")

    def result(self, name: str, what: str, notes: Iterable[str] = ()) -> CheckResult:
        notes = [n for n in notes if n]
        if self.failed:
            status, message = "fail", "\n".join([self.describe(what), *notes])
        else:
            status, message = "pass", "\n".join(notes)
        failed = self.failed
        return CheckResult(name, status, message, self.max_abs if self.compared else None,
                           self.max_rel if self.compared else None, self.subject if failed else None,
                           self.index if failed else None, self.where, self.got if failed else None,
                           self.expected if failed else None, self.tolerance())


def unravel(k: int, shape: Sequence[int]) -> list[int]:
    idx = []
    for d in reversed(list(shape)):
        idx.append(k % d if d else 0)
        k = k // d if d else 0
    return idx[::-1]


def locate(shape: Sequence[int], name: str) -> Callable[[int], tuple[list[int], str]]:
    """Locate flat index k of a tensor of ``shape`` named ``name``: ``weight[2, 0]``."""

    def where(k: int) -> tuple[list[int], str]:
        idx = unravel(k, shape)
        return idx, f"{name}[{', '.join(map(str, idx))}]" if idx else name

    return where


def locate_jac(out_shape: Sequence[int], out_name: str, in_shape: Sequence[int], in_name: str):
    """Locate flat index k of a Jacobian block (out.numel(), in.numel()): ``∂output[3]/∂weight[2, 0]``."""
    n_in = max(math.prod(in_shape), 1)

    def where(k: int) -> tuple[list[int], str]:
        o, i = unravel(k // n_in, out_shape), unravel(k % n_in, in_shape)
        fmt = lambda n, ix: f"{n}[{', '.join(map(str, ix))}]" if ix else n  # noqa: E731
        return o + i, f"∂{fmt(out_name, o)}/∂{fmt(in_name, i)}"

    return where


def short(label: str) -> str:
    """``weight (argument 1)`` → ``weight``, ``parameter weight`` → ``weight``, for ∂out/∂weight[...]."""
    return label.split(" (")[0].removeprefix("parameter ")


def grad_label(label: str) -> str:
    return f"the gradient of {label}"


def first_lines(e: BaseException, n: int = 3) -> str:
    text = str(e).strip() or type(e).__name__
    lines = [ln for ln in text.splitlines() if ln.strip()]
    return " ".join(lines[:n])[:600]


def name_indices(message: str, names: list[str] | None) -> str:
    """torch says "invalid gradient at index 1"; add the argument's name."""
    if not names:
        return message

    def sub(m):
        k = int(m.group(2)) - (m.group(1) == "at position")  # torch counts positions from 1, indices from 0
        return f"{m.group(0)} ({names[k]})" if 0 <= k < len(names) else m.group(0)

    message = re.sub(r"(at index|at position) (\d+)", sub, message, count=1)
    return message

