"""The runner: the checks by name (``CHECKS``, in the order ``ALL`` lists them) and ``run``, which
runs the asked-for checks on one problem and gathers a ``Report``. An exception a check raises
is its verdict (``fail``, with the message); ``Unsupported`` is a ``skip``, or a ``fail`` when strict."""
from __future__ import annotations

import time
from typing import Callable, Iterable

from ..._compat import TorchLacks
from ..report import CheckResult, Report
from .agreement import check_autocast, check_lowp, check_needs_grad, check_noncontiguous, check_reference
from .bad_inputs import check_bad_inputs
from .inplace import check_inplace
from .derivatives import check_forward_ad, check_gradcheck, check_gradgradcheck, check_torch_func
from .measure import first_lines, name_indices
from .options import CheckOptions
from .problem import Ctx, Problem, Unsupported
from .transforms import check_compile, check_vmap

__all__ = ["ALL", "CHECKS", "run"]


CHECKS: dict[str, Callable[[Ctx], CheckResult]] = {
    "gradcheck": check_gradcheck, "gradgradcheck": check_gradgradcheck, "forward_ad": check_forward_ad,
    "vmap": check_vmap, "compile": check_compile, "reference": check_reference, "lowp": check_lowp,
    "needs_grad": check_needs_grad, "noncontiguous": check_noncontiguous, "torch_func": check_torch_func,
    "autocast": check_autocast, "bad_inputs": check_bad_inputs, "inplace": check_inplace,
}

#: every check, in the order they run
ALL: tuple[str, ...] = tuple(CHECKS)


def run(problem: Problem, checks: Iterable[str], options: CheckOptions) -> Report:
    checks = list(checks)
    unknown = [n for n in checks if n not in CHECKS]
    if unknown:
        raise ValueError(f"unknown checks {unknown}; known: {list(ALL)}")
    device = str(problem.inputs.diff[0].device) if problem.inputs.diff else "cpu"
    report = Report(problem.name, problem.arg_lines, device)
    if not problem.inputs.diff:
        report.checks.append(CheckResult("inputs", "fail", "no floating-point tensor input to differentiate"))
        return report
    ctx = Ctx(problem, options)
    try:
        has_output = bool(ctx.out_shapes)
        why = "fn returns no floating-point tensor"
    except Exception as e:  # noqa: BLE001 - fn cannot even run forward on float64 copies
        has_output, why = False, f"fn raised {type(e).__name__} on float64 copies of the inputs: {first_lines(e)}"
    if not has_output:
        report.checks.append(CheckResult("inputs", "fail", why))
        return report
    strict = options.strict
    for name in checks:
        start = time.perf_counter()
        try:
            result = CHECKS[name](ctx)
        except Unsupported as e:
            result = CheckResult(name, "fail" if strict else "skip", f"unsupported{' (strict)' if strict else ''}: {e}")
        except TorchLacks as e:  # the torch reference predates a feature handgrad has: nothing to compare
            result = CheckResult(name, "skip", str(e))
        except Exception as e:  # noqa: BLE001 - the check ran fn, and fn raised: that is the verdict
            result = CheckResult(name, "fail", f"raised {type(e).__name__}: {name_indices(first_lines(e), problem.names)}")
        result.seconds = time.perf_counter() - start
        report.checks.append(result)
    return report
