"""handgrad.per_sample: capture(model, grads=...) and norms(model).

The reference for every per-sample gradient is torch.func's ``vmap(grad(...))`` over the
*native* torch model the handgrad one was converted from (same parameter values), one sample at
a time; and Opacus's ``grad_sample`` where Opacus covers the layers. Tolerances: float64
throughout; 1e-10 relative to the largest reference entry (the issue's bound: both sides sum
the same products in different orders, so they differ by a few ulps times the reduction
length, ~1e-14 here).
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vmap

import handgrad
from handgrad import per_sample

pytestmark = [
    # torch.func's reference over torch's attention (its batching falls back to a loop), and Opacus's hooks
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
    pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning"),
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
]

DT = torch.float64
RTOL = 1e-10    # the bound (see the module docstring)


def _close(actual, expected, what=""):
    scale = expected.abs().max().clamp_min(1e-300)
    err = ((actual - expected).abs().max() / scale).item()
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL:.0e}"


def _reference(native: nn.Module, loss_fn, inputs: tuple, target) -> dict[str, torch.Tensor]:
    """∂Cⁿ/∂θ for each n by torch.func over the native model: loss_fn(model(*inputs_n), target_n)
    on a batch of one (sample dim kept), for a sum-reduced loss_fn."""
    params = {k: v.detach() for k, v in native.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in native.named_buffers()}

    def one(p, target_n, *inputs_n):
        inputs_n = tuple(t.unsqueeze(0) for t in inputs_n)
        return loss_fn(functional_call(native, {**p, **buffers}, inputs_n), target_n.unsqueeze(0))

    return vmap(grad(one), in_dims=(None, 0, *(0,) * len(inputs)))(params, target, *inputs)


def _captured(model: nn.Module, loss_fn, inputs: tuple, target, grads=True):
    model.zero_grad(set_to_none=True)
    with per_sample.capture(model, grads=grads):
        loss_fn(model(*inputs), target).backward()
    return per_sample.norms(model)


def _check(native: nn.Module, loss_fn, inputs: tuple, target):
    """grad_sample == vmap(grad) for every parameter; Σₙ grad_sample == grad; norms of both modes
    equal the reference's."""
    native = native.to(DT)
    model = handgrad.convert(native)                       # a converted deep copy: same values
    ref = _reference(native, loss_fn, inputs, target)
    norms_true = _captured(model, loss_fn, inputs, target, grads=True)
    for name, p in model.named_parameters():
        _close(p.grad_sample, ref[name], f"{name} grad_sample")
        _close(p.grad_sample.sum(0), p.grad, f"{name} grad_sample.sum(0) vs grad")
    ref_norms = torch.stack([g.flatten(1).square().sum(1) for g in ref.values()]).sum(0).sqrt()
    _close(norms_true, ref_norms, "norms (grads=True)")
    norms_false = _captured(model, loss_fn, inputs, target, grads=False)
    _close(norms_false, ref_norms, "norms (grads=False)")
    assert all(not hasattr(p, "grad_sample") for p in model.parameters())
    return model


def _sum_mse(out, y):
    return 0.5 * (out - y).square().sum()


def _r(*shape):
    return torch.randn(*shape, dtype=DT)


# --------------------------------------------------------------------------------------------
# each covered layer


@pytest.mark.parametrize("shape, d_in, d_out, bias", [
    ((5, 4), 4, 3, True),            # one row per sample: ‖δ‖²‖x‖²
    ((5, 3, 4), 4, 6, True),         # T² ≤ D_in·D_out: the Gram form
    ((4, 9, 2), 2, 3, False),        # T² > D_in·D_out: formed, then normed
    ((3, 2, 2, 4), 4, 2, True),      # two sequence dims, summed within a sample
])
def test_linear(shape, d_in, d_out, bias):
    torch.manual_seed(0)
    _check(nn.Linear(d_in, d_out, bias=bias), _sum_mse, (_r(*shape),), _r(*shape[:-1], d_out))


