"""Named parity tests (issue 13 §1, the losses, linear and fused classes): for each class of
disagreement found by differential testing, torch 2.13's behaviour, run here as the judge, and
handgrad matching it: the same exception type, or the same values, dtype, shape and gradients.
Also: each formula is written once (the fused ops run the per-op helpers)."""
from __future__ import annotations

import inspect
import warnings

import pytest
import torch
import torch.nn.functional as TF

import handgrad.functional as F

D = torch.float64
HAS_TORCH_LCE = hasattr(TF, "linear_cross_entropy")
needs_torch_lce = pytest.mark.skipif(not HAS_TORCH_LCE, reason="torch < 2.13 has no linear_cross_entropy")


def _run(fn, args, kwargs, grad_mode=True):
    """(output, gradients of the inputs that require grad) or the exception type."""
    diff = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor) and t.requires_grad]
    try:
        with torch.set_grad_enabled(grad_mode), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = fn(*args, **kwargs)
            grads = ()
            if diff and grad_mode:
                grads = torch.autograd.grad(out, diff, torch.ones_like(out), allow_unused=True)
        return out, grads
    except Exception as e:  # noqa: BLE001 (the type is what is compared)
        return type(e), None


def assert_like_torch(name, *args, grad_mode=True, ours=None, theirs=None, **kwargs):
    """handgrad's ``name`` behaves as torch's: the same exception type, or equal outputs (dtype,
    shape, values, nan where torch's is nan) and gradients. Returns handgrad's output."""
    got = _run(ours or getattr(F, name), args, kwargs, grad_mode)
    want = _run(theirs or getattr(TF, name), args, kwargs, grad_mode)
    if isinstance(want[0], type):
        assert got[0] is want[0], f"torch raises {want[0].__name__}, handgrad gave {got[0]}"
        return None
    assert not isinstance(got[0], type), f"torch accepts, handgrad raised {got[0].__name__}"
    out, ref = got[0], want[0]
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, out.shape, ref.dtype, ref.shape)
    torch.testing.assert_close(out, ref, equal_nan=True)
    for a, b in zip(got[1], want[1]):
        assert (a is None) == (b is None)
        if a is not None:
            assert a.dtype == b.dtype
            torch.testing.assert_close(a, b, equal_nan=True)
    return out


def _x(*shape, dtype=D, grad=True):
    return torch.randn(shape, dtype=dtype).requires_grad_(grad)


def _idx(*values, dtype=torch.long):
    return torch.tensor(values, dtype=dtype)


# ---- negative label_smoothing: torch applies smoothing only for ε > 0 ----------------------

@pytest.mark.parametrize("eps", [-0.1, -1.0, float("nan")])
def test_label_smoothing_not_positive_is_none(eps):
    x = _x(4, 5)
    out = assert_like_torch("cross_entropy", x, _idx(0, 1, 4, 2), label_smoothing=eps)
    torch.testing.assert_close(out, TF.cross_entropy(x, _idx(0, 1, 4, 2)))      # = no smoothing
    assert_like_torch("cross_entropy", x, torch.rand(4, 5, dtype=D), label_smoothing=eps)


@needs_torch_lce
def test_lce_negative_label_smoothing():
    assert_like_torch("linear_cross_entropy", _x(4, 3), _x(5, 3), _idx(0, 1, 4, 2), label_smoothing=-0.1)


@pytest.mark.parametrize("fn", ["cross_entropy", "linear_cross_entropy"])
def test_label_smoothing_above_one_refused(fn):
    if fn == "linear_cross_entropy" and not HAS_TORCH_LCE:
        pytest.skip("torch < 2.13")
    args = (_x(4, 5), _idx(0, 1, 4, 2)) if fn == "cross_entropy" else (_x(4, 3), _x(5, 3), _idx(0, 1, 4, 2))
    assert_like_torch(fn, *args, label_smoothing=1.5)
    with pytest.raises(RuntimeError, match="label_smoothing"):
        getattr(F, fn)(*args, label_smoothing=1.5)


