"""Convolution and pooling edge cases, each named (the registry in handgrad/testing/cases/conv.py
runs the full op contract on representative shapes): the gradient graphs hold no native
convolution or pooling backward at any order; 'same' padding with even kernels; groups; ceil_mode
windows that start in the padding; max pool ties, -inf and NaN as torch; the returned indices;
the nn twins' padding modes, state_dicts and convert."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import handgrad
import handgrad.functional as F
import handgrad.nn as hnn
from test_nn import handgrad_nodes

# float64 on both sides: only the order of summation differs (assert_close's float64 defaults).
f64 = dict(dtype=torch.float64)
# torch warns that it pads a copy of the input for an even effective kernel: expected here
SAME_WARNING = "ignore:Using padding='same' with even kernel"


def _grads(fn, tensors, g=None, create_graph=False):
    out = fn(*tensors)
    g = torch.randn_like(out) if g is None else g
    return out, torch.autograd.grad(out, tensors, g, create_graph=create_graph), g


def assert_matches_torch(ours, theirs, *tensors):
    """Outputs and the gradients of every tensor equal torch's, for one random output gradient."""
    out, grads, g = _grads(ours, tensors)
    ref, ref_grads, _ = _grads(theirs, tensors, g)
    torch.testing.assert_close(out, ref, equal_nan=True)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, equal_nan=True)


def node_names(*roots: torch.Tensor) -> set[str]:
    """Every autograd node's class name reachable from ``roots``."""
    seen, stack = set(), [r.grad_fn for r in roots]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return {type(n).__name__ if getattr(n, "_forward_cls", None) is None else n._forward_cls.__name__ for n in seen}


NATIVE = ("Convolution", "MaxPool", "AvgPool", "AdaptiveAvgPool", "Im2Col", "Col2Im")


def native_layer_nodes(names) -> list[str]:
    """torch's own convolution / pooling backward nodes (ConvolutionBackward0, …) among ``names``."""
    return sorted(n for n in names if "Backward" in n and any(k in n for k in NATIVE))


@pytest.mark.filterwarnings(SAME_WARNING)
@pytest.mark.parametrize("options", [dict(), dict(stride=2, padding=1, dilation=2), dict(groups=3, padding="same")],
                         ids=["plain", "strided", "grouped-same"])
def test_conv_gradient_graphs_have_no_native_convolution(options):
    """First, second and third derivatives are made of ConvFn, ConvInputGradFn and ConvWeightGradFn."""
    x = torch.randn(2, 3, 7, 6, **f64, requires_grad=True)
    w = torch.randn(6, 1 if "groups" in options else 3, 3, 2, **f64, requires_grad=True)
    b = torch.randn(6, **f64, requires_grad=True)
    y = F.conv2d(x, w, b, **options)
    gx, gw = torch.autograd.grad(y.square().sum(), (x, w), create_graph=True)
    ggx, ggw = torch.autograd.grad((gx.square().sum() + gw.square().sum()), (x, w), create_graph=True)
    ggg = torch.autograd.grad(ggx.sum() + ggw.sum(), (x, w), create_graph=True)
    names = node_names(y, gx, gw, ggx, ggw, *ggg)
    assert {"ConvFn", "ConvInputGradFn", "ConvWeightGradFn"} <= names
    assert not native_layer_nodes(names), sorted(names)
    # the reference does build torch's own nodes: the walk would see them
    assert "ConvolutionBackward0" in node_names(TF.conv2d(x, w, b, **options))


@pytest.mark.parametrize("pool", [
    lambda x: F.max_pool2d(x, 3, 2, 1, ceil_mode=True), lambda x: F.avg_pool2d(x, 3, 2, 1, ceil_mode=True),
    lambda x: F.adaptive_avg_pool2d(x, (3, 4))], ids=["max", "avg", "adaptive"])
def test_pool_gradient_graphs_have_no_native_pooling(pool, request):
    kind = request.node.callspec.id
    x = torch.randn(2, 3, 7, 6, **f64, requires_grad=True)
    y = pool(x)
    gx, = torch.autograd.grad(y.square().sum(), x, create_graph=True)
    ggx, = torch.autograd.grad(gx.square().sum(), x, create_graph=True)
    names = node_names(y, gx, ggx)
    assert not native_layer_nodes(names), sorted(names)
    assert handgrad_nodes(y)
    assert native_layer_nodes(node_names(
        {"max": TF.max_pool2d(x, 2), "avg": TF.avg_pool2d(x, 2), "adaptive": TF.adaptive_avg_pool2d(x, 2)}[kind]))


