"""Property tests: every registry op against torch on shapes drawn by hypothesis.

A case is drawn with one of its own shapes' ranks, and each dimension is redrawn (the batch
dim may be 0), so the ops meet shapes nobody wrote down."""
from __future__ import annotations

import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from handgrad.testing.registry import all_cases
from handgrad.testing.tolerances import EXACT_ATOL, EXACT_RTOL

CASES = all_cases()


@st.composite
def case_and_shape(draw):
    case = draw(st.sampled_from(CASES))
    template = draw(st.sampled_from([s for s in case.shapes if s]))
    # the batch dim may be empty; a 1-d template has no batch dim (it is the features/classes)
    shape = tuple(draw(st.integers(0 if i == 0 and len(template) > 1 else 1, 6)) for i in range(len(template)))
    return case, shape


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case_and_shape(), st.integers(0, 2**31 - 1))
def test_matches_torch_on_random_shapes(drawn, seed):
    case, shape = drawn
    torch.manual_seed(seed)
    inputs = case.inputs(shape)
    results = []
    for fn in (case.reference, case.fn):
        try:
            out = inputs.bind(fn)(*inputs.diff)
        except RuntimeError:
            # Only where torch itself refuses (e.g. linear with a 3-D bias and one row: its
            # addmm path cannot expand it) is there nothing to compare; handgrad never may.
            assume(fn is not case.reference)
            raise
        g = torch.ones_like(out) if out.requires_grad else None
        grads = torch.autograd.grad(out, inputs.diff, g, allow_unused=True) if g is not None else ()
        results.append((out, grads))
    (ref, ref_grads), (ours, our_grads) = results
    # float64: two computations of one quantity, only the order of summation differs (tolerances)
    tol = dict(atol=EXACT_ATOL, rtol=EXACT_RTOL, equal_nan=True)
    torch.testing.assert_close(ours, ref, **tol, msg=lambda m: f"{case.name} {shape}: {m}")
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{case.name} {shape} gradient: {m}")
