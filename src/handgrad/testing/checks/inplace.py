"""The inplace check: an in-place op on fn's output before the backward (``nn.ReLU(inplace=True)``
after a layer, ``y += skip``, ``y.mul_(s)``) works wherever it works on the reference's output.

autograd refuses an in-place op on an output that is a view created inside a custom Function
(its view-and-inplace rule would replace the Function's backward), so an op that returns a
reshape of a buffer of its own breaks every in-place layer after it. The reference (torch's
own op) refuses only where it saved its output for the backward (sigmoid, softmax): there fn
may refuse too, or give the gradient of 2·output."""
from __future__ import annotations

from ..report import CheckResult
from .jacobians import outputs, outputs_and_grads
from .measure import first_lines
from .problem import Ctx


def _doubled(f, inplace: bool):
    """f followed by ×2 on each differentiable output: ``mul_`` in place, or out of place."""
    def g(*xs):
        return [(o.mul_(2) if inplace else o * 2) if o.requires_grad else o for o in outputs(f(*xs))]
    return g


def check_inplace(c: Ctx) -> CheckResult:
    if c.ref is None:
        return CheckResult("inplace", "skip", "no reference given: nothing says which in-place ops must work")
    v = c.grad_outputs()
    try:
        truth = outputs_and_grads(_doubled(c.ref, True), c.leaves(), v)
        refuses = None
    except RuntimeError as e:  # the reference saved its output: autograd's version check refuses
        truth, refuses = outputs_and_grads(_doubled(c.ref, False), c.leaves(), v), e
    try:
        got = outputs_and_grads(_doubled(c.f, True), c.leaves(), v)
    except RuntimeError as e:
        if refuses is not None:
            return CheckResult("inplace", "pass", "out.mul_(2) before backward is refused, as the reference "
                               f"refuses it: {first_lines(e, 1)}")
        raise AssertionError(f"out.mul_(2) before backward: {type(e).__name__}: {first_lines(e)}; the reference "
                             "accepts it") from e
    w = c.worst("exact")
    c.compare(w, *got, *truth)
    return w.result("inplace", "out.mul_(2) on the output before backward, against the reference")
