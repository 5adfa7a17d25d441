"""The result of a gradient check: one ``CheckResult`` per check, gathered in a ``Report``.

``str(report)`` is a table a person reads; ``report.to_dict()`` is what ``handgrad-check --json``
writes. Errors are measured the same way everywhere (``handgrad.testing.checks``):

- absolute error ``|got − expected|``;
- relative error ``|got − expected| / max(|expected|, atol)`` (the floor keeps an exact zero in
  the expected value from turning a 1e-17 difference into an infinite relative error);
- ``where`` names the worst element: which output, which input's gradient, the index in it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Literal

Status = Literal["pass", "fail", "skip"]

__all__ = ["CheckResult", "Report", "Status"]


def _num(x: float | None) -> Any:
    """A float as JSON allows it (``inf``/``nan`` become strings)."""
    if x is None or math.isfinite(x):
        return x
    return str(x)


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2e}"


@dataclass
class CheckResult:
    """One check's verdict.

    Attributes:
        name: the check (one of ``handgrad.testing.ALL``).
        status: ``"pass"``, ``"fail"`` or ``"skip"``.
        message: why it failed or was skipped (empty on a plain pass; a note on a qualified pass).
        max_abs_err: the largest ``|got − expected|`` over every compared element, or None.
        max_rel_err: the largest ``|got − expected| / max(|expected|, atol)``, or None.
        subject: what the worst element belongs to, e.g. ``"gradient of weight (argument 1)"``.
        index: the worst element's index inside ``subject`` (a list of ints), or None.
        where: ``subject`` and ``index`` in words, e.g. ``"∂output[3]/∂weight[2, 0]"``.
        got, expected: the values at the worst element of a failed comparison (``got`` is fn's).
        tolerance: the tolerance the comparison used, in words.
        seconds: wall time the check took.
    """

    name: str
    status: Status
    message: str = ""
    max_abs_err: float | None = None
    max_rel_err: float | None = None
    subject: str | None = None
    index: list[int] | None = None
    where: str | None = None
    got: float | None = None
    expected: float | None = None
    tolerance: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status != "fail"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "status": self.status, "message": self.message,
            "max_abs_err": _num(self.max_abs_err), "max_rel_err": _num(self.max_rel_err),
            "subject": self.subject, "index": self.index, "where": self.where,
            "got": _num(self.got), "expected": _num(self.expected),
            "tolerance": self.tolerance, "seconds": round(self.seconds, 4),
        }


@dataclass(repr=False)
class Report:
    """Every check run on one function or module.

    Attributes:
        name: what was checked (a function's qualified name, an op case, a factory).
        inputs: one line per argument: name, shape, dtype, whether it requires grad.
        device: the device the checks ran on.
        checks: one ``CheckResult`` per check, in the order run.
    """

    name: str
    inputs: list[str] = field(default_factory=list)
    device: str = "cpu"
    checks: list[CheckResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (a skipped check is not a failure)."""
        return all(c.ok for c in self.checks)

    @property
    def failures(self) -> list[CheckResult]:
        return [c for c in self.checks if c.status == "fail"]

    @property
    def seconds(self) -> float:
        return sum(c.seconds for c in self.checks)

    def __getitem__(self, name: str) -> CheckResult:
        for c in self.checks:
            if c.name == name:
                return c
        raise KeyError(f"no check named {name!r} in this report; ran {[c.name for c in self.checks]}")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "device": self.device, "inputs": list(self.inputs),
                "seconds": round(self.seconds, 4), "checks": [c.to_dict() for c in self.checks]}

    def __repr__(self) -> str:  # the table, so ``assert report.ok, report`` prints something readable
        return str(self)

    def __str__(self) -> str:
        head = f"{self.name}: {'ok' if self.ok else 'FAILED'} ({len(self.failures)} of {len(self.checks)} checks failed, " \
               f"{self.seconds:.2f} s, {self.device})"
        lines = [head, "  inputs: " + "; ".join(self.inputs)]
        rows = [("check", "status", "max abs err", "max rel err", "worst at", "time")]
        for c in self.checks:
            rows.append((c.name, c.status.upper() if c.status == "fail" else c.status, _fmt(c.max_abs_err),
                         _fmt(c.max_rel_err), c.where or "-", f"{c.seconds:.2f}s"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())
        for c in self.checks:
            if c.message:
                label = {"fail": "FAIL", "skip": "skip", "pass": "note"}[c.status]
                body = c.message.replace("\n", "\n      ")
                lines.append(f"  {label} {c.name}: {body}")
        return "\n".join(lines)
