"""The differential fuzzer in CI (issue 13 §1), and named regression tests for the parity fixes it
found (activations, softmax, layer_norm; the losses, fused ops and layer ops after their merges).
It has no open classes: every call agrees, or a documented deliberate difference covers it.

The fuzzer run is seeded (``$HANDGRAD_FUZZ_SEED``, default ``fuzz.DEFAULT_SEED``) and bounded:
``$HANDGRAD_FUZZ_CALLS`` calls (3000: ~18 s of one core) or ``$HANDGRAD_FUZZ_SECONDS`` of wall
clock (25 s, within the CI budget of one core, on a loaded machine), whichever comes first; the
calls are the same for a seed, so a slower machine runs a prefix of them. A failure prints every
disagreeing class with a one-line reproducer (``python -m handgrad.testing.fuzz --call OP:SEED``).
Larger runs: ``HANDGRAD_FUZZ_CALLS=50000 HANDGRAD_FUZZ_SECONDS=600 HANDGRAD_FUZZ_SEED=7 pytest
tests/test_fuzz.py -k agrees``.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as TF

import handgrad.functional as F
from handgrad import catalogue
from handgrad.testing import fuzz
from handgrad.testing.differences import DIFFERENCES, render
from handgrad.testing.fuzz.call import describe
from handgrad.testing.fuzz.draw import OPTIONS, draw_call

ROOT = Path(__file__).resolve().parents[1]
CALLS = int(os.environ.get("HANDGRAD_FUZZ_CALLS", 3000))
SECONDS = float(os.environ.get("HANDGRAD_FUZZ_SECONDS", 25))


# --- the fuzzer ------------------------------------------------------------------------------------

def test_fuzzer_agrees_with_torch():
    """Every call the fuzzer draws agrees with torch, but where the table of deliberate differences
    covers it."""
    report = fuzz.run(calls=CALLS, seconds=SECONDS)
    print(report.summary())
    # it ran (not a test that cannot fail): ~1000 calls a second on an idle core, a few hundred
    # on a loaded CI machine
    assert report.calls >= min(CALLS, 300), report.summary()
    assert not report.disagreements, report.summary()


def test_fuzzer_finds_a_wrong_value(monkeypatch):
    """A planted error (tanh off by 1e-3 relatively) is reported, with its reproducer."""
    monkeypatch.setattr(F, "tanh", lambda input: TF.tanh(input) * (1 + 1e-3))
    report = fuzz.run(seed=1, calls=300, only=["tanh"])
    assert report.disagreements
    assert "--call tanh:" in report.summary()


def test_fuzzer_finds_a_wrong_exception(monkeypatch):
    def relu(input, inplace=False):
        if not input.is_floating_point():
            raise ValueError("planted")
        return TF.relu(input, inplace=inplace)

    monkeypatch.setattr(F, "relu", relu)
    report = fuzz.run(seed=1, calls=800, only=["relu"])
    assert any(d.mismatch.kind == "exception" for d in report.disagreements)


def test_fuzz_seed_from_environment(monkeypatch):
    monkeypatch.setenv(fuzz.SEED_ENV, "1234")
    report = fuzz.run(calls=5)
    assert report.seed == 1234 and f"fuzz seed 1234 (${fuzz.SEED_ENV})" in report.summary()


def test_a_call_is_redrawn_from_its_seed():
    for op in fuzz.fuzzed_ops()[0]:
        a, b = draw_call(op, 42), draw_call(op, 42)
        assert describe(a) == describe(b)
        assert all(torch.equal(x.base, y.base) for x, y in zip(a.specs(), b.specs()))


def test_every_catalogue_op_is_fuzzed_or_skipped_with_a_reason():
    ops, skipped = fuzz.fuzzed_ops()
    assert set(ops) | set(skipped) == set(catalogue.CATALOGUE)
    # only linear_cross_entropy may be skipped, and only while its signature is not torch's; a new
    # catalogue op needs a domain in fuzz/draw.py (and, without a torch twin, a fuzz/references.py entry)
    assert set(skipped) <= {"linear_cross_entropy"}, skipped
    for why in skipped.values():
        assert "signature" in why


def test_every_option_has_a_domain():
    """An option added to the catalogue must get valid and invalid values in fuzz/draw.py."""
    for op in catalogue.ops():
        assert op.name in OPTIONS, f"{op.name}: no fuzz domain in handgrad/testing/fuzz/draw.py (OPTIONS, DRAW)"
        missing = set(op.options) - set(OPTIONS[op.name])
        assert not missing, f"{op.name}: no fuzz domain for {sorted(missing)}"


def test_deliberate_differences_are_documented():
    """docs/differences.md holds the table as rendered from the data, verbatim; every entry says
    what torch does, what handgrad does, why, and how to see it."""
    doc = (ROOT / "docs" / "differences.md").read_text()
    table = doc.split("<!-- table -->\n", 1)[1].split("<!-- /table -->", 1)[0]
    assert table == render(), "docs/differences.md is stale: paste `python -m handgrad.testing.differences`"
    for d in DIFFERENCES:
        assert d.torch and d.handgrad and d.why and d.reproducer
        assert d.op in catalogue.CATALOGUE


# --- regression tests for the classes fixed (issue 13 §1) --------------------------------------------

def _vg(fn, x, g=None, **kw):
    x = x.detach().clone().requires_grad_()
    y = fn(x, **kw)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y) if g is None else g)
    return y.detach(), gx


def test_layer_norm_constant_float32_rows_are_zero():
    """A constant row normalises to exactly 0, as torch's (was ±2e-3 for rows of 1e3s in float32);
    with eps = 0 it is 0/0 = nan, as torch's (was 1.0)."""
    x = torch.full((4, 13), 1234.567, dtype=torch.float32)
    for eps in (1e-5, 0.0):
        y, ty = F.layer_norm(x, (13,), eps=eps), TF.layer_norm(x, (13,), eps=eps)
        torch.testing.assert_close(y, ty, rtol=0, atol=0, equal_nan=True)
    assert (F.layer_norm(x, (13,)) == 0).all()
    assert F.layer_norm(x, (13,), eps=0.0).isnan().all()


