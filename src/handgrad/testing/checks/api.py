"""The public functions: ``check_function``, ``check_module``, ``assert_gradients_match`` and, for
handgrad's own registry, ``check_case`` with ``representative_shape``."""
from __future__ import annotations

import copy
from typing import Any, Callable, Iterable, Sequence

import torch

from ..report import Report
from ..tolerances import TERM_SCALES
from ..types import BadInput, Inputs, OpCase, Shape
from .labels import as_callable, describe, label_inputs, normalise, param_names, qualname
from .options import CheckOptions, resolve_options
from .problem import Problem
from .runner import ALL, run

__all__ = ["check_function", "check_module", "assert_gradients_match", "GradientCheckError", "check_case",
           "representative_shape", "applies"]


class GradientCheckError(AssertionError):
    """Raised by ``assert_gradients_match``; ``.report`` holds the full ``Report``."""

    def __init__(self, report: Report):
        super().__init__("\n" + str(report))
        self.report = report


def check_function(
    fn: Callable | type[torch.autograd.Function],
    *inputs: Any,
    reference: Callable | None = None,
    checks: Iterable[str] = ALL,
    kwargs: dict[str, Any] | None = None,
    bad_inputs: Sequence[BadInput] = (),
    name: str | None = None,
    options: CheckOptions | None = None,
    **option_values: Any,
) -> Report:
    r"""Check ``fn``'s gradients every way there is; return a ``Report`` (never raises for a bad fn).

    Args:
        fn: an ``autograd.Function`` class (its ``apply``, or handgrad's ``call``), a functional
            op, or any callable built from differentiable pieces.
        *inputs: the arguments to call ``fn`` with (or one ``handgrad.testing.Inputs``). The
            floating-point tensors that require grad are the ones differentiated; if none
            requires grad, every floating-point tensor is. The caller's tensors are not modified:
            every check runs on float64 copies, except ``lowp`` and ``autocast``.
        reference: a callable computing the same function with autograd (e.g. the
            ``torch.nn.functional`` op), same arguments. Enables the ``reference``, ``lowp``,
            ``autocast`` and ``bad_inputs`` checks and is the truth for ``needs_grad`` and
            ``torch_func``.
        checks: the names of the checks to run (default ``ALL``; see ``handgrad.testing.checks``).
        kwargs: keyword arguments for ``fn`` (tensors among them are differentiated too).
        bad_inputs: ``BadInput``\ s, calls the reference refuses; ``fn`` must raise the same type.
        name: the report's title (default: fn's qualified name).
        options: a ``CheckOptions``; the keyword arguments ``atol``, ``rtol``, ``strict``,
            ``compile_backend``, ``lowp_dtypes``, ``lowp_ulps``, ``lowp_terms``, ``seed`` replace its fields.

    Returns:
        a ``Report``: ``report.ok``, ``str(report)``, ``report.to_dict()``, ``report["gradcheck"]``.

    Example::

        report = check_function(MyLinear, x, w, b, reference=torch.nn.functional.linear)
        assert report.ok, report
    """
    opts = resolve_options(options, option_values, "check_function")
    given = normalise(inputs, kwargs)
    names = param_names(fn)
    labels, lines = label_inputs(given, names)
    call = as_callable(fn)
    # torch's "invalid gradient at index k" counts the Function's forward arguments: name them only then
    is_function = isinstance(fn, type) and issubclass(fn, torch.autograd.Function)
    problem = Problem(name or qualname(fn), lambda dtype: call, (lambda dtype: reference) if reference else None,
                      given, labels, lines, call, reference, tuple(bad_inputs), names if is_function else None)
    return run(problem, checks, opts)


