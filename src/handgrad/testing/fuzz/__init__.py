"""A seeded differential fuzzer: every catalogue op against torch, on random calls.

``run(seed, calls, seconds)`` draws calls (``draw``: shapes with 0-size dims, 1-D and 0-d
inputs, non-contiguous layouts, valid and invalid keyword options, four float dtypes and
invalid integer/bool/complex inputs), runs each on torch and on handgrad, and compares
exceptions, outputs and gradients (``compare``; low precision by the registry's
error-against-float64-truth rule). A disagreement passes only where the table of deliberate
differences (``handgrad.testing.differences``) or the caller's ``known`` table covers it.

The seed comes from ``$HANDGRAD_FUZZ_SEED`` (default ``DEFAULT_SEED``); each call has its own
seed drawn from it, and ``python -m handgrad.testing.fuzz --call OP:SEED`` redraws and reruns
one call, so every failure reproduces from the line that reports it.
"""
from __future__ import annotations

import os
import random
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from ... import catalogue
from ..differences import DIFFERENCES, Difference, covering
from ..registry import all_cases
from ..tolerances import TERM_SCALES
from .call import Call, describe
from .compare import Mismatch, Outcome, compare, run_side
from .draw import DRAW, draw_call
from .references import reference

__all__ = ["run", "check_call", "FuzzReport", "Disagreement", "SEED_ENV", "DEFAULT_SEED", "fuzzed_ops"]

SEED_ENV = "HANDGRAD_FUZZ_SEED"
DEFAULT_SEED = 13


@dataclass(frozen=True)
class Disagreement:
    call: Call
    mismatch: Mismatch

    def line(self) -> str:
        return (f"[{self.call.op} {self.mismatch.key}] {describe(self.call)}: {self.mismatch.detail}\n"
                f"    reproduce: python -m handgrad.testing.fuzz --call {self.call.op}:{self.call.seed}")


@dataclass
class FuzzReport:
    seed: int
    calls: int = 0
    agreed: int = 0
    seconds: float = 0.0
    deliberate: Counter = field(default_factory=Counter)   # difference name → calls it covered
    known: Counter = field(default_factory=Counter)
    disagreements: list[Disagreement] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # op → why it is not fuzzed
    per_op: Counter = field(default_factory=Counter)

    def classes(self) -> Counter:
        return Counter((d.call.op, d.mismatch.key) for d in self.disagreements)

    def summary(self) -> str:
        lines = [f"fuzz seed {self.seed} (${SEED_ENV}): {self.calls} calls in {self.seconds:.1f} s, "
                 f"{self.agreed} agreed ({100 * self.agreed / max(self.calls, 1):.2f}%), "
                 f"{sum(self.deliberate.values())} deliberate differences, {sum(self.known.values())} known open, "
                 f"{len({id(d.call) for d in self.disagreements})} disagreed"]
        for op, why in self.skipped.items():
            lines.append(f"  skipped {op}: {why}")
        for (op, key), n in self.classes().most_common():
            first = next(d for d in self.disagreements if (d.call.op, d.mismatch.key) == (op, key))
            lines.append(f"  {n:5d} × {first.line()}")
        return "\n".join(lines)


def _ulps() -> dict[str, float]:
    out: dict[str, float] = {}
    for case in all_cases():
        name = case.name.split("[")[0]
        out[name] = max(out.get(name, 0.0), case.lowp_ulps)
    return out


def fuzzed_ops() -> tuple[dict[str, tuple], dict[str, str]]:
    """({op name: (handgrad callable, torch reference)}, {op name: why it is skipped})."""
    ops, skipped = {}, {}
    for op in catalogue.ops():
        ref, why = reference(op)
        if ref is None:
            skipped[op.name] = why
        elif op.name not in DRAW:
            skipped[op.name] = f"{op.name}: the fuzzer has no domain for it (fuzz/draw.py)"
        else:
            ops[op.name] = (op.functional, ref)
    return ops, skipped


def _outcomes(call: Call, fn, ref) -> tuple[Outcome, ...]:
    """(torch, handgrad, the float64 truth, the truth on inputs moved by a rounding, and for
    float64 calls torch in float32: see ``compare.value_mismatch``)."""
    f64 = call.precision() in (None, torch.float64)
    terms = TERM_SCALES.get(call.op)       # the terms its gradients sum, on the truth's side
    theirs = run_side(ref, call, terms=terms if f64 else None)
    g = {"g": theirs.out.dtype} if isinstance(theirs.out, torch.Tensor) else None
    ours = run_side(fn, call, rounding=g)
    truth = wobble = coarse = None
    if theirs.error is None and ours.error is None:
        truth = theirs if f64 else run_side(ref, call, torch.float64, g, terms=terms)
        wobble = run_side(ref, call, torch.float64, g, perturb=call.seed + 2)
        coarse = run_side(ref, call, torch.float32, g) if f64 else None
    return theirs, ours, truth, wobble, coarse


def check_call(call: Call, ulps: dict | None = None) -> list[Mismatch]:
    """Every mismatch of one call."""
    ops, skipped = fuzzed_ops()
    if call.op not in ops:
        raise ValueError(skipped.get(call.op, f"no op {call.op!r}"))
    fn, ref = ops[call.op]
    return compare(*_outcomes(call, fn, ref), (ulps or _ulps()).get(call.op, 2.0), call.precision())


def run(seed: int | None = None, calls: int = 2000, seconds: float | None = None, only=None,
        known: tuple[Difference, ...] = ()) -> FuzzReport:
    """Draw up to ``calls`` calls (stopping after ``seconds`` of wall clock if given) over every
    fuzzable catalogue op (or those named in ``only``)."""
    if seed is None:
        seed = int(os.environ.get(SEED_ENV, DEFAULT_SEED))
    ops, skipped = fuzzed_ops()
    names = [n for n in ops if only is None or n in only]
    report = FuzzReport(seed, skipped=skipped)
    rng = random.Random(seed)
    ulps = _ulps()
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(calls):
            if seconds is not None and time.perf_counter() - start > seconds:
                break
            name = rng.choice(names)
            call = draw_call(name, rng.getrandbits(40))
            report.calls += 1
            report.per_op[name] += 1
            fn, ref = ops[name]
            mismatches = compare(*_outcomes(call, fn, ref), ulps.get(name, 2.0), call.precision())
            open_ = []
            for m in mismatches:
                d = covering(call, m.kind, DIFFERENCES)
                k = None if d else covering(call, m.kind, known)
                if d:
                    report.deliberate[d.name] += 1
                elif k:
                    report.known[k.name] += 1
                else:
                    open_.append(m)
            if not mismatches:
                report.agreed += 1
            report.disagreements.extend(Disagreement(call, m) for m in open_)
    finally:
        torch.set_num_threads(threads)
    report.seconds = time.perf_counter() - start
    return report
