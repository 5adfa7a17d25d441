"""handgrad.nn: every module is torch.nn's twin (arguments, parameters, buffers, init, repr,
state_dict) and runs handgrad's math (values and gradients equal torch's, through a handgrad
Function)."""
from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
from torch import nn

import handgrad
import handgrad.functional as HF
import handgrad.nn as hnn
from handgrad import catalogue
from handgrad.testing import check_function, check_module, references
from handgrad.ops._function import HandFunction


def handgrad_nodes(t: torch.Tensor) -> list[str]:
    """Names of the handgrad Functions in ``t``'s autograd graph (proves handgrad's math ran)."""
    seen, stack, found = set(), [t.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        cls = getattr(node, "_forward_cls", None)
        if isinstance(cls, type) and issubclass(cls, HandFunction):
            found.append(cls.__name__)
        stack.extend(n for n, _ in node.next_functions)
    return found


def _x(*shape):
    return lambda: (torch.randn(*shape, dtype=torch.float64),)


def _xy(*shape):
    return lambda: (torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64))


def _logits_target(n=6, c=4):
    return lambda: (torch.randn(n, c, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0][:n]))


def _logprobs_target(n=6, c=4):
    return lambda: (torch.randn(n, c, dtype=torch.float64).log_softmax(-1), torch.tensor([0, 1, 2, 3, 1, 0][:n]))


def _x_target(n, d, c):
    return lambda: (torch.randn(n, d, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 1, 0][:n]) % c)


def _bce():
    return lambda: (torch.randn(5, 3, dtype=torch.float64), torch.rand(5, 3, dtype=torch.float64))


W4 = torch.tensor([1.0, 2.0, 0.5, 1.5], dtype=torch.float64)

