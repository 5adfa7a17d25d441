"""Registry cases of the convolutions and pools. Shapes are (N, C, *spatial), unbatched
(C, *spatial) and an empty batch; small, as gradgradcheck on a convolution is costly."""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from ... import functional as F
from ..types import BadInput, Inputs, OpCase, randn

_2D = ((2, 3, 7, 6), (3, 5, 4), (0, 3, 5, 4))
_1D = ((2, 3, 7), (3, 6), (0, 3, 5))


def _conv(k, C_out=4, bias=True, groups=1, **options):
    """Weight (C_out, C / groups, *k) scaled as torch's init; ``options`` go to the conv as keywords."""

    def make(shape, dtype, device):
        C = shape[-len(k) - 1]
        x = randn(shape, dtype, device)
        w = randn((C_out, max(C // groups, 1), *k), dtype, device, scale=(max(C // groups, 1) * len(k)) ** -0.5)
        b = randn((C_out,), dtype, device) if bias else None
        return Inputs((x, w, b), dict(groups=groups, **options) if groups != 1 else dict(options))

    return make


def _bad(what, x, w, names, b=None, **options):
    return BadInput(what, lambda: Inputs((torch.randn(x), torch.randn(w), None if b is None else torch.randn(b)), options),
                    names)


_BAD_2D = (
    _bad("input channels not the weight's", (2, 5, 7, 6), (4, 3, 3, 3), ("input", "weight", "[2, 5, 7, 6]", "[4, 3, 3, 3]")),
    _bad("bias of wrong size", (2, 3, 7, 6), (4, 3, 3, 3), ("bias", "[5]"), b=(5,)),
    _bad("2-D input", (2, 3), (4, 3, 3, 3), ("input", "[2, 3]")),
    _bad("3-D weight", (2, 3, 7, 6), (4, 3, 3), ("weight", "[4, 3, 3]")),
    _bad("kernel larger than the padded input", (2, 3, 2, 2), (4, 3, 3, 3), ("Kernel size", "[4, 3, 3, 3]", "[2, 3, 2, 2]")),
    _bad("groups that do not divide the output channels", (2, 3, 7, 6), (3, 3, 3, 3), ("groups=2", "weight", "[3, 3, 3, 3]"),
         groups=2),
    _bad("zero stride", (2, 3, 7, 6), (4, 3, 3, 3), ("stride", "[0, 0]"), stride=0),
    _bad("negative padding", (2, 3, 7, 6), (4, 3, 3, 3), ("padding", "[-1, -1]"), padding=-1),
    _bad("three strides", (2, 3, 7, 6), (4, 3, 3, 3), ("stride", "[1, 1, 1]"), stride=(1, 1, 1)),
    _bad("unknown padding string", (2, 3, 7, 6), (4, 3, 3, 3), ("padding", "'full'"), padding="full"),
    _bad("padding='same' with a stride", (2, 3, 7, 6), (4, 3, 3, 3), ("padding='same'", "stride"), padding="same", stride=2),
    BadInput("weight of another dtype",
             lambda: Inputs((torch.randn(2, 3, 7, 6), torch.randn(4, 3, 3, 3, dtype=torch.float64))),
             ("weight", "torch.float64")),
)
_BAD_1D = (
    _bad("input channels not the weight's", (2, 5, 7), (4, 3, 3), ("input", "weight", "[2, 5, 7]", "[4, 3, 3]")),
    _bad("4-D input", (2, 3, 7, 6), (4, 3, 3), ("input", "[2, 3, 7, 6]")),
    _bad("two paddings", (2, 3, 7), (4, 3, 3), ("padding", "[1, 1]"), padding=(1, 1)),
)


def _pool(**options):
    def make(shape, dtype, device):
        return Inputs((randn(shape, dtype, device),), dict(options))

    return make


def _bad_pool(what, x, names, **options):
    return BadInput(what, lambda: Inputs((torch.randn(x),), options), names)


def _max_pool_indices(input, kernel_size, **options):
    """The pooled values of ``return_indices=True`` (the registry compares one tensor; the indices
    are compared with torch's in tests/test_conv_pool.py)."""
    return F.max_pool2d(input, kernel_size, return_indices=True, **options)[0]


def _torch_max_pool_indices(input, kernel_size, **options):
    return TF.max_pool2d(input, kernel_size, return_indices=True, **options)[0]


_BAD_MAX = (
    _bad_pool("padding over half the kernel", (2, 3, 7, 6), ("padding", "kernel_size"), kernel_size=2, padding=2),
    _bad_pool("2-D input", (2, 3), ("input", "[2, 3]"), kernel_size=2),
    _bad_pool("kernel larger than the input", (2, 3, 7, 6), ("input", "[2, 3, 7, 6]", "kernel_size"), kernel_size=8),
    _bad_pool("three kernel sizes", (2, 3, 7, 6), ("kernel_size", "[2, 2, 2]"), kernel_size=(2, 2, 2)),
    _bad_pool("zero stride", (2, 3, 7, 6), ("stride", "[0, 0]"), kernel_size=2, stride=0),
    _bad_pool("empty channels", (3, 0, 4, 4), ("input", "[3, 0, 4, 4]"), kernel_size=2),
)
_BAD_AVG = (
    _bad_pool("padding over half the kernel", (2, 3, 7, 6), ("padding", "kernel_size"), kernel_size=2, padding=2),
    _bad_pool("2-D input", (2, 3), ("input", "[2, 3]"), kernel_size=2),  # torch: IndexError
    _bad_pool("zero divisor_override", (2, 3, 7, 6), ("divisor",), kernel_size=2, divisor_override=0),
    _bad_pool("kernel larger than the input", (2, 3, 7, 6), ("input", "[2, 3, 7, 6]"), kernel_size=8),
)
_BAD_ADAPTIVE = (
    _bad_pool("2-D input", (2, 3), ("input", "[2, 3]"), output_size=2),
    _bad_pool("three output sizes", (2, 3, 7, 6), ("output_size", "[2, 2, 2]"), output_size=(2, 2, 2)),
    _bad_pool("empty spatial dim", (2, 3, 0, 4), ("input", "[2, 3, 0, 4]"), output_size=2),
)

CASES = [
    OpCase("conv2d", F.conv2d, TF.conv2d, _conv((3, 3)), shapes=_2D, bad_inputs=_BAD_2D),
    OpCase("conv2d[no-bias]", F.conv2d, TF.conv2d, _conv((3, 3), bias=False), shapes=_2D[:1]),
    OpCase("conv2d[stride=(2,1),padding=(1,2),dilation=(2,1)]", F.conv2d, TF.conv2d,
           _conv((3, 2), stride=(2, 1), padding=(1, 2), dilation=(2, 1)), shapes=_2D[:2]),
    OpCase("conv2d[stride=3,padding=1]", F.conv2d, TF.conv2d, _conv((2, 3), stride=3, padding=1), shapes=_2D[:1]),
    # an even kernel: 'same' pads one more at the end than at the start
    OpCase("conv2d[padding=same,even-kernel]", F.conv2d, TF.conv2d, _conv((2, 4), padding="same"), shapes=_2D[:2]),
    OpCase("conv2d[padding=same,dilation=2]", F.conv2d, TF.conv2d, _conv((3, 2), padding="same", dilation=2),
           shapes=_2D[:1]),
    OpCase("conv2d[padding=valid]", F.conv2d, TF.conv2d, _conv((3, 3), padding="valid"), shapes=_2D[:1]),
    OpCase("conv2d[groups=3]", F.conv2d, TF.conv2d, _conv((3, 3), C_out=6, groups=3, padding=1), shapes=_2D[:1]),
    OpCase("conv2d[groups=2]", F.conv2d, TF.conv2d, _conv((2, 2), C_out=4, groups=2, stride=2), shapes=((2, 4, 5, 6),)),
    OpCase("conv1d", F.conv1d, TF.conv1d, _conv((3,)), shapes=_1D, bad_inputs=_BAD_1D),
    OpCase("conv1d[stride=2,padding=2,dilation=2]", F.conv1d, TF.conv1d, _conv((3,), stride=2, padding=2, dilation=2),
           shapes=_1D[:2]),
    OpCase("conv1d[padding=same,even-kernel,groups=3]", F.conv1d, TF.conv1d,
           _conv((4,), C_out=3, groups=3, padding="same"), shapes=_1D[:1]),
    OpCase("max_pool2d", F.max_pool2d, TF.max_pool2d, _pool(kernel_size=2), shapes=_2D, bad_inputs=_BAD_MAX),
    OpCase("max_pool2d[k=3,stride=2,padding=1,ceil_mode]", F.max_pool2d, TF.max_pool2d,
           _pool(kernel_size=3, stride=2, padding=1, ceil_mode=True), shapes=_2D[:2]),
    OpCase("max_pool2d[k=(3,2),stride=(1,2),dilation=(2,1)]", F.max_pool2d, TF.max_pool2d,
           _pool(kernel_size=(3, 2), stride=(1, 2), dilation=(2, 1)), shapes=_2D[:1]),
    OpCase("max_pool2d[return_indices]", _max_pool_indices, _torch_max_pool_indices, _pool(kernel_size=3, stride=2),
           shapes=_2D[:1]),
    OpCase("avg_pool2d", F.avg_pool2d, TF.avg_pool2d, _pool(kernel_size=2), shapes=_2D, bad_inputs=_BAD_AVG),
    OpCase("avg_pool2d[k=3,stride=2,padding=1,ceil_mode]", F.avg_pool2d, TF.avg_pool2d,
           _pool(kernel_size=3, stride=2, padding=1, ceil_mode=True), shapes=_2D[:2]),
    OpCase("avg_pool2d[count_include_pad=False,ceil_mode]", F.avg_pool2d, TF.avg_pool2d,
           _pool(kernel_size=(3, 2), stride=2, padding=1, ceil_mode=True, count_include_pad=False), shapes=_2D[:1]),
    OpCase("avg_pool2d[divisor_override=5]", F.avg_pool2d, TF.avg_pool2d,
           _pool(kernel_size=3, stride=(2, 1), padding=(1, 0), divisor_override=5), shapes=_2D[:1]),
    # windows that tile the input (stride = kernel, no padding, k | H, W): the backward's one-pass fast path
    OpCase("avg_pool2d[tiles]", F.avg_pool2d, TF.avg_pool2d, _pool(kernel_size=(2, 3)),
           shapes=((2, 3, 8, 6), (3, 4, 6), (0, 3, 4, 6))),
    OpCase("avg_pool2d[tiles,divisor_override=5]", F.avg_pool2d, TF.avg_pool2d, _pool(kernel_size=2, divisor_override=5),
           shapes=((2, 3, 8, 6),)),
    OpCase("adaptive_avg_pool2d", F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, _pool(output_size=(3, 4)), shapes=_2D,
           bad_inputs=_BAD_ADAPTIVE),
    # windows that overlap (H = 7 → 3) and an output larger than the input (6 → 9)
    OpCase("adaptive_avg_pool2d[output_size=(None,9)]", F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d,
           _pool(output_size=(None, 9)), shapes=_2D[:1]),
    OpCase("adaptive_avg_pool2d[output_size=1]", F.adaptive_avg_pool2d, TF.adaptive_avg_pool2d, _pool(output_size=1),
           shapes=_2D[:2]),
]