def test_layer_norm_squares_that_overflow_give_nan():
    """float32 deviations of 1e24: the squares overflow. torch gives 0 or nan by the row (both
    wrong: the row normalises to ±1.22, 0); handgrad nan, not a silent 0 (docs/differences.md)."""
    for row in ([1e24, -1e24, 3.0], [6.7e23, -8.0e23, -5.5e23, 1.1e24]):
        x = torch.tensor([row])
        assert F.layer_norm(x, (len(row),)).isnan().all()
        assert not TF.layer_norm(x, (len(row),)).isfinite().all() or (TF.layer_norm(x, (len(row),)) == 0).all()
        assert TF.layer_norm(x.double(), (len(row),)).isfinite().all()     # the truth is finite


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_elu_gradient_far_left(dtype):
    """f'(z) = α e^z from z: 4.1e-8 at z = −17 in float32, where y + α cancelled to 0 — also in
    the fused ops, which use the same spec."""
    z = torch.tensor([-17.0, -30.0, -80.0], dtype=dtype)
    for alpha in (1.0, 0.5):
        _, g = _vg(F.elu, z, alpha=alpha)
        _, tg = _vg(TF.elu, z, alpha=alpha)
        exact = alpha * torch.exp(z.double())
        torch.testing.assert_close(g.double(), exact, rtol=4 * torch.finfo(dtype).eps, atol=0)
        torch.testing.assert_close(g, tg)
    x = torch.tensor([[1.0]], dtype=dtype)
    w = torch.tensor([[-17.0]], dtype=dtype, requires_grad=True)
    (gw,) = torch.autograd.grad(F.linear_act(x, w, None, activation="elu").sum(), w)
    assert gw.item() == pytest.approx(math.exp(-17), rel=1e-6)


