"""``python -m handgrad.testing.differences``: the table as Markdown (docs/differences.md holds it)."""
from . import render

print(render(), end="")
