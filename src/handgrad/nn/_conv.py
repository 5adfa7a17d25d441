"""Convolution modules: torch.nn's ``Conv1d`` / ``Conv2d`` (constructor, parameters, init, repr,
state_dict) with ``handgrad.functional``'s conv. No math here (STYLE.md §4); see nn/_modules.py."""
from __future__ import annotations

import torch
import torch.nn.functional as TF
from torch import nn

from .. import functional as F

__all__ = ["Conv1d", "Conv2d"]


def _conv_forward(module, conv, torch_class, input: torch.Tensor) -> torch.Tensor:
    """As torch's ``_ConvNd._conv_forward``: ``padding_mode`` 'zeros' pads inside the conv; the other
    modes pad first with ``torch.nn.functional.pad`` (torch's own: a data movement whose backward,
    a gather of the padded borders, stays native) and convolve with padding 0.

    A subclass with its own ``_conv_forward`` (weight standardisation, say) keeps torch's
    ``forward``, so ``convert`` swaps it; its ``_conv_forward`` is its math, and runs as it is."""
    if type(module)._conv_forward is not torch_class._conv_forward:
        return module._conv_forward(input, module.weight, module.bias)
    if module.padding_mode != "zeros":
        padded = TF.pad(input, module._reversed_padding_repeated_twice, mode=module.padding_mode)
        return conv(padded, module.weight, module.bias, module.stride, 0, module.dilation, module.groups)
    return conv(input, module.weight, module.bias, module.stride, module.padding, module.dilation, module.groups)


class Conv1d(nn.Conv1d):
    """``torch.nn.Conv1d``: Y = W_col X_col + b, W (out_channels, in_channels/groups, k), b (out_channels,)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, F.conv1d, nn.Conv1d, input)


class Conv2d(nn.Conv2d):
    """``torch.nn.Conv2d``: Y = W_col X_col + b, W (out_channels, in_channels/groups, kH, kW), b (out_channels,)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _conv_forward(self, F.conv2d, nn.Conv2d, input)
