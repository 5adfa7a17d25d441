"""handgrad.enable(): inside the region every covered torch spelling runs handgrad's op (its
backward node is a handgrad Function's, its values and gradients torch's); everything else runs
torch's; the region is nestable, exception-safe, per thread, and composes with torch.compile
and torch.func."""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import cross_entropy, gelu, layer_norm  # bound before any region

import handgrad
from handgrad import _enable
from handgrad._enable import INTERCEPTED
from handgrad.testing import coverage, record_coverage
from handgrad.testing.coverage import is_handgrad_node
from torch.overrides import _get_current_function_mode_stack

# float64 on both sides: handgrad and torch differ only in rounding (summation order, ~1e-16
# per op); 1e-12 relative leaves room for the few ops chained in a call.
TOL = dict(rtol=1e-12, atol=1e-13)


def _x(*shape, grad=True):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=grad)


X, T, P = _x(4, 5), _x(4, 5, grad=False), torch.rand(4, 5, dtype=torch.float64)
Y = torch.tensor([0, 2, 1, 2])
W, B, W35 = _x(6, 5), _x(6), _x(3, 5)
W5, B5 = _x(5), _x(5)
IMG, W3, B3 = _x(2, 3, 6, 6), _x(3), _x(3)
RM, RV = torch.randn(3, dtype=torch.float64), torch.rand(3, dtype=torch.float64) + 0.5
SEQ, K1, K2 = _x(2, 3, 7), _x(4, 3, 2), _x(4, 3, 3, 3)
IDX, EMB = torch.tensor([[0, 3], [2, 3]]), _x(4, 5)
Q, KV = _x(2, 2, 5, 4), _x(2, 2, 3, 4)                            # (N, H, L, E), (N, H, S, E)
SRC, IPW, IPB, OPW, OPB = _x(3, 2, 6), _x(18, 6), _x(18), _x(6, 6), _x(6)   # MHA: (L, N, E), 2 heads

