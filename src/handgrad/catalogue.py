"""The op catalogue: every op handgrad ships, named once.

One ``Op`` per public function of ``handgrad.functional``: the torch callable it equals, the
``handgrad.nn`` twin and the ``torch.nn`` class it stands for (where there is one), the other
torch spellings of the same function (``torch.sigmoid`` for ``F.sigmoid``), its keyword options
with torch's defaults, and the section of ``docs/derivation.md`` that derives it.

Everything that needs a list of ops reads this table and keeps none of its own: ``nn.MLP``'s
activations, ``convert``'s swap tables, the training app's choices, the registry of op cases and
the bench. ``tests/test_catalogue.py`` asserts that every entry has a registry case, an nn twin
where torch has a module, a convert mapping and a derivation section.

This module imports only torch: the handgrad objects are looked up by name when asked for
(``Op.functional``, ``Op.twin``), so every layer (ops ← functional ← nn ← convert/testing) may
import it without a circle.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as TF
from torch import nn

__all__ = ["Op", "CATALOGUE", "get", "ops", "activations", "activation", "KINDS"]

#: what an op is; the order is the order of the table
KINDS = ("linear", "activation", "softmax", "norm", "loss", "fused", "embedding", "dropout", "convolution",
         "pooling", "attention", "reduction", "elementwise")


@dataclass(frozen=True)
class Op:
    name: str                                   # handgrad.functional.<name>
    kind: str                                   # one of KINDS
    torch_function: Callable | None             # the torch callable it equals (None: handgrad only)
    section: str                                # docs/derivation.md heading it is derived under
    module: str | None = None                   # handgrad.nn.<module>, its module twin
    torch_module: type[nn.Module] | None = None  # the torch.nn class the twin replaces
    aliases: tuple[Callable, ...] = ()          # other torch spellings of torch_function
    # keyword options → default: every defaulted argument of the functional (torch's deprecated
    # size_average / reduce and its private _stacklevel aside), with torch's default where torch
    # has the keyword
    options: Mapping[str, Any] = field(default_factory=dict)
    # further (handgrad.nn name, torch.nn class) pairs running the same functional
    # (BatchNorm1d beside BatchNorm2d); ``module``/``torch_module`` are the first pair
    more_modules: tuple[tuple[str, type[nn.Module]], ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Op {self.name!r}: kind {self.kind!r} is not one of {KINDS}")
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))

    @property
    def functional(self) -> Callable:
        """``handgrad.functional.<name>``."""
        return getattr(importlib.import_module("handgrad.functional"), self.name)

    @property
    def twin(self) -> type[nn.Module] | None:
        """``handgrad.nn.<module>``, or None where the op has no module."""
        if self.module is None:
            return None
        return getattr(importlib.import_module("handgrad.nn"), self.module)

    @property
    def twins(self) -> tuple[tuple[type[nn.Module], type[nn.Module] | None], ...]:
        """Every (handgrad.nn twin, torch.nn class it replaces) pair, the first pair first."""
        if self.module is None:
            return ()
        hnn = importlib.import_module("handgrad.nn")
        pairs = ((self.module, self.torch_module), *self.more_modules)
        return tuple((getattr(hnn, name), torch_module) for name, torch_module in pairs)

    @property
    def torch_functions(self) -> tuple[Callable, ...]:
        """Every torch spelling of the op: the functional first, then the aliases."""
        return tuple(f for f in (self.torch_function, *self.aliases) if f is not None)


def _op(name, kind, torch_function, section, module=None, torch_module=None, aliases=(), more_modules=(),
        **options) -> Op:
    return Op(name, kind, torch_function, section, module, torch_module, tuple(aliases), options, tuple(more_modules))


_ACT = "activations"
_BGR = "batch-group-and-rms-normalisation"
_TABLE: tuple[Op, ...] = (
    _op("linear", "linear", TF.linear, "affine-layer", "Linear", nn.Linear, bias=None),
    # activations: the order is the order MLP and the app offer them in
    _op("sigmoid", "activation", TF.sigmoid, _ACT, "Sigmoid", nn.Sigmoid, (torch.sigmoid,)),
    _op("tanh", "activation", TF.tanh, _ACT, "Tanh", nn.Tanh, (torch.tanh,)),
    _op("relu", "activation", TF.relu, _ACT, "ReLU", nn.ReLU, (torch.relu,), inplace=False),
    _op("leaky_relu", "activation", TF.leaky_relu, _ACT, "LeakyReLU", nn.LeakyReLU,
        negative_slope=0.01, inplace=False),
    _op("elu", "activation", TF.elu, _ACT, "ELU", nn.ELU, alpha=1.0, inplace=False),
    _op("gelu", "activation", TF.gelu, _ACT, "GELU", nn.GELU, approximate="none"),
    _op("silu", "activation", TF.silu, _ACT, "SiLU", nn.SiLU, inplace=False),
    _op("softplus", "activation", TF.softplus, _ACT, "Softplus", nn.Softplus, beta=1.0, threshold=20.0),
    # torch.softmax / torch.log_softmax are not aliases: their third positional argument is
    # ``dtype``, the functional's is ``_stacklevel``.
    _op("softmax", "softmax", TF.softmax, "softmax-and-log-softmax", "Softmax", nn.Softmax, dim=None, dtype=None),
    _op("log_softmax", "softmax", TF.log_softmax, "softmax-and-log-softmax", "LogSoftmax", nn.LogSoftmax,
        dim=None, dtype=None),
    _op("layer_norm", "norm", TF.layer_norm, "layer-normalisation", "LayerNorm", nn.LayerNorm,
        weight=None, bias=None, eps=1e-5),
    _op("mse_loss", "loss", TF.mse_loss, "mean-squared-error", "MSELoss", nn.MSELoss, reduction="mean", weight=None),
    _op("half_squared_error", "loss", None, "half-squared-error", "HalfSquaredErrorLoss", reduction="sum"),
    _op("cross_entropy", "loss", TF.cross_entropy, "cross-entropy", "CrossEntropyLoss", nn.CrossEntropyLoss,
        weight=None, ignore_index=-100, reduction="mean", label_smoothing=0.0),
    _op("nll_loss", "loss", TF.nll_loss, "negative-log-likelihood", "NLLLoss", nn.NLLLoss,
        weight=None, ignore_index=-100, reduction="mean"),
    _op("binary_cross_entropy_with_logits", "loss", TF.binary_cross_entropy_with_logits,
        "binary-cross-entropy-with-logits", "BCEWithLogitsLoss", nn.BCEWithLogitsLoss,
        weight=None, reduction="mean", pos_weight=None),
    # fused: no single torch twin (linear_cross_entropy's is torch ≥ 2.13's F.linear_cross_entropy)
    _op("linear_act", "fused", None, "linear-and-activation", bias=None, activation="relu"),
    _op("mlp", "fused", None, "the-whole-network", "MLP", activation="sigmoid", last_activation=None),
    _op("linear_cross_entropy", "fused", getattr(TF, "linear_cross_entropy", None), "linear-and-cross-entropy-chunked",
        *(("LinearCrossEntropyLoss", nn.LinearCrossEntropyLoss) if hasattr(nn, "LinearCrossEntropyLoss") else ()),
        linear_bias=None, weight=None, reduction="mean", ignore_index=None, label_smoothing=0.0, options=None,
        chunk_size=None),
    _op("batch_norm", "norm", TF.batch_norm, _BGR, "BatchNorm2d", nn.BatchNorm2d,
        more_modules=(("BatchNorm1d", nn.BatchNorm1d),), weight=None, bias=None, training=False, momentum=0.1,
        eps=1e-5),
    _op("group_norm", "norm", TF.group_norm, _BGR, "GroupNorm", nn.GroupNorm, weight=None, bias=None, eps=1e-5),
    _op("rms_norm", "norm", TF.rms_norm, _BGR, "RMSNorm", nn.RMSNorm, (torch.rms_norm,), weight=None, eps=None),
    _op("embedding", "embedding", TF.embedding, "embedding", "Embedding", nn.Embedding, padding_idx=None,
        max_norm=None, norm_type=2.0, scale_grad_by_freq=False, sparse=False),
    _op("dropout", "dropout", TF.dropout, "dropout", "Dropout", nn.Dropout, p=0.5, training=True, inplace=False),
    _op("conv1d", "convolution", TF.conv1d, "convolution", "Conv1d", nn.Conv1d,
        bias=None, stride=1, padding=0, dilation=1, groups=1),
    _op("conv2d", "convolution", TF.conv2d, "convolution", "Conv2d", nn.Conv2d,
        bias=None, stride=1, padding=0, dilation=1, groups=1),
    _op("max_pool2d", "pooling", TF.max_pool2d, "max-pooling", "MaxPool2d", nn.MaxPool2d,
        stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False),
    _op("avg_pool2d", "pooling", TF.avg_pool2d, "average-pooling", "AvgPool2d", nn.AvgPool2d,
        stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None),
    _op("adaptive_avg_pool2d", "pooling", TF.adaptive_avg_pool2d, "average-pooling", "AdaptiveAvgPool2d",
        nn.AdaptiveAvgPool2d),
    _op("scaled_dot_product_attention", "attention", TF.scaled_dot_product_attention, "attention",
        attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False),
    _op("multi_head_attention_forward", "attention", TF.multi_head_attention_forward, "attention",
        "MultiheadAttention", nn.MultiheadAttention, training=True, key_padding_mask=None, need_weights=True,
        attn_mask=None, use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
        static_k=None, static_v=None, average_attn_weights=True, is_causal=False),
    # tensor math models write inline (``x.mean(dim=1)``, ``F.silu(a) * b``): no torch.nn class,
    # so no module twin; enable() routes them (the Tensor method spellings have torch's signature)
    _op("mean", "reduction", torch.mean, "mean", aliases=(torch.Tensor.mean,), dim=None, keepdim=False, dtype=None),
    _op("mul", "elementwise", torch.mul, "elementwise-product", aliases=(torch.Tensor.mul,)),
)

assert len({op.name for op in _TABLE}) == len(_TABLE), "one entry per op name"

#: name → Op, in table order
CATALOGUE: Mapping[str, Op] = MappingProxyType({op.name: op for op in _TABLE})


def get(name: str) -> Op:
    """The entry named ``name``; a ValueError listing the known names otherwise."""
    try:
        return CATALOGUE[name]
    except KeyError:
        raise ValueError(f"handgrad has no op {name!r}; known: {', '.join(CATALOGUE)}") from None


def ops(kind: str | None = None) -> tuple[Op, ...]:
    """Every entry, or those of one kind, in table order."""
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown op kind {kind!r}; expected one of {KINDS}")
    return tuple(op for op in _TABLE if kind is None or op.kind == kind)


def activations() -> tuple[str, ...]:
    """The names of the elementwise activations (what ``MLP``, ``linear_act`` and the app take)."""
    return tuple(op.name for op in ops("activation"))


def activation(name: str, what: str = "activation") -> Op:
    """The activation entry named ``name``; a ValueError naming ``what`` (the argument) and
    listing the activations otherwise."""
    op = CATALOGUE.get(name)
    if op is None or op.kind != "activation":
        raise ValueError(f"unknown {what} {name!r}; expected one of {', '.join(activations())}")
    return op
