"""Named edge cases of softmax, log_softmax and layer_norm (STYLE.md §7); the registry
(handgrad.testing.cases.softmax / .norms, run by tests/test_ops.py) covers the rest."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

import handgrad.functional as F
from handgrad.testing.tolerances import scaled_lowp_excess

SOFTMAXES = [pytest.param(F.softmax, TF.softmax, id="softmax"), pytest.param(F.log_softmax, TF.log_softmax, id="log_softmax")]
INF = float("inf")


def _run(fn, x, g, **kwargs):
    """fn's output and the gradient of its input for the output gradient g."""
    x = x.detach().clone().requires_grad_(True)
    y = fn(x, **kwargs)
    gx, = torch.autograd.grad(y, x, g.to(y.dtype))
    return y, gx


def _both(ours, theirs, x, g=None, *, equal_nan=False, **kwargs):
    g = torch.randn(x.shape, dtype=torch.float64) if g is None else g
    y, gx = _run(ours, x, g, **kwargs)
    ry, rgx = _run(theirs, x, g, **kwargs)
    # Same formulas in the same precision: only rounding and summation order differ, so
    # assert_close's defaults for the dtype (float32: rtol 1.3e-6, atol 1e-5; float64: 1e-7).
    torch.testing.assert_close(y, ry, equal_nan=equal_nan)
    torch.testing.assert_close(gx, rgx, equal_nan=equal_nan)
    return y, gx


# --- softmax / log_softmax ------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("ours,theirs", SOFTMAXES)
def test_huge_logits(ours, theirs, dim, dtype):
    """±1e4 logits: exp(1e4) overflows every float type, so this passes only through the max
    subtraction. Rows with one dominant entry, two tied ones, and all huge."""
    x = torch.tensor([[1e4, 0.0, -1e4, 3.0], [1e4, 1e4, -1e4, 1e4 - 1], [-1e4, -1e4, -1e4, -1e4],
                      [1e4, -1e4, 2.0, -3.0]], dtype=dtype)
    y, gx = _both(ours, theirs, x, dim=dim)
    assert y.isfinite().all() and gx.isfinite().all()
    if ours is F.softmax:
        assert torch.equal(y.sum(dim), torch.ones_like(y.sum(dim)))  # exp(0) = 1 exactly in each row's max


@pytest.mark.parametrize("ours,theirs", SOFTMAXES)
def test_huge_logits_double_backward(ours, theirs):
    """The backward at ±1e4 logits is itself differentiable, in the stable form."""
    x = torch.tensor([[1e4, 0.0, -1e4], [2.0, 1e4, 1e4 - 0.5]], dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: ours(x, dim=1), (x,), check_forward_ad=True)
    assert gradgradcheck(lambda x: ours(x, dim=1), (x,))


@pytest.mark.parametrize("ours,theirs", SOFTMAXES)
def test_neg_inf_entries(ours, theirs):
    """−inf logits (masked positions): softmax 0 and no gradient there, log_softmax −inf with
    ∂L/∂X = G there; finite entries as without them. An all −inf row, or one with +inf, is NaN
    in torch (−inf − (−inf), inf − inf), and here."""
    x = torch.tensor([[0.5, -INF, 1.0, -INF], [-INF, 2.0, -INF, -INF], [-INF, -INF, -INF, -INF],
                      [INF, 0.0, 1.0, 2.0]], dtype=torch.float64)
    g = torch.randn(x.shape, dtype=torch.float64)
    y, gx = _both(ours, theirs, x, g, equal_nan=True, dim=1)
    masked = torch.zeros_like(x, dtype=torch.bool)
    masked[:2] = x[:2] == -INF
    if ours is F.softmax:
        assert torch.equal(y[masked], torch.zeros_like(y[masked]))
        assert torch.equal(gx[masked], torch.zeros_like(gx[masked]))
    else:
        assert (y[masked] == -INF).all()
        assert torch.equal(gx[masked], g[masked])
    assert y[2:].isnan().all()
    # the finite part of a row with −inf entries is the op on the finite entries alone
    torch.testing.assert_close(y[0, [0, 2]], ours(x[0, [0, 2]], dim=0))