def test_elu_in_place_keeps_torchs_output_form():
    """In place, z is gone: f' = y + α from y, as torch's elu_ (so the two agree exactly)."""
    z = torch.linspace(-20, 2, 23, requires_grad=True)
    (g,) = torch.autograd.grad(F.elu(z * 1, inplace=True).sum(), z)
    (tg,) = torch.autograd.grad(TF.elu(z * 1, inplace=True).sum(), z)
    # y itself may differ from torch's by a rounding (expm1), which y + α carries into f' where
    # it cancels: equal to float32's default tolerance, absolute near 0
    torch.testing.assert_close(g, tg)


@pytest.mark.parametrize("fn,tfn", [(F.softmax, TF.softmax), (F.log_softmax, TF.log_softmax)])
def test_softmax_of_empty_non_floating_inputs(fn, tfn):
    """torch returns an empty tensor of any dtype (no kernel runs); non-empty ones it refuses."""
    for x, dtype in ((torch.zeros(0, 3, dtype=torch.long), None), (torch.zeros(0, 3, dtype=torch.bool), None),
                     (torch.zeros(0, 3), torch.long), (torch.zeros(0, 3, dtype=torch.uint8), torch.float16)):
        y, ty = fn(x, 1, dtype=dtype), tfn(x, 1, dtype=dtype)
        assert y.dtype == ty.dtype and y.shape == ty.shape
    with pytest.raises(NotImplementedError):
        fn(torch.zeros(2, 3, dtype=torch.long), 1)
    with pytest.raises(NotImplementedError):
        fn(torch.zeros(2, 3), 1, dtype=torch.long)
    with pytest.raises(RuntimeError, match="complex"):
        fn(torch.zeros(0, 3, dtype=torch.complex64, requires_grad=True), 1)


def test_softmax_gradient_where_one_probability_is_one():
    """Y ⊙ (G − (G ⊙ Y)1) cancels where y ≈ 1: the row sum is kept to float64 accuracy, so the
    float32 gradient is as close to the truth as torch's."""
    x = torch.tensor([[20.0, 0.0, -3.0, 1.0, 2.5]])
    g = torch.tensor([[0.7, -1.3, 0.2, 0.9, -0.4]])
    _, ours = _vg(lambda t: F.softmax(t, 1), x, g)
    _, theirs = _vg(lambda t: TF.softmax(t, 1), x, g)
    _, truth = _vg(lambda t: TF.softmax(t, 1), x.double(), g.double())
    assert (ours.double() - truth).abs().max() <= 2 * (theirs.double() - truth).abs().max() + 1e-12


def test_layer_norm_integer_input_with_float_weight():
    """torch: RuntimeError (its mixed-dtype check) when a parameter's dtype is not the integer
    input's; NotImplementedError (no kernel) otherwise."""
    x = torch.ones(2, 3, dtype=torch.int32)
    for w, b, exc in ((torch.ones(3), None, RuntimeError), (None, torch.ones(3, dtype=torch.double), RuntimeError),
                      (None, None, NotImplementedError), (torch.ones(3, dtype=torch.int32), None, NotImplementedError)):
        with pytest.raises(exc):
            TF.layer_norm(x, (3,), w, b)
        with pytest.raises(exc):
            F.layer_norm(x, (3,), w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layer_norm_half_input_float32_bias(dtype):
    """torch computes the forward (its mixed-dtype kernel) and refuses only the backward; handgrad
    computes both (docs/differences.md): ∂L/∂x in the half type, ∂L/∂b in float32."""
    x = torch.randn(4, 6).to(dtype).requires_grad_()
    b = torch.randn(6, requires_grad=True)
    y, ty = F.layer_norm(x, (6,), bias=b), TF.layer_norm(x, (6,), bias=b)
    assert y.dtype == ty.dtype == dtype
    torch.testing.assert_close(y, ty)
    with pytest.raises(RuntimeError):
        ty.sum().backward()
    gx, gb = torch.autograd.grad(y.sum(), (x, b))
    assert gx.dtype == dtype and gb.dtype == torch.float32
    torch.testing.assert_close(gb, torch.full((6,), 4.0))


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "elu", "silu"])
def test_inplace_activation_checks_in_torchs_order(name):
    """In place: the leaf check first, then (but for relu) overlapping memory, then the dtype —
    each with torch's exception type."""
    ours, theirs = getattr(F, name), getattr(TF, name)
    cases = [torch.ones(3, dtype=torch.complex64, requires_grad=True),                    # a leaf, complex
             torch.ones(1, 3, dtype=torch.complex64, requires_grad=True).expand(2, 3),   # a view of one
             torch.ones(1, 3, dtype=torch.complex64).expand(2, 3),                       # overlapping
             torch.ones(1, 3, dtype=torch.long).expand(2, 3),
             torch.ones(1, 3, dtype=torch.bool).expand(2, 3)]
    for x in cases:
        try:
            theirs(x.clone() if False else x, inplace=True)
            expected = None
        except Exception as e:       # noqa: BLE001
            expected = type(e)
        if expected is None:
            ours(x, inplace=True)
        else:
            with pytest.raises(expected):
                ours(x, inplace=True)
    # an empty expanded tensor has no overlapping elements: accepted
    ours(torch.ones(1, 0).expand(3, 0), inplace=True)