def check_module(
    module: torch.nn.Module,
    *inputs: Any,
    reference: torch.nn.Module | None = None,
    checks: Iterable[str] = ALL,
    name: str | None = None,
    options: CheckOptions | None = None,
    **option_values: Any,
) -> Report:
    r"""``check_function`` for an ``nn.Module``: its outputs with respect to its inputs and every parameter.

    The checks run on a float64 deep copy (``lowp`` on a copy in the module's own dtype, or in
    ``lowp_dtypes``); ``module`` itself is not modified. Floating-point inputs are differentiated
    (those that require grad, or all of them if none does), and so is every parameter that
    requires grad, labelled by its name (``parameter weight``).

    Args:
        module: the module to check. Put it in ``eval()`` mode if it is random in training
            (dropout): finite differences need a deterministic function.
        *inputs: the arguments of ``module(...)``.
        reference: an ``nn.Module`` computing the same function with autograd (e.g. the
            ``torch.nn`` layer), with the same parameter names; it is run with ``module``'s
            parameter values (``torch.func.functional_call``), its own values are ignored.
        others: as for ``check_function``.
    """
    opts = resolve_options(options, option_values, "check_module")
    params = {k: p for k, p in module.named_parameters() if p.requires_grad}
    given_in = normalise(inputs, None)
    n_in = len(given_in.args)
    pnames = list(params)

    def at(mod: torch.nn.Module) -> Callable[[torch.dtype | None], Callable]:
        cache: dict = {}

        def make(dtype):
            if dtype not in cache:
                m = copy.deepcopy(mod)
                cache[dtype] = m if dtype is None else m.to(dtype)

            def call(*args):
                return torch.func.functional_call(cache[dtype], dict(zip(pnames, args[n_in:])), tuple(args[:n_in]))

            return call

        return make

    given = Inputs((*given_in.args, *[p.detach().clone().requires_grad_(True) for p in params.values()]))
    in_labels, in_lines = label_inputs(Inputs(given_in.args), None)
    in_labels = [label.replace("argument", "input") for label in in_labels]
    labels = [*in_labels, *[f"parameter {k}" for k in pnames]]
    lines = [*[line.replace("argument", "input") for line in in_lines],
             *[f"{k} {describe(p)}" for k, p in params.items()]]
    problem = Problem(name or type(module).__name__, at(module), at(reference) if reference is not None else None,
                      given, labels, lines, module, reference)
    return run(problem, checks, opts)


def assert_gradients_match(
    fn: Callable | type[torch.autograd.Function] | torch.nn.Module,
    reference: Callable | torch.nn.Module | None,
    *inputs: Any,
    checks: Iterable[str] = ALL,
    **options: Any,
) -> Report:
    """Run ``check_function`` (or ``check_module`` for a module); raise ``AssertionError`` on any failure.

    For users' own pytest suites::

        def test_my_linear():
            x, w = torch.randn(5, 3), torch.randn(4, 3)
            assert_gradients_match(MyLinear, torch.nn.functional.linear, x, w)

    The error's message is the full report: which check failed, which input's gradient is
    wrong, where, and by how much. Returns the report when everything passes (skips allowed).
    """
    if isinstance(fn, torch.nn.Module):
        report = check_module(fn, *inputs, reference=reference, checks=checks, **options)
    else:
        report = check_function(fn, *inputs, reference=reference, checks=checks, **options)
    if not report.ok:
        raise GradientCheckError(report)
    return report


def applies(case: OpCase, check: str) -> bool:
    """Whether ``check`` applies to ``case`` at all (a check that does not is left out, not counted
    as a skip): not ``lowp`` for a case with ``lowp_dtypes=()`` (softmax's ``dtype=float64``
    variants compute in float64 whatever the input), not ``bad_inputs`` for a case that lists none
    (its variants share the base case's)."""
    return {"bad_inputs": bool(case.bad_inputs), "lowp": bool(case.lowp_dtypes)}.get(check, True)


def representative_shape(case: OpCase) -> Shape:
    """The one shape ``handgrad-check`` uses for a case: the smallest non-empty one with at least
    two dims (a batch and a feature dim), else the smallest non-empty one. Small keeps the full
    Jacobian comparisons (one backward per output element, two forwards per input element) fast;
    the registry's other shapes (odd, batched, empty) run in ``tests/test_ops.py``."""
    nonempty = [s for s in case.shapes if all(d > 0 for d in s)] or list(case.shapes)
    size = lambda s: (len(s) < 2, torch.Size(s).numel())  # noqa: E731
    return min(nonempty, key=size)


def check_case(case: OpCase, shape: Shape | None = None, device: str | torch.device = "cpu",
               checks: Iterable[str] = ALL, strict: bool = True, options: CheckOptions | None = None) -> Report:
    """Check one registry case (``handgrad.testing.registry``) at ``shape`` (default: its
    representative shape), strictly: a handgrad op must support every feature. Inputs are made in
    the first of the case's low-precision dtypes, so the ``lowp`` check runs in each of
    ``case.lowp_dtypes`` with the case's margin; every other check runs on float64 copies, except
    ``autocast``. ``options`` (default: ``CheckOptions()``) gives the rest; the case's ``lowp_dtypes``
    and ``lowp_ulps``, its terms (``OpCase.terms``) and ``strict`` replace its fields."""
    shape = representative_shape(case) if shape is None else tuple(shape)
    dtype = case.lowp_dtypes[0] if case.lowp_dtypes else torch.float64
    with torch.random.fork_rng(devices=[]):  # the same inputs every run; the caller's RNG untouched
        torch.manual_seed(0)
        inputs = case.inputs(shape, dtype, device)
    return check_function(case.fn, inputs, reference=case.reference, checks=checks, bad_inputs=case.bad_inputs,
                          name=case.id(shape), options=options, strict=strict, lowp_dtypes=case.lowp_dtypes,
                          lowp_ulps=case.lowp_ulps, lowp_terms=case.terms())
