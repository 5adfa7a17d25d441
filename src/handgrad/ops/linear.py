"""The affine layer. Derivation: docs/derivation.md#affine-layer."""
from __future__ import annotations

import torch

from ._function import HandFunction


def _flat(x, weight):
    """Views the op works on: X (N, D_in), W (D_out, D_in); 1-D weight is one output row."""
    D_in = x.shape[-1]
    N, D_out = x.shape[:-1].numel(), weight.shape[:-1].numel()  # explicit: D_in may be 0
    return x.reshape(N, D_in), weight.reshape(D_out, D_in)     # (N, D_in), (D_out, D_in)


class LinearFn(HandFunction):
    r"""Y = X Wᵀ + b  — equals ``torch.nn.functional.linear(x, weight, bias)``.

    Shapes: X (N, D_in) (any leading dims flattened into N), W (D_out, D_in) or (D_in,),
    b broadcastable to Y (N, D_out) → Y (N, D_out).
    Backward, G = ∂L/∂Y (N, D_out):
        ∂L/∂X = G W       (N, D_in)
        ∂L/∂W = Gᵀ X      (D_out, D_in)
        ∂L/∂b = 1ᵀ G      (D_out,)   (G summed to b's shape)
    Forward mode, tangents Ẋ, Ẇ, ḃ:
        Ẏ = Ẋ Wᵀ + X Ẇᵀ + ḃ
    Saves X only if W needs a gradient, W only if X does.
    Derivation: docs/derivation.md#affine-layer
    """

    @staticmethod
    def forward(x, weight, bias):
        X, W = _flat(x, weight)                                  # (N, D_in), (D_out, D_in)
        if bias is not None and bias.dim() <= 1:
            Y = torch.addmm(bias, X, W.mT)                       # X Wᵀ + b   (N, D_out)
        else:
            Y = X @ W.mT                                         # X Wᵀ       (N, D_out)
        y = Y.reshape(x.shape[:-1] + weight.shape[:-1])         # (*, D_out)
        if bias is not None and bias.dim() > 1:
            y = y + bias
        return y

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias = inputs
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.save_for_backward(x if needs_w else None, weight if needs_x else None)
        ctx.save_for_forward(x, weight)
        ctx.x_shape, ctx.w_shape = x.shape, weight.shape
        ctx.bias_shape = None if bias is None else bias.shape

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        D_in = ctx.x_shape[-1]
        N, D_out = ctx.x_shape[:-1].numel(), ctx.w_shape[:-1].numel()
        G = grad_y.reshape(N, D_out)                                         # (N, D_out)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = (G @ weight.reshape(D_out, D_in)).reshape(ctx.x_shape)  # G W
        if ctx.needs_input_grad[1]:
            grad_w = (G.mT @ x.reshape(N, D_in)).reshape(ctx.w_shape)        # Gᵀ X
        if ctx.bias_shape is not None and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum_to_size(ctx.bias_shape)                      # 1ᵀ G
        return grad_x, grad_w, grad_b

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, weight = ctx.saved_tensors
        X, W = _flat(x, weight)                                  # (N, D_in), (D_out, D_in)
        dY = X.new_zeros(X.shape[0], W.shape[0])                 # (N, D_out)
        if dx is not None:
            dY = dY + dx.reshape(X.shape) @ W.mT                 # Ẋ Wᵀ
        if dw is not None:
            dY = dY + X @ dw.reshape(W.shape).mT                 # X Ẇᵀ
        dy = dY.reshape(x.shape[:-1] + weight.shape[:-1])       # (*, D_out)
        if db is not None:
            dy = dy + db                                         # ḃ
        return dy