@pytest.mark.parametrize("ndim,expected", [(0, 0), (1, 0), (2, 1), (3, 0), (4, 1)])
@pytest.mark.parametrize("ours,theirs", SOFTMAXES)
def test_implicit_dim_warning(ours, theirs, ndim, expected):
    """dim=None: torch's legacy choice (0 for 0-, 1- and 3-d input, else 1) and its warning,
    attributed to the caller's line (stacklevel), as torch's is."""
    x = torch.randn((2, 3, 4, 5)[:ndim], dtype=torch.float64)
    name = "softmax" if ours is F.softmax else "log_softmax"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ours(x)
        ry = theirs(x)
    ours_w, theirs_w = caught
    assert ours_w.category is theirs_w.category is UserWarning
    assert str(ours_w.message) == str(theirs_w.message)
    assert f"Implicit dimension choice for {name}" in str(ours_w.message)
    assert ours_w.filename == theirs_w.filename == __file__
    torch.testing.assert_close(y, ry)
    torch.testing.assert_close(y, ours(x, dim=expected))


@pytest.mark.parametrize("ours,theirs", SOFTMAXES)
def test_dtype_casts_first(ours, theirs):
    """dtype=float64 on a float32 input: the input is cast before the op, so the output is
    float64 and the gradient comes back through the cast, in float32, as torch's does."""
    x = torch.randn(4, 7) * 3
    y, gx = _both(ours, theirs, x, dim=1, dtype=torch.float64)
    assert y.dtype == torch.float64 and gx.dtype == torch.float32


def _row_scale(name, y, g, dim):
    """The size of the terms the backward subtracts, per element (see cases/softmax.py): a
    rounded Y has error eps·(|Y| + tiny) (tiny: the subnormal floor), and both
    Y ⊙ (G − (G ⊙ Y)1) and G − exp(Y) ⊙ (G)1 carry it into the gradient at these scales."""
    G = g.abs()
    if name == "softmax":
        Y = y.abs() + torch.finfo(torch.float32).tiny
        return Y * (G + (G * Y).sum(dim, keepdim=True))
    return G + y.exp() * G.sum(dim, keepdim=True)


@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (64, 13), (16, 100)], ids=str)
@pytest.mark.parametrize("ours,theirs", SOFTMAXES)
def test_float32_parity_at_the_row_scale(ours, theirs, shape, dim):
    """float32 against a float64 truth, as the registry's low-precision check does, but with
    margin at the scale where the error lives: |ours − truth| ≤ |torch − truth| + 4 eps·scale.
    Output: scale |truth| + mean|truth|; 4 eps, not 2, because exp's argument X − m is itself
    rounded (relative error |X − m|·eps/2 in Y, ~2 ulps for logits spread over ±9), for torch too.
    Gradient: scale |truth| + the row scale of ``_row_scale``."""
    name = "softmax" if ours is F.softmax else "log_softmax"
    for seed in range(5):
        torch.manual_seed(seed)
        x = (torch.randn(shape, dtype=torch.float64) * 3).float()   # scale 3: confident rows too
        g = torch.randn(shape).double()
        truth, truth_gx = _run(theirs, x.double(), g, dim=dim)
        y, gx = _run(ours, x, g, dim=dim)
        ry, rgx = _run(theirs, x, g, dim=dim)
        scales = (truth.abs() + truth.abs().mean(), truth_gx.abs() + _row_scale(name, truth, g, dim))
        for what, a, b, t, scale in (("output", y, ry, truth, scales[0]), ("gradient", gx, rgx, truth_gx, scales[1])):
            assert a.dtype == torch.float32
            excess = scaled_lowp_excess(a, b, t, 4.0, scale)
            assert excess.max() <= 0, f"seed {seed}: {what} exceeds the margin by {excess.max().item():.3g}"


# --- layer_norm -----------------------------------------------------------------------------

def test_layer_norm_constant_rows():
    """Zero variance: x̂ = 0, Y = b, rstd = 1/√eps, ∂L/∂X = rstd·(gy − mean(gy)). Smooth there
    (eps > 0), so gradcheck and gradgradcheck hold at the constant rows."""
    x = torch.randn(4, 6, dtype=torch.float64)
    x[0] = 3.0
    x[2] = 0.0
    x[3] = -1e4
    w, b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    g = torch.randn(4, 6, dtype=torch.float64)
    results = []
    for fn in (F.layer_norm, TF.layer_norm):
        args = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(args[0], [6], args[1], args[2])
        results.append((y, torch.autograd.grad(y, args, g)))
    (y, ours), (ry, theirs) = results
    torch.testing.assert_close(y, ry)
    for row in (0, 2, 3):
        torch.testing.assert_close(y[row], b)  # x̂ = 0
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t)
    gy = g[0] * w
    torch.testing.assert_close(ours[0][0], (gy - gy.mean()) / (1e-5) ** 0.5)  # rstd·(gy − mean(gy))
    fn = lambda x, w, b: F.layer_norm(x, [6], w, b, eps=1e-5)  # noqa: E731
    args = tuple(t.clone().requires_grad_() for t in (x[:3], w, b))
    assert gradcheck(fn, args, check_forward_ad=True)
    assert gradgradcheck(fn, args, check_fwd_over_rev=True)


