"""The deliberate differences from torch: where torch's behaviour is an accident and handgrad
keeps a better one. Data, read by the differential fuzzer (``handgrad.testing.fuzz``), which
passes a disagreement only if an entry here covers it; ``docs/differences.md`` explains each
(tests/test_fuzz.py checks that every entry is there by name).

Each entry: the op, the comparison it differs in (``kinds``, the fuzzer's mismatch kinds), the
condition on the call (a predicate on ``fuzz.call.Call``: its tensor arguments are ``Spec``s,
with the float64 values of the call's storage and the call's dtype), what torch does, what
handgrad does, and why handgrad's is better.

The entries live by kind of op, one module each (``activations``, ``norms``, ``losses``,
``layers``, ``attention``); ``entry`` holds the ``Difference`` type and the shared predicates.
"""
from __future__ import annotations

from .activations import ACTIVATIONS
from .attention import ATTENTION
from .entry import Difference
from .layers import LAYERS
from .losses import LOSSES
from .norms import NORMS

__all__ = ["Difference", "DIFFERENCES", "covering", "render"]

DIFFERENCES: tuple[Difference, ...] = (
    *ACTIVATIONS,
    *NORMS,
    *LOSSES,
    *LAYERS,
    *(Difference(*fields) for fields in ATTENTION),
)


def covering(call, kind: str, table=DIFFERENCES) -> Difference | None:
    """The entry of ``table`` that covers a ``kind`` mismatch of ``call``, if one does."""
    for d in table:
        if d.op == call.op and kind in d.kinds and d.when(call):
            return d
    return None


def render(table=DIFFERENCES) -> str:
    """The table as Markdown, one row per entry: docs/differences.md holds it verbatim (between
    its ``<!-- table -->`` markers; tests/test_fuzz.py checks they are the same)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| op | difference | torch | handgrad | why handgrad's | reproducer |",
            "|---|---|---|---|---|---|"]
    for d in table:
        rows.append(f"| `{d.op}` | {cell(d.name)} | {cell(d.torch)} | {cell(d.handgrad)} | {cell(d.why)} | "
                    f"`{cell(d.reproducer)}` |")
    return "\n".join(rows) + "\n"
