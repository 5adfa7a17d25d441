"""handgrad.testing: check_function / check_module / assert_gradients_match catch each kind of
broken backward, and say which input's gradient is wrong, where, and by how much.

The broken Functions live in handgrad.testing.examples (the README's example uses them too);
each differs from the correct ``MyLinear`` in one marked place. Most tests run only the checks
that concern them, to keep the suite fast (torch.compile alone costs ~1 s a call)."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as TF

import handgrad.functional as F
from handgrad.testing import (ALL, BadInput, CheckOptions, GradientCheckError, Inputs, Report, assert_gradients_match,
                              check_function, check_module, get_case)
from handgrad.testing import examples as E


def _check(factory, checks, **kw) -> Report:
    fn, inputs, reference = factory()
    return check_function(fn, *inputs, reference=reference, checks=checks, **kw)


def test_correct_function_passes_every_check():
    fn, inputs, reference = E.linear()
    bad = BadInput("features mismatch", lambda: Inputs((torch.randn(2, 3), torch.randn(4, 5))), ())
    report = check_function(fn, *inputs, reference=reference, bad_inputs=(bad,))
    assert report.ok, report
    assert [c.name for c in report.checks] == list(ALL)
    # a user's Function with a jvp: Dynamo cannot put it in one graph (torch 2.13), so the
    # non-strict compile check falls back to fullgraph=False and says so. MyLinear's backward
    # multiplies autocast's bfloat16 G by the float32 X, which torch refuses: autocast is a
    # feature it lacks (a skip naming why; a failure when strict). Every other check passed.
    statuses = {c.name: c.status for c in report.checks}
    assert statuses.pop("autocast") == "skip" and "autocast" in report["autocast"].message
    assert all(s == "pass" for s in statuses.values()), statuses
    assert "fullgraph=False" in report["compile"].message
    assert not check_function(fn, *inputs, reference=reference, checks=("autocast",), strict=True).ok


def test_handgrad_op_passes_strictly():
    """A handgrad op supports everything: strict mode (no skips, compile in one graph) passes."""
    x, w, b = torch.randn(5, 3), torch.randn(4, 3), torch.randn(4)
    report = check_function(F.linear, x, w, b, reference=TF.linear, strict=True, bad_inputs=get_case("linear").bad_inputs)
    assert report.ok, report
    assert {c.status for c in report.checks} == {"pass"}


def test_transposed_weight_gradient():
    report = _check(E.transposed_weight_grad, ("gradcheck", "reference", "needs_grad"))
    assert not report.ok
    for name in ("gradcheck", "reference"):
        r = report[name]
        assert r.status == "fail", report
        assert r.subject == "the gradient of weight (argument 1)", r.message
        assert "weight" in r.where and "off by" in r.message
        # by how much: W's entries are O(1), so a transposed entry is off by O(1), not by rounding
        assert abs(r.got - r.expected) > 0.1, r
    assert report["needs_grad"].status == "pass"  # the gradient exists; it is just wrong
    # the worst element is off the diagonal: (Xᵀ G)ᵢᵢ = (Gᵀ X)ᵢᵢ, the transpose only moves the rest
    i, j = report["reference"].index
    assert i != j


def test_wrong_shape_weight_gradient_names_the_input_and_shapes():
    report = _check(E.wrong_shape_weight_grad, ("gradcheck",))
    r = report["gradcheck"]
    assert r.status == "fail"
    assert "index 1 (weight)" in r.message and "[3, 4]" in r.message and "[4, 3]" in r.message, r.message


def test_missing_needs_input_grad_branch_returns_a_gradient_for_none():
    """Backward returns a bias gradient without checking needs_input_grad; bias is None."""
    report = _check(E.unguarded_bias_grad, ("gradcheck",))
    assert "position 3 (bias)" in report["gradcheck"].message, report


def test_missing_needs_input_grad_branch_crashes_on_unsaved_input():
    """Saves X only if W needs a gradient, then uses it regardless: only the needs_grad check,
    which differentiates each input alone, sees it."""
    report = _check(E.unguarded_saved_input, ("gradcheck", "needs_grad"))
    assert report["gradcheck"].status == "pass"
    r = report["needs_grad"]
    assert r.status == "fail"
    assert "with only x (argument 0) requiring grad" in r.message and "NoneType" in r.message, r.message


def test_once_differentiable_hides_double_backward():
    report = _check(E.once_differentiable_backward, ("gradcheck", "gradgradcheck"))
    assert report["gradcheck"].status == "pass"
    r = report["gradgradcheck"]
    assert r.status == "fail"
    assert "once_differentiable" in r.message and "off by" in r.message, r.message
    assert r.got == 0 and r.expected != 0  # no second derivative at all, where one exists


def test_wrong_scale_is_measured():
    fn, (x, w, b), reference = E.wrong_scale()
    report = check_function(fn, x, w, b, reference=reference, checks=("gradcheck", "reference"))
    for name in ("gradcheck", "reference"):
        r = report[name]
        assert r.status == "fail" and r.subject == "the gradient of x (argument 0)", report
        # the bug divides ∂L/∂X by N: got/expected is 1/N. rel 1e-6: the finite-difference truth of
        # gradcheck is off by ~1e-10 relative (module docstring), the float64 reference by ~1e-16.
        assert r.got / r.expected == pytest.approx(1 / x.shape[0], rel=1e-6)
        # every element is off by the same fraction 1 − 1/N of its true value (same reason for rel)
        assert r.max_rel_err == pytest.approx(1 - 1 / x.shape[0], rel=1e-6)


def test_silently_none_gradient():
    report = _check(E.none_bias_grad, ("gradcheck", "needs_grad"))
    r = report["needs_grad"]
    assert r.status == "fail"
    assert "the gradient of bias (argument 2) is None" in r.message and "max |∂L/∂bias| =" in r.message, r.message
    assert report["gradcheck"].subject == "the gradient of bias (argument 2)"


def test_silently_none_gradient_without_reference():
    """Without a reference, finite differences are the truth for a missing gradient."""
    fn, inputs, _ = E.none_bias_grad()
    r = check_function(fn, *inputs, checks=("needs_grad",))["needs_grad"]
    assert r.status == "fail" and "finite differences give max |∂L/∂bias|" in r.message, r.message


def test_wrong_jvp():
    report = _check(E.wrong_jvp, ("gradcheck", "forward_ad"))
    assert report["gradcheck"].status == "pass"
    r = report["forward_ad"]
    assert r.status == "fail" and r.subject == "the forward-mode derivative with respect to weight (argument 1)", r


class _HalfPrecisionBackward(torch.autograd.Function):
    """y = x·w (elementwise); backward right in float64, but rounds through float16 for float32."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w):
        return x * w

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        low = torch.float16 if g.dtype == torch.float32 else g.dtype
        return (g.to(low) * w.to(low)).to(g.dtype), g * x


