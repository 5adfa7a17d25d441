"""scaled_dot_product_attention: torch.nn.functional's arguments, checks and dropout draw; the
math is ``ops/attention.py``. ``multi_head_attention_forward`` lives in ``_mha.py``."""
from __future__ import annotations

import math

import torch

from ..ops.attention import AttentionFn
from ..ops.dropout import keep_mask
from ._common import autocast, check_tensor, shape_str

__all__ = ["scaled_dot_product_attention"]

_FN = "scaled_dot_product_attention"


def _check(query, key, value, attn_mask, is_causal, enable_gqa) -> int:
    """torch's refusals (RuntimeError), naming the arguments and shapes; returns the GQA groups."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, fn=_FN)
    if not (query.dtype == key.dtype == value.dtype) or not query.is_floating_point():
        raise RuntimeError(f"{_FN}: Expected query, key, and value to have the same floating dtype, but got "
                           f"query.dtype: {query.dtype}, key.dtype: {key.dtype} and value.dtype: {value.dtype}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(f"{_FN}: query, key and value must be at least 2-D; got query {shape_str(query)}, "
                           f"key {shape_str(key)}, value {shape_str(value)}")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"{_FN}: query's and key's last dims and key's and value's sequence lengths must match; "
                           f"got query {shape_str(query)}, key {shape_str(key)}, value {shape_str(value)}")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, fn=_FN)
        if is_causal:
            raise RuntimeError(f"{_FN}: Explicit attn_mask should not be set when is_causal=True "
                               f"(attn_mask {shape_str(attn_mask)})")
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            raise RuntimeError(f"{_FN}: Expected attn_mask dtype to be bool or to match query dtype, but got "
                               f"attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype}")
    if not enable_gqa or query.dim() < 3 or key.shape[-3] == query.shape[-3]:
        return 1
    Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
    if Hk != Hv or Hk == 0 or Hq % Hk:
        raise RuntimeError(f"{_FN}: with enable_gqa the number of heads in key and value must be equal and divide "
                           f"the number of heads in query; got query {shape_str(query)}, key {shape_str(key)}, "
                           f"value {shape_str(value)}")
    return Hq // Hk


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``: softmax(scale·Q Kᵀ + M) V with
    ``scale`` = 1/√E by default; a bool ``attn_mask`` attends where True, a float one is added
    (and may require grad); ``is_causal`` masks the top-left aligned upper triangle; fully masked
    rows give 0 (as torch's CPU kernels do). ``dropout_p`` drops attention weights with a bool
    mask drawn here as torch's CPU math path draws it (``bernoulli_(1 − p)`` on a (*, L, S) tensor)."""
    groups = _check(query, key, value, attn_mask, is_causal, enable_gqa)
    query, key, value, attn_mask = autocast(_FN, query, key, value, attn_mask)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    drop = None
    if dropout_p > 0.0:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-3] + (query.shape[-3],) if groups > 1
                                       else key.shape[:-2])
        weights_shape = (*batch, query.shape[-2], key.shape[-2])
        drop = (torch.zeros(weights_shape, dtype=torch.bool, device=query.device) if dropout_p >= 1.0
                else keep_mask(query.new_empty(weights_shape), dropout_p))
    out, _lse = AttentionFn.call(query, key, value, attn_mask, drop, float(dropout_p), bool(is_causal), scale, groups)
    return out