def _layer_norm_scales(x, w, b, g, K):
    """Per output, the size of the terms that are summed or cancel (see cases/norms.py), with
    ξ = |x̂| + rstd·mean|X| the error scale of x̂ (its own size, plus the rounding of the row sum
    in μ carried through rstd):  Y: ξ|w| + |b|;  ∂L/∂X: rstd·(|gy| + mean|gy| + ξ·mean(|gy| ξ));
    ∂L/∂w: Σ_batch |G| ξ;  ∂L/∂b: Σ_batch |G|.  All in float64."""
    dims = tuple(range(-K, 0))
    mu = x.mean(dims, keepdim=True)
    rstd = ((x - mu).square().mean(dims, keepdim=True) + 1e-5).rsqrt()
    xhat, G = ((x - mu) * rstd).abs() + rstd * x.abs().mean(dims, keepdim=True), g.abs()
    W = torch.ones_like(xhat) if w is None else w.abs()
    gy = G * W
    mean = lambda t: t.mean(dims, keepdim=True)  # noqa: E731
    scales = [xhat * W + (0 if b is None else b.abs()), rstd * (gy + mean(gy) + xhat * mean(gy * xhat))]
    if w is not None:
        scales.append((G * xhat).sum_to_size(w.shape))
    if b is not None:
        scales.append(G.sum_to_size(b.shape))
    return scales


@pytest.mark.parametrize("K,affine", [(1, True), (1, False), (2, True)], ids=["affine", "no-affine", "2d-shape"])
@pytest.mark.parametrize("shape", [(7, 13), (2, 5, 13), (64, 13), (16, 100)], ids=str)
def test_layer_norm_float32_parity_at_the_sum_scale(shape, K, affine):
    """float32 against a float64 truth, as the registry's low-precision test does, with the
    margin at the scale of the summed terms (``_layer_norm_scales``):
    |ours − truth| ≤ |torch − truth| + 4 eps·(|truth| + scale) — 4 eps: a few roundings in each of
    two row reductions (μ, var) and the subtraction that follows them."""
    row = shape[len(shape) - K:]
    for seed in range(5):
        torch.manual_seed(seed)
        x = (torch.randn(shape, dtype=torch.float64) * 2).float()
        w, b = (torch.randn(row), torch.randn(row)) if affine else (None, None)
        g = torch.randn(shape)
        tensors = [t for t in (x, w, b) if t is not None]
        results = []
        for fn, dtype in ((TF.layer_norm, torch.float64), (F.layer_norm, torch.float32), (TF.layer_norm, torch.float32)):
            args = [t.to(dtype).requires_grad_() for t in tensors]
            xx, ww, bb = args[0], (args[1] if affine else None), (args[2] if affine else None)
            y = fn(xx, list(row), ww, bb)
            results.append([y, *torch.autograd.grad(y, args, g.to(dtype))])
        truth, ours, theirs = results
        scales = _layer_norm_scales(*[None if t is None else t.double() for t in (x, w, b, g)], K)
        for what, t, a, r, scale in zip(("output", "grad x", "grad w", "grad b"), truth, ours, theirs, scales):
            assert a.dtype == torch.float32
            excess = scaled_lowp_excess(a, r, t, 4.0, t.abs() + scale)
            assert excess.max() <= 0, f"seed {seed}: {what} exceeds the margin by {excess.max().item():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_layer_norm_constant_rows_low_precision(dtype):
    """A constant row in low precision: the mean may round off the value by an ulp, so x̂ is
    that ulp times rstd — tiny, as in torch; the output stays finite and ≈ b."""
    x = torch.full((3, 13), 0.1, dtype=dtype)
    w, b = torch.ones(13, dtype=dtype), torch.randn(13).to(dtype)
    y, ry = F.layer_norm(x, [13], w, b), TF.layer_norm(x, [13], w, b)
    assert y.dtype == dtype
    # float32: the ulp of 0.1 (7.5e-9) times rstd (316) is 2.4e-6 < atol 1e-5; bfloat16: defaults.
    torch.testing.assert_close(y, ry)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_layer_norm_mixed_dtype(dtype):
    """A float16/bfloat16 input with float32 weight and bias (torch's CPU mixed-dtype kernel):
    output in the input's dtype, each gradient in its own tensor's dtype, each value at least as
    close to a float64 truth (on the same values) as torch's."""
    x = torch.randn(5, 13).to(dtype)
    w, b = torch.randn(13), torch.randn(13)
    g = torch.randn(5, 13).to(dtype)
    results = []
    for fn, cast in ((TF.layer_norm, torch.float64), (F.layer_norm, None), (TF.layer_norm, None)):
        args = [(t.to(cast) if cast else t.clone()).requires_grad_() for t in (x, w, b)]
        y = fn(args[0], [13], args[1], args[2])
        results.append([y, *torch.autograd.grad(y, args, g.to(y.dtype))])
    truth, ours, theirs = results
    for what, t, a, r in zip(("output", "grad x", "grad w", "grad b"), truth, ours, theirs):
        assert a.dtype == r.dtype, what
        # One rounding at a's dtype, at the element's or the tensor's typical size (STYLE.md §7).
        # torch's ∂L/∂w, ∂L/∂b come out ~1e-2 off here (summed in the input's dtype, it seems);
        # handgrad's are float32 sums, so they pass with room to spare.
        excess = scaled_lowp_excess(a, r, t, 2.0, t.abs() + t.abs().mean())
        assert excess.max() <= 0, f"{what}: exceeds the margin by {excess.max().item():.3g}"


