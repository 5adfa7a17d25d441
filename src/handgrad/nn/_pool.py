"""Pooling modules: torch.nn's ``MaxPool2d``, ``AvgPool2d``, ``AdaptiveAvgPool2d`` with
``handgrad.functional``'s pools. No math here (STYLE.md §4); see nn/_modules.py."""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F

__all__ = ["MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d"]


class MaxPool2d(nn.MaxPool2d):
    """``torch.nn.MaxPool2d``: the max over each window (and its argmax with ``return_indices``)."""

    def forward(self, input: torch.Tensor):
        return F.max_pool2d(input, self.kernel_size, self.stride, self.padding, self.dilation,
                            ceil_mode=self.ceil_mode, return_indices=self.return_indices)


class AvgPool2d(nn.AvgPool2d):
    """``torch.nn.AvgPool2d``: the mean over each window, Y = A_h X A_wᵀ."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(input, self.kernel_size, self.stride, self.padding, self.ceil_mode,
                            self.count_include_pad, self.divisor_override)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    """``torch.nn.AdaptiveAvgPool2d``: the mean over ``output_size`` windows [⌊iH/H_out⌋, ⌈(i+1)H/H_out⌉)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(input, self.output_size)
