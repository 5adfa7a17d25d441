"""The activations' edge cases, one named test each (STYLE.md §7); the registry
(handgrad.testing.cases.activations) covers gradcheck and parity on ordinary inputs."""
from __future__ import annotations

import math

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF

import handgrad.functional as F
from handgrad import catalogue
from handgrad.ops.activations import ACTIVATIONS, get_activation

FLOATS = [torch.float64, torch.float32, torch.bfloat16, torch.float16]


def _value_and_grad(fn, z, **kwargs):
    z = z.detach().clone().requires_grad_()
    y = fn(z, **kwargs)
    (g,) = torch.autograd.grad(y, z, torch.ones_like(y))
    return y.detach(), g


def _same(fn_ours, fn_torch, z, **kwargs):
    """Output and gradient bit for bit equal to torch's (an edge value, not a rounding question)."""
    y, g = _value_and_grad(fn_ours, z, **kwargs)
    ty, tg = _value_and_grad(fn_torch, z, **kwargs)
    torch.testing.assert_close(y, ty, rtol=0, atol=0)
    torch.testing.assert_close(g, tg, rtol=0, atol=0)
    return y, g


# --- the kinks: the derivative torch picks at the point where f' jumps --------------------------

@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_relu_at_zero(dtype):
    z = torch.tensor([-0.0, 0.0, -1.0, 1.0], dtype=dtype)
    y, g = _same(F.relu, TF.relu, z)
    assert g.tolist() == [0.0, 0.0, 0.0, 1.0]  # relu'(0) = 0, from either side's zero


@pytest.mark.parametrize("slope", [0.01, 0.2, -0.2, 0.0])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_leaky_relu_at_zero(slope, dtype):
    z = torch.tensor([-0.0, 0.0, -1.0, 1.0], dtype=dtype)
    _, g = _same(F.leaky_relu, TF.leaky_relu, z, negative_slope=slope)
    s = torch.tensor(slope, dtype=dtype).item()  # the slope as the dtype holds it
    assert g.tolist() == [s, s, s, 1.0]  # leaky_relu'(0) = slope


@pytest.mark.parametrize("alpha", [1.0, 0.5, 0.0, -0.5])
def test_elu_at_zero(alpha):
    z = torch.tensor([-0.0, 0.0, -1e-3, 1e-3], dtype=torch.float64)
    _, g = _value_and_grad(F.elu, z, alpha=alpha)
    _, tg = _value_and_grad(TF.elu, z, alpha=alpha)
    assert g[:2].tolist() == [alpha, alpha]  # elu'(0) = α e⁰ = α, from y + α with y = 0 too
    # float64: f' from y + α vs torch's α e^z differ by rounding only
    torch.testing.assert_close(g, tg, rtol=1e-15, atol=1e-15)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("beta,threshold", [(1.0, 20.0), (2.0, 5.0), (0.5, 1.0)])
def test_softplus_above_threshold(dtype, beta, threshold):
    """Linear, f' = 1, strictly above βz = threshold; log(1 + e^{βz})/β, f' = σ(βz) at and below it."""
    t = threshold / beta
    just_above = t * (1 + 4 * torch.finfo(dtype).eps)  # a few units in the last place above t
    z64 = torch.tensor([t - 0.5, t, just_above, t + 0.5, 10 * t, 1e4], dtype=torch.float64)
    z = z64.to(dtype)
    y, g = _value_and_grad(F.softplus, z, beta=beta, threshold=threshold)
    ty, tg = _value_and_grad(TF.softplus, z, beta=beta, threshold=threshold)
    above = beta * z.double() > threshold
    assert above.tolist() == [False, False, True, True, True, True]
    assert torch.equal(y[above], z[above]) and torch.equal(g[above], torch.ones_like(g[above]))
    torch.testing.assert_close(y, ty)  # below: one rounding apart at most (stable vs direct form)
    torch.testing.assert_close(g, tg)


# --- huge inputs: finite wherever the float64 truth is --------------------------------------------

