"""scaled_dot_product_attention: torch.nn.functional's arguments, checks and dropout draw; the
math is ``ops/attention.py``. ``multi_head_attention_forward`` lives in ``_mha.py``."""
from __future__ import annotations

import math

import torch

from .. import _compat
from ..ops.attention import AttentionFn, scale_forms
from ..ops.dropout import keep_mask
from ._common import autocast, check_tensor, shape_str

__all__ = ["scaled_dot_product_attention"]

_FN = "scaled_dot_product_attention"


def _check(query, key, value, attn_mask) -> None:
    """torch's argument checks (its ``validate_sdpa_input``), RuntimeError naming the arguments."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        check_tensor(name, t, fn=_FN)
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError(f"{_FN}: Expected query, key, and value to have the same dtype, but got "
                           f"query.dtype: {query.dtype}, key.dtype: {key.dtype} and value.dtype: {value.dtype}")
    if min(query.dim(), key.dim(), value.dim()) < 2:
        raise RuntimeError(f"{_FN}: query, key and value must be at least 2-D; got query {shape_str(query)}, "
                           f"key {shape_str(key)}, value {shape_str(value)}")
    if attn_mask is not None:
        check_tensor("attn_mask", attn_mask, fn=_FN)
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            raise RuntimeError(f"{_FN}: Expected attn_mask dtype to be bool or float or to match query dtype, but "
                               f"got attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype}")


def _fused_kernel(q, k, v, mask, p: float, enable_gqa: bool) -> bool:
    """Does torch's CPU dispatch pick its flash kernel (``use_flash_attention_cpp``, checked in its
    order)? It decides two of torch's answers: is_causal with an attn_mask (the flash kernel takes
    both, the math kernel refuses) and a negative dropout_p (refused, ignored). Its mask-shape
    check reads the mask's dim −2 (IndexError for a 0-d or 1-D mask), as torch's does."""
    if p > 0.0 or not (q.dim() == k.dim() == v.dim() == 4):
        return False
    if not (q.shape[0] == k.shape[0] == v.shape[0]):
        return False
    if not (q.shape[1] == k.shape[1] == v.shape[1]) and not (
            enable_gqa and k.shape[1] == v.shape[1] and k.shape[1] > 0 and q.shape[1] % k.shape[1] == 0):
        return False
    if mask is not None:
        if mask.requires_grad:
            return False
        if mask.dim() < 2:
            raise IndexError(f"Dimension out of range (expected to be in range of [-{max(mask.dim(), 1)}, "
                             f"{max(mask.dim(), 1) - 1}], but got -2)")
        L, S, B, H = q.shape[2], k.shape[2], q.shape[0], q.shape[1]
        if mask.shape[-2] not in (L, 1) or mask.shape[-1] not in (S, 1):
            return False
        if mask.dim() not in (2, 4) or (mask.dim() == 4 and (mask.shape[0] not in (1, B) or mask.shape[1] not in (1, H))):
            return False
    return (q.shape[-1] == k.shape[-1] == v.shape[-1] and q.shape[2] > 0 and k.shape[2] > 0
            and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1 and q.is_floating_point())


def _math_checks(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, fused: bool) -> int:
    """The checks of torch's kernels in the order they run (RuntimeError, IndexError for GQA's
    head dim of a 2-D input, NotImplementedError for complex); returns the GQA groups."""
    if attn_mask is not None and attn_mask.dtype == torch.bool and not (query.is_floating_point() or query.is_complex()):
        # torch turns a bool mask into −∞/0 in the query's dtype first
        raise RuntimeError(f"{_FN}: value cannot be converted to type {query.dtype} without overflow (a bool "
                           f"attn_mask becomes −inf in the query's dtype)")
    if fused:
        if dropout_p != 0.0:
            raise RuntimeError(f"{_FN}_flash_attention: Currently do not support dropout > 0")
    elif is_causal and attn_mask is not None:
        raise RuntimeError(f"{_FN}: Explicit attn_mask should not be set when is_causal=True "
                           f"(attn_mask {shape_str(attn_mask)})")
    if query.shape[-1] != key.shape[-1] or key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"{_FN}: query's and key's last dims and key's and value's sequence lengths must match; "
                           f"got query {shape_str(query)}, key {shape_str(key)}, value {shape_str(value)}")
    groups = 1
    if enable_gqa:
        if min(query.dim(), key.dim(), value.dim()) < 3:
            raise IndexError("Dimension out of range (expected to be in range of [-2, 1], but got -3)")
        Hq, Hk, Hv = query.shape[-3], key.shape[-3], value.shape[-3]
        if Hk != Hq and (Hk != Hv or Hk == 0 or Hq % Hk):
            raise RuntimeError(f"{_FN}: with enable_gqa the number of heads in key and value must be equal and "
                               f"divide the number of heads in query; got query {shape_str(query)}, key "
                               f"{shape_str(key)}, value {shape_str(value)}")
        groups = Hq // Hk if Hk != Hq else 1
    if attn_mask is not None:                 # the math kernel adds the mask to the scores in place
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-3] + query.shape[-3:-2] if groups > 1
                                       else key.shape[:-2])
        weights = (*batch, query.shape[-2], key.shape[-2])
        for i in range(1, max(len(weights), attn_mask.dim()) + 1):
            a, b = (weights[-i] if i <= len(weights) else 1), (attn_mask.shape[-i] if i <= attn_mask.dim() else 1)
            if b != a and b != 1 or i > len(weights):
                raise RuntimeError(f"{_FN}: attn_mask {shape_str(attn_mask)} does not broadcast to the attention "
                                   f"weights' shape {list(weights)} (the size of tensor a ({a}) must match the "
                                   f"size of tensor b ({b}) at dimension {-i})")
    batch = query.shape[:-2]
    if groups == 1 and not key.shape[:-2] == value.shape[:-2] == batch:
        try:                                  # the math kernel's products broadcast the batch dims
            torch.broadcast_shapes(batch, key.shape[:-2], value.shape[:-2])
        except RuntimeError as e:
            raise RuntimeError(f"{_FN}: the batch dims of query {shape_str(query)}, key {shape_str(key)} and value "
                               f"{shape_str(value)} do not broadcast ({e})") from None
    if query.is_complex():
        raise NotImplementedError(f'{_FN}: "softmax_lastdim_kernel_impl" not implemented for {query.dtype}')
    if not query.is_floating_point():
        raise RuntimeError(f"{_FN}: expected a floating dtype for query, key and value, got {query.dtype}")
    return groups


def _empty(query, key, value) -> torch.Tensor:
    """torch's answer for an empty query, before any other check: an empty (*query[:-1], Ev)
    result, differentiable in query, key and value (their gradients 0), not in the mask."""
    zero = (query.sum(-1, keepdim=True) + key.sum() + value.sum()) * 0
    zero = zero.to(torch.int64 if query.dtype == torch.bool else query.dtype)   # (bool: int64, as torch's)
    return zero.expand(*query.shape[:-1], value.shape[-1])


def scaled_dot_product_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                                 attn_mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                                 is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention``: softmax(scale·Q Kᵀ + M) V with
    ``scale`` = 1/√E by default; a bool ``attn_mask`` attends where True, a float one is added
    (and may require grad); ``is_causal`` masks the top-left aligned upper triangle; fully masked
    rows give 0 (as torch's CPU kernels do). ``dropout_p`` drops attention weights with a bool
    mask drawn here as torch's CPU math path draws it (``bernoulli_(1 − p)`` on a (*, L, S) tensor)."""
    for name, x in (("dropout_p", dropout_p), ("scale", scale)):      # torch's argument parser
        if not isinstance(x, (int, float)) and not (x is None and name == "scale"):
            raise TypeError(f"{_FN}(): argument '{name}' must be float, not {type(x).__name__}")
    _check(query, key, value, attn_mask)
    if query.numel() == 0 and not _compat.functorch_transforms_active():   # (torch.func: the Function's path)
        return _empty(*autocast(_FN, query, key, value))
    # the kernel choice decides a mask's and a negative dropout_p's fate, and where the scale rounds
    flash = _fused_kernel(query, key, value, attn_mask, dropout_p, enable_gqa)
    fused = (attn_mask is not None or dropout_p < 0) and flash
    groups = _math_checks(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa, fused)
    query, key, value, attn_mask = autocast(_FN, query, key, value, attn_mask)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    drop = None
    if dropout_p > 1.0 and query.shape[-2] * key.shape[-2] and all(query.shape[:-2]) and all(key.shape[:-2]):
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if dropout_p > 0.0:
        batch = torch.broadcast_shapes(query.shape[:-2], key.shape[:-3] + (query.shape[-3],) if groups > 1
                                       else key.shape[:-2])
        weights_shape = (*batch, query.shape[-2], key.shape[-2])
        drop = (torch.zeros(weights_shape, dtype=torch.bool, device=query.device) if dropout_p >= 1.0
                else keep_mask(query.new_empty(weights_shape), dropout_p))
    scales = scale_forms(scale, "gemm" if flash and query.device.type == "cpu" else "split")
    out, _lse = AttentionFn.call(query, key, value, attn_mask, drop, float(dropout_p), bool(is_causal), scales, groups)
    return out