# ---- binary_cross_entropy_with_logits: the result has the target's dtype -------------------

@pytest.mark.parametrize("x_dtype,t_dtype", [(torch.float32, D), (D, torch.float32), (torch.float32, torch.float16),
                                             (torch.bfloat16, torch.float16), (torch.float16, torch.float32)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_bce_result_takes_the_targets_dtype(x_dtype, t_dtype, reduction):
    x, t = torch.randn(4, 5).to(x_dtype), torch.rand(4, 5).to(t_dtype)
    out = F.binary_cross_entropy_with_logits(x, t, reduction=reduction)
    ref = TF.binary_cross_entropy_with_logits(x, t, reduction=reduction)
    assert out.dtype == ref.dtype == t_dtype and out.shape == ref.shape
    # torch rounds its intermediates to the input's and target's dtypes; handgrad computes in
    # the promoted dtype and rounds once. Against the float64 truth, handgrad's error is at
    # most torch's plus one rounding to the target's dtype (STYLE.md §7).
    truth = TF.binary_cross_entropy_with_logits(x.double(), t.double(), reduction=reduction)
    eps = torch.finfo(t_dtype).eps
    assert ((out.double() - truth).abs() <= (ref.double() - truth).abs() + eps * truth.abs() + 1e-12).all()


def test_bce_gradients_keep_each_inputs_dtype():
    x, t = _x(4, 5, dtype=torch.float32), torch.rand(4, 5, dtype=D, requires_grad=True)
    assert_like_torch("binary_cross_entropy_with_logits", x, t, weight=torch.rand(5, dtype=D))


# ---- unbatched (C,) input: 'none' gives [] whatever the target's shape ---------------------

@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("target", [_idx(0), torch.tensor(0)], ids=["target[1]", "target[]"])
def test_unbatched_none_is_a_scalar(fn, target):
    """torch's 'none' loss of a (C,) input is [] whatever the target's shape. (With a target of
    shape [1] torch's own backward then fails, "size mismatch": a torch accident, not copied;
    handgrad's gradient is checked by gradcheck instead.)"""
    x = _x(4, grad=target.dim() == 0)
    out = assert_like_torch(fn, x, target.clone().fill_(3), reduction="none")
    assert out.shape == torch.Size([])
    x = x.detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda x: getattr(F, fn)(x, target.clone().fill_(3), reduction="none"), (x,))


@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
def test_unbatched_target_of_wrong_size(fn):
    """torch: ValueError for a 1-D target of size ≠ 1, RuntimeError for a 2-D one."""
    assert_like_torch(fn, _x(3), _idx(0, 1))
    assert_like_torch(fn, _x(3), _idx())
    assert_like_torch(fn, _x(3), torch.tensor([[0]]))
    assert_like_torch(fn, _x(3), torch.tensor([[0, 1]]))
    with pytest.raises(ValueError, match="target"):
        getattr(F, fn)(_x(3), _idx(0, 1))


# ---- no classes ----------------------------------------------------------------------------

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
def test_zero_classes(fn, reduction):
    ignored = torch.full((2,), -100)
    assert_like_torch(fn, _x(2, 0), ignored, reduction=reduction)                 # every row ignored
    assert_like_torch(fn, _x(0, 0), _idx(), reduction=reduction)                  # and no rows
    assert_like_torch(fn, _x(4, 0), torch.zeros(4, dtype=torch.long), reduction=reduction)   # Target 0 out of bounds
    assert_like_torch(fn, _x(0), torch.tensor(-100), reduction=reduction)         # unbatched
    if fn == "cross_entropy":
        assert_like_torch(fn, _x(2, 0), ignored, reduction=reduction, label_smoothing=0.1)
        assert_like_torch(fn, _x(2, 0), torch.rand(2, 0, dtype=D), reduction=reduction)   # probabilities
        assert_like_torch(fn, _x(2, 0), ignored, reduction=reduction, weight=torch.rand(0, dtype=D))


@needs_torch_lce
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lce_zero_classes(reduction):
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(0, 3), torch.full((2,), -100), reduction=reduction)
    assert_like_torch("linear_cross_entropy", _x(0, 3), _x(0, 3), _idx(), reduction=reduction)
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(0, 3), _idx(0, 0), reduction=reduction)


