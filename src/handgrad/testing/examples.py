r"""A user-written autograd Function, done right and done wrong: the README's example of
"Validate your own backward pass", and the broken Functions handgrad's tests make sure
``handgrad.testing`` catches.

Each factory returns ``(fn, inputs, reference)`` for ``handgrad-check``::

    handgrad-check handgrad.testing.examples:linear                    # passes
    handgrad-check handgrad.testing.examples:transposed_weight_grad    # fails: gradient of weight

``MyLinear`` is the pattern to copy: ``forward`` without ctx, ``setup_context``, a ``backward``
built from torch ops (so it is differentiable: double backward works), a ``jvp`` for
forward-mode AD, ``generate_vmap_rule = True`` for ``torch.func.vmap``.
Every broken twin below differs from it in one place, marked ``# BUG``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

__all__ = [
    "MyLinear", "TransposedWeightGrad", "WrongShapeWeightGrad", "UnguardedBiasGrad", "UnguardedSavedInput",
    "OnceDifferentiable", "WrongScale", "NoneBiasGrad", "WrongJvp",
    "linear", "transposed_weight_grad", "wrong_shape_weight_grad", "unguarded_bias_grad", "unguarded_saved_input",
    "once_differentiable_backward", "wrong_scale", "none_bias_grad", "wrong_jvp",
]


class MyLinear(torch.autograd.Function):
    r"""Y = X Wᵀ + b — equals ``torch.nn.functional.linear(x, weight, bias)``.

    Shapes: X (N, D_in), W (D_out, D_in), b (D_out,) or None → Y (N, D_out).
    Backward, G = ∂L/∂Y (N, D_out):
        ∂L/∂X = G W       (N, D_in)
        ∂L/∂W = Gᵀ X      (D_out, D_in)
        ∂L/∂b = 1ᵀ G      (D_out,)
    Forward mode: Ẏ = Ẋ Wᵀ + X Ẇᵀ + ḃ.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, weight, bias=None):
        y = x @ weight.mT                                   # X Wᵀ   (N, D_out)
        return y if bias is None else y + bias              # + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        ctx.save_for_backward(x, weight)
        ctx.save_for_forward(x, weight)
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_y @ weight                        # G W
        if ctx.needs_input_grad[1]:
            grad_weight = grad_y.mT @ x                     # Gᵀ X
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_y.sum(0)                       # 1ᵀ G
        return grad_x, grad_weight, grad_bias

    @staticmethod
    def jvp(ctx, dx, dweight, dbias):
        x, weight = ctx.saved_tensors
        dy = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
        if dx is not None:
            dy = dy + dx @ weight.mT                        # Ẋ Wᵀ
        if dweight is not None:
            dy = dy + x @ dweight.mT                        # X Ẇᵀ
        if dbias is not None:
            dy = dy + dbias                                 # ḃ
        return dy


def _broken(name: str, doc: str, **overrides) -> type[torch.autograd.Function]:
    """MyLinear with one staticmethod replaced."""
    attrs = {k: v for k, v in vars(MyLinear).items() if k in ("forward", "setup_context", "backward", "jvp",
                                                                 "generate_vmap_rule")}
    attrs.update({k: staticmethod(v) for k, v in overrides.items()})
    attrs["__doc__"] = doc
    return type(name, (torch.autograd.Function,), attrs)


