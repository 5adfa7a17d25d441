"""The fused ops' own edge cases; the op contract itself (gradcheck, gradgradcheck, parity,
torch.func, autocast, bad inputs) runs from the registry (testing/cases/fused.py, test_ops.py)."""
from __future__ import annotations

import pytest

from handgrad import _compat
import torch
import torch.nn.functional as TF
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import handgrad.functional as F
from handgrad import catalogue
from handgrad.ops.linear_cross_entropy import default_chunk_size
from handgrad.testing import references
from handgrad.testing.registry import all_cases

D64 = torch.float64


def _params(sizes, bias=True, dtype=D64):
    ws = [torch.randn(o, i, dtype=dtype, requires_grad=True) for i, o in zip(sizes[:-1], sizes[1:])]
    bs = [torch.randn(o, dtype=dtype, requires_grad=True) if bias else None for o in sizes[1:]]
    return ws, bs


def test_every_activation_has_a_fused_case():
    """Every activation of the catalogue has a linear_act case and an mlp case in the registry."""
    names = {c.name for c in all_cases()}
    for act in catalogue.activations():
        assert f"linear_act[{act}]" in names and f"mlp[{act},last=None]" in names, act


def test_mlp_is_one_autograd_node():
    x = torch.randn(4, 3, dtype=D64)
    ws, bs = _params((3, 5, 5, 2))
    out = F.mlp(x, ws, bs)
    node = out.grad_fn
    assert "StackFn" in type(node).__name__
    # every parameter hangs directly off the one node (via AccumulateGrad)
    leaves = {id(fn.variable) for fn, _ in node.next_functions if fn is not None and hasattr(fn, "variable")}
    assert leaves == {id(t) for t in (*ws, *bs)}


@pytest.mark.parametrize("name", ["sigmoid", "relu", "gelu"])
def test_mlp_saves_no_more_than_native(name):
    """Bytes autograd keeps for backward: handgrad's one node ≤ the nn.Sequential chain's."""
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    ws, bs = _params((8, 32, 32, 4), dtype=torch.float32)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(seen.values())

    ours = saved_bytes(lambda: F.mlp(x, ws, bs, activation=name))
    native = saved_bytes(lambda: references.mlp(x, ws, bs, name, None))
    assert ours <= native, (ours, native)