@pytest.mark.parametrize("kwargs, length", [
    (dict(kernel_size=3), 9),
    (dict(kernel_size=3, stride=2, padding=2, dilation=2, groups=2), 11),
    (dict(kernel_size=2, padding="same", padding_mode="circular", bias=False), 7),
    (dict(kernel_size=4, padding="same"), 7),
])
def test_conv1d(kwargs, length):
    torch.manual_seed(1)
    conv = nn.Conv1d(4, 6, **kwargs)
    out = conv(torch.zeros(1, 4, length))
    _check(conv, _sum_mse, (_r(3, 4, length),), _r(3, *out.shape[1:]))


@pytest.mark.parametrize("kwargs", [
    dict(kernel_size=3, padding=1),
    dict(kernel_size=(2, 3), stride=(2, 1), groups=3, bias=False),
    dict(kernel_size=3, padding=1, padding_mode="reflect", dilation=(1, 2)),
])
def test_conv2d(kwargs):
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 6, **kwargs)
    out = conv(torch.zeros(1, 3, 7, 8))
    _check(conv, _sum_mse, (_r(4, 3, 7, 8),), _r(4, *out.shape[1:]))


@pytest.mark.parametrize("norm, shape", [
    (lambda: nn.LayerNorm(5), (4, 3, 5)),
    (lambda: nn.LayerNorm((3, 5)), (4, 3, 5)),
    (lambda: nn.LayerNorm(5, bias=False), (4, 5)),
    (lambda: nn.GroupNorm(2, 4), (3, 4, 5, 2)),
    (lambda: nn.RMSNorm(5), (4, 3, 5)),
    (lambda: nn.BatchNorm1d(4).eval(), (5, 4, 3)),
])
def test_norm_layers(norm, shape):
    torch.manual_seed(3)
    layer = norm()
    with torch.no_grad():                      # non-trivial affine parameters and running statistics
        for p in layer.parameters():
            p.copy_(torch.randn_like(p))
        if isinstance(layer, nn.BatchNorm1d):
            layer.running_mean.normal_()
            layer.running_var.uniform_(0.5, 2.0)
    _check(layer, _sum_mse, (_r(*shape),), _r(*shape))


@pytest.mark.parametrize("T, padding_idx", [(6, None), (6, 0), (40, None)])   # T² ≤ V·E; T² > V·E
def test_embedding(T, padding_idx):
    torch.manual_seed(4)
    emb = nn.Embedding(5, 3, padding_idx=padding_idx)
    idx = torch.randint(0, 5, (4, T))          # repeats within a sample: rows add up
    _check(emb, _sum_mse, (idx,), _r(4, T, 3))


def _captured_layer(layer, x, G, grads):
    """(grad_sample of each parameter or None, norms) of one backward of Σ G ⊙ layer(x)."""
    layer.zero_grad(set_to_none=True)
    with per_sample.capture(layer, grads=grads):
        (layer(x) * G).sum().backward()
    return [getattr(p, "grad_sample", None) for p in layer.parameters()], per_sample.norms(layer)


