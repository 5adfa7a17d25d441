"""The twins of issue 10's layers: batch, group and RMS norm, embedding, dropout.

As in ``_modules.py``: each subclasses its ``torch.nn`` namesake and overrides ``forward`` only
(constructor, parameters, buffers, init, repr and state_dict are torch's), and ``forward`` calls
``handgrad.functional``. No math here.
"""
from __future__ import annotations

import types

import torch
from torch import nn
from torch.nn.modules import batchnorm as _torch_batchnorm

from .. import functional as F

__all__ = ["BatchNorm1d", "BatchNorm2d", "GroupNorm", "RMSNorm", "Embedding", "Dropout"]

# torch's own ``_BatchNorm.forward`` (the num_batches_tracked count, momentum=None as the
# cumulative average 1/num_batches_tracked, batch statistics in eval when the buffers are None,
# no running update with track_running_stats=False), run with ``F`` bound to handgrad.functional
# instead of torch.nn.functional: the module logic is torch's, line for line, and only the
# ``F.batch_norm`` it ends in is handgrad's.
_batch_norm_forward = types.FunctionType(
    _torch_batchnorm._BatchNorm.forward.__code__, {**vars(_torch_batchnorm), "F": F},
    "forward", _torch_batchnorm._BatchNorm.forward.__defaults__, _torch_batchnorm._BatchNorm.forward.__closure__,
)


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
