"""embedding: torch.nn.functional's arguments, checks and messages; the math is ``ops/embedding.py``."""
from __future__ import annotations

import numbers

import torch

from ..ops.embedding import EmbeddingFn, embedding_renorm_
from ._common import check_tensor, shape_str

__all__ = ["embedding"]

_INDEX_DTYPES = (torch.int64, torch.int32)


def embedding(input: torch.Tensor, weight: torch.Tensor, padding_idx: int | None = None,
              max_norm: float | None = None, norm_type: float = 2.0, scale_grad_by_freq: bool = False,
              sparse: bool = False) -> torch.Tensor:
    """``torch.nn.functional.embedding``: rows ``weight[input]``; backward a scatter-add into the
    rows referred to (ops.embedding.EmbeddingFn). ``padding_idx``'s row gets no gradient;
    ``scale_grad_by_freq`` divides each row's gradient by its count in ``input``; ``max_norm``
    renormalises the referred rows of ``weight`` in place first, as torch does.

    ``sparse=True``: the gradient wrt ``weight`` is torch's uncoalesced sparse COO tensor (for
    torch.optim.SparseAdam, SGD, …)."""
    check_tensor("indices", input, fn="embedding")
    check_tensor("weight", weight, fn="embedding")
    if padding_idx is not None:                # torch's Python checks first, then embedding_renorm_'s, then embedding's
        V = weight.shape[0] if weight.dim() else 0
        if (padding_idx > 0 and padding_idx >= V) or (padding_idx < 0 and padding_idx < -V):   # torch's test
            raise AssertionError(f"Padding_idx must be within num_embeddings (embedding: padding_idx={padding_idx}, "
                                 f"weight of shape {shape_str(weight)})")
    if max_norm is not None:
        # torch.embedding_renorm_'s binding, then its checks, then its loop over the rows
        for name, v in (("max_norm", max_norm), ("norm_type", norm_type)):
            if not isinstance(v, numbers.Real):
                raise TypeError(f"embedding_renorm_(): argument '{name}' must be float, not {type(v).__name__}")
        if weight.dim() != 2:
            raise RuntimeError(f"embedding: Expected 2-dimensional tensor, but got weight of shape {shape_str(weight)} "
                               "(while checking arguments for embedding_renorm_)")
        if input.dtype not in _INDEX_DTYPES:
            raise RuntimeError(
                "Expected tensor for argument #2 'indices' to have one of the following scalar types: Long, Int; but "
                f"got {input.dtype} instead (while checking arguments for embedding_renorm_; indices of shape "
                f"{shape_str(input)})")
        embedding_renorm_(weight, input, float(max_norm), float(norm_type))
    if weight.dim() != 2:
        raise RuntimeError(f"'weight' must be 2-D (embedding: weight of shape {shape_str(weight)})")
    if input.dtype not in _INDEX_DTYPES:
        raise RuntimeError(
            "Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, Int; but got "
            f"{input.dtype} instead (embedding: indices of shape {shape_str(input)})"
        )
    V = weight.shape[0]
    if padding_idx is not None and V:
        padding_idx = padding_idx % V
    if input.numel() and V == 0:
        raise RuntimeError(f"embedding: index_select(): self indexing axis dim should be positive (weight of shape "
                           f"{shape_str(weight)} has no rows, indices of shape {shape_str(input)})")
    if input.numel() and not weight.shape[1] and not torch.compiler.is_compiling():
        # (rows with elements: EmbeddingFn's index_select refuses an index out of range, IndexError)
        lo, hi = int(input.min()), int(input.max())
        if lo < 0 or hi >= V:                               # torch's kernel for rows of no element
            raise RuntimeError(f"embedding: INDICES element is out of DATA bounds (indices in [{lo}, {hi}], weight of "
                               f"shape {shape_str(weight)})")
    out = EmbeddingFn.call(input, weight, padding_idx, bool(scale_grad_by_freq), bool(sparse))
    if weight.is_complex() and weight.requires_grad:           # autograd's check of the output, after the kernel's
        raise RuntimeError(f"embedding does not support automatic differentiation for outputs with complex dtype "
                           f"(weight of shape {shape_str(weight)})")
    return out