@pytest.mark.parametrize("make, x", [
    (lambda: nn.GroupNorm(2, 4), lambda: torch.randn(5, 4, 6, 3) * 3 + 2),
    (lambda: nn.LayerNorm((3, 4)), lambda: torch.randn(5, 2, 3, 4) * 3 + 2),
    (lambda: nn.Embedding(20, 5, padding_idx=2), lambda: torch.randint(0, 6, (5, 9))),   # repeats; T² ≤ V·E
])
@pytest.mark.parametrize("grads", [True, False])
def test_kernels_equal_the_torch_op_path(make, x, grads, monkeypatch):
    """The rules' compiled kernels (kernels/per_sample.py) against their torch-op path: float64
    equal to 1e-12 relative (both sum the same terms in another order: a few ulps times ~20
    terms); float32 at most the torch path's own error against the float64 truth plus 2 ulps of
    the result (2⁻²² relative: the kernels round their float64 sums once, the torch path rounds
    every partial sum, so the kernels' error is the smaller one, up to the last rounding)."""
    from handgrad import kernels
    if not kernels.enabled():
        pytest.skip("no numba")
    torch.manual_seed(21)
    base, x = make(), x()
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn_like(p))
    G = torch.randn(*x.shape, base.embedding_dim) if isinstance(base, nn.Embedding) else torch.randn_like(x)
    ran = []
    family = kernels.load("per_sample")
    for name in family.__all__:
        fn = getattr(family, name)
        monkeypatch.setattr(family, name, lambda *a, _fn=fn, _n=name: (ran.append(_n), _fn(*a))[1])
    results = {}
    for dt in (torch.float64, torch.float32):
        layer = handgrad.convert(copy.deepcopy(base).to(dt))
        xd = x.to(dt) if x.is_floating_point() else x
        results[dt, "kernel"] = _captured_layer(layer, xd, G.to(dt), grads)
        with kernels.disabled():
            results[dt, "torch"] = _captured_layer(layer, xd, G.to(dt), grads)
    if not grads or not isinstance(base, nn.Embedding):   # (the embedding's kernel is the norms-only pairwise form)
        assert ran, "the kernel path was not taken"
    (g64, n64), (t64, tn64) = results[torch.float64, "kernel"], results[torch.float64, "torch"]
    for a, b in [*zip(g64, t64), (n64, tn64)]:
        if b is not None:
            assert (a - b).abs().max() <= 1e-12 * b.abs().max()
    (g32, n32), (t32, tn32) = results[torch.float32, "kernel"], results[torch.float32, "torch"]
    for a, b, truth in [*zip(g32, t32, t64), (n32, tn32, tn64)]:
        if truth is not None:
            assert a.dtype == torch.float32
            err, err_torch = (a.double() - truth).abs().max(), (b.double() - truth).abs().max()
            assert err <= err_torch + 2 ** -22 * truth.abs().max(), (err.item(), err_torch.item())


def test_mlp_fused():
    torch.manual_seed(5)
    mlp = handgrad.nn.MLP([4, 6, 3], activation="tanh", dtype=DT)
    assert mlp.fused
    model = _check(mlp, _sum_mse, (_r(5, 4),), _r(5, 3))
    assert model.fused, "capture runs the MLP unfused and puts it back"


class _SelfAttention(nn.Module):
    """Batch-first in and out; ``batch_first=False`` transposes around the attention, so
    MultiheadAttention's own batch dimension (1) is the sample dimension."""

    def __init__(self, batch_first=True, **kwargs):
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first, **kwargs)

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        y = self.attn(x, x, x, need_weights=False)[0]
        return y if self.batch_first else y.transpose(0, 1)


class _CrossAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(8, 2, kdim=3, vdim=5, batch_first=True)

    def forward(self, q, k, v):
        return self.attn(q, k, v)[0]


@pytest.mark.parametrize("kwargs", [dict(), dict(batch_first=False, bias=False)])
def test_mha_self_attention(kwargs):
    torch.manual_seed(6)
    _check(_SelfAttention(**kwargs), _sum_mse, (_r(3, 5, 8),), _r(3, 5, 8))


def test_mha_cross_attention_separate_weights():
    torch.manual_seed(7)
    _check(_CrossAttention(), _sum_mse, (_r(3, 4, 8), _r(3, 6, 3), _r(3, 6, 5)), _r(3, 4, 8))


# --------------------------------------------------------------------------------------------
# models built from them


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.MaxPool2d(2),
                                  nn.Conv2d(4, 4, 3, groups=2), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))

    def forward(self, x):
        return self.body(x)


class _Block(nn.Module):
    """A pre-norm transformer block over token ids: embedding, MHA, LayerNorm, MLP, RMSNorm, head."""

    def __init__(self, vocab=11, E=8):
        super().__init__()
        self.emb = nn.Embedding(vocab, E)
        self.ln1, self.ln2 = nn.LayerNorm(E), nn.RMSNorm(E)
        self.attn = nn.MultiheadAttention(E, 2, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(E, 16), nn.GELU(), nn.Linear(16, E))
        self.head = nn.Linear(E, vocab)

    def forward(self, ids):
        h = self.emb(ids)
        a = self.ln1(h)
        h = h + self.attn(a, a, a, need_weights=False)[0]
        h = h + self.ff(self.ln2(h))
        return self.head(h)


