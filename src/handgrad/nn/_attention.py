"""The twin of ``torch.nn.MultiheadAttention``: torch's constructor, parameters, init, repr and
state_dict; ``forward`` runs handgrad's ``multi_head_attention_forward`` (its linear layers and
attention Function). No math here."""
from __future__ import annotations

from torch import nn

from .. import _compat
from .. import functional as F

__all__ = ["MultiheadAttention"]


class MultiheadAttention(nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` with a hand-derived backward: batch_first, kdim/vdim
    (separate q/k/v projection weights), key_padding_mask, attn_mask, is_causal, need_weights
    with average_attn_weights, bias, add_bias_kv, add_zero_attn, dropout. torch's native fast
    path (inference without grad) is not taken: this forward is always handgrad's."""

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        is_batched = query.dim() == 3
        # torch's forward canonicalises both masks first (bool → additive float, its warnings)
        key_padding_mask = _compat.canonical_mask(mask=key_padding_mask, mask_name="key_padding_mask",
                                              other_type=_compat.none_or_dtype(attn_mask), other_name="attn_mask",
                                              target_type=query.dtype)
        attn_mask = _compat.canonical_mask(mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="",
                                       target_type=query.dtype, check_other=False)
        if self.batch_first and is_batched:     # torch's transposes (to sequence-first)
            if key is value:
                if query is key:
                    query = key = value = query.transpose(1, 0)
                else:
                    query, key = (x.transpose(1, 0) for x in (query, key))
                    value = key
            else:
                query, key, value = (x.transpose(1, 0) for x in (query, key, value))
        separate = not self._qkv_same_embed_dim
        out, weights = F.multi_head_attention_forward(
            query, key, value, self.embed_dim, self.num_heads, self.in_proj_weight, self.in_proj_bias,
            self.bias_k, self.bias_v, self.add_zero_attn, self.dropout, self.out_proj.weight, self.out_proj.bias,
            training=self.training, key_padding_mask=key_padding_mask, need_weights=need_weights,
            attn_mask=attn_mask, use_separate_proj_weight=separate,
            q_proj_weight=self.q_proj_weight if separate else None,
            k_proj_weight=self.k_proj_weight if separate else None,
            v_proj_weight=self.v_proj_weight if separate else None,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        if self.batch_first and is_batched:
            return out.transpose(1, 0), weights
        return out, weights