_HUGE = {torch.float64: 1e300, torch.float32: 1e30, torch.bfloat16: 1e38, torch.float16: 6e4}
# every activation of the catalogue with its defaults, and the option variants whose f' takes
# another code path at huge |z| (a negative slope or α: f' from z; gelu's tanh form; a threshold
# above exp's range)
_VARIANTS = {
    "leaky_relu[-0.2]": ("leaky_relu", {"negative_slope": -0.2}),
    "elu[-0.5]": ("elu", {"alpha": -0.5}),
    "gelu[tanh]": ("gelu", {"approximate": "tanh"}),
    "softplus[threshold=1e4]": ("softplus", {"threshold": 1e4}),
}
_CALLS = {name: (catalogue.get(name).functional, catalogue.get(name).torch_function, {})
          for name in catalogue.activations()}
_CALLS |= {k: (catalogue.get(n).functional, catalogue.get(n).torch_function, kw) for k, (n, kw) in _VARIANTS.items()}


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("name", list(_CALLS))
def test_huge_inputs(name, dtype):
    """No nan/inf in outputs or gradients at huge finite |z|; the values are the limits the
    float64 math gives. torch's own float32 kernels give nan here for gelu[tanh]'s gradient at
    |z| ≥ 1.8e19 (z² overflows into 0·∞) and inf/nan for softplus with a threshold above e^88's
    exponent; handgrad's stable forms do not."""
    ours, ref, kw = _CALLS[name]
    h = _HUGE[dtype]
    z = torch.tensor([-h, -1e4, -100.0, -30.0, 30.0, 100.0, 1e4, h], dtype=torch.float64).to(dtype)
    y, g = _value_and_grad(ours, z, **kw)
    assert y.isfinite().all() and g.isfinite().all(), (y, g)
    # the truth: torch in float64 on the same values, where it is finite (it is at every point
    # but softplus(1e4) with threshold 1e4, where e^{1e4} overflows even in float64)
    ty, tg = _value_and_grad(ref, z.double(), **kw)
    ok = ty.isfinite() & tg.isfinite()
    assert ok.sum() >= len(z) - 2
    # one rounding to the dtype from the float64 value (a huge z's output is z itself or 0);
    # f' here is 0, 1 or the slope, or below the dtype's resolution of 1 (elu, silu, softplus at ±30)
    tol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}[dtype]
    torch.testing.assert_close(y.double()[ok], ty[ok], rtol=tol, atol=tol)
    torch.testing.assert_close(g.double()[ok], tg[ok], rtol=tol, atol=tol)


def test_softplus_large_threshold_is_finite_where_torch_overflows():
    """softplus(100, threshold=1e4) = 100 + log1p(e^{−100}): torch's float32 log1p(exp(100)) is inf
    (and its gradient e^z/(e^z + 1) = ∞/∞ = nan); handgrad's max(βz, 0) + log1p(e^{−|βz|}) is not."""
    z = torch.tensor([100.0])
    y, g = _value_and_grad(F.softplus, z, threshold=1e4)
    ty, tg = _value_and_grad(TF.softplus, z, threshold=1e4)
    assert ty.isinf().all() and tg.isnan().all()  # torch, float32: the overflow this avoids
    assert y.item() == 100.0 and g.item() == 1.0


# --- exact values at a few points, from the formulas in math ---------------------------------------

def _gelu_exact(z):
    phi_cdf = 0.5 * (1 + math.erf(z / math.sqrt(2)))
    return z * phi_cdf, phi_cdf + z * math.exp(-z * z / 2) / math.sqrt(2 * math.pi)


def _gelu_tanh_exact(z):
    c, k = math.sqrt(2 / math.pi), 0.044715
    t = math.tanh(c * (z + k * z**3))
    return 0.5 * z * (1 + t), 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * k * z * z)


@pytest.mark.parametrize("approximate,exact", [("none", _gelu_exact), ("tanh", _gelu_tanh_exact)])
def test_gelu_exact_points(approximate, exact):
    points = [-3.0, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0]
    z = torch.tensor(points, dtype=torch.float64)
    y, g = _value_and_grad(F.gelu, z, approximate=approximate)
    want_y, want_g = zip(*(exact(p) for p in points))
    # float64, a handful of roundings on values of size ≤ 3: 1e-14 absolute
    torch.testing.assert_close(y, torch.tensor(want_y, dtype=torch.float64), rtol=0, atol=1e-14)
    torch.testing.assert_close(g, torch.tensor(want_g, dtype=torch.float64), rtol=0, atol=1e-14)
    assert y[3].item() == 0.0 and g[3].item() == 0.5  # f(0) = 0, f'(0) = ½ in both forms
    if approximate == "none":  # Φ(1) and Φ(1) + φ(1), to 16 digits
        assert y[5].item() == pytest.approx(0.8413447460685429, abs=1e-15)
        assert g[5].item() == pytest.approx(1.0833154705876864, abs=1e-15)