# --- convolution --------------------------------------------------------------------------------


@pytest.mark.filterwarnings(SAME_WARNING)
@pytest.mark.parametrize("k,dilation", [((2, 4), 1), ((4, 2), (1, 3)), ((2, 3), 2), ((1, 6), 1)])
def test_same_padding_even_kernels(k, dilation):
    """'same': the output has the input's size; an odd total padding puts the extra at the end."""
    x = torch.randn(2, 3, 7, 6, **f64, requires_grad=True)
    w = torch.randn(4, 3, *k, **f64, requires_grad=True)
    assert F.conv2d(x, w, padding="same", dilation=dilation).shape[2:] == x.shape[2:]
    assert_matches_torch(lambda x, w: F.conv2d(x, w, padding="same", dilation=dilation),
                         lambda x, w: TF.conv2d(x, w, padding="same", dilation=dilation), x, w)


@pytest.mark.filterwarnings(SAME_WARNING)
def test_same_padding_conv1d_even_kernel():
    x, w = torch.randn(2, 3, 9, **f64, requires_grad=True), torch.randn(5, 3, 4, **f64, requires_grad=True)
    assert_matches_torch(lambda x, w: F.conv1d(x, w, padding="same"), lambda x, w: TF.conv1d(x, w, padding="same"), x, w)


@pytest.mark.parametrize("groups,C_in,C_out", [(1, 4, 6), (2, 4, 6), (4, 4, 4), (4, 4, 8)],
                         ids=["dense", "two-groups", "depthwise", "depthwise-multiplier"])
def test_groups(groups, C_in, C_out):
    x = torch.randn(3, C_in, 6, 5, **f64, requires_grad=True)
    w = torch.randn(C_out, C_in // groups, 3, 3, **f64, requires_grad=True)
    b = torch.randn(C_out, **f64, requires_grad=True)
    assert_matches_torch(lambda *t: F.conv2d(*t, stride=(2, 1), padding=1, groups=groups),
                         lambda *t: TF.conv2d(*t, stride=(2, 1), padding=1, groups=groups), x, w, b)


def test_strides_that_leave_rows_unread():
    """Input rows no window reaches (stride 3 over 8 rows with k = 2: rows 2 and 5) get zero gradient."""
    x = torch.randn(1, 2, 8, 8, **f64, requires_grad=True)
    w = torch.randn(3, 2, 2, 2, **f64, requires_grad=True)
    _, (gx, _), _ = _grads(lambda x, w: F.conv2d(x, w, stride=3), (x, w))
    assert gx[:, :, [2, 5]].abs().sum() == 0 and gx[:, :, :, [2, 5]].abs().sum() == 0
    assert gx[:, :, [0, 1, 3, 4, 6, 7]][:, :, :, [0, 1, 3, 4, 6, 7]].ne(0).all()
    assert_matches_torch(lambda x, w: F.conv2d(x, w, stride=3), lambda x, w: TF.conv2d(x, w, stride=3), x, w)


def test_unbatched_and_empty_batch():
    w = torch.randn(4, 3, 3, 3, **f64, requires_grad=True)
    for shape in ((3, 5, 6), (0, 3, 5, 6)):
        x = torch.randn(shape, **f64, requires_grad=True)
        assert_matches_torch(lambda x, w: F.conv2d(x, w, padding=1), lambda x, w: TF.conv2d(x, w, padding=1), x, w)


def test_conv_options_as_torch_spells_them():
    """Single-element tuples repeat; stride/dilation/padding as lists."""
    x, w = torch.randn(2, 3, 7, 6, **f64), torch.randn(4, 3, 3, 3, **f64)
    for kw in (dict(stride=(2,)), dict(padding=[1, 2]), dict(dilation=[2]), dict(padding="valid")):
        torch.testing.assert_close(F.conv2d(x, w, **kw), TF.conv2d(x, w, **kw))


# --- pooling ------------------------------------------------------------------------------------


SWEEP = [(H, k, s, p) for H, k, s, p in itertools.product((4, 5, 6, 7), (2, 3), (1, 2, 3), (0, 1)) if p <= k // 2]


@pytest.mark.parametrize("H,k,s,p", SWEEP, ids=lambda v: str(v))
def test_ceil_mode_windows(H, k, s, p):
    """ceil_mode adds a last window that may start in the end padding (then torch drops it) or be
    cut by it; the output sizes, values and gradients are torch's, max and average, both divisors."""
    x = torch.randn(2, 2, H, H + 1, **f64, requires_grad=True)
    for ceil in (False, True):
        assert_matches_torch(lambda x: F.max_pool2d(x, k, s, p, ceil_mode=ceil),
                             lambda x: TF.max_pool2d(x, k, s, p, ceil_mode=ceil), x)
        for inc in (False, True):
            assert_matches_torch(lambda x: F.avg_pool2d(x, k, s, p, ceil, inc),
                                 lambda x: TF.avg_pool2d(x, k, s, p, ceil, inc), x)


def test_max_pool_ties_follow_torch():
    """Equal values in a window: the index (and so the gradient) is torch's choice."""
    x = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.0, 1.0, 2.0, 2.0], [0.0, 3.0, 3.0, 3.0], [3.0, 0.0, 3.0, 3.0]], **f64)
    x = x.reshape(1, 1, 4, 4).repeat(2, 3, 1, 1).requires_grad_()
    for kw in (dict(kernel_size=2), dict(kernel_size=3, stride=1, padding=1), dict(kernel_size=2, stride=1, dilation=2)):
        y, idx = F.max_pool2d(x, return_indices=True, **kw)
        ref, ref_idx = TF.max_pool2d(x, return_indices=True, **kw)
        assert torch.equal(idx, ref_idx)
        assert_matches_torch(lambda x: F.max_pool2d(x, **kw), lambda x: TF.max_pool2d(x, **kw), x)


