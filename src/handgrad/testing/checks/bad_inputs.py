"""The bad_inputs check: for each input torch refuses (``BadInput``), fn raises the exception type
the reference raises for the same call, with a message naming the argument and the shapes."""
from __future__ import annotations

import torch

from ..report import CheckResult
from .measure import first_lines
from .problem import Ctx


def check_bad_inputs(c: Ctx) -> CheckResult:
    p = c.problem
    if not p.bad_inputs:
        return CheckResult("bad_inputs", "skip", "no bad inputs given")
    if p.reference is None:
        return CheckResult("bad_inputs", "skip", "no reference given: nothing says which exception torch raises")
    problems = []
    with torch.random.fork_rng(devices=[]):  # the bad inputs are random; the caller's RNG untouched
        for bad in p.bad_inputs:
            inputs = bad.make()
            try:
                inputs.call(p.reference)
            except Exception as e:  # noqa: BLE001 - any exception: its type is what fn must raise
                theirs = e
            else:
                problems.append(f"{bad.what}: the reference accepts it, so it is not a bad input")
                continue
            try:
                inputs.call(p.fn)
            except Exception as ours:  # noqa: BLE001 - compared with torch's below
                if not isinstance(ours, type(theirs)):
                    problems.append(f"{bad.what}: raised {type(ours).__name__} ({first_lines(ours, 1)}), "
                                    f"the reference raises {type(theirs).__name__} ({first_lines(theirs, 1)})")
                else:
                    missing = [n for n in bad.names if n not in str(ours)]
                    if missing:
                        problems.append(f"{bad.what}: the message {first_lines(ours, 2)!r} does not name {missing}")
            else:
                problems.append(f"{bad.what}: accepted; the reference raises {type(theirs).__name__} "
                                f"({first_lines(theirs, 1)})")
    if problems:
        return CheckResult("bad_inputs", "fail", f"{len(problems)} of {len(p.bad_inputs)} bad inputs: " + "\n".join(problems))
    return CheckResult("bad_inputs", "pass", tolerance=f"{len(p.bad_inputs)} bad inputs: the reference's exception type")
