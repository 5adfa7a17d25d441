"""handgrad.testing: validate a backward pass, handgrad's or your own.

- ``check_function(fn, *inputs, reference=None)`` → ``Report``: gradcheck, gradgradcheck,
  forward-mode AD, vmap, torch.compile, agreement with a reference in float64 and in low
  precision, missing gradients, non-contiguous inputs, torch.func's jacrev/jacfwd, autocast
  dtypes, bad inputs (``ALL``); options as keyword arguments or one ``CheckOptions``.
- ``check_module(module, *inputs, reference=None)`` → ``Report``: the same for a module's inputs
  and parameters, on a float64 copy.
- ``assert_gradients_match(fn, reference, *inputs)``: raises ``AssertionError`` with the report,
  for pytest.
- ``check_case(case, shape)``: the same for one entry of handgrad's op registry, strictly.
- ``coverage(loss, model)`` / ``record_coverage(model)`` → ``CoverageReport``: which parameters'
  gradients and which layer-level backward nodes of a loss are handgrad's, by module name.
- The op registry (``registry``: ``OpCase``, ``Inputs``, ``all_cases``) that drives handgrad's
  own tests and ``handgrad-check``; the tolerance policy (``tolerances``); reference
  implementations written in plain torch (``references``).
"""
from .checks import (ALL, CheckOptions, GradientCheckError, assert_gradients_match, check_case, check_function,
                     check_module, representative_shape)
from .coverage import CoverageReport, coverage, record_coverage
from .registry import all_cases, get_case
from .report import CheckResult, Report
from .types import BadInput, Inputs, OpCase

__all__ = ["ALL", "BadInput", "CheckOptions", "CheckResult", "CoverageReport", "GradientCheckError", "Inputs",
           "OpCase", "Report", "all_cases", "assert_gradients_match", "check_case", "check_function", "check_module",
           "coverage", "get_case", "record_coverage", "representative_shape"]