def test_silu_in_place_on_complex_is_differentiable():
    """torch refuses the gradient of out-of-place silu on complex z, but not of silu_ on a non-leaf;
    handgrad accepts it too, with torch's complex convention G ⊙ conj f'(z) (torch's silu_ drops
    the conj: docs/differences.md)."""
    x = torch.randn(4, dtype=torch.complex64, requires_grad=True)
    G = torch.randn(4, dtype=torch.complex64)
    (g,) = torch.autograd.grad(F.silu(x * 1, inplace=True), x, G)
    (tg,) = torch.autograd.grad(TF.silu(x * 1, inplace=True), x, G)
    z = x.detach()
    s = torch.sigmoid(z)
    df = s * (1 + z * (1 - s))                                        # f'(z)
    torch.testing.assert_close(g, G * df.conj())
    torch.testing.assert_close(tg, G * df)                            # torch's, without the conj
    with pytest.raises(RuntimeError):
        F.silu(x * 1)


def test_scalar_options_are_type_errors_everywhere():
    """A non-number where torch's binding wants a Scalar: TypeError, also through the fused ops
    (which build the same specs); gelu's approximate must be a str."""
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    with pytest.raises(TypeError, match="beta"):
        F.softplus(x, beta="a")
    with pytest.raises(TypeError, match="beta"):
        F.linear_act(x, w, None, activation="softplus", beta="a")
    with pytest.raises(TypeError, match="negative_slope"):
        F.linear_act(x, w, None, activation="leaky_relu", negative_slope=None)
    with pytest.raises(TypeError, match="approximate"):
        F.linear_act(x, w, None, activation="gelu", approximate=1)


def test_gelu_checks_approximate_before_the_dtype():
    x = torch.ones(3, dtype=torch.bool)
    with pytest.raises(RuntimeError):
        TF.gelu(x, approximate="erf")
    with pytest.raises(RuntimeError, match="approximate"):
        F.gelu(x, approximate="erf")


def test_softplus_gradient_in_the_subnormal_tail():
    """σ(βz) for βz = −97 is 7.2e-43, a float32 subnormal: torch's e^{βz}/(e^{βz} + 1) keeps it,
    torch.sigmoid flushes it to 0; handgrad's e^{−|βz|}/(1 + e^{−|βz|}) keeps it too."""
    z = torch.tensor([-48.57])
    _, g = _vg(F.softplus, z, beta=2.0)
    _, tg = _vg(TF.softplus, z, beta=2.0)
    assert tg.item() > 0 and g.item() == pytest.approx(tg.item(), rel=1e-2)   # subnormal: few digits


# --- regression tests for the classes the fuzzer found after the loss/linear/layer merges --------------