# every name enable() intercepts → one call of it (a new catalogue op needs one line here)
CALLS = {
    "torch.nn.functional.linear": lambda: F.linear(X, W, B),
    "torch.nn.functional.sigmoid": lambda: F.sigmoid(X),
    "torch.sigmoid": lambda: torch.sigmoid(X),
    "torch.Tensor.sigmoid": lambda: X.sigmoid(),
    "torch.nn.functional.tanh": lambda: F.tanh(X),
    "torch.tanh": lambda: torch.tanh(X),
    "torch.Tensor.tanh": lambda: X.tanh(),
    "torch.nn.functional.relu": lambda: F.relu(X),
    "torch.relu": lambda: torch.relu(X),
    "torch.Tensor.relu": lambda: X.relu(),
    "torch.nn.functional.leaky_relu": lambda: F.leaky_relu(X, 0.2),
    "torch.nn.functional.elu": lambda: F.elu(X, alpha=0.7),
    "torch.nn.functional.gelu": lambda: F.gelu(X, approximate="tanh"),
    "torch.nn.functional.silu": lambda: F.silu(X),
    "torch.nn.functional.softplus": lambda: F.softplus(X, 2.0),
    "torch.nn.functional.softmax": lambda: F.softmax(X, 1),
    "torch.softmax": lambda: torch.softmax(X, 1, torch.float64),
    "torch.Tensor.softmax": lambda: X.softmax(-1),
    "torch.nn.functional.log_softmax": lambda: F.log_softmax(X, dim=0),
    "torch.log_softmax": lambda: torch.log_softmax(X, dim=-1),
    "torch.Tensor.log_softmax": lambda: X.log_softmax(0),
    "torch.nn.functional.layer_norm": lambda: F.layer_norm(X, (5,), W5, B5),
    "torch.layer_norm": lambda: torch.layer_norm(X, [5], W5, B5, 1e-4, False),
    "torch.nn.functional.mse_loss": lambda: F.mse_loss(X, T),
    "torch.nn.functional.cross_entropy": lambda: F.cross_entropy(X, Y, label_smoothing=0.1),
    "torch.nn.functional.nll_loss": lambda: F.nll_loss(X, Y, reduction="sum"),
    "torch.nn.functional.binary_cross_entropy_with_logits": lambda: F.binary_cross_entropy_with_logits(X, P),
    "torch.nn.functional.linear_cross_entropy": lambda: F.linear_cross_entropy(X, W35, Y),
    "torch.nn.functional.batch_norm": lambda: F.batch_norm(IMG, RM.clone(), RV.clone(), W3, B3, True),
    "torch.batch_norm": lambda: torch.batch_norm(IMG, W3, B3, RM.clone(), RV.clone(), True, 0.1, 1e-5, False),
    "torch.nn.functional.group_norm": lambda: F.group_norm(IMG, 3, W3, B3),
    "torch.group_norm": lambda: torch.group_norm(IMG, 3, W3, B3, 1e-5, False),
    "torch.nn.functional.rms_norm": lambda: F.rms_norm(X, (5,), W5),
    "torch.rms_norm": lambda: torch.rms_norm(X, [5], W5, 1e-3),
    "torch.nn.functional.embedding": lambda: F.embedding(IDX, EMB, padding_idx=3),
    "torch.embedding": lambda: torch.embedding(EMB, IDX, 2),
    "torch.nn.functional.dropout": lambda: F.dropout(X, 0.5),
    "torch.dropout": lambda: torch.dropout(X, 0.5, True),
    "torch.nn.functional.conv1d": lambda: F.conv1d(SEQ, K1, None, 2, 1),
    "torch.conv1d": lambda: torch.conv1d(SEQ, K1, padding=1, dilation=2),
    "torch.nn.functional.conv2d": lambda: F.conv2d(IMG, K2, W3[:1].expand(4), stride=2, padding=1),
    "torch.conv2d": lambda: torch.conv2d(IMG, K2, padding="same"),
    "torch.nn.functional.max_pool2d": lambda: F.max_pool2d(IMG, 3, 2, 1, return_indices=True),
    "torch.max_pool2d": lambda: torch.max_pool2d(IMG, 2),
    "torch.nn.functional.max_pool2d_with_indices": lambda: F.max_pool2d_with_indices(IMG, 2, ceil_mode=True),
    "torch.nn.functional.avg_pool2d": lambda: F.avg_pool2d(IMG, 2, count_include_pad=False, padding=1),
    "torch.nn.functional.adaptive_avg_pool2d": lambda: F.adaptive_avg_pool2d(IMG, (2, 3)),
    "torch.nn.functional.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(Q, KV, KV, scale=0.7),
    "torch.nn.functional.multi_head_attention_forward": lambda: F.multi_head_attention_forward(
        SRC, SRC, SRC, 6, 2, IPW, IPB, None, None, False, 0.0, OPW, OPB, training=False, need_weights=False)[0],
    "torch.mean": lambda: torch.mean(X, 1, True),
    "torch.Tensor.mean": lambda: X.mean(dim=(0, -1)),
    "torch.mul": lambda: torch.mul(X, W5),
    "torch.Tensor.mul": lambda: 0.5 * (X * B5),                   # the operators reach the mode as Tensor.mul
}
RANDOM = {"torch.nn.functional.dropout", "torch.dropout"}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _producer(node):
    """The node that computed a tensor, past the views on top of it (MHA's output is reshaped)."""
    while node is not None and type(node).__name__.startswith(("ViewBackward", "TransposeBackward")):
        node = node.next_functions[0][0]
    return node


def _grads(out):
    leaves = [t for t in (X, W, B, W35, W5, B5, IMG, W3, B3, SEQ, K1, K2, EMB, Q, KV, SRC, IPW, IPB, OPW, OPB)]
    g = torch.ones_like(out) + torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape) / out.numel()
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return [x for x in grads if x is not None]