def test_linear_act_sigmoid_saves_the_output_not_the_preactivation():
    x = torch.randn(5, 3, requires_grad=True)
    w, b = torch.randn(4, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        y = F.linear_act(x, w, b, "sigmoid")
    # X (for ∂L/∂W), W (for ∂L/∂X) and Y (for f'): one (5, 4) tensor, not Z as well
    assert sorted(s for s in shapes if s) == sorted([(5, 3), (4, 3), (5, 4)])
    assert y.shape == (5, 4)


def test_linear_act_relu_at_zero():
    """relu'(0) = 0, as torch: a row whose pre-activation is exactly 0 passes no gradient."""
    x = torch.zeros(2, 3, dtype=D64, requires_grad=True)
    w = torch.randn(4, 3, dtype=D64, requires_grad=True)
    b = torch.zeros(4, dtype=D64, requires_grad=True)
    ours = torch.autograd.grad(F.linear_act(x, w, b, "relu").sum(), (x, w, b))
    theirs = torch.autograd.grad(TF.relu(TF.linear(x, w, b)).sum(), (x, w, b))
    for a, t in zip(ours, theirs):
        torch.testing.assert_close(a, t)
    assert torch.all(ours[2] == 0)


def _grads(fn, inputs, g, create_graph):
    out = fn(*inputs)
    return torch.autograd.grad(out, inputs, g, create_graph=create_graph)


@pytest.mark.parametrize("name", ["sigmoid", "tanh", "gelu"])
def test_in_place_and_differentiable_backward_agree(name):
    """Grad mode off (the in-place fast path) and on (create_graph: out of place) give the same
    gradients, and the fast path leaves the incoming gradient untouched."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, dtype=D64, requires_grad=True)
    ws, bs = _params((3, 5, 4, 2))
    inputs = (x, *ws, *bs)

    def fn(x, w1, w2, w3, b1, b2, b3):
        return F.mlp(x, [w1, w2, w3], [b1, b2, b3], activation=name, last_activation="sigmoid")

    g = torch.randn(6, 2, dtype=D64)
    g_before = g.clone()
    fast = _grads(fn, inputs, g, False)
    assert torch.equal(g, g_before)
    slow = _grads(fn, inputs, g, True)
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=1e-14)  # float64: only rounding order may differ


@pytest.mark.parametrize("name", ["relu", "silu", "softplus"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradient_over_delta_in_row_blocks(name, dtype, monkeypatch):
    """The fast backward writes ∂L/∂X_{l−1} = Δ_l W_l over Δ_l's own buffer where D_{l−1} ≤ D_l
    (ops.fused._affine_vjp_over), a block of rows at a time: with blocks of 3 rows here (and a
    short last one), the gradients equal the torch composition's."""
    import handgrad.ops.fused as fused
    monkeypatch.setattr(fused, "_GX_BLOCK", 27)             # 27 // 9 = 3 rows per block (Δ: 99 elements > 27)
    torch.manual_seed(0)
    x = torch.randn(11, 5, dtype=dtype, requires_grad=True)
    ws, bs = _params((5, 6, 9, 9, 3))                       # layers 2, 3: D_in 6, 9 ≤ D_out 9
    ws, bs = [w.detach().to(dtype).requires_grad_() for w in ws], [b.detach().to(dtype).requires_grad_() for b in bs]
    g = torch.randn(11, 3, dtype=dtype)
    act = getattr(TF, name)

    def native(x):
        for l, (w, b) in enumerate(zip(ws, bs)):
            x = TF.linear(x, w, b)
            x = act(x) if l < len(ws) - 1 else x
        return x

    ours = torch.autograd.grad(F.mlp(x, ws, bs, activation=name), (x, *ws, *bs), g)
    ref = torch.autograd.grad(native(x), (x, *ws, *bs), g)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)                    # (torch's default tolerance for the dtype: rounding order)


def test_retain_graph_backward_twice_gives_the_same_gradients():
    """The in-place fast path writes only buffers it allocated, never saved tensors."""
    x = torch.randn(6, 3, dtype=D64, requires_grad=True)
    ws, bs = _params((3, 5, 2))
    out = F.mlp(x, ws, bs, activation="tanh", last_activation="sigmoid")
    first = torch.autograd.grad(out.sum(), (x, *ws), retain_graph=True)
    second = torch.autograd.grad(out.sum(), (x, *ws))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    w = torch.randn(7, 3, dtype=D64, requires_grad=True)
    t = torch.tensor([0, 3, -100, 6, 1, 2])
    loss = F.linear_cross_entropy(x, w, t, chunk_size=4)
    first = torch.autograd.grad(loss, (x, w), retain_graph=True)
    second = torch.autograd.grad(loss, (x, w))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_lce_gradient_handed_over_then_changed_in_place():
    """The forward's gradients are handed over on the first backward (no copy); a caller that
    then zeroes them in place and backpropagates again (retain_graph) gets the right values."""
    x, w, b, t = _lce_inputs()
    ref = torch.autograd.grad(TF.cross_entropy(TF.linear(x, w, b), t), (x, w, b))
    loss = F.linear_cross_entropy(x, w, t, linear_bias=b)
    first = torch.autograd.grad(loss, (x, w, b), retain_graph=True)
    for g in first:
        g.zero_()
    loss.backward(retain_graph=True)
    x.grad.zero_()
    loss.backward()
    torch.testing.assert_close(x.grad, ref[0])
    torch.testing.assert_close(w.grad, 2 * ref[1])


def test_hidden_outputs_do_not_leak():
    """mlp returns X_L only; its other outputs live on the node, not in the caller's hands."""
    x = torch.randn(2, 3)
    ws, bs = _params((3, 4, 5), dtype=torch.float32)
    out = F.mlp(x, ws, bs)
    assert isinstance(out, torch.Tensor) and out.shape == (2, 5)


