"""Named edge cases of batch/group/RMS norm, embedding and dropout that the registry cannot hold
(handgrad.testing.cases.layers says why): running statistics, module modes, padding_idx,
scale_grad_by_freq, max_norm, and dropout's random training path."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import handgrad
import handgrad.functional as HF
import handgrad.nn as hnn

D64 = torch.float64


def _grads(out, tensors, g):
    return torch.autograd.grad(out, tensors, g, allow_unused=True)


# --- batch norm: running statistics, modes ---------------------------------------------------------


def _twins(cls, *args, dtype=D64, **kwargs):
    torch.manual_seed(0)
    ref = getattr(nn, cls)(*args, dtype=dtype, **kwargs)
    ours = getattr(hnn, cls)(*args, dtype=dtype, **kwargs)
    ours.load_state_dict(ref.state_dict())
    if ref.weight is not None:  # not the init's 1 and 0, so the affine map is exercised
        with torch.no_grad():
            for m in (ref, ours):
                m.weight.copy_(torch.linspace(0.5, 1.5, m.weight.numel(), dtype=dtype))
                m.bias.copy_(torch.linspace(-1, 1, m.bias.numel(), dtype=dtype))
    return ref, ours


def _same_step(ref, ours, x, dtype=D64, **tol):
    """One forward/backward of both: outputs, input and parameter gradients, buffers equal."""
    xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yo = ref(xr), ours(xo)
    torch.testing.assert_close(yo, yr, **tol)
    g = torch.randn_like(yr)
    params_r, params_o = [xr, *ref.parameters()], [xo, *ours.parameters()]
    for a, b in zip(_grads(yo, params_o, g), _grads(yr, params_r, g)):
        torch.testing.assert_close(a, b, **tol)
    for (name, a), (_, b) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(a, b, msg=name, **tol)


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum=0.1", "momentum=None(cumulative)"])
@pytest.mark.parametrize("cls,shape", [("BatchNorm1d", (6, 3)), ("BatchNorm1d", (4, 3, 5)), ("BatchNorm2d", (3, 3, 4, 2))])
def test_batch_norm_running_stats_over_steps_then_eval(cls, shape, momentum):
    ref, ours = _twins(cls, 3, momentum=momentum)
    for step in range(4):
        _same_step(ref, ours, torch.randn(shape, dtype=D64) * (step + 1) + step)
    assert int(ours.num_batches_tracked) == 4
    assert not torch.equal(ours.running_var, torch.ones(3, dtype=D64))  # the updates happened
    ref.eval(), ours.eval()
    _same_step(ref, ours, torch.randn(shape, dtype=D64))


def test_batch_norm_running_stats_float32():
    # float32 buffers: the update is one fused expression in both; a few roundings apart at most
    ref, ours = _twins("BatchNorm2d", 3, dtype=torch.float32)
    for _ in range(3):
        _same_step(ref, ours, torch.randn(4, 3, 2, 2), rtol=1e-5, atol=1e-6)


def test_functional_running_update_is_unbiased_and_in_place():
    x = torch.randn(5, 3, 2, dtype=D64)
    mean, var = torch.zeros(3, dtype=D64), torch.ones(3, dtype=D64)
    ids = mean.data_ptr(), var.data_ptr()
    HF.batch_norm(x, mean, var, training=True, momentum=0.25)
    n = 5 * 2
    torch.testing.assert_close(mean, 0.25 * x.mean((0, 2)))
    torch.testing.assert_close(var, 0.75 + 0.25 * x.var((0, 2), correction=0) * n / (n - 1))
    assert (mean.data_ptr(), var.data_ptr()) == ids


def test_batch_norm_training_with_buffers_gradchecks():
    # the buffers change on every call; the output (batch statistics) does not depend on them
    x = torch.randn(4, 3, 2, dtype=D64, requires_grad=True)
    w, b = torch.randn(3, dtype=D64, requires_grad=True), torch.randn(3, dtype=D64, requires_grad=True)
    mean, var = torch.zeros(3, dtype=D64), torch.ones(3, dtype=D64)
    fn = lambda x, w, b: HF.batch_norm(x, mean, var, w, b, training=True)  # noqa: E731
    assert gradcheck(fn, (x, w, b), check_forward_ad=True)
    assert gradgradcheck(fn, (x, w, b))


@pytest.mark.parametrize("affine", [True, False])
def test_batch_norm_without_running_stats_uses_batch_stats_in_eval(affine):
    ref, ours = _twins("BatchNorm2d", 3, affine=affine, track_running_stats=False)
    assert ours.running_mean is None
    for mode in (ref.train, ours.train), (ref.eval, ours.eval):
        for f in mode:
            f()
        _same_step(ref, ours, torch.randn(3, 3, 2, 2, dtype=D64))


def test_batch_norm_affine_false_module():
    ref, ours = _twins("BatchNorm1d", 4, affine=False)
    _same_step(ref, ours, torch.randn(5, 4, dtype=D64))
    ref.eval(), ours.eval()
    _same_step(ref, ours, torch.randn(5, 4, dtype=D64))


def test_batch_norm_empty_batch_leaves_running_stats():
    mean, var = torch.zeros(3), torch.ones(3)
    y = HF.batch_norm(torch.randn(0, 3), mean, var, training=True)
    assert y.shape == (0, 3) and torch.equal(mean, torch.zeros(3)) and torch.equal(var, torch.ones(3))


def test_batch_norm_refuses_running_stats_that_require_grad():
    x, mean, var = torch.randn(2, 3), torch.zeros(3, requires_grad=True), torch.ones(3)
    with pytest.raises(RuntimeError):
        TF.batch_norm(x, mean, var)
    with pytest.raises(RuntimeError, match="running_mean"):
        HF.batch_norm(x, mean, var)


def test_batch_norm_mixed_dtype_half_input_float32_params():
    x = torch.randn(4, 3, 5).bfloat16()
    args = torch.zeros(3), torch.ones(3), torch.randn(3), torch.randn(3)
    for training in (True, False):
        ours, ref = HF.batch_norm(x, *args, training=training), TF.batch_norm(x, *args, training=training)
        assert ours.dtype == ref.dtype == torch.bfloat16
        torch.testing.assert_close(ours, ref, atol=2e-2, rtol=1e-2)  # bfloat16: 2⁻⁷ relative per rounding


# --- group and RMS norm modules ------------------------------------------------------------------


def test_group_norm_module():
    ref, ours = _twins("GroupNorm", 2, 6)
    _same_step(ref, ours, torch.randn(3, 6, 4, dtype=D64))


@pytest.mark.parametrize("eps", [None, 1e-3])
def test_rms_norm_module(eps):
    ref, ours = nn.RMSNorm([3, 4], eps=eps, dtype=D64), hnn.RMSNorm([3, 4], eps=eps, dtype=D64)
    with torch.no_grad():
        for m in (ref, ours):
            m.weight.copy_(torch.linspace(0.5, 1.5, 12, dtype=D64).reshape(3, 4))
    _same_step(ref, ours, torch.randn(2, 3, 4, dtype=D64))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rms_norm_eps_none_is_the_computation_dtypes_epsilon(dtype):
    # rows of tiny values: the result is set by eps. torch's eps=None is finfo of the dtype the
    # norm is computed in (float32 for the half types), not of the input's dtype.
    x = torch.full((2, 4), 1e-4 if dtype != D64 else 1e-8, dtype=dtype)
    ours, ref = HF.rms_norm(x, [4]), TF.rms_norm(x, [4])
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    compute = D64 if dtype == D64 else torch.float32
    v = x[0, 0].to(compute)
    assert math.isclose(ref[0, 0].double().item(), (v / (v * v + torch.finfo(compute).eps).sqrt()).to(dtype).item())


def test_rms_norm_half_input_float32_weight():
    x, w = torch.randn(3, 5).bfloat16(), torch.randn(5)
    ours, ref = HF.rms_norm(x, [5], w), TF.rms_norm(x, [5], w)
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)


# --- embedding --------------------------------------------------------------------------------


IDX = torch.tensor([[0, 2, 2, 4], [5, 0, 1, 2]])


def _embedding_pair(**kw):
    W = torch.randn(6, 3, dtype=D64, requires_grad=True)
    g = torch.randn(2, 4, 3, dtype=D64)
    ours, ref = HF.embedding(IDX, W, **kw), TF.embedding(IDX, W, **kw)
    torch.testing.assert_close(ours, ref, atol=0, rtol=0)
    return W, g, _grads(ours, W, g)[0], _grads(ref, W, g)[0]


@pytest.mark.parametrize("padding_idx", [2, -4], ids=["padding_idx=2", "padding_idx=-4"])
def test_embedding_padding_idx_gets_no_gradient(padding_idx):
    W, g, ours, ref = _embedding_pair(padding_idx=padding_idx)
    torch.testing.assert_close(ours, ref)
    assert torch.equal(ours[2], torch.zeros(3, dtype=D64)) and ours[0].abs().sum() > 0


@pytest.mark.parametrize("padding_idx", [None, 0])
def test_embedding_scale_grad_by_freq(padding_idx):
    W, g, ours, ref = _embedding_pair(scale_grad_by_freq=True, padding_idx=padding_idx)
    torch.testing.assert_close(ours, ref)
    # row 2 appears three times: the mean of its three G rows, not their sum
    torch.testing.assert_close(ours[2], g.reshape(-1, 3)[IDX.reshape(-1) == 2].mean(0))


@pytest.mark.parametrize("kw", [{}, {"padding_idx": 2}, {"scale_grad_by_freq": True},
                                {"padding_idx": 0, "scale_grad_by_freq": True}], ids=str)
def test_embedding_double_backward_is_the_gather(kw):
    """∂L/∂W is linear in G; its own derivative (the gather, times c) against finite differences.
    (torch's double backward omits 1/count with scale_grad_by_freq, so it is not the reference.)"""
    W = torch.randn(6, 3, dtype=D64, requires_grad=True)
    backward = lambda g: torch.autograd.grad(HF.embedding(IDX, W, **kw), W, g, create_graph=True)[0]  # noqa: E731
    assert gradcheck(backward, (torch.randn(2, 4, 3, dtype=D64, requires_grad=True),), check_forward_ad=True)


def test_embedding_max_norm_renormalises_weight_in_place_as_torch():
    torch.manual_seed(1)
    W = torch.randn(6, 3, dtype=D64) * 3
    Wo, Wr = W.clone().requires_grad_(), W.clone().requires_grad_()
    g = torch.randn(2, 4, 3, dtype=D64)
    ours, ref = HF.embedding(IDX, Wo, max_norm=1.5), TF.embedding(IDX, Wr, max_norm=1.5)
    torch.testing.assert_close(Wo, Wr, atol=0, rtol=1e-15)  # the referred rows renormalised, row 3 untouched
    assert torch.equal(Wo[3], W[3]) and not torch.equal(Wo[0], W[0])
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(_grads(ours, Wo, g)[0], _grads(ref, Wr, g)[0])
    Wo2, Wr2 = W.clone(), W.clone()
    HF.embedding(IDX, Wo2, max_norm=2.0, norm_type=1.0), TF.embedding(IDX, Wr2, max_norm=2.0, norm_type=1.0)
    torch.testing.assert_close(Wo2, Wr2, atol=0, rtol=1e-15)


@pytest.mark.parametrize("idx", [IDX, torch.tensor([[2, 2], [0, 5]], dtype=torch.int32), torch.tensor([], dtype=torch.long)])
@pytest.mark.parametrize("padding_idx", [None, 2, -1])
def test_embedding_sparse_gradient_is_torchs(idx, padding_idx):
    """sparse=True: torch's uncoalesced COO ∂L/∂W, entry for entry (indices idx, values G's rows, the
    padding rows left out), and its refusal of scale_grad_by_freq in backward."""
    W = torch.randn(6, 3, dtype=D64)
    grads = []
    for f in (HF.embedding, TF.embedding):
        w = W.clone().requires_grad_()
        y = f(idx, w, padding_idx=padding_idx, sparse=True)
        y.backward(torch.arange(y.numel(), dtype=D64).reshape(y.shape))
        grads.append(w.grad)
    ours, ref = grads
    assert ours.layout == ref.layout == torch.sparse_coo and ours.is_coalesced() == ref.is_coalesced()
    assert torch.equal(ours._indices(), ref._indices()) and torch.equal(ours._values(), ref._values())
    with pytest.raises(RuntimeError, match="scale_grad_by_freq"):
        HF.embedding(IDX, W.clone().requires_grad_(), scale_grad_by_freq=True, sparse=True).sum().backward()


@pytest.mark.parametrize("opt", [torch.optim.SparseAdam, torch.optim.SGD])
def test_embedding_sparse_module_trains_like_torchs(opt):
    torch.manual_seed(0)
    ref = nn.Embedding(10, 4, sparse=True, dtype=D64)
    ours = hnn.Embedding(10, 4, sparse=True, dtype=D64)
    ours.load_state_dict(ref.state_dict())
    steps = [(m, opt(m.parameters(), lr=0.1)) for m in (ours, ref)]
    for _ in range(3):
        idx = torch.randint(0, 10, (6,))
        for m, o in steps:
            o.zero_grad()
            (m(idx) ** 2).sum().backward()
            assert m.weight.grad.is_sparse
            o.step()
    torch.testing.assert_close(ours.weight, ref.weight, atol=0, rtol=0)


def test_embedding_module_and_from_pretrained():
    torch.manual_seed(0)
    ref = nn.Embedding(6, 3, padding_idx=1, dtype=D64)
    torch.manual_seed(0)
    ours = hnn.Embedding(6, 3, padding_idx=1, dtype=D64)
    assert torch.equal(ours.weight, ref.weight)  # torch's init, padding row zeroed
    g = torch.randn(2, 4, 3, dtype=D64)
    torch.testing.assert_close(_grads(ours(IDX), ours.weight, g)[0], _grads(ref(IDX), ref.weight, g)[0])
    pre = hnn.Embedding.from_pretrained(ref.weight.detach(), freeze=False, max_norm=0.5)
    assert type(pre) is hnn.Embedding and pre.max_norm == 0.5
    pre(IDX)
    assert torch.linalg.vector_norm(pre.weight[IDX.unique()], dim=1).max() <= 0.5 + 1e-12


# --- dropout ----------------------------------------------------------------------------------


def _seeded(fn, seed=0, **kw):
    """fn with the generator reset to ``seed`` on every call (same mask each call), the caller's
    RNG state untouched."""

    def call(x):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(x, **kw)

    return call


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_equals_torch_with_the_same_seed_on_cpu(p, dtype):
    x = torch.randn(7, 13, dtype=D64).to(dtype).requires_grad_()
    ours, ref = _seeded(HF.dropout, p=p)(x), _seeded(TF.dropout, p=p)(x)
    assert torch.equal(ours, ref)
    g = torch.randn_like(ours)
    assert torch.equal(_grads(ours, x, g)[0], _grads(ref, x, g)[0])


def test_dropout_matches_its_own_mask():
    """y = x ⊙ m/(1 − p) and ∂L/∂x = G ⊙ m/(1 − p), with m read off the output's zeros."""
    x = torch.randn(50, 20, dtype=D64).requires_grad_()
    y = HF.dropout(x, 0.3)
    m = y != 0
    torch.testing.assert_close(y, x * m / 0.7, atol=0, rtol=1e-15)
    g = torch.randn_like(y)
    torch.testing.assert_close(_grads(y, x, g)[0], g * m / 0.7, atol=0, rtol=1e-15)


def test_dropout_keep_rate_is_one_minus_p():
    n, p = 200_000, 0.3
    kept = (HF.dropout(torch.ones(n), p) != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 5 * math.sqrt(p * (1 - p) / n)  # 5σ of a binomial proportion


def test_dropout_contract_with_a_fixed_seed():
    x = torch.randn(5, 3, dtype=D64, requires_grad=True)
    fn = _seeded(HF.dropout, p=0.4)
    # batched forward-mode would draw inside vmap, which torch refuses for its own dropout too
    assert gradcheck(fn, (x,), check_forward_ad=True, check_batched_grad=True, check_batched_forward_grad=False)
    assert gradgradcheck(fn, (x,), check_fwd_over_rev=True, check_batched_grad=True)
    torch.testing.assert_close(torch.func.jacrev(fn)(x.detach()), torch.func.jacrev(_seeded(TF.dropout, p=0.4))(x.detach()))


@pytest.mark.parametrize("randomness", ["different", "same"])
def test_dropout_under_vmap_randomness(randomness):
    y = torch.func.vmap(lambda t: HF.dropout(t, 0.5), randomness=randomness)(torch.ones(4, 64))
    assert set(y.unique().tolist()) <= {0.0, 2.0}
    assert (randomness == "same") == all(torch.equal(y[0], r) for r in y)


def test_dropout_compiles():
    x = torch.randn(6, 5, dtype=D64, requires_grad=True)
    y = torch.compile(lambda t: HF.dropout(t, 0.5), backend="aot_eager", fullgraph=True)(x)
    m = y != 0
    torch.testing.assert_close(y, x * m * 2.0)
    torch.testing.assert_close(_grads(y, x, torch.ones_like(y))[0], m * 2.0, check_dtype=False)


def test_dropout_p0_eval_and_empty_return_the_input():
    x = torch.randn(3, 4, requires_grad=True)
    assert HF.dropout(x, 0.0) is x and HF.dropout(x, 0.7, training=False) is x
    e = torch.randn(0, 4)
    assert HF.dropout(e, 0.5) is e


def test_dropout_p1_is_x_times_zero():
    x = torch.tensor([1.0, -2.0, float("inf"), float("nan")], requires_grad=True)
    ours, ref = HF.dropout(x, 1.0), TF.dropout(x, 1.0)
    torch.testing.assert_close(ours, ref, equal_nan=True)  # zeros; NaN where x is ±inf or NaN, as torch
    assert torch.equal(_grads(ours, x, torch.ones(4))[0], torch.zeros(4))


def test_dropout_inplace():
    base = torch.randn(6, 5, dtype=D64, requires_grad=True)
    results = []
    for fn in (HF.dropout, TF.dropout):
        x = base * 1.0
        ptr = x.data_ptr()
        y = _seeded(fn, p=0.5, inplace=True)(x)
        assert y is x and y.data_ptr() == ptr
        results.append((y, _grads(y, base, torch.arange(30.0, dtype=D64).reshape(6, 5))[0]))
    (y, g), (y_ref, g_ref) = results
    assert torch.equal(y, y_ref) and torch.equal(g, g_ref)
    with pytest.raises(RuntimeError):  # a leaf that requires grad cannot be written in place, as in torch
        HF.dropout(torch.randn(3, requires_grad=True), 0.5, inplace=True)


def test_dropout_inplace_forward_ad():
    """In place, the jvp writes the tangent in place too (torch requires it of an in-place Function)."""
    import torch.autograd.forward_ad as fwAD

    x, t = torch.randn(5, 3, dtype=D64), torch.randn(5, 3, dtype=D64)
    results = []
    for fn in (HF.dropout, TF.dropout):
        with fwAD.dual_level():
            y = fwAD.make_dual(x.clone(), t.clone()) * 1.0
            z = _seeded(fn, p=0.5, inplace=True)(y)
            assert z is y
            results.append(tuple(v.clone() for v in fwAD.unpack_dual(z)[:2]))
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_dropout_module_modes():
    m = hnn.Dropout(0.5)
    x = torch.ones(1000)
    assert (m(x) == 0).any()
    m.eval()
    assert m(x) is x


# --- torch.compile of the twins -----------------------------------------------------------------


def test_twins_compile_fullgraph_train_then_eval():
    """BatchNorm2d (its buffer updates included), GroupNorm, RMSNorm, Embedding and Dropout in one
    graph (aot_eager, as handgrad.testing's compile check): compiled equals eager."""

    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Dropout(0.0), nn.Linear(3 * 2 * 2, 5), nn.RMSNorm(5),
                          nn.Unflatten(1, (5, 1)), nn.GroupNorm(1, 5)).double()
    emb = nn.Embedding(7, 3 * 2 * 2, padding_idx=0, dtype=D64)
    eager_m, eager_e = handgrad.convert(model), handgrad.convert(emb)
    comp_m, comp_e = copy.deepcopy(eager_m), copy.deepcopy(eager_e)
    idx = torch.tensor([0, 3, 3, 6])

    def step(m, e, x):
        return (m(x + e(idx).reshape(4, 3, 2, 2)) ** 2).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for train in (True, False):
        for mod in (eager_m, comp_m):
            mod.train(train)
        x = torch.randn(4, 3, 2, 2, dtype=D64)
        a, b = step(eager_m, eager_e, x), compiled(comp_m, comp_e, x)
        torch.testing.assert_close(b, a)
        a.backward(), b.backward()
    for (name, p), (_, q) in zip([*eager_m.named_parameters(), *eager_e.named_parameters()],
                                 [*comp_m.named_parameters(), *comp_e.named_parameters()]):
        torch.testing.assert_close(q.grad, p.grad, msg=name)
    for (name, p), (_, q) in zip(eager_m.named_buffers(), comp_m.named_buffers()):
        torch.testing.assert_close(q, p, msg=name)


def test_constant_sets_normalise_to_exact_zero():
    """A constant set has X − μ = 0 exactly (ops.normalize.moments shifts by the first element),
    so x̂ = 0 and Y = b: float32 1000.1s gave x̂ = −0.019 from mean(X)'s rounding alone."""
    c = torch.full((6, 2, 3), 1000.1)
    b = torch.randn(2)
    assert torch.equal(HF.batch_norm(c, None, None, None, b, training=True), b[:, None].expand(6, 2, 3))
    assert torch.equal(HF.group_norm(c.reshape(6, 6), 2), torch.zeros(6, 6))
