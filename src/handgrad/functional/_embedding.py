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

    ``sparse=True`` is refused (NotImplementedError): handgrad's gradient wrt ``weight`` is dense."""
    check_tensor("indices", input, fn="embedding")
    check_tensor("weight", weight, fn="embedding")
    if sparse:
        raise NotImplementedError(
            "embedding: sparse=True is not supported by handgrad: its gradient wrt 'weight' is a dense (V, D) "
            f"tensor (weight of shape {shape_str(weight)}); use sparse=False (or torch.nn.functional.embedding)"
        )
    if weight.dim() != 2:
        raise RuntimeError(f"'weight' must be 2-D (embedding: weight of shape {shape_str(weight)})")
    if input.dtype not in _INDEX_DTYPES:
        raise RuntimeError(
            "Expected tensor for argument #1 'indices' to have one of the following scalar types: Long, Int; but got "
            f"{input.dtype} instead (embedding: indices of shape {shape_str(input)})"
        )
    V = weight.shape[0]
    if padding_idx is not None:
        if not -V <= padding_idx < V:
            raise AssertionError(f"Padding_idx must be within num_embeddings (embedding: padding_idx={padding_idx}, "
                                 f"weight of shape {shape_str(weight)})")
        padding_idx = padding_idx % V
    if input.numel() and not torch.compiler.is_compiling():
        lo, hi = int(input.min()), int(input.max())
        if lo < 0 or hi >= V:
            raise IndexError(f"index out of range in self (embedding: indices in [{lo}, {hi}], weight of shape "
                             f"{shape_str(weight)})")
    if max_norm is not None:
        if not isinstance(norm_type, numbers.Real):
            raise TypeError(f"embedding(): argument 'norm_type' must be float, not {type(norm_type).__name__}")
        embedding_renorm_(weight, input, float(max_norm), float(norm_type))
    return EmbeddingFn.call(input, weight, padding_idx, bool(scale_grad_by_freq))