# ---- Byte targets --------------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
def test_byte_targets_with_more_than_255_classes(fn):
    """The range check compares as int64: a Byte 255 is in range for C = 300 (no wrap)."""
    assert_like_torch(fn, _x(2, 300), _idx(44, 255, dtype=torch.uint8))
    assert_like_torch(fn, _x(2, 3), _idx(1, 44, dtype=torch.uint8), ignore_index=300)   # 44 ≥ 3: out of bounds


@needs_torch_lce
def test_lce_byte_targets_with_more_than_255_classes():
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(300, 3), _idx(44, 255, dtype=torch.uint8))
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(4, 3), _idx(1, 2, dtype=torch.uint8))


@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
def test_byte_targets_refused_for_k_dim_input(fn):
    """torch's K-dim kernels take Long targets only (RuntimeError); 1-D and 2-D take Byte."""
    assert_like_torch(fn, _x(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="target"):
        getattr(F, fn)(_x(2, 3, 4), torch.zeros(2, 4, dtype=torch.uint8))
    assert_like_torch(fn, _x(3), torch.tensor(1, dtype=torch.uint8))


# ---- the class weight ----------------------------------------------------------------------

@pytest.mark.parametrize("fn", ["nll_loss", "cross_entropy"])
@pytest.mark.parametrize("shape", [(1, 3), (3, 1), (1, 1, 3)])
def test_class_weight_of_c_elements_with_k_dim_input(fn, shape):
    """torch flattens a weight of C elements for K-dim input (any shape), not for 2-D input."""
    w = torch.rand(3, dtype=D) + 0.5
    for x_shape, t_shape in (((2, 3, 4), (2, 4)), ((2, 3, 2, 2, 2), (2, 2, 2, 2))):
        assert_like_torch(fn, _x(*x_shape), torch.randint(0, 3, t_shape), weight=w.reshape(shape))
    assert_like_torch(fn, _x(2, 3), _idx(0, 2), weight=w.reshape(shape))          # refused
    assert_like_torch(fn, _x(3), torch.tensor(1), weight=w.reshape(shape))        # refused
    if fn == "cross_entropy":
        assert_like_torch(fn, _x(2, 3, 4), torch.rand(2, 3, 4, dtype=D), weight=w.reshape(shape))   # refused


def test_class_weight_requiring_grad():
    """torch differentiates the class weight for probability targets; for class indices it
    refuses one that requires grad, except under no_grad."""
    w = (torch.rand(3, dtype=D) + 0.5).requires_grad_()
    for kw in ({}, {"label_smoothing": 0.3}, {"reduction": "none"}, {"reduction": "sum"}):
        assert_like_torch("cross_entropy", _x(4, 3), torch.rand(4, 3, dtype=D), weight=w, **kw)
        assert_like_torch("cross_entropy", _x(2, 3, 2), torch.rand(2, 3, 2, dtype=D), weight=w, **kw)
    for fn in ("cross_entropy", "nll_loss"):
        assert_like_torch(fn, _x(4, 3), _idx(0, 1, 2, 1), weight=w)                  # refused
        assert_like_torch(fn, _x(4, 3), _idx(0, 1, 2, 1), weight=w, grad_mode=False)   # accepted
    x, t = _x(4, 3, grad=False), torch.rand(4, 3, dtype=D, requires_grad=True)
    f = lambda w: F.cross_entropy(x, t, weight=w, label_smoothing=0.2)           # noqa: E731
    assert torch.autograd.gradcheck(f, (w,)) and torch.autograd.gradgradcheck(f, (w,))
    assert torch.autograd.gradcheck(f, (w,), check_forward_ad=True, check_backward_ad=False, check_undefined_grad=False)


def test_bce_weight_requiring_grad_accepted_under_no_grad():
    w = torch.rand(5, dtype=D, requires_grad=True)
    for name in ("weight", "pos_weight"):
        assert_like_torch("binary_cross_entropy_with_logits", _x(2, 5), torch.rand(2, 5, dtype=D), **{name: w})
        assert_like_torch("binary_cross_entropy_with_logits", _x(2, 5), torch.rand(2, 5, dtype=D), grad_mode=False,
                          **{name: w})


@needs_torch_lce
def test_lce_class_weight_requiring_grad():
    w = (torch.rand(5, dtype=D) + 0.5).requires_grad_()
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(5, 3), _idx(0, 4), weight=w)
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(5, 3), _idx(0, 4), weight=w, grad_mode=False)
    assert_like_torch("linear_cross_entropy", _x(2, 3), _x(5, 3), torch.rand(2, 5, dtype=D), weight=w)


