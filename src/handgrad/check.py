"""``handgrad-check``: check every handgrad op, or your own Function, from the shell.

    handgrad-check                                  # every op in the registry, on CPU
    handgrad-check --device cuda --only linear      # one op (and its variants), on CUDA
    handgrad-check my_package.my_module:my_factory  # your own Function or module
    handgrad-check --checks gradcheck,gradgradcheck --json report.json

A factory is a function of no arguments returning ``(fn, inputs)`` or ``(fn, inputs,
reference)``: ``fn`` an autograd.Function class, a callable or an ``nn.Module``; ``inputs`` a
tuple of arguments (or one ``handgrad.testing.Inputs``); ``reference`` a callable (or module)
computing the same function with autograd. The exit status is 0 only if every check passes.
Same as ``python -m handgrad.check``.
"""
from __future__ import annotations

import argparse
import fnmatch
import importlib
import inspect
import json
import os
import sys
import time
import warnings
from typing import Any, NoReturn, Sequence

import torch

from .testing.checks import ALL, applies, check_case, check_function, check_module, representative_shape
from .testing.registry import Inputs, OpCase, all_cases, get_case
from .testing.report import Report

__all__ = ["main", "representative_shape", "check_case", "load_factory"]


def _usage_error(message: str) -> NoReturn:
    print(f"handgrad-check: {message}", file=sys.stderr)
    raise SystemExit(2)


def load_factory(spec: str) -> tuple[Any, Any, Any]:
    """``pkg.mod:factory`` → (fn, inputs, reference or None)."""
    if ":" not in spec:
        _usage_error(f"expected MODULE:FACTORY, got {spec!r}")
    mod_name, attr = spec.split(":", 1)
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # a user's module next to where they run the command
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        _usage_error(f"cannot load {spec!r}: {type(e).__name__}: {e}")
    factory = "a function of no arguments returning (fn, inputs) or (fn, inputs, reference)"
    example = "e.g. handgrad.testing.examples:linear"
    if isinstance(obj, type) or not callable(obj):
        what = f"the class {obj.__qualname__}" if isinstance(obj, type) else f"a {type(obj).__name__}"
        _usage_error(f"{spec} is {what}; it must be {factory} ({example})")
    try:
        inspect.signature(obj).bind()
    except TypeError:
        params = ", ".join(inspect.signature(obj).parameters)
        _usage_error(f"{spec} takes arguments ({params}); it must be {factory} ({example})")
    except ValueError:  # no signature to read (a builtin such as torch.nn.functional.linear)
        try:
            made = obj()
        except TypeError as e:
            _usage_error(f"{spec} cannot be called without arguments ({e}); it must be {factory} ({example})")
    else:
        made = obj()
    if not isinstance(made, (tuple, list)) or len(made) not in (2, 3):
        _usage_error(f"{spec} must be {factory}; it returned {type(made).__name__}")
    fn, inputs, reference = (*made, None) if len(made) == 2 else made
    if not callable(fn) or (reference is not None and not callable(reference)):
        got = ", ".join(type(v).__name__ for v in made)
        _usage_error(f"{spec} returned ({got}); fn must be an autograd.Function class, a callable or an "
                     "nn.Module, and reference a callable or None")
    return fn, inputs, reference


def _to(x: Any, device: str) -> Any:
    return x.to(device) if isinstance(x, (torch.Tensor, torch.nn.Module)) else x


def check_factory(spec: str, device: str | None = None, checks: Sequence[str] = ALL, strict: bool = False) -> Report:
    fn, inputs, reference = load_factory(spec)
    if isinstance(inputs, Inputs):
        args, kwargs = inputs.args, inputs.kwargs
    elif isinstance(inputs, (tuple, list)):
        args, kwargs = tuple(inputs), {}
    else:
        args, kwargs = (inputs,), {}
    if device is not None:
        args = tuple(_to(a, device) for a in args)
        kwargs = {k: _to(v, device) for k, v in kwargs.items()}
        fn, reference = _to(fn, device), _to(reference, device)
    if isinstance(fn, torch.nn.Module):
        return check_module(fn, *args, reference=reference, checks=checks, strict=strict, name=spec)
    return check_function(fn, *args, kwargs=kwargs, reference=reference, checks=checks, strict=strict, name=spec)


_SHORT = {"gradcheck": "grad", "gradgradcheck": "gradgrad", "forward_ad": "fwd_ad", "vmap": "vmap",
          "compile": "compile", "reference": "ref64", "lowp": "lowp", "needs_grad": "needs", "noncontiguous": "strided",
          "torch_func": "jac", "autocast": "amp", "bad_inputs": "bad", "inplace": "inplace"}
_MARK = {"pass": "ok", "fail": "FAIL", "skip": "skip"}


def table(reports: Sequence[Report], checks: Sequence[str], first: str = "op") -> str:
    """op × check: ok/FAIL/skip, the worst float64 errors (every check but lowp), the time."""
    rows = [[first, *[_SHORT.get(c, c) for c in checks], "max abs err", "max rel err", "time"]]
    for r in reports:
        by = {c.name: c for c in r.checks}
        f64 = [c for c in r.checks if c.name != "lowp" and c.max_abs_err is not None]
        rows.append([r.name, *[_MARK[by[c].status] if c in by else "-" for c in checks],
                     f"{max(c.max_abs_err for c in f64):.1e}" if f64 else "-",
                     f"{max(c.max_rel_err for c in f64):.1e}" if f64 else "-", f"{r.seconds:.2f}s"])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _select(cases: list[OpCase], only: list[str]) -> list[OpCase]:
    """NAME matches the case of that name and its variants (``linear`` → ``linear[no-bias]``);
    glob patterns (``*softmax*``) work too."""
    if not only:
        return cases
    keep = []
    for case in cases:
        base = case.name.split("[")[0]
        if any(case.name == p or base == p or fnmatch.fnmatchcase(case.name, p) for p in only):
            keep.append(case)
    return keep