def test_cross_entropy_noncontiguous_kdim_half():
    """A permuted (N, C, d) input: log-softmax rows zero their argmax by scatter (a flat view of
    e^Z failed for a permuted layout)."""
    x = torch.randn(1, 3, 1, 6, dtype=torch.float16)[..., ::2]
    t = torch.softmax(torch.randn(1, 3, 1, 3), 1).half()
    torch.testing.assert_close(F.cross_entropy(x, t), TF.cross_entropy(x, t))
    x = torch.randn(2, 5, 4).transpose(1, 2).transpose(1, 2).permute(0, 2, 1).contiguous().permute(0, 2, 1)
    y = torch.tensor([[0, 1, 4, 2], [3, 3, 0, 1]])
    torch.testing.assert_close(F.cross_entropy(x, y, reduction="none"), TF.cross_entropy(x, y, reduction="none"))


@pytest.mark.parametrize("shape", [(1,), ()])
def test_fused_bias_of_one_element_broadcasts(shape):
    """linear's bias broadcasts: a () or (1,) bias is added to every output, in the fused ops too,
    and its gradient is the sum over the outputs."""
    x, w = torch.randn(2, 3, 2), torch.randn(5, 2)
    b = torch.tensor(-1.0).reshape(shape).requires_grad_()
    tb = b.detach().clone().requires_grad_()
    y, ty = F.linear_act(x, w, b, activation="tanh"), TF.tanh(TF.linear(x, w, tb))
    torch.testing.assert_close(y, ty)
    (g,), (tg,) = torch.autograd.grad(y.sum(), b), torch.autograd.grad(ty.sum(), tb)
    assert g.shape == b.shape
    torch.testing.assert_close(g, tg)
    torch.testing.assert_close(F.mlp(x, [w], [b], activation="relu"), TF.linear(x, w, tb).detach())
    w1 = torch.randn(1, 2)                                          # D_out = 1: () broadcasts too
    torch.testing.assert_close(F.linear_act(x, w1, b.detach()), TF.relu(TF.linear(x, w1, b.detach())))


def test_ignored_rows_are_zero_even_with_infinite_logits():
    """An ignored row adds exactly 0 to the loss, as torch's (which skips it), even where its
    logits are ±inf (0 · nan was nan)."""
    x = torch.tensor([[-0.0367]])
    w = torch.tensor([[-math.inf], [-0.507]])
    b = torch.tensor([1.66, -0.55])
    t = torch.tensor([-100])
    for kw in ({}, {"label_smoothing": 0.3}):
        got = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum", **kw)
        assert got.item() == 0 == TF.linear_cross_entropy(x, w, t, linear_bias=b, reduction="sum", **kw).item()
        z = TF.linear(x, w, b)
        assert F.cross_entropy(z, t, reduction="sum", **kw).item() == 0


def test_label_smoothing_must_be_a_number():
    x, t = torch.randn(2, 3), torch.tensor([1, 0])
    with pytest.raises(TypeError):
        TF.cross_entropy(x, t, label_smoothing="a")
    with pytest.raises(TypeError, match="label_smoothing"):
        F.cross_entropy(x, t, label_smoothing="a")
    bad_target = torch.zeros(3, 7)                                  # the type is checked first, as torch's
    with pytest.raises(TypeError):
        TF.cross_entropy(x, bad_target, ignore_index=2, label_smoothing="a")
    with pytest.raises(TypeError, match="label_smoothing"):
        F.cross_entropy(x, bad_target, ignore_index=2, label_smoothing="a")
    torch.testing.assert_close(F.cross_entropy(x, t, label_smoothing=torch.tensor(0.1)),
                               TF.cross_entropy(x, t, label_smoothing=0.1))


def test_batch_norm_eps_must_be_positive_in_training():
    x = torch.randn(4, 3)
    for eps in (0.0, -1e-5):
        with pytest.raises(ValueError):
            TF.batch_norm(x, None, None, training=True, eps=eps)
        with pytest.raises(ValueError, match="eps must be positive"):
            F.batch_norm(x, None, None, training=True, eps=eps)
    F.batch_norm(x, torch.zeros(3), torch.ones(3), training=False, eps=0.0)   # eval: accepted, as torch


