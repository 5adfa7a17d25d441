"""``CheckOptions``: the options every check reads, in one frozen dataclass (STYLE.md §5), so
``check_function``, ``check_module`` and ``check_case`` take them the same way: as keyword
arguments (``check_function(fn, x, atol=1e-6)``) or as one value (``options=CheckOptions(...)``)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..tolerances import DEFAULT_LOWP_ULPS

__all__ = ["CheckOptions", "resolve_options"]


@dataclass(frozen=True)
class CheckOptions:
    r"""How the checks run.

    Attributes:
        atol, rtol: replace every float64 tolerance (by default ``tolerances.FD_ATOL``/``FD_RTOL``
            against finite differences, ``EXACT_ATOL``/``EXACT_RTOL`` between two exact
            computations; see ``handgrad.testing.tolerances``).
        strict: report an unsupported feature (no ``jvp``, no vmap rule, a Dynamo graph break)
            as a failure rather than a skip (handgrad's own ops are checked strictly).
        compile_backend: the ``torch.compile`` backend of the ``compile`` check. The default,
            ``"aot_eager"``, traces the forward and backward graphs through AOTAutograd as
            inductor does but runs them eagerly, so a check takes about 0.5 s rather than several
            seconds of code generation; pass ``"inductor"`` to test the generated kernels too.
        lowp_dtypes: dtypes of the ``lowp`` check; by default the inputs' own dtype (skipped if
            that is float64).
        lowp_ulps: the ``lowp`` margin in units of the dtype's eps (``tolerances.LOWP_RULE``).
        lowp_terms: the op's absolute computation, (G, *args, **kwargs) → {parameter: the size of
            the terms each gradient element sums} (``tolerances.TERM_SCALES``): the ``lowp`` margin
            adds ``lowp_ulps`` roundings at that size, for gradients whose terms cancel.
        seed: seeds the random output gradients, so reports are reproducible.
    """

    atol: float | None = None
    rtol: float | None = None
    strict: bool = False
    compile_backend: str = "aot_eager"
    lowp_dtypes: tuple[torch.dtype, ...] | None = None
    lowp_ulps: float = DEFAULT_LOWP_ULPS
    lowp_terms: Callable | None = None
    seed: int = 0

    def __post_init__(self):
        if self.lowp_dtypes is not None:
            object.__setattr__(self, "lowp_dtypes", tuple(self.lowp_dtypes) or None)


def resolve_options(options: CheckOptions | None, values: dict[str, Any], caller: str) -> CheckOptions:
    """``options`` (or the defaults) with the keyword arguments ``values`` replacing fields."""
    known = {f.name for f in dataclasses.fields(CheckOptions)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise TypeError(f"{caller}() got unexpected keyword arguments {unknown}; the options are {sorted(known)}")
    base = options if options is not None else CheckOptions()
    return dataclasses.replace(base, **values) if values else base

