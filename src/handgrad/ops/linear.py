"""The affine layer, and the affine rules every op with a linear layer reuses (``linear``, the
fused ``linear_act``/``mlp`` and ``linear_cross_entropy``): each written here once.
Derivation: docs/derivation.md#affine-layer.
"""
from __future__ import annotations

import torch

from ._function import HandFunction


def affine(X: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Z = X Wᵀ + b   (N, D_out), one GEMM (addmm adds a bias that broadcasts to Z); ``out``: a
    buffer of Z's shape and dtype to write it into (nothing records it)."""
    if out is not None:
        return torch.mm(X, W.mT, out=out) if b is None else torch.addmm(b, X, W.mT, out=out)
    return X @ W.mT if b is None else torch.addmm(b, X, W.mT)


def affine_jvp(X: torch.Tensor, W: torch.Tensor, dX, dW, db) -> torch.Tensor:
    """Ż = Ẋ Wᵀ + X Ẇᵀ + ḃ   (N, D_out); a missing tangent is zero."""
    dZ = X.new_zeros(X.shape[0], W.shape[0])                   # (N, D_out)
    if dX is not None:
        dZ = dZ + dX @ W.mT                                     # Ẋ Wᵀ
    if dW is not None:
        dZ = dZ + X @ dW.mT                                     # X Ẇᵀ
    return dZ if db is None else dZ + db                        # + ḃ


def bias_vjp(G: torch.Tensor, b_shape) -> torch.Tensor:
    """∂L/∂b = 1ᵀ G, in general G summed down to b's shape."""
    if G.dim() == 2 and len(b_shape) == 1 and b_shape[0] == G.shape[1]:
        return G.sum(0)                                         # 1ᵀ G (D_out,): sum_to_size's shape logic costs 1.5 µs
    return G.sum_to_size(b_shape)


def affine_vjp(G: torch.Tensor, X, W, needs, *, acc=(None, None)):
    """(∂L/∂X, ∂L/∂W, ∂L/∂b) = (G W, Gᵀ X, 1ᵀ G) for G = ∂L/∂Z (N, D_out), each only where
    ``needs`` (three bools) asks. ``acc``: running sums (∂L/∂W, ∂L/∂b) of earlier row blocks to
    add this block's into, in place (the caller owns them and nothing records the backward)."""
    need_x, need_w, need_b = needs
    gW_acc, gb_acc = acc
    gX = G @ W if need_x else None                              # G W       (N, D_in)
    gW = gb = None
    if need_w:
        gW = gW_acc.addmm_(G.mT, X) if gW_acc is not None else G.mT @ X   # (+=) Gᵀ X   (D_out, D_in)
    if need_b:
        gb = bias_vjp(G, G.shape[-1:])                          # 1ᵀ G      (D_out,)
        gb = gb_acc.add_(gb) if gb_acc is not None else gb
    return gX, gW, gb


def _flat(x, weight):
    """Views the op works on: X (N, D_in), W (D_out, D_in); 1-D weight is one output row."""
    if x.dim() == 2 and weight.dim() == 2:
        return x, weight                                        # already (N, D_in), (D_out, D_in): no view (1 µs each)
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
    The bias has the output's dtype (the functional casts one torch adds in place).
    Derivation: docs/derivation.md#affine-layer
    """

    @staticmethod
    def forward(x, weight, bias):
        X, W = _flat(x, weight)                                  # (N, D_in), (D_out, D_in)
        vector_bias = bias is not None and bias.dim() <= 1 and weight.dim() == 2
        Y = affine(X, W, bias if vector_bias else None)          # X Wᵀ (+ b)   (N, D_out)
        y = Y if X is x else Y.reshape(x.shape[:-1] + weight.shape[:-1])   # (*, D_out)
        if bias is not None and not vector_bias:
            y = y + bias                                         # + b, broadcast to Y
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
        needs = ctx.needs_input_grad
        flat = len(ctx.x_shape) == 2 and len(ctx.w_shape) == 2 and grad_y.dim() == 2   # already 2-D: no views
        if flat:
            G, X, W = grad_y, x, weight                                      # (N, D_out), (N, D_in), (D_out, D_in)
        else:
            D_in = ctx.x_shape[-1]
            N, D_out = ctx.x_shape[:-1].numel(), ctx.w_shape[:-1].numel()
            G = grad_y.reshape(N, D_out)                                     # (N, D_out)
            X = None if x is None else x.reshape(N, D_in)
            W = None if weight is None else weight.reshape(D_out, D_in)
        gX, gW, _ = affine_vjp(G, X, W, (needs[0], needs[1], False))
        grad_x = gX if flat or gX is None else gX.reshape(ctx.x_shape)      # G W
        grad_w = gW if flat or gW is None else gW.reshape(ctx.w_shape)      # Gᵀ X
        grad_b = None
        if ctx.bias_shape is not None and needs[2]:
            grad_b = bias_vjp(grad_y, ctx.bias_shape)                        # 1ᵀ G
        return grad_x, grad_w, grad_b

    @staticmethod
    def jvp(ctx, dx, dw, db):
        x, weight = ctx.saved_tensors
        X, W = _flat(x, weight)                                  # (N, D_in), (D_out, D_in)
        dX = None if dx is None else dx.reshape(X.shape)
        dW = None if dw is None else dw.reshape(W.shape)
        dY = affine_jvp(X, W, dX, dW, None)                      # Ẋ Wᵀ + X Ẇᵀ   (N, D_out)
        dy = dY.reshape(x.shape[:-1] + weight.shape[:-1])       # (*, D_out)
        if db is not None:
            dy = dy + db                                         # ḃ
        return dy
