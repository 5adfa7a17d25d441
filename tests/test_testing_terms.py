"""The low-precision rule's terms (``tolerances.TERM_SCALES``): where a gradient is a difference of
terms that cancel, handgrad and torch both err by a few roundings of the terms, and the rule allows
``ulps`` of them. The margin must still fail a real bug: a gradient off by 10 roundings of its
terms (2.5 times the case's ``lowp_ulps`` where that is more: the deep mlp's 16) at one element
(where it cancels most), or with one element's sign flipped, fails the ``lowp`` check and the fuzzer, for every op that declares terms."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as TF

import handgrad.functional as F
from handgrad.testing import check_function, fuzz
from handgrad.testing.checks.problem import G_STREAM
from handgrad.testing.fuzz.call import build, describe
from handgrad.testing.fuzz.compare import run_side
from handgrad.testing.fuzz.draw import draw_call
from handgrad.testing.registry import all_cases
from handgrad.testing.tolerances import TERM_SCALES, allowed_lowp_error, term_scales

SEED = 0   # the lowp check's output gradients: CheckOptions.seed


def _cases():
    seen = set()
    for case in all_cases():
        op = case.name.split("[")[0]
        if case.terms() is not None and case.lowp_dtypes and case.name not in seen:
            seen.add(case.name)
            yield pytest.param(case, id=case.name)


def _planted(fn, change):
    """fn with ``change(∂L/∂x) → the wrong ∂L/∂x`` applied to its first input's gradient."""
    class Plant(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x.view_as(x)

        @staticmethod
        def setup_context(ctx, inputs, output):
            pass

        @staticmethod
        def backward(ctx, g):
            return change(g)

    return lambda x, *args, **kwargs: fn(Plant.apply(x), *args, **kwargs)


def _lowp(case, fn, inputs):
    return check_function(fn, inputs, reference=case.reference, checks=("lowp",), lowp_dtypes=case.lowp_dtypes,
                          lowp_ulps=case.lowp_ulps, lowp_terms=case.terms(), seed=SEED)["lowp"]


def _truth_and_terms(case, inputs):
    """∂L/∂x in float64 and its terms, for the lowp check's G."""
    x64 = inputs.map(lambda t: t.double())
    with torch.no_grad():
        out = x64.call(case.reference)
    G = torch.randn(out.shape, generator=torch.Generator().manual_seed(G_STREAM + SEED), dtype=torch.float64)
    leaves = x64.diff
    truth = torch.autograd.grad(x64.call(case.reference), leaves[0], G)[0]
    terms = term_scales(case.terms(), G, x64.args, x64.kwargs, leaves)[0]
    return truth, terms


@pytest.mark.parametrize("case", list(_cases()))
def test_a_gradient_off_by_ten_roundings_of_its_terms_fails(case):
    shape = max((s for s in case.shapes if 0 not in s), key=lambda s: torch.Size(s).numel())
    torch.manual_seed(0)
    inputs = case.inputs(shape, case.lowp_dtypes[0])
    assert _lowp(case, case.fn, inputs).status == "pass"           # the op itself passes the rule
    truth, terms = _truth_and_terms(case, inputs)
    eval_bn = case.name.startswith("batch_norm[eval")   # ∂L/∂x = G·w·rstd: nothing cancels, no terms
    assert (terms is None) == eval_bn and (eval_bn or terms.shape == truth.shape)
    terms = truth.abs() if terms is None else terms
    gap = terms - truth.abs()
    # where the gradient cancels most; where nothing cancels (mse_loss's ∂L/∂x, no broadcast), the largest
    k = int(gap.argmax()) if gap.max() > 1e-9 * terms.max() else int(terms.argmax())

    n = max(10.0, 2.5 * case.lowp_ulps)

    def off(g):
        g = g.clone()
        g.view(-1)[k] += n * torch.finfo(g.dtype).eps * terms.view(-1)[k].item()
        return g

    def flipped(g):
        g = g.clone()
        j = int(truth.abs().argmax())
        g.view(-1)[j] = -g.view(-1)[j]
        return g

    plants = ((flipped, "a sign"),) if eval_bn else ((off, f"{n:g} roundings of the terms"), (flipped, "a sign"))
    for change, what in plants:
        result = _lowp(case, _planted(case.fn, change), inputs)
        assert result.status == "fail", f"{case.name}: a gradient off by {what} passed: {result}"


def test_terms_never_loosen_where_nothing_cancels():
    """The terms are at least |truth| and, where no term cancels, about it: for a softmax gradient
    of one sign per row the bound is a few roundings of the value."""
    x = torch.randn(4, 7, dtype=torch.float64)
    G = torch.ones(4, 7, dtype=torch.float64)                    # Y ⊙ (1 − 1) = 0: total cancellation
    (s,) = term_scales(TERM_SCALES["softmax"], G, (x,), {"dim": 1}, (x,))
    y = x.softmax(1)
    assert torch.allclose(s, 2 * y)                               # |y|·1 + y·Σ y
    truth = torch.zeros_like(x)
    allowed = allowed_lowp_error(torch.zeros_like(x), truth, 2.0 ** -23, 4.0, s)
    assert bool((allowed <= 4 * 2.0 ** -23 * 2 * y + 1e-30).all())


def test_terms_match_gradients_by_parameter_not_position():
    """layer_norm's weight given by keyword or by position gets the same terms."""
    x, w, b = (torch.randn(*s, dtype=torch.float64) for s in ((3, 5), (5,), (5,)))
    G = torch.randn(3, 5, dtype=torch.float64)
    by_pos = term_scales(TERM_SCALES["layer_norm"], G, (x, (5,), w, b), {}, (x, w, b))
    by_kw = term_scales(TERM_SCALES["layer_norm"], G, (x, (5,)), {"bias": b, "weight": w}, (x, w, b))
    assert all(torch.equal(a, c) for a, c in zip(by_pos, by_kw))
    assert [t.shape for t in by_pos] == [x.shape, w.shape, b.shape]


def test_a_call_the_terms_do_not_fit_gets_the_stricter_rule():
    x = torch.randn(3, 5, dtype=torch.float64)
    G = torch.randn(3, 5, dtype=torch.float64)
    assert term_scales(TERM_SCALES["layer_norm"], G, (x, (7,)), {}, (x,)) == [None]     # torch refuses it
    assert term_scales(None, G, (x,), {}, (x,)) == [None]


@pytest.mark.parametrize("op", sorted(TERM_SCALES))
def test_every_accepted_fuzz_call_has_terms(op):
    """The absolute computation covers every call torch differentiates: a refusal of it falls
    back to the stricter rule silently, so it must not happen where torch accepts the call
    (eval batch norm's ∂L/∂x has no terms by design: nothing cancels)."""
    ops = fuzz.fuzzed_ops()[0]
    rng, n = random.Random(3), 0
    for _ in range(80):
        call = draw_call(op, rng.getrandbits(40))
        o = run_side(ops[op][1], call, torch.float64, terms=TERM_SCALES[op])
        if o.error or o.backward_error or not o.grads or 0 in call.first().shape:
            continue                  # (an empty input: no element to bound)
        leaves = build(call, torch.float64)[2]
        for i, g in enumerate(o.grads):
            if g is None or op == "batch_norm" and not call.kwargs.get("training") and leaves[i].dim() > 1:
                continue
            n += 1
            assert o.terms[i] is not None, f"no terms for gradient {i} of {describe(call)}"
    assert n >= 15                  # gradients checked: torch differentiates ~40% of the draws


@pytest.mark.parametrize("op", ["softmax", "layer_norm"])
def test_fuzzer_finds_a_sign_error(monkeypatch, op):
    """The fuzzer, with the terms in its rule, still reports one element's flipped sign."""
    def flipped(g):
        g = g.clone()
        if g.numel():
            j = int(g.abs().argmax())
            g.view(-1)[j] = -g.view(-1)[j]
        return g

    monkeypatch.setattr(F, op, _planted(getattr(TF, op), flipped))
    report = fuzz.run(seed=1, calls=200, only=[op])
    assert any(d.mismatch.kind == "grad" for d in report.disagreements), report.summary()