def _check_named(name: str, device: str, checks: Sequence[str]) -> Report:
    """One case by name (what a worker process receives: cases hold lambdas, names pickle).

    Checks that do not apply to the case (``testing.checks.applies``) are left out, not counted
    as skips. The broadcast-target ``mse_loss`` case makes torch warn, as it should."""
    torch.set_num_threads(1)  # one op per core; intra-op threads would only fight the other worker
    case = get_case(name)
    checks = [c for c in checks if applies(case, c)]
    with warnings.catch_warnings():
        # the warnings two cases exist to provoke, from torch and handgrad alike: a broadcast
        # mse_loss target, and the deprecated reduction='elementwise_mean'
        warnings.filterwarnings("ignore", message="Using a target size", category=UserWarning)
        warnings.filterwarnings("ignore", message="reduction='elementwise_mean' is deprecated", category=UserWarning)
        return check_case(case, device=device, checks=checks)


def _run_cases(names: list[str], device: str, checks: Sequence[str], jobs: int) -> list[Report]:
    """Check the named cases, in ``jobs`` processes; reports come back in the order of ``names``."""

    def progress(r: Report) -> None:
        print(f"  {r.name}: {'ok' if r.ok else 'FAIL'} ({r.seconds:.1f} s)", file=sys.stderr, flush=True)

    if jobs <= 1 or len(names) == 1:
        reports = []
        for name in names:
            reports.append(_check_named(name, device, checks))
            progress(reports[-1])
        return reports
    import concurrent.futures
    import multiprocessing

    # spawn, not fork: forking a process that has started torch's thread pools can deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(min(jobs, len(names)), mp_context=multiprocessing.get_context("spawn"))
    with pool:
        futures = [pool.submit(_check_named, name, device, list(checks)) for name in names]
        for f in concurrent.futures.as_completed(futures):
            progress(f.result())
        return [f.result() for f in futures]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="handgrad-check", description=__doc__.replace("``", ""),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("factory", nargs="?", help="MODULE:FACTORY returning (fn, inputs[, reference]); "
                                              "without it, every handgrad op in the registry")
    p.add_argument("--device", default=None, help="cpu (default) or cuda")
    p.add_argument("--only", action="append", default=[], metavar="NAME",
                   help="only this op and its variants (repeatable, comma-separated, globs allowed)")
    p.add_argument("--checks", default=",".join(ALL), help=f"comma-separated subset of: {','.join(ALL)}")
    p.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    p.add_argument("--strict", action="store_true", default=None,
                   help="an unsupported feature (no jvp, no vmap rule, a graph break) fails rather than skips "
                        "(always on for handgrad's own ops)")
    p.add_argument("-j", "--jobs", type=int, default=None,
                   help="worker processes for the registry run (default: min(2, cores) on CPU, 1 on CUDA)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every report in full, not only failures")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in ALL]
    if unknown:
        print(f"handgrad-check: unknown checks {unknown}; known: {','.join(ALL)}", file=sys.stderr)
        return 2
    device = args.device or "cpu"
    if args.jobs is None:
        args.jobs = 1 if device != "cpu" else min(2, os.cpu_count() or 1)
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("handgrad-check: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    start = time.perf_counter()
    if args.factory:
        if args.only:
            print("handgrad-check: --only selects registry ops; it does not apply to a factory", file=sys.stderr)
            return 2
        reports = [check_factory(args.factory, args.device, checks, strict=bool(args.strict))]
    else:
        only = [n.strip() for o in args.only for n in o.split(",") if n.strip()]
        cases = _select(all_cases(), only)
        if not cases:
            print(f"handgrad-check: no op matches {only}; known: {[c.name for c in all_cases()]}", file=sys.stderr)
            return 2
        reports = _run_cases([c.name for c in cases], device, checks, args.jobs)
    elapsed = time.perf_counter() - start

    print(table(reports, checks, "op" if args.factory is None else "function"))
    for r in reports:
        if args.verbose or not r.ok or args.factory:  # a user's function: always the whole report
            print()
            print(r)
    counts = {s: sum(c.status == s for r in reports for c in r.checks) for s in ("pass", "fail", "skip")}
    failed_ops = [r.name for r in reports if not r.ok]
    not_applicable = len(reports) * len(checks) - sum(counts.values())  # the "-" cells of the table
    summary = (f"{'FAILED' if failed_ops else 'OK'}: {len(reports)} {'op' if args.factory is None else 'function'}"
               f"{'s' if len(reports) != 1 else ''} × {len(checks)} checks on {device}: {counts['pass']} passed, "
               f"{counts['fail']} failed, {counts['skip']} skipped"
               + (f", {not_applicable} not applicable" if not_applicable else "") + f" in {elapsed:.1f} s"
               + (f" (failed: {', '.join(failed_ops)})" if failed_ops else ""))
    print()
    print(summary)
    if args.json:
        doc = {"ok": not failed_ops, "summary": summary, "device": device, "torch": torch.__version__,
               "checks": checks, "seconds": round(elapsed, 3), "reports": [r.to_dict() for r in reports]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
    return 1 if failed_ops else 0


if __name__ == "__main__":
    sys.exit(main())