def test_every_intercepted_name_has_a_call():
    assert set(CALLS) == set(INTERCEPTED)
    assert len(INTERCEPTED) >= len(_enable._ROUTES)  # every route has a name a user writes


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_spelling_runs_handgrad(name):
    call = CALLS[name]
    with handgrad.enable():
        out = call()
    hand = _first(out)
    assert is_handgrad_node(_producer(hand.grad_fn)), f"{name}: {type(hand.grad_fn).__name__}"
    if name in RANDOM:  # a fresh mask: each element is dropped or scaled by 1/(1-p)
        assert torch.all((hand == 0) | torch.isclose(hand, 2 * X))
        return
    ref = _first(call())
    assert not is_handgrad_node(_producer(ref.grad_fn))
    torch.testing.assert_close(hand, ref, **TOL)
    if isinstance(out, tuple):
        torch.testing.assert_close(out[1], call()[1], rtol=0, atol=0)  # max_pool2d's indices
    for g, r in zip(_grads(hand), _grads(ref), strict=True):
        torch.testing.assert_close(g, r, **TOL, msg=name)


class Net(nn.Module):
    """Functions called inside forward, each spelled differently; F's names bound at import."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 5)
        self.gain = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x, y):
        h = layer_norm(gelu(self.fc1(x)), (8,), self.gain)
        h = self.fc2(torch.sigmoid(h)).softmax(-1)
        return cross_entropy(h, y)


def test_functions_in_forward_are_handgrad():
    model = Net().double()
    x, y = _x(7, 6, grad=False), torch.tensor([0, 1, 4, 3, 2, 1, 0])
    ref = model(x, y)
    with record_coverage(model) as cov, handgrad.enable():
        loss = model(x, y)
    report = cov.report(loss)
    assert report.fully_handgrad and report.percent == 100.0, report
    assert not coverage(ref, model).handgrad_parameters
    seen, stack, kinds = set(), [loss.grad_fn], []
    while stack:  # every node but the leaves' AccumulateGrad is a handgrad Function's
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.append(type(node).__name__)
        assert is_handgrad_node(node) or type(node).__name__ == "AccumulateGrad", type(node).__name__
        stack.extend(n for n, _ in node.next_functions)
    assert kinds.count("LinearFnBackward") == 2 and "CrossEntropyFnBackward" in kinds
    torch.testing.assert_close(loss, ref, **TOL)
    for g, r in zip(torch.autograd.grad(loss, list(model.parameters())),
                    torch.autograd.grad(ref, list(model.parameters()))):
        torch.testing.assert_close(g, r, **TOL)


def test_backward_inside_or_outside_the_region():
    model = Net().double()
    x, y = _x(5, 6), torch.tensor([0, 1, 4, 3, 2])
    grads = []
    for inside in (True, False):
        with handgrad.enable():
            loss = model(x, y)
            if inside:
                grads.append(torch.autograd.grad(loss, [x, *model.parameters()], create_graph=True))
        if not inside:
            grads.append(torch.autograd.grad(loss, [x, *model.parameters()], create_graph=True))
    native = torch.autograd.grad(model(x, y), [x, *model.parameters()], create_graph=True)
    for a, b, c in zip(*grads, native):
        torch.testing.assert_close(a, c, **TOL)
        torch.testing.assert_close(b, c, **TOL)
    # second order through the handgrad backward, taken inside the region
    with handgrad.enable():
        (gg,) = torch.autograd.grad(grads[0][0].square().sum(), x)
    (ref,) = torch.autograd.grad(native[0].square().sum(), x)
    torch.testing.assert_close(gg, ref, **TOL)


def test_handgrad_ops_do_not_recurse(monkeypatch):
    routed = []
    for func, (fn, adapter) in list(_enable._ROUTES.items()):
        def counting(*a, _fn=fn, _name=getattr(func, "__name__", func), **k):
            routed.append(_name)
            return _fn(*a, **k)
        monkeypatch.setitem(_enable._ROUTES, func, (counting, adapter))
    with handgrad.enable():
        F.silu(X)                   # handgrad's silu is built from torch ops: none is routed
        F.cross_entropy(X, Y)       # (its log-softmax inside is handgrad's own, not re-routed)
        F.gelu(X, approximate="tanh")
    assert routed == ["silu", "cross_entropy", "gelu"]
    # nor do their backward formulas (silu's f' calls torch.sigmoid): a backward started in the
    # region runs with the mode popped
    with handgrad.enable():
        y = F.silu(X)
        routed.clear()
        (g,) = torch.autograd.grad(y.sum(), X, create_graph=True)
        g.sum().backward(inputs=[X])
    assert routed == [] and X.grad is not None
    X.grad = None


class Marked(torch.Tensor):
    """A tensor subclass with its own __torch_function__ (torch.Tensor's)."""


def test_what_handgrad_does_not_take_falls_through():
    with handgrad.enable():
        ints = torch.relu(torch.tensor([-1, 2]))              # no floating-point argument
        out = torch.empty(4, 5, dtype=torch.float64)
        torch.sigmoid(X.detach(), out=out)                    # out=
        added = torch.add(X, X)                               # not covered
        marked = torch.sigmoid(X.detach().as_subclass(Marked).requires_grad_())
        keyword = X.softmax(dim=-1, dtype=torch.float64)       # (routed: keywords bind to the adapter)
    assert torch.equal(ints, torch.tensor([0, 2]))
    torch.testing.assert_close(out, torch.sigmoid(X).detach(), rtol=0, atol=0)
    assert type(added.grad_fn).__name__ == "AddBackward0"
    assert type(marked).__name__ == "Marked"  # torch wraps the result in an alias of the subclass
    assert type(marked.grad_fn.next_functions[0][0]).__name__ == "SigmoidBackward0"
    assert is_handgrad_node(keyword.grad_fn)


@pytest.mark.parametrize("spelling", ["F.embedding", "torch.embedding"])
def test_sparse_embedding_is_handgrads(spelling):
    """sparse=True embeddings are routed (handgrad's embedding takes the option): the node is
    handgrad's and ∂L/∂W is the uncoalesced COO tensor torch's own call gives, the same values
    (a scatter of the same rows: exact), padding_idx's row left out."""
    idx = torch.tensor([[0, 3, 1], [2, 3, 3]])
    G = _x(2, 3, 5).detach()

    def call():
        if spelling == "F.embedding":
            return F.embedding(idx, EMB, padding_idx=1, sparse=True)
        return torch.embedding(EMB, idx, 1, False, True)  # (weight, indices, padding_idx, scale_grad_by_freq, sparse)
    expected = call()
    (expected * G).sum().backward()
    ref, EMB.grad = EMB.grad, None
    with handgrad.enable():
        out = call()
    assert is_handgrad_node(out.grad_fn)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    (out * G).sum().backward()
    got, EMB.grad = EMB.grad, None
    assert got.is_sparse and got.layout == ref.layout and got.shape == ref.shape
    torch.testing.assert_close(got.to_dense(), ref.to_dense(), rtol=0, atol=0)


def test_products_and_means_that_record_nothing_are_torchs():
    """Where no graph can come out of a call (no_grad, no input requiring grad: the products inside
    handgrad's own forward passes), mean and mul run torch's call, whose values MulFn/MeanFn's
    forward reproduces; integer operands are torch's throughout."""
    x = X.detach()
    with handgrad.enable():
        with torch.no_grad():
            a, m = X * W5, X.mean(1)
        b, n = x * 0.5, torch.mean(x, 0)
        ints, int_mean = torch.arange(3) * 2, torch.arange(4).mean(dtype=torch.float32)
        scaled, averaged = X * 0.5, X.mean()                          # these do record: handgrad's
    assert a.grad_fn is None and m.grad_fn is None and b.grad_fn is None and n.grad_fn is None
    torch.testing.assert_close(b, x * 0.5, rtol=0, atol=0)
    torch.testing.assert_close(n, x.mean(0), rtol=0, atol=0)
    assert ints.dtype == torch.int64 and torch.equal(ints, torch.tensor([0, 2, 4])) and int_mean.item() == 1.5
    assert is_handgrad_node(scaled.grad_fn) and is_handgrad_node(averaged.grad_fn)
    torch.testing.assert_close(scaled, X * 0.5, rtol=0, atol=0)
    with handgrad.enable(), torch.autograd.forward_ad.dual_level():   # a tangent: handgrad's jvp
        dual = torch.autograd.forward_ad.make_dual(x, torch.ones_like(x))
        tangent = torch.autograd.forward_ad.unpack_dual(dual * 3.0).tangent
    torch.testing.assert_close(tangent, torch.full_like(x, 3.0), rtol=0, atol=0)


def _active():
    return [type(m).__name__ for m in _get_current_function_mode_stack()]


@handgrad.enable()
def decorated(x):
    return torch.tanh(x)


def test_decorator_nesting_and_exceptions():
    assert is_handgrad_node(decorated(X).grad_fn) and not _active()
    with handgrad.enable():
        with handgrad.enable():
            assert _active() == ["_HandgradMode"]       # nested regions are one
            assert is_handgrad_node(decorated(X).grad_fn)
        assert is_handgrad_node(torch.tanh(X).grad_fn)  # the inner exit leaves the outer region on
    assert not _active() and not is_handgrad_node(torch.tanh(X).grad_fn)
    region = handgrad.enable()
    with pytest.raises(ZeroDivisionError):
        with region:
            1 / 0
    assert not _active()
    with region:                                        # the same object enters again
        assert is_handgrad_node(torch.tanh(X).grad_fn)

    @handgrad.enable()
    def fails():
        raise KeyError("x")
    with pytest.raises(KeyError):
        fails()
    assert not _active() and not is_handgrad_node(torch.tanh(X).grad_fn)


def test_other_threads_are_unaffected():
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def other():
        inside.wait()
        seen["other"] = type(torch.sigmoid(X).grad_fn).__name__
        done.set()

    t = threading.Thread(target=other)
    t.start()
    with handgrad.enable():
        inside.set()
        done.wait(10)           # the other thread ran while this one was in the region
        seen["main"] = is_handgrad_node(torch.sigmoid(X).grad_fn)
    t.join()
    assert seen == {"other": "SigmoidBackward0", "main": True}
    # one decorated function on two threads at once: each call is its own region
    barrier, results = threading.Barrier(2), []

    @handgrad.enable()
    def work():
        barrier.wait(10)
        results.append(is_handgrad_node(torch.tanh(X).grad_fn))
        barrier.wait(10)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == [True, True] and not _active()


def _recording_backend(graphs):
    def backend(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward
    return backend


def test_compile_inside_and_outside():
    torch._dynamo.reset()
    graphs = []

    def inside(x):
        with handgrad.enable():
            return torch.sigmoid(x).sum()

    x = _x(5)
    compiled = torch.compile(inside, fullgraph=True, backend=_recording_backend(graphs))
    (g,) = torch.autograd.grad(compiled(x), x)
    assert len(graphs) == 1 and "autograd_function_apply" in graphs[0]  # handgrad's Function, traced
    s = torch.sigmoid(x)
    torch.testing.assert_close(g, s * (1 - s), **TOL)

    def plain(x):
        return torch.tanh(x).sum()

    graphs.clear()
    compiled = torch.compile(plain, fullgraph=True, backend=_recording_backend(graphs))
    compiled(x)
    with handgrad.enable():
        (g,) = torch.autograd.grad(compiled(x), x)      # the mode is guarded on: a new graph
    assert len(graphs) == 2 and "autograd_function_apply" not in graphs[0] and "autograd_function_apply" in graphs[1]
    torch.testing.assert_close(g, 1 - torch.tanh(x) ** 2, **TOL)
    torch._dynamo.reset()


def test_torch_func():
    def f(x):
        with handgrad.enable():
            return F.softmax(torch.tanh(x), -1)

    xs = _x(3, 4, grad=False)
    torch.testing.assert_close(torch.func.vmap(f)(xs), F.softmax(torch.tanh(xs), -1), **TOL)
    ref = torch.func.jacrev(lambda x: F.softmax(torch.tanh(x), -1))(xs[0])
    torch.testing.assert_close(torch.func.jacrev(f)(xs[0]), ref, **TOL)
    with handgrad.enable():                              # the region around the transform
        torch.testing.assert_close(torch.func.jacrev(lambda x: F.softmax(torch.tanh(x), -1))(xs[0]), ref, **TOL)
        g = torch.func.grad(lambda x: F.gelu(x).sum())(xs[0])
    torch.testing.assert_close(g, torch.func.grad(lambda x: F.gelu(x).sum())(xs[0]), **TOL)
