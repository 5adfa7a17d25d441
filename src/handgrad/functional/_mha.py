"""multi_head_attention_forward: ``torch.nn.functional.multi_head_attention_forward`` (torch 2.13)
step for step — its checks, its mask merging, its bias_k/bias_v and zero-attention padding —
with the projections run by handgrad's ``linear`` and the attention by handgrad's attention
Function, so the whole layer's backward is hand-derived. No math here.

torch's private mask helpers (``_mha_shape_check``, ``_canonical_mask``, ``_none_or_dtype``) are
reused through ``handgrad._compat``, so the refusals and mask conversions are torch's own.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from .. import _compat
from ..ops.attention import AttentionFn, scale_forms
from ..ops.dropout import keep_mask
from ._attention import _fused_kernel
from ._linear import linear

__all__ = ["multi_head_attention_forward"]

#: handgrad.per_sample.capture's taps on the four projections, innermost last: ``tap(role, x, y,
#: bsz)`` with role "q", "k", "v" or "out" (rows of x and y in (T, N) order); empty outside a
#: capture. A plain list, not a ContextVar: torch.compile traces a global list (fullgraph too).
PROJECTION_TAP: list = []


def _project(role: str, x, w, b, bsz: int):
    y = linear(x, w, b)
    if PROJECTION_TAP:
        PROJECTION_TAP[-1](role, x, y, bsz)
    return y


def _project_packed(x, w, b, bsz: int):
    """Self-attention's q, k, v = x W_{q,k,v}ᵀ + b_{q,k,v} as one GEMM, x Wᵀ + b (T, N, 3E), and
    its three column blocks (views), each tapped as its own projection (torch's
    ``_in_projection_packed``)."""
    qkv = linear(x, w, b).chunk(3, dim=-1)
    if PROJECTION_TAP:
        for role, y in zip("qkv", qkv):
            PROJECTION_TAP[-1](role, x, y, bsz)
    return qkv


def _heads(t, bsz: int, num_heads: int):
    """(T, N, E) → (N·H, T, E/H): torch's per-head layout (a view where the strides allow)."""
    return t.reshape(t.shape[0], bsz * num_heads, t.shape[-1] // num_heads).transpose(0, 1)


def _drop_mask(shape, p: float, like: torch.Tensor) -> torch.Tensor | None:
    """The attention weights' bool keep mask, drawn as torch's dropout draws it (None: no dropout)."""
    if p <= 0.0:
        return None
    if p >= 1.0:
        return torch.zeros(shape, dtype=torch.bool, device=like.device)
    return keep_mask(like.new_empty(shape), p)


def multi_head_attention_forward(query, key, value, embed_dim_to_check: int, num_heads: int, in_proj_weight,
                                 in_proj_bias, bias_k, bias_v, add_zero_attn: bool, dropout_p: float,
                                 out_proj_weight, out_proj_bias, training: bool = True, key_padding_mask=None,
                                 need_weights: bool = True, attn_mask=None, use_separate_proj_weight: bool = False,
                                 q_proj_weight=None, k_proj_weight=None, v_proj_weight=None, static_k=None,
                                 static_v=None, average_attn_weights: bool = True, is_causal: bool = False):
    """``torch.nn.functional.multi_head_attention_forward``: (attn_output, attn_weights or None).
    ``need_weights`` also returns the weights P ⊙ N (head-averaged with ``average_attn_weights``),
    from the attention Function with V = I; the output comes from the Function with V, which
    never keeps P. A fully masked row gives 0 (torch's
    sdpa path; torch's need_weights path gives NaN there)."""
    is_batched = _compat.mha_shape_check(query, key, value, key_padding_mask, attn_mask, num_heads)
    if not is_batched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    tgt_len, bsz, embed_dim = query.shape
    key_padding_mask = _compat.canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                          other_type=_compat.none_or_dtype(attn_mask), other_name="attn_mask",
                                          target_type=query.dtype)
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer module "
                           "method `generate_square_subsequent_mask` to create this mask.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None                      # the hint replaces the mask: sdpa's causal mask
    else:
        attn_mask = _compat.canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                       target_type=query.dtype, check_other=False)
        if key_padding_mask is not None:
            is_causal = False
    if embed_dim != embed_dim_to_check:
        raise AssertionError(f"was expecting embedding dimension of {embed_dim_to_check}, but got {embed_dim}")
    head_dim = embed_dim // num_heads
    if head_dim * num_heads != embed_dim:
        raise AssertionError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
    if use_separate_proj_weight:
        if key.shape[:2] != value.shape[:2]:
            raise AssertionError(f"key's sequence and batch dims {key.shape[:2]} do not match value's "
                                 f"{value.shape[:2]}")
        if q_proj_weight is None or k_proj_weight is None or v_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is True but q_proj_weight, k_proj_weight or "
                                 "v_proj_weight is None")
        w_q, w_k, w_v = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        if key.shape != value.shape:
            raise AssertionError(f"key shape {key.shape} does not match value shape {value.shape}")
        if in_proj_weight is None:
            raise AssertionError("use_separate_proj_weight is False but in_proj_weight is None")
        w_q, w_k, w_v = in_proj_weight.chunk(3)
    if not use_separate_proj_weight and query is key and key is value:
        q, k, v = _project_packed(query, in_proj_weight, in_proj_bias, bsz)                 # (T, N, E) each
    else:
        b_q, b_k, b_v = (None, None, None) if in_proj_bias is None else in_proj_bias.chunk(3)
        q, k, v = (_project(r, x, w, b, bsz) for r, x, w, b in                             # (T, N, E) each
                   (("q", query, w_q, b_q), ("k", key, w_k, b_k), ("v", value, w_v, b_v)))

    src_len = key.shape[0]
    if attn_mask is not None:
        if attn_mask.dim() == 2:
            if attn_mask.shape != (tgt_len, src_len):
                raise RuntimeError(f"The shape of the 2D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(tgt_len, src_len)}.")
            attn_mask = attn_mask.unsqueeze(0)
        elif attn_mask.dim() == 3:
            if attn_mask.shape != (bsz * num_heads, tgt_len, src_len):
                raise RuntimeError(f"The shape of the 3D attn_mask is {attn_mask.shape}, but should be "
                                   f"{(bsz * num_heads, tgt_len, src_len)}.")
        else:
            raise RuntimeError(f"attn_mask's dimension {attn_mask.dim()} is not supported")
    if bias_k is not None and bias_v is not None:
        if static_k is not None or static_v is not None:
            raise AssertionError("bias cannot be added to static key or value.")
        k = torch.cat([k, bias_k.repeat(1, bsz, 1)])
        v = torch.cat([v, bias_v.repeat(1, bsz, 1)])
        attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))
    elif bias_k is not None or bias_v is not None:
        raise AssertionError("bias_k and bias_v must be set together")

    q = _heads(q, bsz, num_heads)                                               # (N·H, L, E/H)
    k = _heads(k, bsz, num_heads) if static_k is None else static_k
    v = _heads(v, bsz, num_heads) if static_v is None else static_v
    if add_zero_attn:
        zeros = torch.zeros((bsz * num_heads, 1, head_dim), dtype=k.dtype, device=k.device)
        k, v = torch.cat([k, zeros], dim=1), torch.cat([v, zeros], dim=1)
        attn_mask = None if attn_mask is None else TF.pad(attn_mask, (0, 1))
        key_padding_mask = None if key_padding_mask is None else TF.pad(key_padding_mask, (0, 1))
    src_len = k.size(1)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (bsz, src_len):   # torch's check, without its closures Dynamo refuses
            raise AssertionError(f"Expected key_padded_mask of shape {(bsz, src_len)} (batch, source length), but "
                                 f"got {tuple(key_padding_mask.shape)}")
        key_padding_mask = (key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1)
                            .reshape(bsz * num_heads, 1, src_len))
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    if not training:
        dropout_p = 0.0

    # the merged mask (1 or N·H, L, S) and q, k, v per (batch, head): (N, H, ·, ·)
    mask4 = None
    if attn_mask is not None:
        mask4 = (attn_mask.unsqueeze(0) if attn_mask.size(0) == 1
                 else attn_mask.view(bsz, num_heads, -1, src_len))
    if mask4 is not None and mask4.dtype != q.dtype:
        mask4 = mask4.to(q.dtype)             # under autocast the projections ran in the lower dtype
    q4 = q.view(bsz, num_heads, tgt_len, head_dim)
    k4 = k.view(bsz, num_heads, src_len, head_dim)
    v4 = v.view(bsz, num_heads, src_len, head_dim)
    keep = _drop_mask((bsz, num_heads, tgt_len, src_len), dropout_p, q4)
    # rounded as torch's path rounds: the explicit weights (scale·Q) with need_weights, else its sdpa's kernel
    form = ("query" if need_weights else "gemm" if q4.device.type == "cpu" and _fused_kernel(q4, k4, v4, mask4,
                                                                                             dropout_p, False)
            else "split")
    scale = scale_forms(1.0 / math.sqrt(head_dim), form)
    out, _lse = AttentionFn.call(q4, k4, v4, mask4, keep, float(dropout_p), bool(is_causal and mask4 is None),
                                 scale, 1)                                    # (N, H, L, E/H)
    out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
    out = _project("out", out, out_proj_weight, out_proj_bias, bsz)
    out = out.view(tgt_len, bsz, out.size(-1))
    weights = None
    if need_weights:
        if is_causal and attn_mask is None:
            raise AssertionError("FIXME: is_causal not implemented for need_weights")
        # P̃ = (P ⊙ N) I: the same Function with V = I (S × S) returns the weights themselves, so
        # their backward is hand-derived too (P ⊙ N exactly: each entry is p·1 plus zeros)
        eye = torch.eye(src_len, dtype=q4.dtype, device=q4.device).expand(bsz, num_heads, src_len, src_len)
        weights, _lse = AttentionFn.call(q4, k4, eye, mask4, keep, float(dropout_p), False, scale, 1)
        if average_attn_weights:
            weights = weights.mean(dim=1)                                       # (N, L, S)
    if not is_batched:
        out = out.squeeze(1)
        weights = None if weights is None else weights.squeeze(0)
    return out, weights