def _sum_ce(logits, y):
    return nn.functional.cross_entropy(logits.flatten(0, -2), y.flatten(), reduction="sum")


def test_mlp_model():
    torch.manual_seed(8)
    _check(nn.Sequential(nn.Linear(6, 8), nn.Sigmoid(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)),
           _sum_ce, (_r(7, 6),), torch.randint(0, 3, (7,)))


def test_cnn_model():
    torch.manual_seed(9)
    _check(_CNN(), _sum_ce, (_r(4, 1, 8, 8),), torch.randint(0, 3, (4,)))


def test_transformer_block():
    torch.manual_seed(10)
    _check(_Block(), _sum_ce, (torch.randint(0, 11, (3, 6)),), torch.randint(0, 11, (3, 6)))


@pytest.mark.parametrize("norm_first", [False, True])
def test_torch_transformer_encoder_layer(norm_first):
    torch.manual_seed(16)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True, norm_first=norm_first)
    _check(layer, _sum_mse, (_r(3, 5, 8),), _r(3, 5, 8))


def test_sequence_model():
    torch.manual_seed(11)
    _check(nn.Sequential(nn.Conv1d(3, 5, 3, padding=1), nn.SiLU(), nn.GroupNorm(1, 5), nn.Flatten(1),
                         nn.Linear(5 * 7, 2)), _sum_mse, (_r(4, 3, 7),), _r(4, 2))


# --------------------------------------------------------------------------------------------
# reduction, accumulation, modes


def test_mean_reduction_scales_as_the_loss():
    torch.manual_seed(12)
    model = handgrad.convert(_Block().to(DT))
    ids, y = torch.randint(0, 11, (4, 5)), torch.randint(0, 11, (4, 5))
    out = {}
    for reduction in ("sum", "mean"):
        model.zero_grad(set_to_none=True)
        with per_sample.capture(model):
            nn.functional.cross_entropy(model(ids).flatten(0, 1), y.flatten(), reduction=reduction).backward()
        out[reduction] = {k: p.grad_sample for k, p in model.named_parameters()}
        for k, p in model.named_parameters():
            _close(p.grad_sample.sum(0), p.grad, f"{k} ({reduction})")
    for k in out["sum"]:
        _close(out["mean"][k] * ids.numel(), out["sum"][k], k)      # the mean divides by N·T tokens


def test_two_backwards_accumulate():
    torch.manual_seed(13)
    native = _CNN().to(DT)
    model = handgrad.convert(native)
    x, y1, y2 = _r(3, 1, 8, 8), torch.randint(0, 3, (3,)), torch.randint(0, 3, (3,))
    ref1, ref2 = (_reference(native, _sum_ce, (x,), y) for y in (y1, y2))
    with per_sample.capture(model):
        out = model(x)
        _sum_ce(out, y1).backward(retain_graph=True)
        _sum_ce(out, y2).backward()
    for k, p in model.named_parameters():
        _close(p.grad_sample, ref1[k] + ref2[k], k)
        _close(p.grad_sample.sum(0), p.grad, k)
    with per_sample.capture(model, grads=False), pytest.raises(RuntimeError, match="second contribution"):
        out = model(x)
        _sum_ce(out, y1).backward(retain_graph=True)
        _sum_ce(out, y2).backward()


def test_a_layer_used_twice():
    torch.manual_seed(14)
    native = nn.Linear(4, 4).to(DT)
    model = handgrad.convert(native)
    twice = lambda m: (lambda x: m(torch.tanh(m(x))))                # noqa: E731
    x, y = _r(5, 4), _r(5, 4)
    params = {k: v.detach() for k, v in native.named_parameters()}
    ref = vmap(grad(lambda p, xn, yn: _sum_mse(twice(lambda t: functional_call(native, p, (t,)))(xn[None]), yn[None])),
               in_dims=(None, 0, 0))(params, x, y)
    with per_sample.capture(model):
        _sum_mse(twice(model)(x), y).backward()
    for k, p in model.named_parameters():
        _close(p.grad_sample, ref[k], k)