# --- in place ------------------------------------------------------------------------------------

# the activations that take ``inplace`` (the catalogue's options), plus a non-default slope and α
INPLACE = [(op.name, {}) for op in catalogue.ops("activation") if "inplace" in op.options]
INPLACE += [("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.5})]
INPLACE_IDS = [f"{n}{kw or ''}" for n, kw in INPLACE]


def _fns(name):
    return getattr(F, name), getattr(TF, name)


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_non_leaf(name, kw):
    """Result written into the input, the input returned, gradients as torch's."""
    ours, ref = _fns(name)
    results = []
    for fn in (ours, ref):
        x = torch.linspace(-3, 3, 13, dtype=torch.float64).requires_grad_()
        h = x * 1.5
        out = fn(h, inplace=True, **kw)
        assert out is h
        (out * torch.arange(13.0, dtype=torch.float64)).sum().backward()
        results.append((h.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_view_of_non_leaf(name, kw):
    ours, ref = _fns(name)
    results = []
    for fn in (ours, ref):
        x = torch.linspace(-3, 3, 12, dtype=torch.float64).requires_grad_()
        h = x * 1.0
        fn(h[2:8], inplace=True, **kw)
        assert type(h.grad_fn).__name__ == "CopySlices"
        (h * torch.arange(12.0, dtype=torch.float64)).sum().backward()
        results.append((h.detach(), x.grad))
    torch.testing.assert_close(results[0], results[1])


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_refuses_leaf_before_writing(name, kw):
    ours, ref = _fns(name)
    for fn in (ref, ours):
        x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
        with pytest.raises(RuntimeError, match="a leaf Variable that requires grad is being used in an in-place"):
            fn(x, inplace=True, **kw)
        assert x.tolist() == [-1.0, 0.0, 2.0]  # nothing written
        with pytest.raises(RuntimeError, match="a view of a leaf Variable that requires grad is being used"):
            fn(x[1:], inplace=True, **kw)
        assert x.tolist() == [-1.0, 0.0, 2.0]


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_without_grad(name, kw):
    """No graph (a tensor without grad, or a leaf under no_grad): written in place, as torch."""
    ours, ref = _fns(name)
    want = ref(torch.tensor([-1.0, 0.0, 2.0]), **kw)
    x = torch.tensor([-1.0, 0.0, 2.0])
    assert ours(x, inplace=True, **kw) is x
    torch.testing.assert_close(x, want)
    leaf = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
    with torch.no_grad():
        assert ours(leaf, inplace=True, **kw) is leaf
    torch.testing.assert_close(leaf.detach(), want)


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_on_a_tensor_saved_for_backward(name, kw):
    """exp saves its output; overwriting it breaks exp's backward, with torch's version-counter error."""
    ours, ref = _fns(name)
    for fn in (ref, ours):
        x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
        y = fn(x.exp(), inplace=True, **kw)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("name,kw", [("leaky_relu", {"negative_slope": -0.2}), ("elu", {"alpha": -0.5})])
def test_inplace_negative_slope_refuses_backward(name, kw):
    """f' needs the overwritten z: torch writes the result, then refuses the backward; so does handgrad."""
    ours, ref = _fns(name)
    for fn in (ref, ours):
        x = torch.tensor([-1.0, 0.0, 2.0], requires_grad=True)
        h = x * 1
        fn(h, inplace=True, **kw)
        torch.testing.assert_close(h.detach(), ref(torch.tensor([-1.0, 0.0, 2.0]), **kw))
        with pytest.raises(RuntimeError, match="negative slope which is not supported"):
            h.sum().backward()


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_forward_ad_and_double_backward(name, kw):
    ours, ref = _fns(name)
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    dx = torch.cos(x)
    tangents = []
    for fn in (ours, ref):
        with fwAD.dual_level():
            h = fwAD.make_dual(x * 1.0, dx.clone())
            out = fn(h, inplace=True, **kw)
            tangents.append(fwAD.unpack_dual(out).tangent.clone())
    torch.testing.assert_close(tangents[0], tangents[1])
    xs = (x + 0.05).requires_grad_()  # off the kink at 0
    assert torch.autograd.gradgradcheck(lambda t: ours(t * 1.0, inplace=True, **kw), (xs,))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_half(name, kw, dtype):
    """In place in a half type: computed in float32, rounded once, as the out-of-place result."""
    ours, _ = _fns(name)
    x = torch.linspace(-3, 3, 13).to(dtype).requires_grad_()
    a, b = x * 1, x * 1
    ours(a, inplace=True, **kw)
    torch.testing.assert_close(a, ours(b, **kw), rtol=0, atol=0)
    # elu in place reads f' = y + α from the rounded y, as torch's elu_ does; out of place it is
    # α e^z from z (issue 13), so its in-place gradient is compared with torch's in-place one
    twin, twin_kw = (_fns(name)[1], dict(kw, inplace=True)) if name == "elu" else (ours, kw)
    ga, gb = torch.autograd.grad(a.sum(), x)[0], torch.autograd.grad(twin(x * 1, **twin_kw).sum(), x)[0]
    torch.testing.assert_close(ga, gb, rtol=0, atol=0)


# --- the specs: what is saved, and the interface ops.fused uses ----------------------------------

@pytest.mark.parametrize("name,kw,saves", [
    ("sigmoid", {}, "output"), ("tanh", {}, "output"), ("relu", {}, "output"),
    ("leaky_relu", {}, "input"), ("leaky_relu", {"negative_slope": -0.1}, "input"),
    ("elu", {}, "input"), ("elu", {"alpha": 0.0}, "input"), ("elu", {"alpha": -1.0}, "input"),
    ("gelu", {}, "input"), ("gelu", {"approximate": "tanh"}, "input"),
    ("silu", {}, "input"), ("softplus", {}, "input"),
])
def test_saves_one_tensor(name, kw, saves):
    """f' is read from the output or from the input, never both: one tensor is kept, and it is
    the one the spec names."""
    assert get_activation(name, **kw).saves == saves
    packed = []
    z = torch.randn(4, 5, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
        y = getattr(F, name)(z, **kw)
    assert len(packed) == 1
    assert packed[0] is (y if saves == "output" else z) or torch.equal(packed[0], y if saves == "output" else z)


def test_get_activation():
    assert set(ACTIVATIONS) == set(catalogue.activations())
    assert get_activation("gelu", approximate="tanh") is get_activation("gelu", approximate="tanh")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        get_activation("swish")
    with pytest.raises(RuntimeError, match="approximate argument must be either none or tanh"):
        get_activation("gelu", approximate="erf")
    # the spec's math, as ops.fused uses it: f and f' from (z, y)
    z = torch.linspace(-2, 2, 9, dtype=torch.float64)
    for name in ACTIVATIONS:
        act = get_activation(name)
        y = act.f(z)
        d = act.df(None, y) if act.saves == "output" else act.df(z, None)
        jac = torch.autograd.functional.jacobian(act.f, z + 1e-3).diagonal()  # off relu's kink at 0
        d_off = act.df(None, act.f(z + 1e-3)) if act.saves == "output" else act.df(z + 1e-3, None)
        torch.testing.assert_close(d_off, jac)  # f' agrees with autograd's derivative of f
        assert d.shape == z.shape


# --- dtypes torch promotes or accepts -------------------------------------------------------------

def test_integer_inputs():
    i = torch.tensor([-2, 0, 3])
    for ours, ref in ((F.sigmoid, torch.sigmoid), (F.tanh, torch.tanh), (F.relu, TF.relu)):
        got, want = ours(i), ref(i)
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("name", ["sigmoid", "tanh"])
def test_complex_inputs(name):
    """torch's sigmoid and tanh take complex z; the backward is G ⊙ conj f'(Z)."""
    ours, ref = getattr(F, name), getattr(torch, name)
    z = torch.randn(3, 4, dtype=torch.complex128, requires_grad=True)
    assert torch.autograd.gradcheck(ours, (z,), check_forward_ad=True)
    g = torch.randn(3, 4, dtype=torch.complex128)
    torch.testing.assert_close(torch.autograd.grad(ours(z), z, g)[0], torch.autograd.grad(ref(z), z, g)[0])


def test_complex_silu_without_gradient():
    """torch's silu takes complex z but refuses to differentiate it; so does handgrad."""
    z = torch.randn(3, 4, dtype=torch.complex128)
    torch.testing.assert_close(F.silu(z), TF.silu(z))
    for fn in (TF.silu, F.silu):
        with pytest.raises(RuntimeError, match="silu does not support automatic differentiation"):
            fn(z.clone().requires_grad_())


def test_signatures_as_torch():
    """Positional and keyword use as torch.nn.functional allows it (gelu's approximate is keyword-only)."""
    x = torch.randn(5)
    calls = [
        lambda F_: F_.relu(input=x), lambda F_: F_.leaky_relu(x, 0.2, False), lambda F_: F_.elu(x, 0.5, False),
        lambda F_: F_.softplus(x, 2.0, 5.0), lambda F_: F_.gelu(input=x, approximate="tanh"),
        lambda F_: F_.silu(x, False), lambda F_: F_.tanh(input=x), lambda F_: F_.sigmoid(input=x),
    ]
    for call in calls:
        torch.testing.assert_close(call(F), call(TF))
    for F_ in (TF, F):
        with pytest.raises(TypeError):
            F_.gelu(x, "tanh")


@pytest.mark.parametrize("name,kw", INPLACE, ids=INPLACE_IDS)
def test_inplace_under_torch_func(name, kw):
    ours, ref = _fns(name)
    x = torch.randn(3, 4, dtype=torch.float64)
    f_ours, f_ref = (lambda t: ours(t * 1, inplace=True, **kw)), (lambda t: ref(t * 1, inplace=True, **kw))
    torch.testing.assert_close(torch.func.vmap(f_ours)(x), torch.func.vmap(f_ref)(x))
    torch.testing.assert_close(torch.func.grad(lambda t: f_ours(t).sum())(x), torch.func.grad(lambda t: f_ref(t).sum())(x))
    torch.testing.assert_close(torch.func.jacfwd(f_ours)(x[0]), torch.func.jacfwd(f_ref)(x[0]))


# --- the fast path on tensors of several blocks (ops.activations.fast_vjp) ----------------------

_FAST_VARIANTS = {**{n: (n, {}) for n in catalogue.activations()}, **_VARIANTS,
                  "leaky_relu[0.2]": ("leaky_relu", {"negative_slope": 0.2}),
                  "softplus[beta=2,threshold=5]": ("softplus", {"beta": 2.0, "threshold": 5.0})}
# the kinks and edges, placed in the second block: 0, ±tiny, the softplus thresholds, exp's range
_EDGES = (0.0, -0.0, 1e-30, -1e-30, -17.0, 2.5, 5.0, 16.9, 17.5, 20.0, 20.5, -87.5, -100.0, 30.0, 1e4, -1e4)


def _blocked_input(dtype, scale=4.0):
    from handgrad.ops.activations import _BLOCK
    torch.manual_seed(0)
    z = torch.randn(2 * _BLOCK + 123, dtype=torch.float64) * scale       # three blocks, the last short
    z[_BLOCK + 5 : _BLOCK + 5 + len(_EDGES)] = torch.tensor(_EDGES, dtype=torch.float64)
    return z.to(dtype).reshape(-1, 1)[: 2 * _BLOCK + 123].reshape(2 * _BLOCK + 123)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(_FAST_VARIANTS))
def test_fast_path_over_blocks_equals_formula(name, dtype):
    """The fast backward (f' block by block into a scratch, torch's forward kernels) against the
    differentiable formula (create_graph=True takes it), on a tensor of three blocks with the
    kinks and edges in it: the same values to a few roundings."""
    op, kw = _FAST_VARIANTS[name]
    fn = catalogue.get(op).functional
    z = _blocked_input(dtype).requires_grad_()
    G = torch.randn(z.shape, dtype=dtype)
    y = fn(z, **kw)
    fast, = torch.autograd.grad(y, z, G, retain_graph=True)
    formula, = torch.autograd.grad(y, z, G, create_graph=True)
    with torch.no_grad():
        ref = fn(z.double(), **kw)
    # a few roundings; float32 gelu: Φ(z) = gelu(z)/z carries the absolute error of torch's
    # vectorised erf (~1e-7, times |G| ≤ 5), where the formula's erfc is relative
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=3e-6 if op == "gelu" else 1e-6)
    torch.testing.assert_close(y.detach(), ref.to(dtype), **tol)
    torch.testing.assert_close(fast, formula.detach(), **tol)


@pytest.mark.parametrize("name", list(_FAST_VARIANTS))
def test_fast_path_non_finite_as_torch(name):
    """±inf and nan in Z and in G, over several blocks: the fast backward gives torch's values,
    nan where torch's is nan and the same selections (relu: 0 for y ≤ 0 even where G is inf or
    nan; softplus: G itself above the threshold). Skipped where handgrad differs deliberately
    (handgrad.testing.differences: gelu tanh's limit at ±inf, gelu's exact left tail, elu's nan at a
    nan z)."""
    from handgrad.ops.activations import _BLOCK
    op, kw = _FAST_VARIANTS[name]
    z = _blocked_input(torch.float32)
    specials = [math.inf, -math.inf, math.nan, 0.0, -3.0, 3.0]
    if kw.get("approximate") == "tanh":
        specials = [math.nan, 0.0, -3.0, 3.0]
    if op == "elu":
        specials = [math.inf, -math.inf, 0.0, -3.0, 3.0]
    z[_BLOCK - 3 : _BLOCK + 3] = torch.tensor(specials * 2)[:6]          # across a block boundary
    G = torch.randn(z.shape)
    G[_BLOCK - 10 : _BLOCK + 10] = torch.tensor([math.inf, -math.inf, math.nan, 1.0] * 5)
    ours, ref = catalogue.get(op).functional, catalogue.get(op).torch_function
    z.requires_grad_()
    g, = torch.autograd.grad(ours(z, **kw), z, G)
    tg, = torch.autograd.grad(ref(z, **kw), z, G)
    window = slice(_BLOCK - 12, _BLOCK + 12)
    keep = ~(z[window] < -2.4) if op == "gelu" else torch.ones(24, dtype=torch.bool)   # (the left tail)
    torch.testing.assert_close(g[window][keep], tg[window][keep], rtol=1e-5, atol=1e-6, equal_nan=True)


def test_relu_selects_as_torch():
    """relu's backward at inf/nan G: 0 where y ≤ 0, G where y > 0 or y is nan (threshold_backward),
    on the fast path (float32, one block) and the formula (bfloat16)."""
    for dtype in (torch.float32, torch.bfloat16):
        z = torch.tensor([-1.0, 0.0, 2.0, math.nan, -1.0, 3.0], dtype=dtype, requires_grad=True)
        G = torch.tensor([math.inf, math.nan, math.inf, 5.0, 1.0, math.nan], dtype=dtype)
        g, = torch.autograd.grad(F.relu(z), z, G)
        tg, = torch.autograd.grad(TF.relu(z), z, G)
        torch.testing.assert_close(g, tg, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name", list(_FAST_VARIANTS))
def test_kernel_path_equals_formula(name, dtype, monkeypatch):
    """The compiled kernel (handgrad.kernels.activations, one pass) against the differentiable
    formula, on three blocks with the kinks and edges and, in the last, ±inf and nan in Z and G,
    on one thread (on several, torch's kernels run large tensors in parallel and the kernel is not
    taken): the same values to a few roundings, nan where the formula's is nan."""
    from handgrad import kernels
    if not kernels.enabled():
        pytest.skip("numba does not import here")
    op, kw = _FAST_VARIANTS[name]
    fn = catalogue.get(op).functional
    z = _blocked_input(dtype)
    z[-6:] = torch.tensor([math.inf, -math.inf, math.nan, 0.0, -3.0, 3.0], dtype=dtype)
    z.requires_grad_()
    G = torch.randn(z.shape, dtype=dtype)
    G[-12:-6] = torch.tensor([math.inf, -math.inf, math.nan, 1.0, math.inf, math.nan], dtype=dtype)
    calls = []
    arrays = kernels.arrays
    monkeypatch.setattr(kernels, "arrays", lambda *ts: calls.append(1) or arrays(*ts))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        y = fn(z, **kw)
        fast, = torch.autograd.grad(y, z, G, retain_graph=True)
    finally:
        torch.set_num_threads(threads)
    assert calls, f"{name}: the kernel was not taken"
    formula, = torch.autograd.grad(y, z, G, create_graph=True)
    # float32: a few roundings of f' (gelu: Φ = gelu(z)/z carries torch's vectorised erf's
    # absolute error, as the torch-op path's, times |G| ≤ 5)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=3e-6 if op == "gelu" else 1e-6)
    torch.testing.assert_close(fast, formula.detach(), equal_nan=True, **tol)