def test_max_pool_minus_inf_and_nan():
    """-inf everywhere in a window: torch's index; a NaN is its window's max and takes the gradient."""
    x = torch.randn(1, 2, 6, 6, **f64)
    x[0, 0, :2, :2] = -torch.inf
    x[0, 1, 2, 3] = torch.nan
    x[0, 1, 4:, 4:] = torch.inf
    x.requires_grad_()
    for kw in (dict(kernel_size=2), dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)):
        y, idx = F.max_pool2d(x, return_indices=True, **kw)
        ref, ref_idx = TF.max_pool2d(x, return_indices=True, **kw)
        assert torch.equal(idx, ref_idx)
        assert_matches_torch(lambda x: F.max_pool2d(x, **kw), lambda x: TF.max_pool2d(x, **kw), x)


def test_max_pool_return_indices():
    for shape in ((2, 3, 7, 6), (3, 7, 6), (0, 3, 7, 6)):
        x = torch.randn(shape, **f64)
        y, idx = F.max_pool2d(x, 3, 2, 1, return_indices=True)
        ref, ref_idx = TF.max_pool2d(x, 3, 2, 1, return_indices=True)
        assert idx.dtype == torch.int64 and torch.equal(idx, ref_idx) and torch.equal(y, ref)
        assert not idx.requires_grad
    # indices work with torch's own max_unpool2d, as torch's do
    x = torch.randn(2, 3, 6, 6, **f64)
    y, idx = F.max_pool2d(x, 2, return_indices=True)
    torch.testing.assert_close(TF.max_unpool2d(y, idx, 2), TF.max_unpool2d(*TF.max_pool2d(x, 2, return_indices=True), 2))


@pytest.mark.parametrize("H,out", [(7, 3), (6, 4), (5, 5), (4, 7), (9, 1), (1, 3)])
def test_adaptive_windows(H, out):
    """Windows [⌊iH/out⌋, ⌈(i+1)H/out⌉): overlapping (7 → 3), exact, larger than the input (4 → 7)."""
    x = torch.randn(2, 3, H, H + 2, **f64, requires_grad=True)
    assert_matches_torch(lambda x: F.adaptive_avg_pool2d(x, (out, None)),
                         lambda x: TF.adaptive_avg_pool2d(x, (out, None)), x)
    assert_matches_torch(lambda x: F.adaptive_avg_pool2d(x, out), lambda x: TF.adaptive_avg_pool2d(x, out), x)


def test_pools_unbatched_and_empty_batch():
    for shape in ((3, 7, 6), (0, 3, 7, 6)):
        x = torch.randn(shape, **f64, requires_grad=True)
        assert_matches_torch(lambda x: F.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2), x)
        assert_matches_torch(lambda x: F.avg_pool2d(x, 3, 2, 1), lambda x: TF.avg_pool2d(x, 3, 2, 1), x)
        assert_matches_torch(lambda x: F.adaptive_avg_pool2d(x, 2), lambda x: TF.adaptive_avg_pool2d(x, 2), x)