class _TiedLM(nn.Module):
    """Embedding → LayerNorm → logits by the embedding's own weight: tied through a second module
    (``decoder.weight = emb.weight``) or through a functional call (``F.linear(h, emb.weight)``)."""

    def __init__(self, functional: bool, vocab=9, E=6):
        super().__init__()
        self.emb, self.norm, self.functional = nn.Embedding(vocab, E), nn.LayerNorm(E), functional
        if not functional:
            self.decoder = nn.Linear(E, vocab, bias=False)
            self.decoder.weight = self.emb.weight

    def forward(self, ids):
        h = self.norm(self.emb(ids))
        return nn.functional.linear(h, self.emb.weight) if self.functional else self.decoder(h)


def test_weight_tied_through_modules_sums_both_uses():
    torch.manual_seed(17)
    native = _TiedLM(functional=False).to(DT)
    model = handgrad.convert(native)
    assert model.decoder.weight is model.emb.weight
    ids, y = torch.randint(0, 9, (4, 5)), torch.randint(0, 9, (4, 5))
    ref = _reference(native, _sum_ce, (ids,), y)                       # functional_call ties them too
    with per_sample.capture(model):
        _sum_ce(model(ids), y).backward()
    for k, p in model.named_parameters():
        _close(p.grad_sample, ref[k], k)
        _close(p.grad_sample.sum(0), p.grad, k)
    with per_sample.capture(model, grads=False), pytest.raises(RuntimeError, match="second contribution"):
        _sum_ce(model(ids), y).backward()


def test_refuses_a_weight_tied_through_a_functional_call():
    model = handgrad.convert(_TiedLM(functional=True))
    ids = torch.randint(0, 9, (3, 4))
    for grads in (True, False):
        with per_sample.capture(model, grads=grads), pytest.raises(RuntimeError, match=r"emb\.weight is used outside"):
            model(ids)                                                  # refused in the forward, before any backward
    with torch.no_grad(), per_sample.capture(model):                   # no graph, nothing to refuse
        model(ids)


@pytest.mark.parametrize("reentrant", [False, True])
@pytest.mark.parametrize("grads", [True, False])
def test_under_activation_checkpointing(reentrant, grads):
    """torch.utils.checkpoint: the non-reentrant form keeps the first forward's graph (the
    recomputation only refills saved tensors, its outputs are never backpropagated); the
    reentrant one runs the layers with grad off, then again inside backward, where the taps
    are set and fire. Both record what the plain forward does."""
    from torch.utils.checkpoint import checkpoint

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.checkpointed = nn.Linear(4, 5), nn.Linear(5, 3), False

        def forward(self, x):
            f = lambda t: torch.tanh(self.a(t))                        # noqa: E731
            return self.b(checkpoint(f, x, use_reentrant=reentrant) if self.checkpointed else f(x))

    torch.manual_seed(18)
    native = Net().to(DT)
    model = handgrad.convert(native)
    model.checkpointed = True                                          # the reference runs without (torch.func refuses it)
    x, y = _r(6, 4).requires_grad_(), _r(6, 3)                         # reentrant: an input needing grad, else torch gives a none
    ref = _reference(native, _sum_mse, (x.detach(),), y)
    norms = _captured(model, _sum_mse, (x,), y, grads=grads)
    ref_norms = torch.stack([g.flatten(1).square().sum(1) for g in ref.values()]).sum(0).sqrt()
    _close(norms, ref_norms, "norms")
    if grads:
        for k, p in model.named_parameters():
            _close(p.grad_sample, ref[k], k)


def test_norms_need_a_capture():
    model = handgrad.convert(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="never captured"):
        per_sample.norms(model)
    with per_sample.capture(model):
        pass
    with pytest.raises(RuntimeError, match="nothing was recorded"):
        per_sample.norms(model)


def test_hooks_removed_on_exit():
    model = handgrad.convert(nn.Sequential(nn.Linear(3, 2)))
    with per_sample.capture(model):
        pass
    model(torch.randn(2, 3)).sum().backward()
    assert not hasattr(model[0].weight, "grad_sample")


# --------------------------------------------------------------------------------------------
# refusals


