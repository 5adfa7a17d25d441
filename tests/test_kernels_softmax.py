"""The compiled softmax and log-softmax backward (``handgrad.kernels.softmax``), taken from
``ops.softmax.KERNEL_FROM`` elements: above the registry's shapes, so tests/test_fast_paths.py
never reaches it. Here: its gradient against torch's autograd on shapes above the threshold,
with kernels on and off, including rows with −inf logits and a dominant class."""
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