def test_mlp_per_sample_gradients_with_vmap():
    """torch.func: vmap(grad(...)) over samples equals a loop over samples."""
    torch.manual_seed(0)
    x, y = torch.randn(5, 3, dtype=D64), torch.randn(5, 2, dtype=D64)
    ws, bs = _params((3, 4, 2))
    params = {f"w{i}": w.detach() for i, w in enumerate(ws)} | {f"b{i}": b.detach() for i, b in enumerate(bs)}

    def loss(p, xi, yi):
        out = F.mlp(xi, [p["w0"], p["w1"]], [p["b0"], p["b1"]], activation="tanh")
        return references.half_squared_error(out, yi)  # ½‖out − y‖²

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for n in range(5):
        one = torch.func.grad(loss)(params, x[n], y[n])
        for k in params:
            torch.testing.assert_close(batched[k][n], one[k])


# ---- linear_cross_entropy -------------------------------------------------------------------


def _lce_inputs(N=10, D=3, C=7, dtype=D64):
    torch.manual_seed(0)
    x = torch.randn(N, D, dtype=dtype, requires_grad=True)
    w = torch.randn(C, D, dtype=dtype, requires_grad=True)
    b = torch.randn(C, dtype=dtype, requires_grad=True)
    t = torch.randint(0, C, (N,))
    t[::4] = -100
    return x, w, b, t


@pytest.mark.parametrize("chunk_size", [1, 3, 10, 64, None])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lce_any_chunk_size_equals_unchunked(chunk_size, reduction):
    x, w, b, t = _lce_inputs()
    g = torch.rand(10, dtype=D64) if reduction == "none" else torch.tensor(1.7, dtype=D64)  # a non-unit incoming gradient
    ours = F.linear_cross_entropy(x, w, t, linear_bias=b, reduction=reduction, label_smoothing=0.1, chunk_size=chunk_size)
    theirs = TF.cross_entropy(TF.linear(x, w, b), t, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(ours, theirs)
    for a, c in zip(torch.autograd.grad(ours, (x, w, b), g), torch.autograd.grad(theirs, (x, w, b), g)):
        torch.testing.assert_close(a, c)


def test_lce_every_row_ignored():
    """As torch: 'mean' of no rows is nan, yet every gradient is 0 (not nan)."""
    x, w, b, _ = _lce_inputs()
    t = torch.full((10,), -100)
    ours = F.linear_cross_entropy(x, w, t, linear_bias=b)
    theirs = TF.cross_entropy(TF.linear(x, w, b), t)
    assert ours.isnan() and theirs.isnan()
    for a, c in zip(torch.autograd.grad(ours, (x, w, b)), torch.autograd.grad(theirs, (x, w, b))):
        assert torch.equal(a, c) and torch.all(a == 0)


def test_lce_custom_ignore_index_and_byte_target():
    x, w, b, t = _lce_inputs()
    t = t.clamp(min=0)
    t[1] = 5
    ours = F.linear_cross_entropy(x, w, t.to(torch.uint8), linear_bias=b, ignore_index=5)
    theirs = TF.cross_entropy(TF.linear(x, w, b), t, ignore_index=5)
    torch.testing.assert_close(ours, theirs)


class _Shapes(TorchDispatchMode):
    """Records every op's output sizes (numel), and how many matrix products ran."""

    def __init__(self):
        super().__init__()
        self.numels, self.matmuls = [], 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            self.matmuls += 1
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numels.append(t.numel())
        return out


def test_lce_never_materialises_the_logits():
    """No tensor of the forward or backward holds more than one chunk of logits."""
    N, D, C, chunk = 64, 3, 50, 8
    x, w, b, t = _lce_inputs(N, D, C)
    with _Shapes() as mode:
        loss = F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk)
        loss.backward()
    largest = max(chunk * C, N * D, C * D)   # a chunk's logits, ∂L/∂X, ∂L/∂W
    assert max(mode.numels) <= largest < N * C
    with _Shapes() as mode:
        TF.cross_entropy(TF.linear(x, w, b), t).backward()
    assert max(mode.numels) == N * C       # the test sees the (N, C) logits where they exist