def _backward_transposed(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
    grad_weight = x.mT @ grad_y if ctx.needs_input_grad[1] else None   # BUG: Xᵀ G = (Gᵀ X)ᵀ
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


TransposedWeightGrad = _broken("TransposedWeightGrad", "∂L/∂W = Xᵀ G, the transpose of Gᵀ X (square W: wrong values)",
                               backward=_backward_transposed)
WrongShapeWeightGrad = _broken("WrongShapeWeightGrad", "∂L/∂W = Xᵀ G (non-square W: the wrong shape)",
                               backward=_backward_transposed)


def _backward_unguarded_bias(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_y @ weight if ctx.needs_input_grad[0] else None
    grad_weight = grad_y.mT @ x if ctx.needs_input_grad[1] else None
    grad_bias = grad_y.sum(0)                 # BUG: no `if ctx.has_bias and ctx.needs_input_grad[2]`
    return grad_x, grad_weight, grad_bias


UnguardedBiasGrad = _broken("UnguardedBiasGrad", "returns a bias gradient even when bias is None",
                            backward=_backward_unguarded_bias)


def _setup_saving_only_needed(ctx, inputs, output):
    x, weight, bias = inputs
    # saves X only if W needs a gradient (∂L/∂W = Gᵀ X), W only if X does (∂L/∂X = G W)
    ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
    ctx.save_for_forward(x, weight)
    ctx.has_bias = bias is not None


def _backward_unguarded_saved(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x = grad_y @ weight                  # BUG: no `if ctx.needs_input_grad[0]`: weight is None then
    grad_weight = grad_y.mT @ x               # BUG: no `if ctx.needs_input_grad[1]`: x is None then
    grad_bias = grad_y.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
    return grad_x, grad_weight, grad_bias


UnguardedSavedInput = _broken("UnguardedSavedInput", "saves X only when W needs a gradient, then uses it regardless",
                              setup_context=_setup_saving_only_needed, backward=_backward_unguarded_saved)


@once_differentiable
def _backward_once(ctx, grad_y):
    return MyLinear.backward(ctx, grad_y)


OnceDifferentiable = _broken("OnceDifferentiable", "a correct backward hidden behind @once_differentiable "
                                                   "(double backward impossible)", backward=_backward_once)


def _backward_wrong_scale(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight, grad_bias = MyLinear.backward(ctx, grad_y)
    if grad_x is not None:
        grad_x = grad_x / x.shape[0]          # BUG: a stray 1/N (a 'mean' leaking into the gradient)
    return grad_x, grad_weight, grad_bias


WrongScale = _broken("WrongScale", "∂L/∂X = G W / N", backward=_backward_wrong_scale)


def _backward_none_bias(ctx, grad_y):
    grad_x, grad_weight, _ = MyLinear.backward(ctx, grad_y)
    return grad_x, grad_weight, None          # BUG: the bias silently gets no gradient


NoneBiasGrad = _broken("NoneBiasGrad", "returns None for the bias", backward=_backward_none_bias)


def _jvp_missing_term(ctx, dx, dweight, dbias):
    x, weight = ctx.saved_tensors
    dy = torch.zeros(x.shape[0], weight.shape[0], dtype=x.dtype, device=x.device)
    if dx is not None:
        dy = dy + dx @ weight.mT
    if dbias is not None:
        dy = dy + dbias
    return dy                                 # BUG: the X Ẇᵀ term is missing


WrongJvp = _broken("WrongJvp", "Ẏ = Ẋ Wᵀ + ḃ (the X Ẇᵀ term forgotten)", jvp=_jvp_missing_term)


def _inputs(d_in: int = 3, d_out: int = 4, n: int = 5, bias: bool = True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=g, requires_grad=True)
    weight = torch.randn(d_out, d_in, generator=g, requires_grad=True)
    b = torch.randn(d_out, generator=g, requires_grad=True) if bias else None
    return x, weight, b


def linear():
    """The correct Function: every check passes."""
    return MyLinear, _inputs(), torch.nn.functional.linear


def transposed_weight_grad():
    return TransposedWeightGrad, _inputs(d_in=4, d_out=4), torch.nn.functional.linear


def wrong_shape_weight_grad():
    return WrongShapeWeightGrad, _inputs(), torch.nn.functional.linear


def unguarded_bias_grad():
    return UnguardedBiasGrad, _inputs(bias=False), torch.nn.functional.linear


def unguarded_saved_input():
    return UnguardedSavedInput, _inputs(), torch.nn.functional.linear


def once_differentiable_backward():
    return OnceDifferentiable, _inputs(), torch.nn.functional.linear


def wrong_scale():
    return WrongScale, _inputs(), torch.nn.functional.linear


def none_bias_grad():
    return NoneBiasGrad, _inputs(), torch.nn.functional.linear


def wrong_jvp():
    return WrongJvp, _inputs(), torch.nn.functional.linear
