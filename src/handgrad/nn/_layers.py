"""The twins of issue 10's layers: batch, group and RMS norm, embedding, dropout.

As in ``_modules.py``: each subclasses its ``torch.nn`` namesake and overrides ``forward`` only
(constructor, parameters, buffers, init, repr and state_dict are torch's), and ``forward`` calls
``handgrad.functional``. No math here.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "GroupNorm", "RMSNorm", "Embedding", "Dropout"]


def _batch_norm_forward(m: nn.modules.batchnorm._BatchNorm, input: torch.Tensor) -> torch.Tensor:
    """torch's ``_BatchNorm.forward`` (torch 2.13), step for step, ending in handgrad's
    ``F.batch_norm``: count the batch in ``num_batches_tracked``; ``momentum=None`` is the
    cumulative average 1/num_batches_tracked; batch statistics in training, and in eval when the
    buffers are None; buffers passed (so updated) only where tracked. (Running torch's own
    function with another ``F`` in its globals would be shorter, but Dynamo guards a function's
    globals as its module's and fails on it.)"""
    m._check_input_dim(input)
    factor = 0.0 if m.momentum is None else m.momentum
    if m.training and m.track_running_stats and m.num_batches_tracked is not None:
        m.num_batches_tracked.add_(1)
        factor = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
    use_batch_stats = m.training or (m.running_mean is None and m.running_var is None)
    pass_buffers = not m.training or m.track_running_stats
    return F.batch_norm(input, m.running_mean if pass_buffers else None, m.running_var if pass_buffers else None,
                        m.weight, m.bias, use_batch_stats, factor, m.eps)


class BatchNorm1d(nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d``: (N, C) or (N, C, L), statistics per channel (dim 1)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _batch_norm_forward(self, input)


class BatchNorm2d(nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d``: (N, C, H, W), statistics per channel (dim 1)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return _batch_norm_forward(self, input)


class GroupNorm(nn.GroupNorm):
    """``torch.nn.GroupNorm``: each sample's channels in ``num_groups`` groups, then weight, bias per channel."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)


class RMSNorm(nn.RMSNorm):
    """``torch.nn.RMSNorm``: y = x / √(mean(x²) + eps) ⊙ weight over ``normalized_shape``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight, self.eps)


class Embedding(nn.Embedding):
    """``torch.nn.Embedding``: rows of ``weight`` (num_embeddings, embedding_dim); ``from_pretrained`` is torch's."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.embedding(input, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


class Dropout(nn.Dropout):
    """``torch.nn.Dropout``: zeros with probability ``p`` in training, the rest scaled by 1/(1 − p)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.dropout(input, self.p, self.training, self.inplace)