def test_layer_norm_normalized_shape_forms():
    """list, tuple and torch.Size are one normalized_shape; an int alone is refused with torch's
    TypeError (torch.nn.functional.layer_norm takes int[], only torch.nn.LayerNorm wraps an int)."""
    x = torch.randn(2, 3, 4, dtype=torch.float64)
    ref = TF.layer_norm(x, [3, 4])
    for shape in ([3, 4], (3, 4), torch.Size([3, 4])):
        torch.testing.assert_close(F.layer_norm(x, shape), ref)
    with pytest.raises(TypeError) as theirs:
        TF.layer_norm(x, 4)
    with pytest.raises(TypeError) as ours:
        F.layer_norm(x, 4)
    assert str(ours.value) == str(theirs.value)


# --- torch.compile --------------------------------------------------------------------------

def test_compile_fullgraph():
    """Dynamo traces all three in one graph (the Functions go through ``Fn.call``); aot_eager
    runs the traced graph without a C++ compiler, and must give eager's values and gradients."""
    x = torch.randn(3, 5, dtype=torch.float64)
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)

    def model(x, w, b):
        h = F.layer_norm(x, [5], w, b)
        return F.log_softmax(h, dim=-1) + F.softmax(h, dim=0)

    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    outs = []
    for fn in (model, compiled):
        args = [t.clone().requires_grad_() for t in (x, w, b)]
        y = fn(*args)
        outs.append((y, torch.autograd.grad(y.sum(), args)))
    torch.testing.assert_close(outs[0], outs[1])


def test_sets_whose_squares_overflow_are_normalised():
    """float32 deviations of 1e24: the squares overflow, and torch's batch, group and RMS norms give
    x̂ = 0 (rstd = 0); handgrad's fast path normalises such a set again, scaled
    (ops.normalize.rescue_overflow): the float64 values, and gradients close to float64's."""
    row = torch.tensor([1e24, -1e24, 3.0])
    calls = {"batch_norm": (lambda f, x: f.batch_norm(x, None, None, training=True), row.reshape(3, 1)),
             "group_norm": (lambda f, x: f.group_norm(x, 1), row.reshape(1, 1, 3)),
             "rms_norm": (lambda f, x: f.rms_norm(x, (3,)), row.reshape(1, 3))}
    g = torch.tensor([0.5, -1.0, 2.0])
    for name, (fn, x) in calls.items():
        x = x.clone().requires_grad_()
        y = fn(F, x)
        (gx,) = torch.autograd.grad(y, x, g.reshape(y.shape))
        xd = x.detach().double().requires_grad_()
        ty = fn(TF, xd)
        (tgx,) = torch.autograd.grad(ty, xd, g.double().reshape(ty.shape))
        # float32 rounding of the scaled statistics: a few ulps of |x̂| ≤ 1.3 and of |∂L/∂x| ~ 1e-24
        torch.testing.assert_close(y.double(), ty.detach(), rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(gx.double(), tgx, rtol=1e-4, atol=1e-30, msg=name)
        t32 = fn(TF, x.detach())                                     # torch's float32: x̂ = 0 or nan
        assert ((t32 == 0) | t32.isnan()).all(), name