# ---- reduction='elementwise_mean': torch's legacy alias of 'mean', with a warning ----------

@pytest.mark.parametrize("fn,args", [
    ("cross_entropy", lambda: (_x(4, 3), _idx(0, 1, 2, 1))),
    ("nll_loss", lambda: (_x(4, 3), _idx(0, 1, 2, 1))),
    ("mse_loss", lambda: (_x(4, 3), _x(4, 3))),
    ("binary_cross_entropy_with_logits", lambda: (_x(4, 3), torch.rand(4, 3, dtype=D))),
    ("linear_cross_entropy", lambda: (_x(4, 3), _x(5, 3), _idx(0, 1, 2, 4))),
])
def test_elementwise_mean_is_mean(fn, args):
    if fn == "linear_cross_entropy" and not HAS_TORCH_LCE:
        pytest.skip("torch < 2.13")
    a = args()
    out = assert_like_torch(fn, *a, reduction="elementwise_mean")
    torch.testing.assert_close(out, getattr(F, fn)(*a, reduction="mean"))
    with pytest.warns(UserWarning, match="elementwise_mean"):
        getattr(F, fn)(*a, reduction="elementwise_mean")


# ---- mse_loss with a bool tensor and a weight ----------------------------------------------

def test_mse_bool_with_weight_refused():
    b = torch.tensor([True, False, True])
    assert_like_torch("mse_loss", _x(3, dtype=torch.float32), b, weight=torch.ones(3))   # refused
    assert_like_torch("mse_loss", b, _x(3, dtype=torch.float32), weight=torch.ones(3))   # refused
    assert_like_torch("mse_loss", _x(3, dtype=torch.float32), b)                         # accepted
    assert_like_torch("mse_loss", _x(3, dtype=torch.float32), _idx(1, 0, 1), weight=torch.ones(3))   # accepted


# ---- linear: the bias torch adds by addmm or in place --------------------------------------

