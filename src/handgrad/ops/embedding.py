"""Embedding lookup: a gather of weight rows, whose backward is a scatter-add.
Derivation: docs/derivation.md#embedding.
"""
from __future__ import annotations

import torch

from ._function import HandFunction, fast_path, opmath

__all__ = ["EmbeddingFn", "embedding_renorm_"]


def _row_scale(idx: torch.Tensor, num: int, padding_idx: int | None, scale_grad_by_freq: bool, dtype):
    """c_i, the factor of G's row i in ∂L/∂W: 0 where idx_i = padding_idx, 1/count(idx_i) with
    ``scale_grad_by_freq`` (count over this call's indices), else 1. None when every c_i is 1."""
    c = None
    if scale_grad_by_freq:
        counts = torch.bincount(idx, minlength=num)                          # (V,)
        c = counts[idx].to(dtype).reciprocal()                               # 1/count(idx_i)   (n,)
    if padding_idx is not None:
        keep = (idx != padding_idx).to(dtype)                                # 0 at padding_idx (n,)
        c = keep if c is None else c * keep
    return None if c is None else c[:, None]                                 # (n, 1)


class EmbeddingFn(HandFunction):
    r"""Y = W[idx]  (row i of Y is row idx_i of W) — equals ``torch.nn.functional.embedding``.

    Shapes: idx (*) integer, W (V, D) → Y (*, D); n = idx.numel(), E (n, V) the one-hot rows of
    idx, so Y = E W (flattened to (n, D)).
    Backward, G = ∂L/∂Y (n, D), c (n,) the row factors (0 at padding_idx, 1/count with
    scale_grad_by_freq, else 1):
        ∂L/∂W = Eᵀ (c ⊙ G)       a scatter-add of G's rows into rows idx   (V, D)
    It is linear in G; its own backward (double backward) is the gather again, (c ⊙ E Ġ).
    idx gets no gradient (integer). float16/bfloat16 rows are summed in float32 and rounded once.
    Forward mode: Ẏ = Ẇ[idx].
    Derivation: docs/derivation.md#embedding
    """

    @staticmethod
    def forward(idx, weight, padding_idx, scale_grad_by_freq):
        # int64 rows: torch < 2.5 batches index_select under vmap as a gather, which takes int64 only
        return weight.index_select(0, idx.reshape(-1).long()).reshape(*idx.shape, weight.shape[1])   # W[idx]  (*, D)

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, weight, padding_idx, scale_grad_by_freq = inputs
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)
        ctx.V, ctx.w_dtype = weight.shape[0], weight.dtype
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq

    @staticmethod
    def backward(ctx, grad_y):
        (idx,) = ctx.saved_tensors
        grad_w = None
        if ctx.needs_input_grad[1]:
            flat = idx.reshape(-1)                                                  # (n,)
            G = opmath(grad_y).reshape(flat.numel(), grad_y.shape[-1])             # (n, D), float32 for half
            c = _row_scale(flat, ctx.V, ctx.padding_idx, ctx.scale_grad_by_freq, G.dtype)
            if c is not None:
                G = G * c                                                           # c ⊙ G
            zeros = G.new_zeros(ctx.V, G.shape[1])                                 # (V, D)
            add = zeros.index_add_ if fast_path(grad_y) else zeros.index_add      # in place on the fresh zeros
            grad_w = add(0, flat, G)                                                # Eᵀ (c ⊙ G)  (V, D)
            grad_w = grad_w.to(ctx.w_dtype)
        return None, grad_w, None, None

    @staticmethod
    def jvp(ctx, _didx, dw, _padding_idx, _scale):
        (idx,) = ctx.saved_tensors
        return dw.index_select(0, idx.reshape(-1).long()).reshape(*idx.shape, dw.shape[1])   # Ẇ[idx]


def embedding_renorm_(weight: torch.Tensor, idx: torch.Tensor, max_norm: float, norm_type: float) -> None:
    """torch.embedding_renorm_, by hand: in place and not differentiated, each row W_r that idx
    refers to with ‖W_r‖_p > max_norm becomes W_r · max_norm / (‖W_r‖_p + 1e-7)."""
    with torch.no_grad():
        rows = idx.reshape(-1).unique()                                             # each row once
        norms = torch.linalg.vector_norm(weight[rows], ord=norm_type, dim=1)        # ‖W_r‖_p
        scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
        weight[rows] = weight[rows] * scale[:, None].to(weight.dtype)
