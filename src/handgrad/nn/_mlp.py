"""``MLP``: the seed's network, a stack of affine layers each followed by an activation."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import catalogue
from .. import functional as F
from ._modules import Linear

__all__ = ["MLP"]


def _activation_module(name: str | None, arg: str) -> nn.Module | None:
    """The ``handgrad.nn`` twin of the catalogue's activation ``name``, with torch.nn's defaults."""
    return None if name is None else catalogue.activation(name, f"MLP {arg}").twin()


def _param(m: nn.Module, name: str):
    """``getattr(m, name)``, read straight from ``m._parameters`` where it is registered there
    (``Module.__getattr__`` costs ~1 µs a lookup, 6 a step of a 3-layer MLP); otherwise (a
    parametrization's property, a plain tensor attribute, a None bias) the attribute itself."""
    p = m._parameters.get(name)
    return getattr(m, name) if p is None else p


class MLP(nn.Sequential):
    r"""x_l = f(W_l x_{l-1} + b_l) for l = 1 … L−1, then x_L = W_L x_{L-1} + b_L
    (followed by ``last_activation`` when given): the seed's network.

    ``sizes = (D_0, D_1, …, D_L)``: layer l maps D_{l-1} → D_l. Children are
    ``Linear, act, Linear, act, …, Linear[, last_act]``, so the state_dict keys ("0.weight",
    "0.bias", "2.weight", …), shapes and initialisation are those of the equivalent
    ``torch.nn.Sequential`` of ``torch.nn.Linear`` and activation modules built in the same order
    with the same seed, and ``parameters()`` iterate W1, b1, W2, b2, ….

    ``fused=True`` runs the whole stack as one op (``handgrad.functional.mlp``: one backward
    pass over all layers, derivation "the seed's network"); ``fused=False`` runs the children
    one by one (``nn.Sequential.forward``). Both give the same values and gradients.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "sigmoid",
        bias: bool = True,
        last_activation: str | None = None,
        fused: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2:
            raise ValueError(f"MLP: sizes needs at least 2 entries (input and output), got {sizes}")
        layers: list[nn.Module] = []
        n_layers = len(sizes) - 1
        for l, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(Linear(d_in, d_out, bias=bias, device=device, dtype=dtype))
            act = _activation_module(activation if l < n_layers - 1 else last_activation,
                                     "activation" if l < n_layers - 1 else "last_activation")
            if act is not None:
                layers.append(act)
        if n_layers == 1:  # a single layer still validates `activation`
            _activation_module(activation, "activation")
        super().__init__(*layers)
        self.sizes = tuple(sizes)
        self.activation = activation
        self.last_activation = last_activation
        self.fused = fused

    def linears(self) -> list[nn.Linear]:
        return [m for m in self if isinstance(m, nn.Linear)]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.fused:
            return super().forward(input)
        weights, biases = [], []
        for m in self._modules.values():                        # self.linears(), in one pass (this runs every step)
            if isinstance(m, nn.Linear):
                weights.append(_param(m, "weight"))
                biases.append(_param(m, "bias"))
        return F.mlp(input, weights, biases, self.activation, self.last_activation)

    def extra_repr(self) -> str:
        return f"sizes={self.sizes}, activation={self.activation!r}, last_activation={self.last_activation!r}, fused={self.fused}"
