"""The compiled kernels of softmax and the losses (``handgrad.kernels.softmax``, ``.losses``) where
tests/test_fast_paths.py does not reach them: the softmax backward, taken from
``ops.softmax.KERNEL_FROM`` elements (above the registry's shapes), against torch's autograd with
kernels on and off, including rows with −inf logits and a dominant class; the cross entropy's
backward with a non-finite class weight beside ignored rows."""
from __future__ import annotations

import contextlib

import pytest
import torch

from handgrad import functional as F, kernels
from handgrad.ops.softmax import KERNEL_FROM

# (rows, D) with rows·D ≥ KERNEL_FROM; a batched 3-d input
SHAPES = [(KERNEL_FROM // 160 + 1, 160), (3, KERNEL_FROM // 3 + 5), (2, KERNEL_FROM // 64, 33)]
# float64: two computations of one quantity, only the order of summation differs (assert_close's
# defaults); float32: the kernel sums in float64, torch in float32: a few ulps of the row's scale
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=2e-6, rtol=2e-5)}


@pytest.mark.parametrize("mode", ["kernels", "torch-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_backward_above_kernel_threshold(name, shape, dtype, mode):
    if mode == "kernels" and not kernels.enabled():
        pytest.skip("numba does not import here")
    assert torch.Size(shape).numel() >= KERNEL_FROM
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype) * 4
    x[..., 0, :3] = -float("inf")          # zeros of the softmax (log_softmax: −inf, its exp 0)
    x[..., 1, 0] = 60.0                    # one class dominates: p ≈ 1, the others ≈ e^-60
    x.requires_grad_()
    g = torch.randn(shape, dtype=dtype)
    ref, = torch.autograd.grad(getattr(torch, name)(x, -1), x, g)
    with kernels.disabled() if mode == "torch-ops" else contextlib.nullcontext():
        ours, = torch.autograd.grad(getattr(F, name)(x, -1), x, g)
    torch.testing.assert_close(ours, ref, equal_nan=True, **TOL[dtype])


@pytest.mark.parametrize("mode", ["kernels", "torch-ops"])
@pytest.mark.parametrize("bad", [float("nan"), -float("inf"), float("inf")])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_nonfinite_weight_beside_ignored_rows(reduction, bad, mode):
    """An ignored row's gradient is exactly 0 whatever the class weight holds (torch never
    touches it); the kept rows' nan/inf are torch's (fuzzer seeds 1 and 2, cross_entropy)."""
    if mode == "kernels" and not kernels.enabled():
        pytest.skip("numba does not import here")
    torch.manual_seed(0)
    x = (torch.randn(4, 3) * 5).requires_grad_()
    t = torch.tensor([0, -100, 1, -100])
    w = torch.tensor([0.5, 1.0, bad])
    g = torch.randn(4) if reduction == "none" else torch.tensor(1.0)
    ref, = torch.autograd.grad(torch.nn.functional.cross_entropy(x, t, weight=w, reduction=reduction), x, g)
    with kernels.disabled() if mode == "torch-ops" else contextlib.nullcontext():
        ours, = torch.autograd.grad(F.cross_entropy(x, t, weight=w, reduction=reduction), x, g)
    torch.testing.assert_close(ours, ref, equal_nan=True)
    assert (ours[1] == 0).all() and (ours[3] == 0).all()
