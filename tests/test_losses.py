"""Named edge cases of the losses (STYLE.md §7): what the registry's generic tests
(tests/test_ops.py) do not reach. Every value is compared with torch, and where torch cannot
be the judge (the seed's loss, the formulas), with the formula written out."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as TF
from torch.autograd import gradcheck, gradgradcheck

import handgrad.functional as F
from handgrad.testing import references

# float64 comparisons: assert_close's defaults (rtol 1e-7, atol 1e-7): only summation order differs.
D = torch.float64


def _both(fn_name, *args, grad_out=None, **kwargs):
    """Output and gradients (for the tensors that require grad) from handgrad and from torch."""
    diff = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    results = []
    for fn in (getattr(F, fn_name), references.torch_reference(fn_name)):
        out = fn(*args, **kwargs)
        g = torch.ones_like(out) if grad_out is None else grad_out
        grads = torch.autograd.grad(out, diff, g) if diff else ()
        results.append((out, grads))
    return results


def _assert_same(fn_name, *args, grad_out=None, equal_nan=False, **kwargs):
    (ours, our_grads), (ref, ref_grads) = _both(fn_name, *args, grad_out=grad_out, **kwargs)
    assert ours.dtype == ref.dtype and ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, equal_nan=equal_nan)
    for a, b in zip(our_grads, ref_grads):
        torch.testing.assert_close(a, b, equal_nan=equal_nan)
    return ours, our_grads


# ---------------------------------------------------------------------------------------------
# ignore_index
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fn_name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("ignore_index", [-100, 0, 4, -7])
@pytest.mark.parametrize("where", ["first", "last", "all-but-one", "k-dim"])
def test_ignore_index_everywhere(fn_name, reduction, ignore_index, where):
    """ignore_index at the first row, the last, every row but one, and scattered over K-dim
    positions; in range (0, 4), torch's default (-100) and another negative value."""
    C = 5
    shape = (2, C, 3, 2) if where == "k-dim" else (6, C)
    x = torch.randn(shape, dtype=D, requires_grad=True)
    y = torch.randint(0, C, shape[:1] + shape[2:])
    y = torch.where(y == ignore_index, (ignore_index + 1) % C, y)     # no accidental ignores
    flat = y.view(-1)
    if where == "first":
        flat[0] = ignore_index
    elif where == "last":
        flat[-1] = ignore_index
    elif where == "all-but-one":
        flat[1:] = ignore_index
    else:
        flat[::2] = ignore_index
    w = torch.rand(C, dtype=D) + 0.5
    _, grads = _assert_same(fn_name, x, y, weight=w, ignore_index=ignore_index, reduction=reduction,
                            grad_out=None if reduction != "none" else torch.randn(y.shape, dtype=D))
    ignored = (y == ignore_index).unsqueeze(1).expand_as(x)
    assert torch.all(grads[0][ignored] == 0), "ignored positions must get exactly zero gradient"


@pytest.mark.parametrize("fn_name", ["cross_entropy", "nll_loss"])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
def test_all_ignored_batch(fn_name, weighted, label_smoothing):
    """Every target ignored: 'mean' is 0/0 = nan (torch's), the gradient exactly zero, not nan;
    'sum' is 0 and 'none' all zeros."""
    if fn_name == "nll_loss" and label_smoothing:
        pytest.skip("nll_loss has no label_smoothing")
    kw = {"label_smoothing": label_smoothing} if label_smoothing else {}
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    y = torch.full((4,), -100)
    w = torch.rand(3, dtype=D) + 0.5 if weighted else None
    ours, grads = _assert_same(fn_name, x, y, weight=w, reduction="mean", equal_nan=True, **kw)
    assert ours.isnan()
    assert torch.equal(grads[0], torch.zeros_like(x))
    ours, _ = _assert_same(fn_name, x, y, weight=w, reduction="sum", **kw)
    assert ours.item() == 0
    ours, _ = _assert_same(fn_name, x, y, weight=w, reduction="none", **kw)
    assert torch.equal(ours, torch.zeros(4, dtype=D))