def test_avg_pool2d_divisor_override_must_be_an_int():
    x = torch.randn(1, 2, 4, 4)
    for bad in (1.5, True):
        with pytest.raises(TypeError):
            TF.avg_pool2d(x, 2, divisor_override=bad)
        with pytest.raises(TypeError, match="divisor_override"):
            F.avg_pool2d(x, 2, divisor_override=bad)


def test_group_norm_bias_without_weight_differentiates():
    """torch's backward raises 'tensor does not have a device' (docs/differences.md); handgrad's
    gradient equals torch's with a weight of ones."""
    x = torch.randn(2, 4, 3, dtype=torch.double, requires_grad=True)
    b = torch.randn(4, dtype=torch.double, requires_grad=True)
    with pytest.raises(RuntimeError):
        TF.group_norm(x, 2, bias=b).sum().backward()
    G = torch.randn(2, 4, 3, dtype=torch.double)
    got = torch.autograd.grad(F.group_norm(x, 2, bias=b), (x, b), G)
    want = torch.autograd.grad(TF.group_norm(x, 2, weight=torch.ones(4, dtype=torch.double), bias=b), (x, b), G)
    torch.testing.assert_close(got, want)


def test_batch_norm_strided_weight_gradient():
    """torch's CPU backward misreads a strided weight (docs/differences.md); handgrad's gradient
    does not depend on the layout and equals torch's with the weight made contiguous."""
    x = torch.randn(7, 5, dtype=torch.double, requires_grad=True)
    w = torch.randn(10, dtype=torch.double)[::2]
    G = torch.randn(7, 5, dtype=torch.double)
    (got,) = torch.autograd.grad(F.batch_norm(x, None, None, w, training=True), x, G)
    (want,) = torch.autograd.grad(TF.batch_norm(x, None, None, w.contiguous(), training=True), x, G)
    torch.testing.assert_close(got, want)
    (bad,) = torch.autograd.grad(TF.batch_norm(x, None, None, w, training=True), x, G)
    assert not torch.allclose(bad, want)        # torch's accident, still there (else: drop the difference)


def test_dropout_is_fuzzed_mask_for_mask():
    """The fuzzer compares dropout at any p: handgrad draws torch's CPU mask from the same seed."""
    x = torch.randn(6, 7, dtype=torch.float64)
    torch.manual_seed(5)
    want = TF.dropout(x, 0.3)
    torch.manual_seed(5)
    torch.testing.assert_close(F.dropout(x, 0.3), want, rtol=0, atol=0)


def test_max_pool2d_window_of_only_padding_is_refused():
    """Dilated taps can skip a window's only input element: torch's CPU kernel then returns -inf
    with an argmax outside the input, and its backward writes through it (heap corruption: the
    fuzzer found it as a crash and no longer draws it). handgrad refuses the call, naming it."""
    x = torch.tensor([[[-8.97, 0.27, 4.85, -11.9]]], requires_grad=True)
    with pytest.raises(RuntimeError, match="no element of the input"):
        F.max_pool2d(x, 2, padding=(1, 0), dilation=2, ceil_mode=True)
    F.max_pool2d(x, 2, padding=(1, 0), dilation=1, ceil_mode=True).sum().backward()    # no such window
    assert x.grad is not None


def test_elementwise_mean_with_an_mse_weight_is_refused():
    """torch's weighted mse_loss has no legacy alias (ValueError); without a weight it is 'mean'."""
    x, y, w = torch.randn(3), torch.randn(3), torch.rand(3)
    with pytest.raises(ValueError):
        TF.mse_loss(x, y, reduction="elementwise_mean", weight=w)
    with pytest.raises(ValueError, match="elementwise_mean"):
        F.mse_loss(x, y, reduction="elementwise_mean", weight=w)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(F.mse_loss(x, y, reduction="elementwise_mean"), TF.mse_loss(x, y))


