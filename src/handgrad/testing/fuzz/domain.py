"""The one building block of the option domains (``draw.py``, ``layers.py``): a value drawn from
a list of valid ones, or now and then from a list of invalid ones."""
from __future__ import annotations

__all__ = ["one_of"]


def one_of(valid, invalid=(), p_invalid=0.1):
    """A domain (draw, context) → value: mostly one of ``valid``; with probability ``p_invalid``
    one of ``invalid`` (if any)."""
    def draw(d, ctx):
        return d.pick(invalid) if invalid and d.chance(p_invalid) else d.pick(valid)

    return draw
