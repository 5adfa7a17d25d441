"""The registry of op cases: one entry per op (or per option variant of an op).

Both ``tests/`` and ``handgrad-check`` are driven from it (STYLE.md §6): an entry names the
handgrad callable, the torch reference, an input maker and the shapes to try, so adding an op
costs one entry in ``handgrad.testing.cases.<area>``.

Imports run one way: this module reads the case modules, which read the case types
(``handgrad.testing.types``) and the tolerance policy (``handgrad.testing.tolerances``), never
this module. The names of both are re-exported here for the tests that import them from here.
"""
from __future__ import annotations

from .cases import CASES
from .tolerances import LOWP_RULE, allowed_lowp_error
from .types import DEFAULT_SHAPES, BadInput, Inputs, OpCase, Shape, randn

__all__ = ["all_cases", "get_case", "OpCase", "Inputs", "BadInput", "Shape", "DEFAULT_SHAPES", "randn",
           "LOWP_RULE", "allowed_lowp_error"]


def all_cases() -> list[OpCase]:
    return list(CASES)


def get_case(name: str) -> OpCase:
    for case in CASES:
        if case.name == name:
            return case
    raise KeyError(f"no op case named {name!r}; known: {[c.name for c in CASES]}")