def test_lce_gradients_in_forward_only_when_asked():
    """3 GEMMs per chunk when gradients are wanted (logits, ∂L/∂X, ∂L/∂W, none in backward);
    1 under no_grad (the loss alone)."""
    N, chunk = 40, 8
    x, w, b, t = _lce_inputs(N)
    with _Shapes() as mode:
        loss = F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk)
    assert mode.matmuls == 3 * (N // chunk)
    with _Shapes() as mode:
        loss.backward()
    assert mode.matmuls == 0
    with torch.no_grad(), _Shapes() as mode:
        F.linear_cross_entropy(x, w, t, linear_bias=b, chunk_size=chunk)
    assert mode.matmuls == N // chunk


def test_default_chunk_size():
    assert default_chunk_size(4096, 16384) == 128          # 2²¹ logits a chunk
    assert default_chunk_size(10, 16384) == 10             # never more rows than there are
    assert default_chunk_size(0, 7) == 1
    assert default_chunk_size(10**6, 10**8) == 1           # at least one row


# ---- torch.compile ----------------------------------------------------------------------------


def test_compile_fullgraph_matches_eager():
    """Dynamo traces the fused ops with no graph break (fullgraph=True); AOTAutograd's traced
    backward gives eager's gradients. aot_eager: the same graphs, no code generation (fast)."""
    if _compat.torch_version() < _compat.OLD_DYNAMO_LIMITS[0]:
        pytest.skip("linear_cross_entropy's backward calls another Function, which this torch's Dynamo "
                    "cannot trace (handgrad._compat.OLD_DYNAMO_LIMITS)")
    torch.manual_seed(0)
    x = torch.randn(8, 6)
    ws, bs = _params((6, 5, 3), dtype=torch.float32)
    w_lce = torch.randn(9, 6, requires_grad=True)
    t = torch.randint(0, 9, (8,))

    def step(x, w1, w2, b1, b2, w_lce):
        h = F.mlp(x, [w1, w2], [b1, b2], activation="tanh")
        a = F.linear_act(x, w1, b1, "relu")
        return h.square().sum() + a.sum() + F.linear_cross_entropy(x, w_lce, t, chunk_size=3)

    args = (x, *ws, *bs, w_lce)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_out = step(*args)
    eager = torch.autograd.grad(eager_out, args[1:])
    comp_out = compiled(*args)
    comp = torch.autograd.grad(comp_out, args[1:])
    # float32, the same ops in the same order: rounding may differ only by fusion (none here)
    torch.testing.assert_close(comp_out, eager_out)
    for a, b in zip(comp, eager):
        torch.testing.assert_close(a, b)


def test_mlp_equals_sequential_module():
    """handgrad.functional.mlp with an nn.Sequential's parameters gives its outputs and gradients."""
    torch.manual_seed(0)
    seq = references.sequential_mlp((4, 6, 3), last_activation="sigmoid", dtype=D64)
    x = torch.randn(5, 4, dtype=D64)
    lin = [m for m in seq if isinstance(m, nn.Linear)]
    ours = F.mlp(x, [m.weight for m in lin], [m.bias for m in lin], last_activation="sigmoid")
    theirs = seq(x)
    torch.testing.assert_close(ours, theirs)
    params = [p for m in lin for p in (m.weight, m.bias)]
    for a, b in zip(torch.autograd.grad(ours.sum(), params), torch.autograd.grad(theirs.sum(), params)):
        torch.testing.assert_close(a, b)


def test_output_changed_in_place_before_backward_is_refused():
    """The activations the fast backward reads are detached aliases of the outputs (dropped layer
    by layer); their shared version counter still refuses an output changed in place, as a
    saved tensor would be."""
    x = torch.randn(4, 3, requires_grad=True)
    ws, bs = _params((3, 5, 2), dtype=torch.float32)
    out = F.mlp(x, ws, bs, activation="tanh", last_activation="sigmoid")   # f_L' reads X_L
    out.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
