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
    ``sparse``: the same Eᵀ (c ⊙ G) left unsummed, as torch's sparse gradient is: a sparse COO
    (V, D) tensor, uncoalesced, whose indices are idx and whose values are G's rows, the rows
    at padding_idx left out (c = 0); torch has no sparse form of scale_grad_by_freq and refuses it
    in backward (so does this).
    It is linear in G; its own backward (double backward) is the gather again, (c ⊙ E Ġ).
    idx gets no gradient (integer). float16/bfloat16 rows are summed in float32 and rounded once.
    Forward mode: Ẏ = Ẇ[idx].
    Derivation: docs/derivation.md#embedding
    """

    @staticmethod
    def forward(idx, weight, padding_idx, scale_grad_by_freq, sparse):
        # int64 rows: torch < 2.5 batches index_select under vmap as a gather, which takes int64 only.
        # index_select refuses an index outside [0, V) (IndexError, as torch's embedding): the
        # functional leaves that check to it.
        flat = idx if idx.dim() == 1 else idx.reshape(-1)
        try:
            Y = weight.index_select(0, flat if flat.dtype == torch.int64 else flat.long())   # W[idx]  (n, D)
        except IndexError as e:
            raise IndexError(f"{e} (embedding: indices of shape {list(idx.shape)}, weight of shape "
                             f"{list(weight.shape)})") from None
        return Y if idx.dim() == 1 else Y.reshape(*idx.shape, weight.shape[1])              # (*, D)

    @staticmethod
    def setup_context(ctx, inputs, output):
        idx, weight, padding_idx, scale_grad_by_freq, sparse = inputs
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)
        ctx.V, ctx.w_dtype = weight.shape[0], weight.dtype
        ctx.padding_idx, ctx.scale_grad_by_freq, ctx.sparse = padding_idx, scale_grad_by_freq, sparse

    @staticmethod
    def backward(ctx, grad_y):
        (idx,) = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None, None
        flat = idx if idx.dim() == 1 else idx.reshape(-1)                          # (n,)
        D = grad_y.shape[-1]
        if ctx.sparse:
            return None, _sparse_grad(flat, grad_y.reshape(flat.numel(), D), ctx), None, None, None
        G = opmath(grad_y)                                                          # float32 for half
        G = G if G.dim() == 2 else G.reshape(flat.numel(), D)                       # (n, D)
        c = _row_scale(flat, ctx.V, ctx.padding_idx, ctx.scale_grad_by_freq, G.dtype)
        if c is not None:
            G = G * c                                                               # c ⊙ G
        zeros = G.new_zeros(ctx.V, D)                                               # (V, D)
        add = zeros.index_add_ if fast_path(grad_y) else zeros.index_add           # in place on the fresh zeros
        grad_w = add(0, flat, G)                                                    # Eᵀ (c ⊙ G)  (V, D)
        return None, grad_w if grad_w.dtype == ctx.w_dtype else grad_w.to(ctx.w_dtype), None, None, None

    @staticmethod
    def jvp(ctx, _didx, dw, _padding_idx, _scale, _sparse):
        (idx,) = ctx.saved_tensors
        return dw.index_select(0, idx.reshape(-1).long()).reshape(*idx.shape, dw.shape[1])   # Ẇ[idx]


def _sparse_grad(flat, G, ctx):
    """Eᵀ (c ⊙ G) unsummed: sparse COO (V, D), indices idx (1, n) int64, values G's rows (n, D)
    in G's dtype, the rows at padding_idx dropped; torch's layout (uncoalesced)."""
    if ctx.scale_grad_by_freq:
        raise RuntimeError("embedding_backward: scale_grad_by_freq not supported with sparse gradients "
                           f"(embedding: weight of shape [{ctx.V}, {G.shape[1]}], sparse=True)")
    if ctx.padding_idx is not None:
        keep = flat != ctx.padding_idx                                             # c ≠ 0   (n,)
        flat, G = flat[keep], G[keep]
    if G.numel() == 0:                                                              # torch: no entry at all
        flat, G = flat.new_empty(0), G.new_empty(0, G.shape[1])
    # (no invariant check: the forward's index_select checked every index)
    return torch.sparse_coo_tensor(flat.long().unsqueeze(0), G, (ctx.V, G.shape[1]), check_invariants=False)


def embedding_renorm_(weight: torch.Tensor, idx: torch.Tensor, max_norm: float, norm_type: float) -> None:
    """torch.embedding_renorm_, by hand: in place and not differentiated, each row W_r that idx
    refers to with ‖W_r‖_p > max_norm becomes W_r · max_norm / (‖W_r‖_p + 1e-7), the norm taken
    in W's dtype and compared in float64, as torch's loop does (aten/native/Embedding.cpp).
    A weight whose rows share memory (a zero stride, an expanded tensor) is renormalised row by
    row in ascending order, exactly as torch's loop: a row scaled in place changes the norms of
    the rows after it, and a row that overlaps itself is refused only when it is to be scaled.
    Any other weight: every row at once (the same numbers). An index outside [−V, V) is an
    IndexError (torch's row select; a negative one selects from the end)."""
    with torch.no_grad():
        rows = idx.reshape(-1).unique()                                             # each row once, ascending
        if not rows.numel():
            return
        V = weight.shape[0]
        if any(st == 0 and n > 1 for st, n in zip(weight.stride(), weight.shape)):
            for r in rows.tolist():
                row = weight.select(0, r)                                           # W_r (IndexError out of range)
                norm = float(torch.linalg.vector_norm(row, ord=norm_type))          # ‖W_r‖_p
                if norm > max_norm:
                    row.mul_(max_norm / (norm + 1e-7))                              # torch's row *= scale
            return
        lo, hi = rows[[0, -1]].tolist()
        if lo < -V or hi >= V:
            raise IndexError(f"select(): index {lo if lo < -V else hi} out of range for tensor of size "
                             f"{list(weight.shape)} at dimension 0 (embedding's max_norm renormalisation)")
        W = weight[rows]                                                            # (k, D)
        norms = torch.linalg.vector_norm(W, ord=norm_type, dim=1).double()          # ‖W_r‖_p   (k,)
        scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), 1.0)       # float64, as torch's
        Wo = opmath(W)                                                              # torch's row *= scale: in opmath
        weight[rows] = (Wo * scale.to(Wo.dtype)[:, None]).to(weight.dtype)