def test_low_precision_error_beyond_torchs():
    x, w = torch.randn(6, 5), torch.randn(6, 5)
    report = check_function(_HalfPrecisionBackward, x, w, reference=torch.mul, checks=("reference", "lowp"))
    assert report["reference"].status == "pass"  # float64 is exact
    r = report["lowp"]
    assert r.status == "fail" and r.subject == "the gradient of x (argument 0)", r
    assert r.message.startswith("in float32, the gradient of x (argument 0) is less accurate"), r.message
    # in bfloat16 the float16 detour is no worse than torch's own rounding
    assert check_function(_HalfPrecisionBackward, x, w, reference=torch.mul, checks=("lowp",),
                          lowp_dtypes=(torch.bfloat16,)).ok


class _ViewFlat(torch.autograd.Function):
    """y = 2x, with a backward that assumes a contiguous gradient (``view``)."""

    @staticmethod
    def forward(x):
        return 2 * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.shape = inputs[0].shape

    @staticmethod
    def backward(ctx, g):
        return (2 * g.view(-1)).view(ctx.shape)


def test_noncontiguous_gradient_breaks_a_view():
    report = check_function(_ViewFlat, torch.randn(4, 3), checks=("gradcheck", "noncontiguous"))
    assert report["gradcheck"].status == "pass"
    assert report["noncontiguous"].status == "fail" and "view" in report["noncontiguous"].message


def test_unsupported_feature_skips_or_fails_when_strict():
    """An old-style Function (forward(ctx, ...)) has no vmap support and no jvp."""

    class OldStyle(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x.sin()

        @staticmethod
        def backward(ctx, g):
            (x,) = ctx.saved_tensors
            return g * x.cos()

    x = torch.randn(3, 2)
    loose = check_function(OldStyle, x, checks=("forward_ad", "vmap"))
    assert loose.ok and {c.status for c in loose.checks} == {"skip"}
    assert "jvp" in loose["forward_ad"].message and "setup_context" in loose["vmap"].message
    strict = check_function(OldStyle, x, checks=("forward_ad", "vmap"), strict=True)
    assert not strict.ok and {c.status for c in strict.checks} == {"fail"}
    assert strict.inputs[0].startswith("x (3, 2) float32")  # forward(ctx, x): ctx is not an input


def test_tolerances_are_honoured():
    fn, inputs, _ = E.wrong_scale()
    assert not check_function(fn, *inputs, checks=("gradcheck",)).ok
    # an absurd tolerance lets the wrong scale through: atol/rtol really are the comparison's
    assert check_function(fn, *inputs, checks=("gradcheck",), atol=100.0, rtol=0.0)["gradcheck"].status == "pass"


def test_unknown_check_is_refused():
    with pytest.raises(ValueError, match="unknown checks"):
        check_function(torch.sin, torch.randn(3), checks=("gradcheck", "nope"))


def test_inputs_are_not_modified():
    x = torch.randn(5, 3, requires_grad=True)
    w, b = torch.randn(4, 3), torch.randn(4)
    before = [t.clone() for t in (x, w, b)]
    check_function(F.linear, x, w, b, checks=("gradcheck", "reference"), reference=TF.linear)
    assert x.grad is None and x.dtype == torch.float32
    for t, t0 in zip((x, w, b), before):
        assert torch.equal(t, t0)


def test_only_inputs_requiring_grad_are_checked():
    x, w = torch.randn(5, 3, requires_grad=True), torch.randn(4, 3)
    report = check_function(E.NoneBiasGrad, x, w, torch.randn(4), checks=("gradcheck", "needs_grad"))
    assert report.ok, report  # the bias gets None, but nobody asked for its gradient


def test_report_str_and_dict():
    report = _check(E.wrong_scale, ("gradcheck", "reference", "lowp"))
    text = str(report)
    assert "FAILED" in text and "gradcheck" in text and "x (argument 0)" in text
    doc = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    assert doc["ok"] is False and [c["name"] for c in doc["checks"]] == ["gradcheck", "reference", "lowp"]
    assert doc["checks"][0]["status"] == "fail" and doc["checks"][0]["index"] is not None
    assert all(c["seconds"] >= 0 for c in doc["checks"])


def test_assert_gradients_match():
    x, w, b = torch.randn(5, 4), torch.randn(4, 4), torch.randn(4)
    report = assert_gradients_match(E.MyLinear, TF.linear, x, w, b, checks=("gradcheck", "reference"))
    assert report.ok
    with pytest.raises(AssertionError) as err:
        assert_gradients_match(E.TransposedWeightGrad, TF.linear, x, w, b, checks=("gradcheck", "reference"))
    assert isinstance(err.value, GradientCheckError)
    message = str(err.value)
    assert "the gradient of weight (argument 1) is wrong" in message and "off by" in message, message


class _TransposedLinear(torch.nn.Module):
    """torch.nn.Linear's parameters, with the transposed-weight-gradient Function."""

    def __init__(self, d):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d, d))
        self.bias = torch.nn.Parameter(torch.randn(d))

    def forward(self, x):
        return E.TransposedWeightGrad.apply(x, self.weight, self.bias)