# The modules come from the catalogue (every op with an nn twin and a torch.nn class); what the
# catalogue cannot say is how to build and call one: per op, (variant, constructor arguments,
# the forward's arguments (float64), tensor constructor arguments such as CrossEntropyLoss's weight).
# An activation without an entry gets the plain one; any other op without one fails
# test_every_twin_has_module_cases.
_PLAIN = ("", {}, _x(4, 5), {})
VARIANTS: dict[str, list[tuple[str, dict, Callable[[], tuple], dict]]] = {
    "linear": [("", dict(in_features=5, out_features=3), _x(4, 5), {}),
               ("nobias", dict(in_features=5, out_features=3, bias=False), _x(2, 4, 5), {})],
    "leaky_relu": [_PLAIN, ("slope", dict(negative_slope=0.2), _x(4, 5), {})],
    "elu": [_PLAIN, ("alpha", dict(alpha=0.7), _x(4, 5), {})],
    "gelu": [_PLAIN, ("tanh", dict(approximate="tanh"), _x(4, 5), {})],
    "softplus": [_PLAIN, ("beta-threshold", dict(beta=2.0, threshold=1.0), _x(4, 5), {})],
    "softmax": [("", dict(dim=1), _x(3, 4, 5), {})],
    "log_softmax": [("", dict(dim=-1), _x(3, 4, 5), {})],
    "layer_norm": [("", dict(normalized_shape=5), _x(4, 5), {}),
                   ("2d-noaffine", dict(normalized_shape=(3, 5), eps=1e-3, elementwise_affine=False), _x(2, 3, 5), {}),
                   ("nobias", dict(normalized_shape=5, bias=False), _x(4, 5), {})],
    "mse_loss": [("", {}, _xy(4, 5), {}), ("sum", dict(reduction="sum"), _xy(4, 5), {})],
    "cross_entropy": [("", {}, _logits_target(), {}),
                      ("options", dict(ignore_index=2, label_smoothing=0.1, reduction="sum"), _logits_target(),
                       dict(weight=W4))],
    "nll_loss": [("", dict(ignore_index=1), _logprobs_target(), dict(weight=W4))],
    "multi_head_attention_forward": [("", dict(embed_dim=4, num_heads=2), lambda: _x(3, 2, 4)() * 3, {}),
                                     ("batch-first-kdim", dict(embed_dim=4, num_heads=2, kdim=3, vdim=5,
                                                               batch_first=True),
                                      lambda: tuple(torch.randn(2, n, d, dtype=torch.float64)
                                                    for n, d in ((3, 4), (5, 3), (5, 5))), {})],
    "binary_cross_entropy_with_logits": [
        ("", {}, _bce(), {}),
        ("weights", dict(reduction="none"), _bce(), dict(weight=torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64),
                                                         pos_weight=torch.tensor([2.0, 1.0, 0.25], dtype=torch.float64)))],
    "batch_norm": [("", dict(num_features=3), _x(4, 3, 2, 2), {}),
                   ("no-running-stats", dict(num_features=3, affine=False, track_running_stats=False), _x(4, 3, 5, 2), {})],
    "group_norm": [("", dict(num_groups=2, num_channels=4), _x(3, 4, 5), {})],
    "rms_norm": [("", dict(normalized_shape=5), _x(4, 5), {}),
                 ("eps-noaffine", dict(normalized_shape=(3, 5), eps=1e-3, elementwise_affine=False), _x(2, 3, 5), {})],
    "embedding": [("", dict(num_embeddings=10, embedding_dim=3), lambda: (torch.tensor([[1, 2, 4], [9, 2, 0]]),), {}),
                  ("padding", dict(num_embeddings=10, embedding_dim=3, padding_idx=2),
                   lambda: (torch.tensor([[1, 2, 4], [9, 2, 0]]),), {})],
    "conv1d": [("", dict(in_channels=2, out_channels=3, kernel_size=3), _x(2, 2, 7), {}),
               ("reflect", dict(in_channels=2, out_channels=4, kernel_size=2, padding=1, padding_mode="reflect",
                                groups=2), _x(2, 2, 7), {})],
    "conv2d": [("", dict(in_channels=2, out_channels=3, kernel_size=3, stride=2, padding=1), _x(2, 2, 7, 6), {}),
               ("circular-nobias", dict(in_channels=2, out_channels=3, kernel_size=(2, 3), padding="same",
                                        padding_mode="circular", bias=False), _x(2, 2, 5, 6), {})],
    "max_pool2d": [("", dict(kernel_size=2), _x(2, 3, 6, 5), {}),
                   ("ceil-padding", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True), _x(2, 3, 6, 5), {})],
    "avg_pool2d": [("", dict(kernel_size=2), _x(2, 3, 6, 5), {}),
                   ("ceil-nopad-count", dict(kernel_size=3, stride=2, padding=1, ceil_mode=True,
                                             count_include_pad=False), _x(2, 3, 6, 5), {})],
    "adaptive_avg_pool2d": [("", dict(output_size=(2, 3)), _x(2, 3, 7, 5), {})],
    "linear_cross_entropy": [("", dict(in_features=5, num_classes=4), _x_target(6, 5, 4), {}),
                             ("bias-smoothing", dict(in_features=5, num_classes=4, bias=True, label_smoothing=0.1,
                                                     reduction="sum"), _x_target(6, 5, 4), {})],
}
# ops whose module cannot be compared call for call: their forward draws random numbers
RANDOM = {"dropout": "a random mask; tests/test_layers.py compares it with torch's under one seed"}
TWINNED = [op for op in catalogue.ops() if op.module is not None and op.torch_module is not None
           and op.name not in RANDOM]


@dataclass(frozen=True)
class ModuleCase:
    id: str
    op: catalogue.Op                # its twin and torch.nn class, and the functional it calls
    kwargs: dict
    make: Callable[[], tuple]       # the forward's arguments (float64)
    buffers: dict = field(default_factory=dict)  # tensor constructor arguments (CrossEntropyLoss weight, …)


def _variants(op):
    return VARIANTS.get(op.name, [_PLAIN] if op.kind == "activation" else [])


CASES = [ModuleCase(f"{op.module}{'-' + v if v else ''}", op, kw, make, buf)
         for op in TWINNED for v, kw, make, buf in _variants(op)]


def build(case: ModuleCase, lib, seed: int = 0, **extra):
    torch.manual_seed(seed)
    cls = case.op.twin if lib is hnn else case.op.torch_module
    return cls(**case.kwargs, **{k: v.clone() for k, v in case.buffers.items()}, **extra)


