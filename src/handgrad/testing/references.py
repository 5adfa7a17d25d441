"""Reference implementations in plain torch, each written once, for the registry cases, the tests
and anyone comparing against them: the torch function an op equals (read from the catalogue), the
seed's loss Σ_n ½‖x_n − y_n‖², and the seed's network as torch composes it (functional and as an
``nn.Sequential`` of torch.nn's Linear and activation modules)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as TF
from torch import nn
from .._compat import nn_reduction as _Reduction

from .. import _compat, catalogue

__all__ = ["torch_reference", "half_squared_error", "mlp", "sequential_mlp"]


def torch_reference(name: str) -> Callable:
    """The torch callable op ``name`` equals (``catalogue.get(name).torch_function``); on a torch
    in the supported range that lacks a feature handgrad has, a stand-in raising ``TorchLacks``
    for the calls that need it (``_compat.torch_reference``)."""
    fn = catalogue.get(name).torch_function
    if fn is None and name in _compat._REFERENCE_NEEDS:   # a torch function newer than this torch
        return _compat.torch_reference(name, None)
    if fn is None:
        raise ValueError(f"the catalogue names no torch function for {name!r}: give its reference explicitly")
    return _compat.torch_reference(name, fn)


def half_squared_error(input: torch.Tensor, target: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
    """The seed's loss in plain torch ops: C^n = ½‖x_n − y_n‖² over the last dim, then summed
    (``'sum'``, the default: L = Σ_n C^n), averaged over the rows (``'mean'``) or kept (``'none'``)."""
    _Reduction.get_enum(reduction)  # torch's reduction check (ValueError)
    per_row = 0.5 * ((input - target) ** 2).sum(-1)
    return {"none": per_row, "sum": per_row.sum(), "mean": per_row.mean()}[reduction]


def mlp(x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None],
        activation: str = "sigmoid", last_activation: str | None = None) -> torch.Tensor:
    """x_l = f(x_{l−1} W_lᵀ + b_l) by torch's ``F.linear`` and the activation's torch function
    (default options), the last layer followed by ``last_activation`` (None: none)."""
    L = len(weights)
    for l, (w, b) in enumerate(zip(weights, biases)):
        x = TF.linear(x, w, b)
        name = activation if l < L - 1 else last_activation
        if name is not None:
            x = torch_reference(name)(x)
    return x


def sequential_mlp(sizes: Sequence[int], activation: str = "sigmoid", bias: bool = True,
                   last_activation: str | None = None, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None) -> nn.Sequential:
    """``handgrad.nn.MLP(sizes, ...)``'s torch twin: ``nn.Linear`` and the activation's torch.nn
    module (from the catalogue), built in the same order, so the same seed gives the same weights."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b, bias=bias, dtype=dtype, device=device))
        name = activation if i < len(sizes) - 2 else last_activation
        if name is not None:
            layers.append(catalogue.get(name).torch_module())
    return nn.Sequential(*layers)
