"""Elementwise activations y = f(z), one spec each, one Function for all.
Derivation: docs/derivation.md#activations.

An ``Activation`` is the math of one f: the forward, and f'(z) written from whichever of z or
y it is cheapest in (STYLE.md §3: sigmoid, tanh, relu from the output). ``ElementwiseFn`` is
the one autograd Function that runs any of them; fused ops (``ops.fused``) reuse the same
specs, so each derivative is written once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ._function import HandFunction, opmath


@dataclass(frozen=True)
class Activation:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]                       # y = f(z)
    df: Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]  # f'(z), from (z, y)
    saves: str                                                      # "output" (y) or "input" (z)


def sigmoid_spec() -> Activation:
    # f(z) = σ(z) = 1 / (1 + e^{−z});  f'(z) = σ(z)(1 − σ(z)) = y(1 − y)
    return Activation("sigmoid", torch.sigmoid, lambda z, y: y * (1 - y), "output")


# name → factory(**options) → Activation
ACTIVATIONS: dict[str, Callable[..., Activation]] = {
    "sigmoid": sigmoid_spec,
}


def get_activation(name: str, **options) -> Activation:
    try:
        factory = ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None
    return factory(**options)


class ElementwiseFn(HandFunction):
    r"""Y = f(Z), elementwise — equals the torch activation named by ``act.name``.

    Shapes: Z (*) → Y (*), any shape.
    Backward, G = ∂L/∂Y (*):
        ∂L/∂Z = G ⊙ f'(Z)        (*)
    Forward mode, tangent Ż:
        Ẏ = f'(Z) ⊙ Ż
    f'(Z) is computed from the saved Y or Z (``act.saves``), never both. In float16/bfloat16
    the math runs in float32 and rounds once, as torch's kernels do.
    Derivation: docs/derivation.md#activations
    """

    @staticmethod
    def forward(z, act):
        return act.f(opmath(z)).to(z.dtype)                       # Y = f(Z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, act = inputs
        ctx.act = act
        saved = output if act.saves == "output" else z
        ctx.save_for_backward(saved)
        ctx.save_for_forward(saved)

    @staticmethod
    def _df(ctx):
        saved, = ctx.saved_tensors
        z, y = (None, saved) if ctx.act.saves == "output" else (saved, None)
        return ctx.act.df(opmath(z), opmath(y))                   # f'(Z)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None
        return (opmath(grad_y) * ElementwiseFn._df(ctx)).to(grad_y.dtype), None   # G ⊙ f'(Z)

    @staticmethod
    def jvp(ctx, dz, _):
        return (opmath(dz) * ElementwiseFn._df(ctx)).to(dz.dtype)                  # f'(Z) ⊙ Ż
