"""Each op's fast path against its differentiable path, on the registry's cases and shapes.

The fast path (``handgrad.ops._function.fast_path``: grad mode off, no torch.func transform) is
what an ordinary training step takes: the forward and a first-order backward, in place on
buffers the op owns, with fewer passes, and for some ops torch's forward kernel. The
differentiable path, the formula as written, is what double backward, forward AD, vmap and
compile take. Both must compute the same function and gradients:

- eager ``autograd.grad`` (the fast forward and the fast backward) against
  ``torch.func.vjp`` (a transform is active: the differentiable forward and backward);
- eager ``autograd.grad(..., create_graph=True)`` (the fast forward, the differentiable
  backward) against the same.

Each case runs twice: with the compiled kernels (``handgrad.kernels``: the fast path's formula
as numba loops, on CPU float32/float64) and with them off (the torch-op fast path, as on CUDA or
without numba). In float64, where the paths differ only in the order of rounding:
``EXACT_ATOL``/``EXACT_RTOL``.
(The fast path's low-precision accuracy against a float64 truth is the registry's ``lowp``
check, which runs eagerly, so on the fast path.)
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from handgrad import kernels

from handgrad.testing.registry import all_cases
from handgrad.testing.tolerances import EXACT_ATOL, EXACT_RTOL

# the ops whose Functions have a fast path distinct from the differentiable one
FAST = ("softmax", "log_softmax", "layer_norm", "batch_norm", "group_norm", "rms_norm", "cross_entropy", "nll_loss", "mse_loss",
        "half_squared_error", "binary_cross_entropy_with_logits", "embedding", "conv1d", "conv2d",
        "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "scaled_dot_product_attention",
        "multi_head_attention_forward", "sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu", "softplus",
        "linear_act", "mlp", "linear_cross_entropy")


def _cases():
    for case in all_cases():
        if case.name.split("[")[0] in FAST:
            for shape in case.shapes:
                yield pytest.param(case, shape, id=case.id(shape))


def _floats(out):
    """The differentiable outputs, as a tuple (max_pool2d's indices dropped)."""
    outs = out if isinstance(out, tuple) else (out,)
    return tuple(o for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())


def _close(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        torch.testing.assert_close(x, y, atol=EXACT_ATOL, rtol=EXACT_RTOL, equal_nan=True,
                                   msg=lambda m: f"{what}[{i}]: fast and differentiable paths differ: {m}")


def _dense(grads, xs):
    """autograd.grad's None (an input the output does not use) as torch.func's zeros."""
    return [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(grads, xs)]


@pytest.fixture(params=["kernels", "torch-ops"])
def fast_mode(request):
    if request.param == "kernels" and not kernels.enabled():
        pytest.skip("numba does not import here: the kernels' run is the torch-op run")
    with kernels.disabled() if request.param == "torch-ops" else contextlib.nullcontext():
        yield request.param


@pytest.mark.parametrize("case,shape", list(_cases()))
def test_fast_path_equals_differentiable_path(case, shape, fast_mode):
    torch.manual_seed(0)
    inputs = case.inputs(shape, torch.float64)
    xs = inputs.diff
    f = inputs.bind(case.fn)
    outs = _floats(f(*xs))
    vs = tuple(torch.randn_like(o) for o in outs)

    fast = torch.autograd.grad(outs, xs, vs, allow_unused=True)                     # fast forward + backward
    outs_g = _floats(f(*xs))
    recorded = torch.autograd.grad(outs_g, xs, vs, allow_unused=True, create_graph=True)   # differentiable backward

    ref_outs, vjp = torch.func.vjp(lambda *a: _floats(f(*a)), *xs)                  # differentiable throughout
    ref = vjp(vs)

    _close(outs, ref_outs, "output")
    _close(_dense(fast, xs), _dense(ref, xs), "fast gradient")
    _close(_dense(recorded, xs), _dense(ref, xs), "recorded gradient")