# --- modules ------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_module_padding_modes(padding_mode, dims):
    torch.manual_seed(1)
    cls, twin = (nn.Conv1d, hnn.Conv1d) if dims == 1 else (nn.Conv2d, hnn.Conv2d)
    kwargs = dict(kernel_size=3, stride=2, padding=2, dilation=1, groups=1, padding_mode=padding_mode, **f64)
    ref = cls(4, 6, **kwargs)
    ours = twin(4, 6, **kwargs)
    ours.load_state_dict(ref.state_dict())
    assert repr(ours) == repr(ref) and isinstance(ours, cls)
    x = torch.randn(2, 4, *(7,) * dims, **f64, requires_grad=True)
    out, ref_out = ours(x), ref(x)
    torch.testing.assert_close(out, ref_out)
    g = torch.randn_like(out)
    mine = torch.autograd.grad(out, (x, ours.weight, ours.bias), g)
    theirs = torch.autograd.grad(ref_out, (x, ref.weight, ref.bias), g)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a, b)
    assert "ConvFn" in handgrad_nodes(out)


def test_same_seed_same_init_and_state_dicts_both_ways():
    for cls in (nn.Conv1d, nn.Conv2d):
        torch.manual_seed(0)
        ref = cls(3, 4, 3, padding="same", bias=True)
        torch.manual_seed(0)
        ours = getattr(hnn, cls.__name__)(3, 4, 3, padding="same", bias=True)
        for (n, p), (m, q) in zip(ref.state_dict().items(), ours.state_dict().items()):
            assert n == m and torch.equal(p, q)
        ref.load_state_dict(ours.state_dict())