def test_linear_act_vector_weight_and_torchs_check_order():
    """linear's 1-D weight (D_in,) gives one output per row with the dim dropped, in linear_act too;
    the linear's arguments are checked before the activation's options, as the composition does."""
    for x, b in ((torch.randn(4, 3), None), (torch.randn(2, 4, 3), torch.tensor(0.5))):
        x, w = x.requires_grad_(), torch.randn(3, requires_grad=True)
        y, ty = F.linear_act(x, w, b, activation="tanh"), TF.tanh(TF.linear(x, w, b))
        assert y.shape == ty.shape == x.shape[:-1]
        torch.testing.assert_close(y, ty)
        torch.testing.assert_close(torch.autograd.grad(y.sum(), (x, w)), torch.autograd.grad(ty.sum(), (x, w)))
    x2, w1, b0 = torch.randn(4, 3), torch.randn(3), torch.tensor(0.5)
    with pytest.raises(RuntimeError):                   # a 2-D input: torch's addmm wants W as a matrix
        TF.linear(x2, w1, b0)
    with pytest.raises(RuntimeError, match="matrix"):
        F.linear_act(x2, w1, b0)
    with pytest.raises(RuntimeError, match="shape"):
        F.linear_act(torch.randn(3, 3), torch.randn(3, 4), activation="gelu", approximate=None)
    with pytest.raises(ValueError):
        F.linear_act(torch.randn(3, 3), torch.randn(3, 4), activation="swish")


def test_group_norm_one_element_groups_are_exact():
    """A one-element group is its own mean: y = b and ∂L/∂x = 0 exactly (torch's are rounding
    residues: docs/differences.md)."""
    x = torch.tensor([[601.14, -1200.3, 1604.7]], dtype=torch.double).repeat(2, 1).requires_grad_()
    b = torch.tensor([0.25, -1.0, 2.0], dtype=torch.double)
    y = F.group_norm(x, 3, weight=torch.full((3,), 2.0, dtype=torch.double), bias=b)
    assert torch.equal(y.detach(), b.expand(2, 3))
    (g,) = torch.autograd.grad(y, x, torch.randn(2, 3, dtype=torch.double))
    assert (g == 0).all()


# --- regression tests for the parity classes closed on the fuzzpar branch ---------------------------

@pytest.mark.parametrize("pool", [lambda f, x: f.avg_pool2d(x, (1, 2)), lambda f, x: f.adaptive_avg_pool2d(x, (2, 2))])
def test_pooling_keeps_a_nonfinite_value_in_its_window(pool):
    """Pools as matrix products: 0 · inf was nan in every window of the row; now only the windows
    that hold the inf (or nan) see it, as torch's."""
    x = torch.tensor([[[[1.0, math.inf, 2.0, 3.0], [math.nan, 1.0, -math.inf, 4.0]]]], requires_grad=True)
    y, ty = pool(F, x), pool(TF, x.detach())
    torch.testing.assert_close(y, ty, equal_nan=True)
    assert y[0, 0, 0, 1] == 2.5
    (g,) = torch.autograd.grad(y.nansum(), x)
    assert g.isfinite().all()


def test_nll_loss_ignored_rows_are_zero_with_infinite_input_or_weight():
    x = torch.tensor([[math.inf], [-1.0]], requires_grad=True)
    t = torch.tensor([0, 0])
    for kw in ({"ignore_index": 0, "reduction": "none"}, {"ignore_index": 0, "weight": torch.tensor([-math.inf])}):
        y, ty = F.nll_loss(x, t, **kw), TF.nll_loss(x.detach(), t, **kw)
        torch.testing.assert_close(y, ty, equal_nan=True)
    (g,) = torch.autograd.grad(F.nll_loss(x, t, ignore_index=0, weight=torch.tensor([-math.inf]), reduction="sum"), x)
    assert (g == 0).all()


def test_cross_entropy_row_holding_inf_is_nan_as_torch():
    """torch's log-softmax of a row whose max is +inf (or nan) is nan throughout; so is handgrad's."""
    x = torch.tensor([[math.inf, 1.0], [0.5, -0.5]], requires_grad=True)
    t = torch.tensor([1, 0])
    y = F.cross_entropy(x, t, reduction="none")
    torch.testing.assert_close(y, TF.cross_entropy(x.detach(), t, reduction="none"), equal_nan=True)
    (g,) = torch.autograd.grad(y[1], x)
    assert g[1].isfinite().all()