def test_refuses_batch_norm_in_training():
    model = handgrad.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)))
    with pytest.raises(RuntimeError, match=r"1 \(BatchNorm2d\).*GroupNorm"):
        with per_sample.capture(model):
            pass
    model.eval()
    with per_sample.capture(model), pytest.raises(RuntimeError, match=r"1 \(BatchNorm2d\).*GroupNorm"):
        model.train()                                                  # switched inside the capture
        model(torch.randn(2, 1, 4, 4))


def test_refuses_a_native_parameterised_module():
    model = handgrad.convert(nn.Sequential(nn.Linear(3, 3), nn.Sequential(nn.Bilinear(3, 3, 2))), exclude=None)
    with pytest.raises(TypeError, match=r"1\.0 \(Bilinear\)"):
        with per_sample.capture(model):
            pass
    native = nn.Sequential(nn.Linear(3, 3))                            # not converted
    with pytest.raises(TypeError, match=r"0 \(Linear\).*handgrad.convert"):
        with per_sample.capture(native):
            pass
    native[0].requires_grad_(False)                                    # frozen: nothing to record, allowed
    with per_sample.capture(native):
        pass


# --------------------------------------------------------------------------------------------
# Opacus


def test_equals_opacus_grad_sample():
    opacus = pytest.importorskip("opacus")
    torch.manual_seed(15)
    for native, x, y in ((_CNN().to(DT), _r(4, 1, 8, 8), torch.randint(0, 3, (4,))),
                         (nn.Sequential(nn.Embedding(9, 6), nn.LayerNorm(6), nn.Linear(6, 9)).to(DT),
                          torch.randint(0, 9, (3, 5)), torch.randint(0, 9, (3, 5))),
                         (nn.Sequential(nn.Conv1d(3, 4, 3, padding=1, groups=1), nn.GroupNorm(2, 4), nn.Flatten(1),
                                        nn.Linear(4 * 6, 3)).to(DT), _r(5, 3, 6), torch.randint(0, 3, (5,)))):
        model = handgrad.convert(native)
        with per_sample.capture(model):
            _sum_ce(model(x), y).backward()
        gsm = opacus.GradSampleModule(copy.deepcopy(native), loss_reduction="sum")
        _sum_ce(gsm(x), y).backward()
        for (k, p), (_, q) in zip(model.named_parameters(), gsm._module.named_parameters()):
            _close(p.grad_sample, q.grad_sample, f"{k} vs opacus")


def test_refuses_a_gradient_no_rule_saw():
    class Bypass(nn.Module):                                           # runs its Linear's weight outside the Linear
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            return handgrad.functional.linear(x, self.lin.weight, self.lin.bias)

    model = handgrad.convert(Bypass())
    with pytest.raises(RuntimeError, match=r"lin\.weight, lin\.bias received a gradient"):
        with per_sample.capture(model):
            model(torch.randn(2, 3)).sum().backward()


@pytest.mark.skipif(not hasattr(nn, "LinearCrossEntropyLoss"), reason="torch < 2.13 has no LinearCrossEntropyLoss")
def test_refuses_the_fused_linear_cross_entropy():
    model = handgrad.convert(nn.ModuleDict({"body": nn.Linear(3, 4), "loss": nn.LinearCrossEntropyLoss(4, 5)}))
    with pytest.raises(RuntimeError, match=r"loss \(.*LinearCrossEntropyLoss\).*inside the fused loss"):
        with per_sample.capture(model):
            pass


def test_captures_do_not_nest():
    model = handgrad.convert(nn.Linear(2, 2))
    with per_sample.capture(model), pytest.raises(RuntimeError, match="already inside a capture"):
        with per_sample.capture(model):
            pass


@pytest.mark.parametrize("grads", [True, False])
def test_empty_batch(grads):
    model = handgrad.convert(nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(8, 2)))
    with per_sample.capture(model, grads=grads):
        model(torch.randn(0, 1, 4, 4)).sum().backward()
    assert per_sample.norms(model).shape == (0,)
    if grads:
        assert model[3].weight.grad_sample.shape == (0, 2, 8)
