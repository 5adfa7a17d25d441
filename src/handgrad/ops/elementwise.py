"""The elementwise product, broadcast. Derivation: docs/derivation.md#elementwise-product.

The product itself is torch's multiplication (``torch.mul``: its broadcasting, type promotion and
rounding, a number as a wrapped scalar); what is hand-derived is its backward and jvp.
"""
from __future__ import annotations

import torch

from .._compat import forward_ad_active, functorch_transforms_active
from ._function import HandFunction

__all__ = ["MulFn"]


def _conj(t):
    """conj B: a complex tensor's or number's conjugate; a real one itself."""
    if isinstance(t, torch.Tensor):
        return t.conj() if t.dtype.is_complex else t
    return t.conjugate() if isinstance(t, complex) else t


def _to_input(g: torch.Tensor, shape, dtype: torch.dtype, device) -> torch.Tensor:
    """g summed over the dims broadcasting added or stretched (to ``shape``), in the input's
    dtype and device; the real part for a real input (torch's handle_r_to_c)."""
    g = g.sum_to_size(shape) if g.shape != shape else g                         # Σ over the broadcast dims
    if g.dtype == dtype and g.device == device:
        return g                                                                # (no call: 0.5 µs)
    if g.dtype.is_complex and not dtype.is_complex:
        g = g.real
    return g.to(dtype=dtype, device=device)


class MulFn(HandFunction):
    r"""Y = A ⊙ B, broadcast — equals ``torch.mul(a, b)`` (B a tensor or a number).

    Shapes: A (*a), B (*b) or a number → Y (broadcast(*a, *b)), in the promoted dtype.
    Backward, G = ∂L/∂Y (Y's shape), Σ_bc summing over the dims an operand was broadcast along:
        ∂L/∂A = Σ_bc (G ⊙ conj B)      (*a), in A's dtype
        ∂L/∂B = Σ_bc (G ⊙ conj A)      (*b), in B's dtype
    (conj: torch's convention for complex operands; a real operand of a complex product gets the
    real part). Saves B where A needs a gradient and A where B does, as torch's MulBackward0
    (both for forward mode, only while a jvp can be asked for).
    Forward mode: Ẏ = Ȧ ⊙ B + A ⊙ Ḃ.
    Derivation: docs/derivation.md#elementwise-product
    """

    @staticmethod
    def forward(a, b):
        return torch.mul(a, b)                                                  # A ⊙ B

    @staticmethod
    def setup_context(ctx, inputs, output):
        a, b = inputs
        ctx.b_tensor = isinstance(b, torch.Tensor)
        need_a, need_b = ctx.needs_input_grad[0], ctx.b_tensor and ctx.needs_input_grad[1]
        ctx.a_meta = (a.shape, a.dtype, a.device)
        if ctx.b_tensor:
            ctx.b_meta = (b.shape, b.dtype, b.device)
            ctx.save_for_backward(a if need_b else None, b if need_a else None)
            # forward mode reads both: saved only where a jvp can be asked for (a dual level or a
            # torch.func transform), so that plain training holds only what the backward reads
            if forward_ad_active() or functorch_transforms_active():
                ctx.save_for_forward(a, b)
        else:
            ctx.b = b
            ctx.save_for_backward(None, None)

    @staticmethod
    def backward(ctx, grad_y):
        a, b = ctx.saved_tensors
        b = b if ctx.b_tensor else ctx.b
        grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_a = _to_input(grad_y * _conj(b), *ctx.a_meta)     # Σ_bc (G ⊙ conj B)
        if ctx.b_tensor and ctx.needs_input_grad[1]:
            grad_b = _to_input(grad_y * _conj(a), *ctx.b_meta)     # Σ_bc (G ⊙ conj A)
        return grad_a, grad_b

    @staticmethod
    def jvp(ctx, da, db):
        if not ctx.b_tensor:
            return da * ctx.b                                                   # Ȧ c
        a, b = ctx.saved_tensors
        dy = None
        if da is not None:
            dy = da * b                                                         # Ȧ ⊙ B
        if db is not None:
            dy = a * db if dy is None else dy + a * db                          # + A ⊙ Ḃ
        return dy