def test_every_twin_has_module_cases():
    """Each catalogue op with an nn twin and a torch.nn class is tested here (a new op needs a way
    to build and call its module, or it fails here)."""
    assert [op.name for op in TWINNED if not _variants(op)] == []
    assert not set(VARIANTS) - {op.name for op in TWINNED}, "entries for ops the catalogue gives no module pair"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_twin_of_torch_module(case):
    """Same seed, same arguments: same class hierarchy, names, shapes, values, buffers and repr."""
    ours, theirs = build(case, hnn), build(case, nn)
    assert isinstance(ours, type(theirs))
    assert repr(ours) == repr(theirs)
    assert [(n, p.shape, p.dtype) for n, p in ours.named_parameters()] == [(n, p.shape, p.dtype) for n, p in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    sd_ours, sd_theirs = ours.state_dict(), theirs.state_dict()
    assert list(sd_ours) == list(sd_theirs)
    for k in sd_ours:
        assert torch.equal(sd_ours[k], sd_theirs[k]), k  # identical init: same init calls, same order
    # reset_parameters re-runs torch's init: the same seed gives the same values again
    if hasattr(theirs, "reset_parameters"):
        torch.manual_seed(1)
        ours.reset_parameters()
        torch.manual_seed(1)
        theirs.reset_parameters()
        for (k, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
            assert torch.equal(a, b), k


@pytest.mark.parametrize("case", [c for c in CASES if build(c, nn).state_dict()], ids=lambda c: c.id)
def test_state_dict_loads_both_ways(case):
    ours, theirs = build(case, hnn, seed=0), build(case, nn, seed=1)
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(1.0)  # make the two differ
    theirs.load_state_dict(ours.state_dict())  # strict: same keys, same shapes
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
    fresh = build(case, hnn, seed=2)
    fresh.load_state_dict(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_forward_backward_match_torch(case, monkeypatch):
    """Outputs and the gradients of the inputs and every parameter equal torch.nn's in float64
    (handgrad.testing's reference check, its tolerances); the module called its handgrad
    functional once and the graph holds a handgrad Function, so it ran handgrad's math."""
    calls = []
    real = getattr(HF, case.op.name)
    monkeypatch.setattr(HF, case.op.name, lambda *a, **k: calls.append(1) or real(*a, **k))
    ours, theirs = build(case, hnn).double(), build(case, nn).double()  # the inputs are float64
    args = case.make()
    x = args[0].clone()
    y = ours(x.requires_grad_() if x.is_floating_point() else x, *args[1:])
    y = y[0] if isinstance(y, tuple) else y  # MultiheadAttention: (output, weights)
    assert calls == [1] and handgrad_nodes(y), "the module did not run a handgrad op"
    monkeypatch.undo()
    report = check_module(ours, *args, reference=theirs, checks=("reference", "needs_grad"), name=case.id)
    assert report.ok, report


@pytest.mark.parametrize("name", ["Linear", "LayerNorm"])
def test_factory_kwargs(name):
    args = (4, 3) if name == "Linear" else (4,)
    m = getattr(hnn, name)(*args, device="cpu", dtype=torch.float64)
    ref = getattr(nn, name)(*args, device="cpu", dtype=torch.float64)
    assert [(p.dtype, p.device) for p in m.parameters()] == [(p.dtype, p.device) for p in ref.parameters()]
    assert all(p.dtype == torch.float64 for p in m.parameters())


def test_inplace_activation_matches_torch():
    x = torch.randn(4, 5, dtype=torch.float64)
    a, b = x.clone(), x.clone()
    ya, yb = hnn.ReLU(inplace=True)(a), nn.ReLU(inplace=True)(b)
    assert torch.equal(ya, yb) and torch.equal(a, b)  # both wrote into their input


# --- HalfSquaredErrorLoss: the seed's cost, no torch twin -------------------------------------

@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_half_squared_error_loss(reduction):
    """C^n = ½‖x_n − y_n‖², summed, averaged or kept: the seed's loss (testing.references) in
    float64, through handgrad's Function."""
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    loss = hnn.HalfSquaredErrorLoss(reduction=reduction)
    assert handgrad_nodes(loss(x.requires_grad_(), y))
    reference = lambda input, target: references.half_squared_error(input, target, reduction)  # noqa: E731
    report = check_function(loss, x.detach(), y, reference=reference, checks=("reference", "needs_grad"))
    assert report.ok, report


def test_half_squared_error_loss_module():
    m = hnn.HalfSquaredErrorLoss()
    assert m.reduction == "sum" and repr(m) == "HalfSquaredErrorLoss(reduction='sum')"
    assert not list(m.parameters()) and not list(m.buffers()) and m.state_dict() == {}


# --- MLP: the seed's network ------------------------------------------------------------------

torch_mlp = references.sequential_mlp  # the torch twin of MLP, written once


@pytest.mark.parametrize("bias", [True, False])
def test_mlp_is_the_sequential(bias):
    sizes = (5, 7, 4, 3)
    torch.manual_seed(0)
    ours = hnn.MLP(sizes, bias=bias)
    torch.manual_seed(0)
    theirs = torch_mlp(sizes, bias=bias)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert list(ours.state_dict())[:4] == (["0.weight", "0.bias", "2.weight", "2.bias"] if bias else ["0.weight", "2.weight", "4.weight"])
    for k, v in ours.state_dict().items():
        assert torch.equal(v, theirs.state_dict()[k]), k  # same seed, same init order
    # parameters iterate W1, b1, W2, b2, …
    linears = [m for m in ours if isinstance(m, nn.Linear)]
    expected = [t for m in linears for t in ((m.weight, m.bias) if bias else (m.weight,))]
    assert len(list(ours.parameters())) == len(expected)
    assert all(p is q for p, q in zip(ours.parameters(), expected))
    assert [tuple(m.weight.shape) for m in linears] == [(7, 5), (4, 7), (3, 4)]
    # state_dicts load both ways
    theirs2 = torch_mlp(sizes, bias=bias)
    theirs2.load_state_dict(ours.state_dict())
    ours2 = hnn.MLP(sizes, bias=bias)
    ours2.load_state_dict(theirs.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(ours2.state_dict().values(), theirs.state_dict().values()))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("activation,last_activation,bias", [("sigmoid", None, True), ("tanh", "sigmoid", True), ("relu", None, False)])
def test_mlp_matches_torch(fused, activation, last_activation, bias):
    sizes = (5, 7, 4, 3)
    torch.manual_seed(0)
    ours = hnn.MLP(sizes, activation=activation, bias=bias, last_activation=last_activation, fused=fused, dtype=torch.float64)
    torch.manual_seed(0)
    theirs = torch_mlp(sizes, activation, bias, last_activation, dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    nodes = handgrad_nodes(ours(x.clone().requires_grad_()))
    assert nodes and (len(set(nodes)) == 1 if fused else "LinearFn" in nodes)  # fused: one op for the stack
    report = check_module(ours, x, reference=theirs, checks=("reference", "needs_grad"))
    assert report.ok, report


def test_mlp_fused_calls_functional_mlp(monkeypatch):
    calls = []

    def spy(input, weights, biases, activation="sigmoid", last_activation=None):
        calls.append((len(weights), len(biases), activation, last_activation))
        return torch.zeros(input.shape[0], weights[-1].shape[0])

    monkeypatch.setattr(HF, "mlp", spy, raising=False)
    x = torch.randn(2, 3)
    hnn.MLP((3, 4, 2), activation="tanh", last_activation="sigmoid")(x)
    assert calls == [(2, 2, "tanh", "sigmoid")]
    hnn.MLP((3, 4, 2), fused=False)(x)
    assert len(calls) == 1  # the unfused path runs layer by layer


def test_mlp_arguments():
    with pytest.raises(ValueError, match="activation"):
        hnn.MLP((3, 4, 2), activation="swish")
    with pytest.raises(ValueError, match="last_activation"):
        hnn.MLP((3, 4, 2), last_activation="swish")
    with pytest.raises(ValueError, match="sizes"):
        hnn.MLP((3,))
    m = hnn.MLP((3, 4, 2), activation="tanh", last_activation="sigmoid", dtype=torch.float64)
    assert [type(c).__name__ for c in m] == ["Linear", "Tanh", "Linear", "Sigmoid"]
    assert all(p.dtype == torch.float64 for p in m.parameters())
    assert "sizes=(3, 4, 2)" in repr(m)


def test_mlp_reverts_to_sequential():
    m = hnn.MLP((3, 4, 2), dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64)
    y = m(x)
    handgrad.revert(m)
    assert type(m) is nn.Sequential and [type(c) for c in m] == [nn.Linear, nn.Sigmoid, nn.Linear]
    torch.testing.assert_close(m(x), y, rtol=1e-12, atol=1e-12)  # float64, same math, other kernels


# --- copies -----------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: hnn.Linear(3, 2), lambda: hnn.LayerNorm(3), lambda: hnn.MLP((3, 4, 2)),
                                  lambda: hnn.CrossEntropyLoss(weight=torch.rand(3)), lambda: hnn.HalfSquaredErrorLoss("mean")],
                         ids=["Linear", "LayerNorm", "MLP", "CrossEntropyLoss", "HalfSquaredErrorLoss"])
def test_deepcopy_and_pickle(make):
    m = make()
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert type(twin) is type(m) and repr(twin) == repr(m)
        for (k, a), b in zip(m.state_dict().items(), twin.state_dict().values()):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), k
