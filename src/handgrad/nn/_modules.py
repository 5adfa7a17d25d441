"""One module per functional op: torch.nn's twin, with the math of ``handgrad.functional``.

Each class subclasses its ``torch.nn`` namesake and overrides ``forward`` only, so the
constructor arguments (``device=``/``dtype=`` included), parameter and buffer names, shapes,
initialisation (the same ``torch.nn.init`` calls in the same order, so the same seed gives the
same weights), ``reset_parameters``, ``extra_repr``, ``repr`` and ``state_dict`` are torch's
own, and a state_dict saved from either loads into the other unchanged. ``isinstance(m,
torch.nn.Linear)`` stays true, so code that inspects modules by type keeps working.

No math here (STYLE.md §4): ``forward`` calls the functional, which calls the op.
``handgrad.convert`` swaps a torch.nn module for its twin by reassigning ``__class__``, which is
sound because a twin adds no state of its own.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F

__all__ = [
    "Linear", "Sigmoid", "Tanh", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Softplus",
    "Softmax", "LogSoftmax", "LayerNorm",
    "MSELoss", "CrossEntropyLoss", "NLLLoss", "BCEWithLogitsLoss", "HalfSquaredErrorLoss",
]


class Linear(nn.Linear):
    """``torch.nn.Linear``: y = x Wᵀ + b, W (out_features, in_features), b (out_features,)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight, self.bias)


class Sigmoid(nn.Sigmoid):
    """``torch.nn.Sigmoid``: y = σ(x)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.sigmoid(input)


class Tanh(nn.Tanh):
    """``torch.nn.Tanh``: y = tanh(x)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.tanh(input)


class ReLU(nn.ReLU):
    """``torch.nn.ReLU``: y = max(x, 0)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.relu(input, inplace=self.inplace)


class LeakyReLU(nn.LeakyReLU):
    """``torch.nn.LeakyReLU``: y = max(x, 0) + negative_slope · min(x, 0)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(input, self.negative_slope, self.inplace)


class ELU(nn.ELU):
    """``torch.nn.ELU``: y = x for x > 0, alpha (eˣ − 1) otherwise."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.elu(input, self.alpha, self.inplace)


class GELU(nn.GELU):
    """``torch.nn.GELU``: y = x Φ(x) (``approximate='tanh'``: the tanh approximation)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.gelu(input, approximate=self.approximate)


class SiLU(nn.SiLU):
    """``torch.nn.SiLU``: y = x σ(x)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.silu(input, inplace=self.inplace)


class Softplus(nn.Softplus):
    """``torch.nn.Softplus``: y = log(1 + e^{βx}) / β (x where βx > threshold)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softplus(input, self.beta, self.threshold)


class Softmax(nn.Softmax):
    """``torch.nn.Softmax``: y = eˣ / Σ eˣ along ``dim``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.softmax(input, self.dim)


class LogSoftmax(nn.LogSoftmax):
    """``torch.nn.LogSoftmax``: y = x − log Σ eˣ along ``dim``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(input, self.dim)


class LayerNorm(nn.LayerNorm):
    """``torch.nn.LayerNorm``: y = (x − μ) / √(σ² + eps) ⊙ weight + bias over ``normalized_shape``."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)


class MSELoss(nn.MSELoss):
    """``torch.nn.MSELoss``: (x − y)², reduced by ``reduction``."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(input, target, reduction=self.reduction)


class CrossEntropyLoss(nn.CrossEntropyLoss):
    """``torch.nn.CrossEntropyLoss``; buffer ``weight`` (C,) or None, as torch's."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            input, target, weight=self.weight, ignore_index=self.ignore_index,
            reduction=self.reduction, label_smoothing=self.label_smoothing,
        )


class NLLLoss(nn.NLLLoss):
    """``torch.nn.NLLLoss``; buffer ``weight`` (C,) or None, as torch's."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.nll_loss(input, target, weight=self.weight, ignore_index=self.ignore_index, reduction=self.reduction)


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """``torch.nn.BCEWithLogitsLoss``; buffers ``weight`` and ``pos_weight`` or None, as torch's."""

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(
            input, target, self.weight, pos_weight=self.pos_weight, reduction=self.reduction,
        )


if hasattr(nn, "LinearCrossEntropyLoss"):  # torch ≥ 2.13
    class LinearCrossEntropyLoss(nn.LinearCrossEntropyLoss):
        """``torch.nn.LinearCrossEntropyLoss``: the cross entropy of ``self.linear``'s logits, chunked
        (``handgrad.functional.linear_cross_entropy``); ``linear.weight`` is stored 2-D and viewed as
        (num_classes, *out_features, in_features), as torch's module does."""

        def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            linear_weight = self.linear.weight.reshape((self.num_classes, *self.out_features, self.linear.in_features))
            linear_bias = None if self.linear.bias is None else self.linear.bias.reshape(
                (self.num_classes, *self.out_features))
            return F.linear_cross_entropy(
                input, linear_weight, target, linear_bias=linear_bias, weight=self.weight, reduction=self.reduction,
                ignore_index=self.ignore_index, label_smoothing=self.label_smoothing, options=self.options,
            )

    __all__.append("LinearCrossEntropyLoss")


class HalfSquaredErrorLoss(nn.modules.loss._Loss):
    r"""The seed's cost: Σ_n ½‖x_n − y_n‖² (``reduction='sum'``, the default); ``'mean'`` divides
    by N, ``'none'`` gives one value per sample. No torch.nn twin; no parameters or buffers.

    ``HalfSquaredErrorLoss(reduction='mean')`` equals ``torch.nn.MSELoss(reduction='sum')(x, y) / (2 N)``.
    """

    def __init__(self, reduction: str = "sum") -> None:
        super().__init__(reduction=reduction)  # validated when called, as torch's losses are

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.half_squared_error(input, target, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"