@pytest.mark.parametrize("x_shape", [(2, 4, 3), (4, 2, 3), (2, 2, 4, 3)])
@pytest.mark.parametrize("b_shape", [(), (4,), (1,), (2, 4)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_linear_1d_weight_with_bias(x_shape, b_shape, contiguous):
    """A 1-D weight is one output row, dropped from the shape; torch's addmm path (contiguous
    input with a 1-D bias) refuses it, its matmul-then-add path takes any bias that broadcasts."""
    x = _x(*x_shape) if contiguous else _x(*reversed(x_shape[:-1]), 3).transpose(0, -2)
    assert_like_torch("linear", x, _x(3), _x(*b_shape))


@pytest.mark.parametrize("x_shape,contiguous", [((4, 3), True), ((2, 4, 3), True), ((2, 4, 3), False), ((3,), True)])
@pytest.mark.parametrize("b_shape", [(), (5,), (1, 5), (4, 5), (2, 4, 5)])
@pytest.mark.parametrize("b_dtype", [torch.float64, torch.float16, torch.bfloat16, torch.long])
def test_linear_bias_of_another_dtype(x_shape, contiguous, b_shape, b_dtype):
    """torch refuses a bias of another dtype on its addmm path and casts it on its in-place
    ``output.add_(bias)`` path (a 0-D or full-shape bias, or a non-contiguous input)."""
    x = _x(*x_shape, dtype=torch.float32)
    if not contiguous:
        x = _x(*reversed(x_shape[:-1]), 3, dtype=torch.float32).transpose(0, 1)
    b = torch.randn(b_shape).to(b_dtype)
    if b_dtype.is_floating_point:
        b.requires_grad_()
    assert_like_torch("linear", x, _x(5, 3, dtype=torch.float32), b)


# ---- fused ops with 0 input features -------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_fused_zero_input_features(bias):
    x, w = _x(3, 0), _x(4, 0)
    b = _x(4) if bias else None
    assert_like_torch("linear_act", x, w, b, "sigmoid", theirs=lambda x, w, b, a: torch.sigmoid(TF.linear(x, w, b)))
    w2 = _x(2, 4)
    assert_like_torch("mlp", x, [w, w2], [b, None],
                      ours=lambda x, ws, bs: F.mlp(x, ws, bs, activation="tanh"),
                      theirs=lambda x, ws, bs: TF.linear(torch.tanh(TF.linear(x, ws[0], bs[0])), ws[1], bs[1]))
    x3 = _x(2, 3, 0)                                                             # leading dims
    assert_like_torch("linear_act", x3, w, b, "tanh", theirs=lambda x, w, b, a: torch.tanh(TF.linear(x, w, b)))
    if HAS_TORCH_LCE:
        assert_like_torch("linear_cross_entropy", x, w, _idx(0, 3, 1), linear_bias=b)


# ---- linear_cross_entropy: torch's signature and semantics ---------------------------------

@needs_torch_lce
def test_lce_has_torchs_signature():
    """The same parameters, kinds and defaults as torch's, plus handgrad's ``chunk_size``."""
    ours = inspect.signature(F.linear_cross_entropy).parameters
    theirs = inspect.signature(TF.linear_cross_entropy).parameters
    assert list(ours)[: len(theirs)] == list(theirs) and list(ours)[len(theirs):] == ["chunk_size"]
    for name, p in theirs.items():
        assert (ours[name].kind, ours[name].default) == (p.kind, p.default), name


@needs_torch_lce
@pytest.mark.parametrize("case", [
    "class-weight", "unbatched", "probabilities", "k-dim", "k-dim-bias", "3-d-input", "1-d-weight",
    "bias-shape", "features", "probs-with-ignore_index", "k-dim-unbatched", "weight-dtype", "batch-mismatch",
    "float-target", "out-of-range", "ignore_index",
])
def test_lce_matches_torch(case):
    x, W, b, t = _x(5, 3), _x(4, 3), _x(4), _idx(0, 3, -100, 1, 2)
    w = torch.rand(4, dtype=D) + 0.5
    args, kw = {
        "class-weight": ((x, W, t), {"weight": w, "linear_bias": b, "label_smoothing": 0.2}),
        "unbatched": ((_x(3), W, torch.tensor(2)), {"reduction": "none", "weight": w}),
        "probabilities": ((x, W, torch.rand(5, 4, dtype=D)), {"weight": w, "linear_bias": b, "label_smoothing": 0.1}),
        "k-dim": ((x, _x(4, 2, 3), torch.randint(0, 4, (5, 2))), {"weight": w}),
        "k-dim-bias": ((x, _x(4, 2, 3), torch.randint(0, 4, (5, 2))), {"linear_bias": _x(4, 2), "reduction": "none"}),
        "3-d-input": ((_x(2, 5, 3), W, torch.zeros(2, 5, dtype=torch.long)), {}),
        "1-d-weight": ((x, _x(3), t), {}),
        "bias-shape": ((x, W, t), {"linear_bias": _x(1)}),
        "features": ((x, _x(4, 2), t), {}),
        "probs-with-ignore_index": ((x, W, torch.rand(5, 4, dtype=D)), {"ignore_index": -100}),
        "k-dim-unbatched": ((_x(3), _x(4, 2, 3), torch.zeros(2, dtype=torch.long)), {}),
        "weight-dtype": ((x, W, t), {"weight": w.float()}),
        "batch-mismatch": ((x, W, _idx(0, 1)), {}),
        "float-target": ((x, W, torch.zeros(5, dtype=D)), {}),
        "out-of-range": ((x, W, _idx(0, 3, 9, 1, 2)), {}),
        "ignore_index": ((x, W, _idx(0, 3, 2, 1, 2)), {"ignore_index": 2, "reduction": "sum"}),
    }[case]
    assert_like_torch("linear_cross_entropy", *args, **kw)


@needs_torch_lce
def test_lce_options_chunk_size():
    """torch's ``options`` is accepted; its ``batch_chunk_size`` sets handgrad's chunk size."""
    x, W, t = _x(7, 3), _x(4, 3), _idx(0, 3, -100, 1, 2, 0, 1)
    opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=2)
    torch.testing.assert_close(F.linear_cross_entropy(x, W, t, options=opts), TF.linear_cross_entropy(x, W, t))


# ---- each formula once ---------------------------------------------------------------------

def test_fused_ops_run_the_per_op_helpers(monkeypatch):
    """linear_cross_entropy runs the cross entropy's own formulas per chunk and the affine rule
    (no second copy of either): replacing the helpers changes its result."""
    from handgrad.ops import linear_cross_entropy as fused, losses

    x, W, t = _x(6, 3), _x(4, 3), _idx(0, 3, -100, 1, 2, 0)
    before = F.linear_cross_entropy(x, W, t, chunk_size=2)
    assert fused.ce_losses is losses.ce_losses and fused.ce_direction is losses.ce_direction
    assert fused.ce_chunk_fast is losses.ce_chunk_fast          # the fast chunk (nothing recorded)
    monkeypatch.setattr(fused, "ce_chunk_fast", lambda Z, *a: (lambda l, d: (2 * l, d))(*losses.ce_chunk_fast(Z, *a)))
    torch.testing.assert_close(F.linear_cross_entropy(x, W, t, chunk_size=2), 2 * before)
    smoothed = F.linear_cross_entropy(x, W, t, chunk_size=2, label_smoothing=0.1)   # ce_losses per chunk
    monkeypatch.setattr(fused, "ce_losses", lambda logp, *a: 2 * losses.ce_losses(logp, *a))
    torch.testing.assert_close(F.linear_cross_entropy(x, W, t, chunk_size=2, label_smoothing=0.1), 2 * smoothed)


def test_lce_double_backward_and_jvp_are_handgrads(monkeypatch):
    """The double backward and the jvp of linear_cross_entropy use no torch softmax/logsumexp."""
    x, W, b, t = _x(5, 3), _x(4, 3), _x(4), _idx(0, 3, -100, 1, 2)
    for name in ("softmax", "log_softmax", "logsumexp"):
        monkeypatch.setattr(torch.Tensor, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError(name)))
        monkeypatch.setattr(torch, name, lambda *a, **k: (_ for _ in ()).throw(AssertionError(name)))
    f = lambda x, W, b: F.linear_cross_entropy(x, W, t, linear_bias=b, label_smoothing=0.1, chunk_size=2)   # noqa: E731
    assert torch.autograd.gradgradcheck(f, (x, W, b))
    assert torch.autograd.gradcheck(f, (x, W, b), check_forward_ad=True, check_backward_ad=False,
                                    check_undefined_grad=False)
