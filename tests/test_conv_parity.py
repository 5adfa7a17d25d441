"""Convolution parity with torch where the fuzzer found it missing (issue 13), and the pools' and
convs' size-dependent evaluations against the general ones: complex convolutions (conjugate-Wirtinger
gradients), inputs with no batch or no channels under options torch's kernels would refuse, float16
/ bfloat16 sums past float32's range, the accuracy of tiny grouped weight gradients, average pooling
whose windows tile the input."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as TF

import handgrad.functional as F
from test_conv_pool import assert_matches_torch

c128 = dict(dtype=torch.complex128)
CASES = [  # (functional name, input shape, weight shape, options)
    ("conv1d", (2, 4, 9), (6, 2, 3), dict(stride=2, groups=2, padding=1)),
    ("conv2d", (2, 2, 6, 5), (3, 2, 3, 2), dict(padding="same")),
    ("conv2d", (3, 2, 7, 4), (2, 2, 3, 4), dict(dilation=(2, 1))),
]


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("name, x_shape, w_shape, options", CASES)
def test_complex_matches_torch_and_gradcheck(name, x_shape, w_shape, options):
    """torch convolves complex tensors (three real products, Gauss's); its gradient is the adjoint,
    the conjugated coefficient's: gradcheck (Wirtinger) and gradgradcheck hold, and values equal torch's."""
    ours, theirs = getattr(F, name), getattr(TF, name)
    x = torch.randn(*x_shape, **c128, requires_grad=True)
    w = torch.randn(*w_shape, **c128, requires_grad=True)
    b = torch.randn(w_shape[0], **c128, requires_grad=True)
    assert_matches_torch(lambda x, w, b: ours(x, w, b, **options), lambda x, w, b: theirs(x, w, b, **options), x, w, b)
    assert torch.autograd.gradcheck(lambda x, w, b: ours(x, w, b, **options), (x, w, b))
    assert torch.autograd.gradgradcheck(lambda x, w, b: ours(x, w, b, **options), (x, w, b))


def test_complex64_forward_is_torchs():
    """complex64: the same three float32 products as torch's, so the same roundings."""
    x, w = torch.randn(7, 3, 3, 6, dtype=torch.complex64), torch.randn(3, 1, 2, 5, dtype=torch.complex64)
    torch.testing.assert_close(F.conv2d(x, w, groups=3), TF.conv2d(x, w, groups=3), rtol=0, atol=0)


@pytest.mark.parametrize("x, w, options", [
    (torch.randn(0, 2, 7), torch.randn(3, 2, 5), dict(dilation=0)),                       # dilation 0
    (torch.randn(0, 2, 7, dtype=torch.bfloat16), torch.randn(3, 2, 5), {}),                # mixed dtypes
    (torch.zeros(0, 2, 7, dtype=torch.long), torch.zeros(3, 2, 5), {}),                    # int input
    (torch.ones(0, 3, 3, 4).bool(), torch.ones(6, 1, 1, 4).bool(), dict(padding=(2, 1), groups=3)),
    (torch.zeros(2, 0, 7), torch.zeros(3, 0, 5), dict(dilation=0)),                        # no channels
    (torch.randn(0, 2, 7), torch.randn(3, 2, 5), dict(stride=3, dilation=0)),
])
def test_no_batch_or_channels_as_torch(x, w, options):
    """torch's Empty backend: accepted where its kernels would refuse; the same shape and dtype."""
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    ref = (TF.conv1d if x.dim() == 3 else TF.conv2d)(x, w, **options)
    out = conv(x, w, **options)
    assert out.shape == ref.shape and out.dtype == ref.dtype


@pytest.mark.parametrize("call", [
    lambda f: f.conv1d(torch.randn(0, 2, 7), torch.randn(3, 2, 5), torch.randn(3, dtype=torch.float64)),
    lambda f: f.conv1d(torch.randn(0, 2, 7, dtype=torch.complex64), torch.randn(3, 2, 5)),
    lambda f: f.conv1d(torch.randn(1, 2, 7), torch.randn(3, 2, 5), dilation=0),
    lambda f: f.conv1d(torch.randn(0, 2, 7), torch.randn(3, 2, 5), dilation=-1),
])
def test_refused_as_torch(call):
    with pytest.raises(RuntimeError):
        call(TF)
    with pytest.raises(RuntimeError):
        call(F)


def test_bool_input_refused_before_the_weight_dtype():
    # torch 2.13: NotImplementedError (the bool input); torch 2.4: RuntimeError from its kernel
    x, w = torch.ones(2, 1, 5).bool(), torch.randn(2, 1, 4, dtype=torch.float64)
    with pytest.raises((NotImplementedError, RuntimeError)) as theirs:
        TF.conv1d(x, w)
    with pytest.raises(theirs.type):
        F.conv1d(x, w)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_lowp_sum_past_float32_range(dtype):
    """3e38 + 3e38 − 3e38 is inf in float32 (bfloat16's max is 3.4e38), where the float64 sum,
    rounded once, is the truth: 3e38 (float16: the same sum at 6e4 stays in float32's range)."""
    big = 3e38 if dtype == torch.bfloat16 else 6e4
    x = torch.tensor([[[big, big, -big]]], dtype=torch.float64)
    w = torch.ones(1, 1, 3, dtype=torch.float64)
    truth = TF.conv1d(x, w).to(dtype)
    torch.testing.assert_close(F.conv1d(x.to(dtype), w.to(dtype)), truth)


@pytest.mark.parametrize("x_shape, w_shape, padding, groups", [
    ((3, 3, 9, 9), (6, 1, 5, 5), 2, 3),       # tiny: the batched GEMM's order
    ((7, 4, 11, 8), (6, 2, 7, 7), 3, 2),      # small: oneDNN's forward kernel over the batch (seed 3)
])
def test_tiny_grouped_weight_gradient_at_most_torchs_error(x_shape, w_shape, padding, groups):
    """The fuzzer's finds: float32 ∂L/∂W of a grouped conv erred past torch's error against float64
    (up to 2.4× on the tiny one); summed in float64 it is within torch's."""
    worst = 0.0
    for seed in range(20):
        gen = torch.Generator().manual_seed(seed)
        x, w = torch.randn(*x_shape, generator=gen, **f64()), torch.randn(*w_shape, generator=gen, **f64())
        g = torch.randn(x_shape[0], w_shape[0], *x_shape[2:], generator=gen, **f64())

        def grad_w(conv, dt):
            ww = w.to(dt).requires_grad_()
            return torch.autograd.grad(conv(x.to(dt), ww, padding=padding, groups=groups), ww, g.to(dt))[0].double()

        truth = grad_w(TF.conv2d, torch.float64)
        ours = (grad_w(F.conv2d, torch.float32) - truth).abs().max()
        theirs = (grad_w(TF.conv2d, torch.float32) - truth).abs().max()
        worst = max(worst, float(ours / theirs))
    assert worst <= 1.25, worst


def f64():
    return dict(dtype=torch.float64)


@pytest.mark.parametrize("options", [dict(kernel_size=2), dict(kernel_size=(2, 3), divisor_override=5),
                                     dict(kernel_size=3, stride=2, padding=1)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_avg_pool_fast_backward_is_the_differentiable_one(options, dtype):
    """Where the windows tile X, the first-order backward repeats G (one pass); it equals A_hᵀ G A_w,
    the differentiable path (create_graph=True), and (float64) torch's gradient."""
    x = torch.randn(2, 3, 8, 12, dtype=dtype, requires_grad=True)
    y = F.avg_pool2d(x, **options)
    g = torch.randn_like(y)
    fast, = torch.autograd.grad(y, x, g, retain_graph=True)
    slow, = torch.autograd.grad(y, x, g, create_graph=True)
    torch.testing.assert_close(fast, slow.detach())
    if dtype == torch.float64:     # (bfloat16: torch rounds its sums otherwise, near-zero entries differ)
        ref, = torch.autograd.grad(TF.avg_pool2d(x, **options), x, g)
        torch.testing.assert_close(fast, ref)


@pytest.mark.parametrize("shape, kernel", [((2, 4, 8, 8), 3), ((16, 3, 32, 32), 3), ((4, 8, 6, 6), 1)])
def test_size_dependent_evaluations_agree(shape, kernel):
    """Tiny convs take aten's im2col kernels, RGB stems and 1×1s the unfolded weight gradient, the
    rest oneDNN's forward primitive on swapped operands: in float64 each equals torch to rounding."""
    x = torch.randn(*shape, **f64(), requires_grad=True)
    w = torch.randn(5, shape[1], kernel, kernel, **f64(), requires_grad=True)
    assert_matches_torch(lambda x, w: F.conv2d(x, w, padding=kernel // 2), lambda x, w: TF.conv2d(x, w, padding=kernel // 2),
                         x, w)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")
@pytest.mark.parametrize("shape, kernel, options", [
    ((3, 16, 300), 3, dict(padding=1)),
    ((2, 16, 700), 4, dict(padding="same")),                          # asymmetric padding (1, 2)
    ((3, 24, 500), 3, dict(stride=3, dilation=2, padding=2)),         # rows no window reaches
    ((8, 16, 130), 5, dict(stride=2)),
])
def test_conv1d_weight_gradient_past_the_tiny_bound(shape, kernel, options):
    """A 1-D weight gradient past the tiny bound with C_in·K > C_out: the convolution over the
    batch (lifted to 2-D, G channels-last). Float64: the values equal torch's to rounding, at first
    and second order (the second order runs ConvWeightGradFn's forward)."""
    x = torch.randn(*shape, **f64(), requires_grad=True)
    w = torch.randn(5, shape[1], kernel, **f64(), requires_grad=True)
    ours, theirs = (lambda x, w: F.conv1d(x, w, **options)), (lambda x, w: TF.conv1d(x, w, **options))
    assert_matches_torch(ours, theirs, x, w)
    g = torch.randn_like(theirs(x, w))
    second = []
    for f in (ours, theirs):
        gx, gw = torch.autograd.grad(f(x, w), (x, w), g, create_graph=True)
        second.append(torch.autograd.grad((gx * gx).sum() + (gw * gw).sum(), (x, w)))
    for a, b in zip(*second):
        torch.testing.assert_close(a, b)


def test_string_padding_takes_a_bias_of_another_dtype():
    """torch's padding='same' / 'valid' path adds the bias to the output in place: any float bias
    is accepted and cast to the input's dtype (a numeric padding refuses it)."""
    x, w = torch.randn(1, 2, 5), torch.randn(2, 2, 3)
    b = torch.randn(2, dtype=torch.float64, requires_grad=True)
    for padding in ("same", "valid"):
        out, ref = F.conv1d(x, w, b, padding=padding), TF.conv1d(x, w, b, padding=padding)
        assert out.dtype == ref.dtype == torch.float32
        torch.testing.assert_close(out, ref)
        assert torch.autograd.grad(out.sum(), b)[0].dtype == torch.float64