def test_check_module():
    torch.manual_seed(0)
    good = torch.nn.Linear(3, 4)
    state = copy.deepcopy(good.state_dict())
    x = torch.randn(5, 3)
    report = check_module(good, x, reference=torch.nn.Linear(3, 4), checks=("gradcheck", "reference", "lowp"))
    assert report.ok, report
    assert any(line.startswith("weight ") for line in report.inputs)
    # the user's module is untouched: same dtype, same values, no .grad
    assert good.weight.dtype == torch.float32 and good.weight.grad is None
    assert all(torch.equal(v, state[k]) for k, v in good.state_dict().items())

    bad = _TransposedLinear(4)
    report = check_module(bad, torch.randn(5, 4), reference=torch.nn.Linear(4, 4), checks=("gradcheck", "reference"))
    assert report["reference"].subject == "the gradient of parameter weight", report
    assert report["gradcheck"].subject == "the gradient of parameter weight"
    with pytest.raises(AssertionError, match="parameter weight"):
        assert_gradients_match(bad, torch.nn.Linear(4, 4), torch.randn(5, 4), checks=("gradcheck",))


def test_torch_func_catches_a_wrong_jvp():
    """jacfwd runs the jvp under vmap: a wrong jvp is caught there too, with where it is wrong."""
    r = _check(E.wrong_jvp, ("torch_func",))["torch_func"]
    assert r.status == "fail" and "jacfwd" in r.message and r.subject.startswith("torch.func.jacfwd"), r


def test_bad_inputs_wrong_type_missing_name_and_accepted():
    def picky(x, w):
        if x.shape[-1] != w.shape[-1]:
            raise ValueError("shapes differ")  # torch raises RuntimeError, naming mat1 and mat2
        return TF.linear(x, w)

    bad = (
        BadInput("features mismatch", lambda: Inputs((torch.randn(2, 3), torch.randn(4, 5))), ()),
        BadInput("3-D weight", lambda: Inputs((torch.randn(2, 3), torch.randn(2, 4, 3))), ("weight",)),
        BadInput("not bad at all", lambda: Inputs((torch.randn(2, 3), torch.randn(4, 3))), ()),
    )
    r = check_function(picky, torch.randn(2, 3), torch.randn(4, 3), reference=TF.linear, bad_inputs=bad,
                       checks=("bad_inputs",))["bad_inputs"]
    assert r.status == "fail"
    assert "features mismatch: raised ValueError" in r.message and "the reference raises RuntimeError" in r.message
    assert "3-D weight" in r.message and "does not name ['weight']" in r.message
    assert "not bad at all: the reference accepts it" in r.message
    assert check_function(picky, torch.randn(2, 3), torch.randn(4, 3), checks=("bad_inputs",))["bad_inputs"].status == "skip"


def test_options_as_one_value_or_keywords():
    fn, inputs, _ = E.wrong_scale()
    loose = CheckOptions(atol=100.0, rtol=0.0)
    assert check_function(fn, *inputs, checks=("gradcheck",), options=loose).ok
    assert not check_function(fn, *inputs, checks=("gradcheck",), options=loose, atol=1e-5, rtol=1e-3).ok  # keywords win
    with pytest.raises(TypeError, match="unexpected keyword arguments \\['atoll'\\]"):
        check_function(fn, *inputs, checks=("gradcheck",), atoll=1.0)