def test_pool_modules():
    x = torch.randn(2, 3, 9, 8, **f64, requires_grad=True)
    pairs = [(nn.MaxPool2d(3, 2, 1, ceil_mode=True), hnn.MaxPool2d(3, 2, 1, ceil_mode=True)),
             (nn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False),
              hnn.AvgPool2d(3, 2, 1, ceil_mode=True, count_include_pad=False)),
             (nn.AvgPool2d(2, divisor_override=3), hnn.AvgPool2d(2, divisor_override=3)),
             (nn.AdaptiveAvgPool2d((4, None)), hnn.AdaptiveAvgPool2d((4, None)))]
    for ref, ours in pairs:
        assert repr(ours) == repr(ref)
        assert_matches_torch(ours, ref, x)
    y, idx = hnn.MaxPool2d(2, return_indices=True)(x)
    assert torch.equal(idx, nn.MaxPool2d(2, return_indices=True)(x)[1])


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 2, padding="same", groups=2), nn.Tanh(), nn.AvgPool2d(2, ceil_mode=True),
            nn.Conv2d(6, 6, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        return self.body(x)


def test_convert_a_cnn():
    """Every conv and pool is swapped; float64 outputs and every parameter's gradient equal native."""
    model = TinyCNN().double()
    converted = handgrad.convert(model)
    assert dict(converted.handgrad_report.native) == {"Flatten": 1}
    x = torch.randn(3, 1, 9, 9, **f64)
    out, ref = converted(x), model(x)
    torch.testing.assert_close(out, ref)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (n, p), (_, q) in zip(converted.named_parameters(), model.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=n)
    assert {"ConvFn", "MaxPool2dFn", "AvgPool2dFn", "GlobalAvgPoolFn"} <= set(handgrad_nodes(out))
    assert not native_layer_nodes(node_names(out))
    handgrad.revert(converted)
    assert type(converted.body[0]) is nn.Conv2d and type(converted.body[2]) is nn.MaxPool2d


def test_compile_cnn_fullgraph():
    """Dynamo traces the converted CNN's forward and backward in one graph (aot_eager)."""
    torch._dynamo.reset()
    model = handgrad.convert(TinyCNN())
    x = torch.randn(2, 1, 9, 9)

    def step(x):
        return model(x).square().sum()

    def grads(loss):
        return torch.autograd.grad(loss, list(model.parameters()))

    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    ref_loss = step(x)
    grads, ref_grads = grads(loss), grads(ref_loss)
    # float32, compiled vs eager: the same kernels in the same order; a few ulps of reordering allowed
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("op", [
    lambda x, w: F.conv2d(x, w, stride=2, padding="valid"), lambda x, w: F.conv2d(x, w, padding="same", groups=3),
    lambda x, w: F.max_pool2d(F.conv2d(x, w), 2), lambda x, w: F.avg_pool2d(F.conv2d(x, w), 2, ceil_mode=True),
    lambda x, w: F.adaptive_avg_pool2d(F.conv2d(x, w), 3)], ids=["conv", "conv-same-groups", "max", "avg", "adaptive"])
def test_torch_func_hessian(op, request):
    """torch.func.hessian (forward over reverse through functorch) equals native's."""
    groups = 3 if "groups" in request.node.callspec.id else 1
    x, w = torch.randn(2, 3, 6, 5, **f64), torch.randn(3, 3 // groups, 3, 3, **f64)
    ref = {"conv": lambda x, w: TF.conv2d(x, w, stride=2, padding="valid"),
           "conv-same-groups": lambda x, w: TF.conv2d(x, w, padding="same", groups=3),
           "max": lambda x, w: TF.max_pool2d(TF.conv2d(x, w), 2),
           "avg": lambda x, w: TF.avg_pool2d(TF.conv2d(x, w), 2, ceil_mode=True),
           "adaptive": lambda x, w: TF.adaptive_avg_pool2d(TF.conv2d(x, w), 3)}[request.node.callspec.id]
    ours = torch.func.hessian(lambda x, w: op(x, w).tanh().sum(), argnums=(0, 1))(x, w)
    theirs = torch.func.hessian(lambda x, w: ref(x, w).tanh().sum(), argnums=(0, 1))(x, w)
    for a, b in zip(torch.utils._pytree.tree_leaves(ours), torch.utils._pytree.tree_leaves(theirs)):
        torch.testing.assert_close(a, b)


# the checks tests/test_ops.py does not run per case today (compile, vmap's batched and per-sample
# gradients, needs_grad branches, non-contiguous inputs), through handgrad-check's engine, on one
# case per op and the asymmetric-padding conv
ENGINE_CASES = ["conv2d", "conv2d[padding=same,even-kernel]", "conv1d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d"]


@pytest.mark.parametrize("name", ENGINE_CASES)
def test_engine_checks(name):
    from handgrad.testing.checks import check_case
    from handgrad.testing.registry import get_case

    report = check_case(get_case(name), checks=("vmap", "compile", "needs_grad", "noncontiguous"))
    assert report.ok, str(report)


def test_autocast_runs_pools_in_float32_and_convs_in_the_lower_dtype():
    """As torch: under CPU autocast a conv runs in bfloat16, the pools in the input's float32 (the
    pools' matrix products must not be autocast to bfloat16 inside the Function)."""
    x, w = torch.randn(2, 3, 8, 8, requires_grad=True), torch.randn(4, 3, 3, 3, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for ours, theirs in ((lambda x: F.avg_pool2d(x, 3, 2, 1), lambda x: TF.avg_pool2d(x, 3, 2, 1)),
                             (lambda x: F.adaptive_avg_pool2d(x, 3), lambda x: TF.adaptive_avg_pool2d(x, 3)),
                             (lambda x: F.max_pool2d(x, 2), lambda x: TF.max_pool2d(x, 2))):
            # float32 values: summation order only (a bfloat16 product would be off by ~1e-2)
            torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
        y = F.conv2d(x, w)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y, TF.conv2d(x, w), rtol=0, atol=0)  # the same bfloat16 kernel on the same values


class StdConv2d(nn.Conv2d):
    """A third-party conv whose math is its own ``_conv_forward`` (weight standardisation); it keeps
    torch's ``forward``, so convert swaps it."""

    def _conv_forward(self, input, weight, bias):
        w = (weight - weight.mean((1, 2, 3), keepdim=True)) / weight.std((1, 2, 3), keepdim=True)
        return TF.conv2d(input, w, bias, self.stride, self.padding, self.dilation, self.groups)


def test_converted_subclass_keeps_its_own_conv_forward():
    model = nn.Sequential(StdConv2d(2, 3, 3, padding=1), nn.Conv2d(3, 2, 1)).double()
    converted = handgrad.convert(model)
    x = torch.randn(2, 2, 5, 5, **f64)
    torch.testing.assert_close(converted(x), model(x))
    assert isinstance(converted[0], StdConv2d) and type(converted[1]) is hnn.Conv2d