# ---------------------------------------------------------------------------------------------
# numerics
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_huge_logits_cross_entropy(dtype):
    """Logits of ±1e4: the log-sum-exp form stays finite, and equals torch's."""
    x = torch.tensor([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [1e4, 1e4, -1e4]], dtype=dtype, requires_grad=True)
    y = torch.tensor([1, 1, 0])
    for reduction in ("mean", "none"):
        out = F.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
        ref = TF.cross_entropy(x, y, reduction=reduction, label_smoothing=0.1)
        assert out.isfinite().all()
        # the losses are ~1e4, exact up to one rounding of the input dtype
        torch.testing.assert_close(out, ref, rtol=torch.finfo(dtype).eps, atol=0)
        g, = torch.autograd.grad(out.sum(), x)
        g_ref, = torch.autograd.grad(ref.sum(), x)
        assert g.isfinite().all()
        # gradients are differences of probabilities in [0, 1]: one rounding of 1 in the dtype
        torch.testing.assert_close(g, g_ref, rtol=0, atol=torch.finfo(dtype).eps)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_huge_logits_bce(dtype):
    """±1e4 logits through the softplus form: finite, and torch's numbers."""
    x = torch.tensor([1e4, -1e4, 30.0, -30.0, 0.0], dtype=dtype, requires_grad=True)
    t = torch.tensor([0.0, 1.0, 0.3, 0.7, 0.5], dtype=dtype, requires_grad=True)
    pw = torch.tensor([2.0, 0.5, 1.0, 3.0, 1.0], dtype=dtype)
    out = F.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")
    ref = TF.binary_cross_entropy_with_logits(x, t, pos_weight=pw, reduction="none")
    assert out.isfinite().all()
    # losses up to 1e4·pos_weight: one rounding of the dtype, relative; exactly 0 stays ~0
    torch.testing.assert_close(out, ref, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    gx, gt = torch.autograd.grad(out.sum(), (x, t))
    rx, rt = torch.autograd.grad(ref.sum(), (x, t))
    assert gx.isfinite().all() and gt.isfinite().all()
    torch.testing.assert_close(gx, rx, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    torch.testing.assert_close(gt, rt, rtol=2 * torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)


def test_dominant_class_gradient_is_accurate():
    """p_y ≈ 1: ∂ℓ/∂x_y = p_y − 1 is computed as expm1(log p_y), not 1 − 1 + tiny, so float32
    keeps its relative precision where torch's p·g − g cancels."""
    x = torch.tensor([[12.0, 0.0, -1.0]], requires_grad=True)
    y = torch.tensor([0])
    g, = torch.autograd.grad(F.cross_entropy(x, y), x)
    x64 = x.detach().double().requires_grad_()
    truth, = torch.autograd.grad(TF.cross_entropy(x64, y), x64)
    # relative error of a few float32 roundings, at the element's own (tiny, ~8e-6) size
    torch.testing.assert_close(g.double(), truth, rtol=8 * torch.finfo(torch.float32).eps, atol=0)


# ---------------------------------------------------------------------------------------------
# the incoming gradient
# ---------------------------------------------------------------------------------------------

def _loss_inputs(name):
    """(args, kwargs) for each loss with reduction='none', differentiable float inputs."""
    x = torch.randn(5, 4, dtype=D, requires_grad=True)
    t = torch.rand(5, 4, dtype=D, requires_grad=True)
    y = torch.tensor([0, 3, -100, 1, 2])
    w = torch.rand(4, dtype=D) + 0.5
    return {
        "mse_loss": ((x, t), {"weight": torch.rand(5, 4, dtype=D, requires_grad=True)}),
        "half_squared_error": ((x, t), {}),
        "cross_entropy": ((x, y), {"weight": w, "label_smoothing": 0.2}),
        "cross_entropy[probs]": ((x, t.detach().softmax(1).requires_grad_()), {"weight": w, "label_smoothing": 0.2}),
        "nll_loss": ((x, y), {"weight": w}),
        "binary_cross_entropy_with_logits": ((x, t), {"weight": w, "pos_weight": w * 2}),
    }[name]


def _reference(name):
    base = name.split("[")[0]
    return references.half_squared_error if base == "half_squared_error" else references.torch_reference(base)


LOSSES = ["mse_loss", "half_squared_error", "cross_entropy", "cross_entropy[probs]", "nll_loss",
          "binary_cross_entropy_with_logits"]


@pytest.mark.parametrize("name", LOSSES)
def test_none_then_weighted_sum(name):
    """reduction='none' followed by Σ v ⊙ ℓ: the backward must scale each element by its own
    incoming gradient v (never assume 1); checked against torch, and double-differentiable."""
    args, kwargs = _loss_inputs(name)
    fn = getattr(F, name.split("[")[0])
    diff = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    out = fn(*args, reduction="none", **kwargs)
    v = torch.randn(out.shape, dtype=D)
    ours = torch.autograd.grad((out * v).sum(), diff)
    ref_out = _reference(name)(*args, reduction="none", **kwargs)
    torch.testing.assert_close(out, ref_out)
    theirs = torch.autograd.grad((ref_out * v).sum(), diff)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)

    def weighted(*d):
        values = list(args) + list(kwargs.values())
        it = iter(d)
        values = [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else a for a in values]
        return (fn(*values[: len(args)], reduction="none", **dict(zip(kwargs, values[len(args):]))) * v).sum()

    assert gradgradcheck(weighted, diff)


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_scalar_incoming_gradient(name, reduction):
    """A scalar loss scaled by g = −2.5 (as a later op would): every gradient scales by g."""
    args, kwargs = _loss_inputs(name)
    fn = getattr(F, name.split("[")[0])
    diff = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    g = torch.tensor(-2.5, dtype=D)
    ours = torch.autograd.grad(fn(*args, reduction=reduction, **kwargs), diff, g)
    theirs = torch.autograd.grad(_reference(name)(*args, reduction=reduction, **kwargs), diff, g)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


# ---------------------------------------------------------------------------------------------
# label_smoothing with weight and ignore_index
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("shape", [(6, 4), (2, 4, 3)], ids=["rows", "k-dim"])
def test_label_smoothing_with_weight_and_ignore_index(reduction, shape):
    """torch's rule, written out: ℓ_i = (1−ε)(−w_{y_i} log p_{i,y_i}) + (ε/C)(−Σ_c w_c log p_ic)
    on kept positions, 0 on ignored ones; 'mean' divides both terms by Σ_i w_{y_i} over kept
    positions (not by the count, not by Σ w)."""
    C, eps, ignore = shape[1], 0.25, 2
    x = torch.randn(shape, dtype=D, requires_grad=True)
    y = torch.randint(0, C, shape[:1] + shape[2:])
    y.view(-1)[::3] = ignore
    w = torch.rand(C, dtype=D) + 0.5
    ours, _ = _assert_same("cross_entropy", x, y, weight=w, ignore_index=ignore, label_smoothing=eps,
                           reduction=reduction, grad_out=None if reduction != "none" else torch.randn(y.shape, dtype=D))
    logp = x.detach().log_softmax(1)
    keep = y != ignore
    y0 = y.where(keep, 0)
    nll = -w[y0] * logp.gather(1, y0.unsqueeze(1)).squeeze(1)
    smooth = -(logp * w.view(1, C, *([1] * (len(shape) - 2)))).sum(1)
    per = torch.where(keep, (1 - eps) * nll + eps / C * smooth, torch.zeros_like(nll))
    expected = {"none": per, "sum": per.sum(), "mean": per.sum() / w[y0][keep].sum()}[reduction]
    torch.testing.assert_close(ours.detach(), expected)


# ---------------------------------------------------------------------------------------------
# empty batches, the seed's loss, mse weight, legacy flags, dtypes
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", LOSSES)
def test_empty_batch(name):
    """No samples: 'mean' is nan (torch's 0/0), 'sum' 0, 'none' empty; gradients empty, not errors."""
    x = torch.randn(0, 4, dtype=D, requires_grad=True)
    t = torch.rand(0, 4, dtype=D, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    target = y if name in ("cross_entropy", "nll_loss") else t
    fn = getattr(F, name.split("[")[0])
    for reduction, check in (("mean", lambda o: o.isnan()), ("sum", lambda o: o == 0), ("none", lambda o: o.numel() == 0)):
        out = fn(x, target, reduction=reduction)
        ref = _reference(name)(x, target, reduction=reduction)
        assert out.shape == ref.shape and bool(check(out))
        gx, = torch.autograd.grad(out.sum(), x)
        assert gx.shape == x.shape


def test_half_squared_error_is_the_seed_loss():
    """L = Σ_n ½‖x_n − y_n‖², ∂L/∂X = g (X − Y), ∂L/∂Y = −g (X − Y); 'mean' divides by N rows."""
    x = torch.randn(7, 3, dtype=D, requires_grad=True)
    y = torch.randn(7, 3, dtype=D, requires_grad=True)
    L = F.half_squared_error(x, y)
    torch.testing.assert_close(L, references.half_squared_error(x, y))
    gx, gy = torch.autograd.grad(L, (x, y), torch.tensor(3.0, dtype=D))
    torch.testing.assert_close(gx, 3.0 * (x - y))
    torch.testing.assert_close(gy, -3.0 * (x - y))
    torch.testing.assert_close(F.half_squared_error(x, y, reduction="mean"), L / 7)
    assert F.half_squared_error(x, y, reduction="none").shape == (7,)
    assert F.half_squared_error(x[0], y[0], reduction="none").shape == ()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_weight_semantics(reduction):
    """torch 2.13's weight: w ⊙ (x − y)², 'mean' = Σ w (x − y)² / Σ w; differentiable in w,
    also with a target that broadcasts (torch warns about the broadcast; so does handgrad)."""
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    t = torch.randn(4, dtype=D, requires_grad=True)
    w = torch.rand(3, 4, dtype=D, requires_grad=True)
    with pytest.warns(UserWarning, match="target size"):
        ours, _ = _assert_same("mse_loss", x, t, weight=w, reduction=reduction,
                               grad_out=None if reduction != "none" else torch.randn(3, 4, dtype=D))
    if reduction == "mean":
        torch.testing.assert_close(ours.detach(), (w * (x - t) ** 2).sum().detach() / w.sum().detach())


@pytest.mark.parametrize("name", ["mse_loss", "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits"])
@pytest.mark.parametrize("size_average,reduce", [(False, None), (None, False), (True, True), (False, True)])
def test_legacy_size_average_reduce(name, size_average, reduce):
    """The deprecated flags map to a reduction exactly as torch maps them (and warn as torch does)."""
    x = torch.randn(4, 3, dtype=D, requires_grad=True)
    target = torch.tensor([0, 2, 1, 1]) if name in ("cross_entropy", "nll_loss") else torch.rand(4, 3, dtype=D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = getattr(F, name)(x, target, size_average=size_average, reduce=reduce)
    assert any("size_average and reduce" in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = getattr(TF, name)(x, target, size_average=size_average, reduce=reduce)
    torch.testing.assert_close(ours, ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_half_types_keep_dtype(name, dtype):
    """Half inputs give half losses and half gradients (the math runs in float32 inside)."""
    args, kwargs = _loss_inputs(name)
    cast = lambda a: a.detach().to(dtype).requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) and a.is_floating_point() else a  # noqa: E731
    args, kwargs = tuple(cast(a) for a in args), {k: cast(v) for k, v in kwargs.items()}
    diff = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.requires_grad]
    out = getattr(F, name.split("[")[0])(*args, **kwargs)
    assert out.dtype == dtype
    for g, a in zip(torch.autograd.grad(out.float().sum(), diff), diff):
        assert g.dtype == a.dtype == dtype


def test_needs_input_grad_only():
    """Only what is asked is computed: a target that does not require grad gets None, and an
    input that does not while the target does still gives the target's gradient."""
    x = torch.randn(3, 4, dtype=D)
    t = torch.rand(3, 4, dtype=D).softmax(1).requires_grad_()
    gt, = torch.autograd.grad(F.cross_entropy(x, t), t)
    ref, = torch.autograd.grad(TF.cross_entropy(x, t), t)
    torch.testing.assert_close(gt, ref)
    assert gradcheck(lambda t_: F.binary_cross_entropy_with_logits(x, t_), (t,), check_forward_ad=True)


def test_unbatched_cross_entropy_shapes():
    """(C,) input: a 0-D loss for 'none', class-index or class-probability targets."""
    x = torch.randn(5, dtype=D, requires_grad=True)
    for target in (torch.tensor(3), torch.rand(5, dtype=D).softmax(0)):
        for reduction in ("none", "mean", "sum"):
            ours, _ = _assert_same("cross_entropy", x, target, reduction=reduction, label_smoothing=0.1)
            assert ours.shape == ()