def test_weighted_mean_mse_weight_gradient_is_exact_for_one_element():
    w = torch.tensor(0.685, dtype=torch.double, requires_grad=True)
    x, y = torch.tensor(7115.4, dtype=torch.double), torch.tensor(1.09, dtype=torch.double)
    (g,) = torch.autograd.grad(F.mse_loss(x, y, weight=w), w)
    assert g.item() == 0.0


@pytest.mark.parametrize("call", [
    lambda f: f.mse_loss(torch.ones(3, dtype=torch.long), torch.ones(3, dtype=torch.long)),
    lambda f: f.binary_cross_entropy_with_logits(torch.ones(3, dtype=torch.long), torch.rand(3)),
    lambda f: f.cross_entropy(torch.ones(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long)),
    lambda f: f.nll_loss(torch.ones(3, 2, dtype=torch.long), torch.zeros(3, dtype=torch.long), weight=torch.ones(2)),
    lambda f: f.nll_loss(torch.ones(3, 2, dtype=torch.long), torch.zeros(3)),
    lambda f: f.avg_pool2d(torch.ones(1, 2, 2, dtype=torch.int32), 1),
    lambda f: f.adaptive_avg_pool2d(torch.ones(1, 2, 2), (1, 2, 3)),
    lambda f: f.adaptive_avg_pool2d(torch.ones(1, 2, 2), (1, "a")),
    lambda f: f.group_norm(torch.ones(2, 4, dtype=torch.bool), 2, bias=torch.ones(4)),
    lambda f: f.batch_norm(torch.randn(3, 2, 5), torch.zeros(2), None, training=True),
    lambda f: f.embedding(torch.tensor([0]), torch.randn(0, 3)),
])
def test_invalid_calls_raise_torchs_exception_type(call):
    """Classes the fuzzer found: torch's exception type, in torch's order of checks."""
    with pytest.raises(Exception) as theirs:
        call(TF)
    with pytest.raises(theirs.type):
        call(F)


def test_empty_batch_norm_input_is_returned_before_any_check():
    x = torch.randn(0, 3, requires_grad=True)
    y = F.batch_norm(x, torch.zeros(4), torch.ones(3), weight=torch.ones(5), training=True)
    ty = TF.batch_norm(x, torch.zeros(4), torch.ones(3), weight=torch.ones(5), training=True)
    assert y.shape == ty.shape and y.dtype == ty.dtype


# Calls that long sweeps (outside CI's draw) once found disagreeing, redrawn from their seeds:
# softplus's σ(βz) flushed to 0 on a non-contiguous float32 input with βz < −88; bool input to
# linear_cross_entropy refused before torch's label_smoothing check; a (1, 1) class weight with
# K-dim input and smoothing under 'mean', which torch refuses; a 3-D integer input to nll_loss with
# a uint8 target (torch's nll_loss2d dispatches on the input's dtype before refusing the Byte target).
@pytest.mark.parametrize("found", ["softplus:239845055259", "linear_cross_entropy:556992991605",
                                   "cross_entropy:940470998542", "mlp:907767313839", "nll_loss:171469673439"])
def test_calls_once_found_disagreeing_agree(found):
    op, seed = found.rsplit(":", 1)
    assert fuzz.check_call(fuzz.draw.draw_call(op, int(seed))) == []


def test_linear_cross_entropy_kdim_2d_class_weight_with_smoothing_default_ignore_index():
    # ignore_index=None means −100 before torch's 'mean' gathers a 2-D class weight (and refuses it)
    x, W, t = torch.randn(4, 5), torch.randn(3, 2, 5), torch.randint(0, 3, (4, 2))
    for fn in (TF.linear_cross_entropy, F.linear_cross_entropy):
        with pytest.raises(RuntimeError):
            fn(x, W, t, weight=torch.ones(3, 1), label_smoothing=0.1)
