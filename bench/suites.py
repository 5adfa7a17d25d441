"""The bench's suites, and every case by name: ``seed`` (bench.cases: the seed's network, the
first fused ops), ``ops`` (bench.ops: every catalogue op), ``models`` (bench.models: the
converted model families)."""
from __future__ import annotations

import fnmatch

from . import cases, models, ops
from .cases import Case

SUITES = {
    "seed": lambda: list(cases.CASES),
    "ops": ops.op_case_names,
    "models": models.model_case_names,
}


def suite_of(name: str) -> str:
    if name.startswith("op:"):
        return "ops"
    if name.startswith("model"):
        return "models"
    return "seed"


def all_names() -> list[str]:
    return [name for suite in SUITES.values() for name in suite()]


def select(patterns: list[str]) -> list[str]:
    """Case names for ``patterns``: a suite name (``ops``), a case name (``op:relu:large``) or a
    glob over case names (``op:*:small``); none, or ``all``: every case. A ValueError names a
    pattern that selects nothing."""
    if not patterns or patterns == ["all"]:
        return all_names()
    names: list[str] = []
    for pattern in patterns:
        found = SUITES[pattern]() if pattern in SUITES else fnmatch.filter(all_names(), pattern)
        if not found:
            raise ValueError(f"{pattern!r} names no suite or case; suites: {', '.join(SUITES)}, all; "
                             f"cases: {', '.join(all_names())}")
        names += [n for n in found if n not in names]
    return names


def build(name: str, device: str, quick: bool) -> Case:
    suite = suite_of(name)
    if suite == "ops":
        return ops.build_case(name, device, quick)
    if suite == "models":
        return models.build_case(name, device, quick)
    return cases.CASES[name](device, quick)


def memory_groups(cases: list[Case]) -> list[list[tuple[str, str]]]:
    """The (case, implementation) peak-memory measurements, grouped by the fresh process each
    group runs in: each seed and model step in its own; an op's two sides (large size only) in
    one (a few MiB each: a process each would double the run for no difference). Not measured:
    the compiled cases (each process would compile again), the ops' small size (bytes)."""
    groups = []
    for case in cases:
        name = case.name
        if name == "compiled" or name.startswith("model-compiled") or name.endswith(":small"):
            continue
        pairs = [(name, impl) for impl in case.steps]
        groups += [pairs] if suite_of(name) == "ops" else [[p] for p in pairs]
    return groups
