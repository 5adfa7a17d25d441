"""Scaled dot-product attention as one Function. Derivation: docs/derivation.md#attention.

The scores S = scale·Q Kᵀ + M and the weights P = softmax(S) are (L × S) per head: the Function
saves neither. It saves Q, K, V and the row log-sum-exp ℓ = log Σ_j exp(S_j) (one
value per query row), and the backward recomputes P = exp(S − ℓ) from them, as flash attention
does. ℓ is returned as a second output (the functional drops it) so that the backward, which
reads it, stays differentiable: its VJP is ∂L/∂S += P ⊙ ∂L/∂ℓ (∂ℓ/∂S = P).

Masks are kept as given (the user's bool or float tensor, saved by reference, as native saves
it) and the causal mask is rebuilt where needed, so nothing (L × S) is allocated to be kept
beyond the dropout's bool keep mask, which native keeps too.
"""
from __future__ import annotations

import math

import torch

from ._function import HandFunction, accurate_sum, opmath as _opmath
from .dropout import keep_scale

__all__ = ["AttentionFn", "causal_keep"]


def opmath(t):
    """The compute dtype: float32 for float16/bfloat16 (as torch's kernels), and float64 for
    float32 on CPU: the recomputed P = exp(S − ℓ) and the products over the keys lost up to 3.6×
    torch's float32 error (its kernel normalises once at the end); on CPU a float64 pass is cheap
    at attention's sizes and leaves one rounding. (CUDA float32 stays float32.)"""
    if t is not None and t.dtype == torch.float32 and t.device.type == "cpu":
        return t.double()
    return _opmath(t)


def _own_dtype(t: torch.Tensor):
    """Every product runs in the compute dtype chosen here: autocast's cast is made once, by the
    functional (recorded outside the Function), never again inside forward, backward or jvp."""
    return torch.autocast(t.device.type, enabled=False)


def causal_keep(L: int, S: int, device) -> torch.Tensor:
    """The top-left aligned causal mask (L, S), True = attend: ``torch.ones(L, S).tril(0)``."""
    return torch.ones(L, S, dtype=torch.bool, device=device).tril()


def repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: each of the Hkv key/value heads serves ``groups`` query heads (repeat_interleave on dim -3)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def sum_heads(g: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of ``repeat_heads``: the gradients of a head's ``groups`` copies, summed."""
    return g if groups == 1 else g.reshape(*g.shape[:-3], g.shape[-3] // groups, groups, *g.shape[-2:]).sum(-3)


def scores(q, k, mask, causal: bool, scale: float) -> torch.Tensor:
    """S = scale·Q Kᵀ + M   (*, L, S); M is −∞ where a bool mask (or the causal one) is False,
    the float mask added otherwise."""
    S = (q @ k.mT) * scale                                       # scale·Q Kᵀ       (*, L, S)
    if causal:
        S = S.masked_fill(~causal_keep(S.shape[-2], S.shape[-1], S.device), -math.inf)
    if mask is not None:
        S = S.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else S + mask.to(S.dtype)
    return S


def row_logsumexp(S: torch.Tensor) -> torch.Tensor:
    """ℓ = m + log Σ_j exp(S_j − m), m the row max (0 where the row is all −∞)  (*, L).
    A fully masked row gets ℓ = +∞, so P = exp(S − ℓ) = 0 there: its output and gradients are
    0, as torch's CPU attention gives (a "safe" softmax), not NaN."""
    if S.shape[-1] == 0:                                         # no keys: every row fully masked
        return S.new_full(S.shape[:-1], math.inf)
    m = S.amax(-1, keepdim=True)                                 # (*, L, 1)
    m = m.masked_fill(m == -math.inf, 0)
    lse = (m + accurate_sum((S - m).exp(), -1, keepdim=True).log()).squeeze(-1)   # (*, L)
    return lse.masked_fill(lse == -math.inf, math.inf)


def weights(S: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = exp(S − ℓ) = softmax(S) along the keys   (*, L, S)."""
    return (S - lse.unsqueeze(-1)).exp()


class AttentionFn(HandFunction):
    r"""O = softmax(scale·Q Kᵀ + M) V, with dropout on the weights — equals
    ``torch.nn.functional.scaled_dot_product_attention`` (the dropout mask D given).

    Shapes: Q (*, L, E), K (*, Hkv, S, E), V (*, Hkv, S, Ev) (batch dims broadcast; Hkv = H/groups
    with GQA), M broadcastable to (*, L, S) (bool: True = attend, or float: added), D (*, L, S)
    bool or None → O (*, L, Ev), ℓ (*, L).
    Forward (N = D/(1 − p), the dropout's scaled keep mask, 1 without dropout):
        S = scale·Q Kᵀ + M,   P = softmax(S) = exp(S − ℓ),   O = (P ⊙ N) V
    Backward, G = ∂L/∂O, Γ = ∂L/∂ℓ (zero unless a double backward reads ℓ):
        ∂L/∂V = (P ⊙ N)ᵀ G            dP = (G Vᵀ) ⊙ N
        dS = P ⊙ (dP − rowsum(G ⊙ O)) + P ⊙ Γ,   rowsum(G ⊙ O) = rowsum(P ⊙ dP)
        ∂L/∂Q = scale·dS K            ∂L/∂K = scale·dSᵀ Q            ∂L/∂M = dS (summed to M)
    Forward mode:
        Ṡ = scale(Q̇ Kᵀ + Q K̇ᵀ) + Ṁ,   ℓ̇ = rowsum(P ⊙ Ṡ),   Ṗ = P ⊙ (Ṡ − ℓ̇)
        Ȯ = (Ṗ ⊙ N) V + (P ⊙ N) V̇
    Saves Q, K, V, M, D and ℓ; P is recomputed, and the row term is taken as rowsum(P ⊙ dP), so
    O is not kept either. float16/bfloat16 run in float32, float32 on CPU in float64 (``opmath``).
    Derivation: docs/derivation.md#attention
    """

    @staticmethod
    def forward(q, k, v, mask, drop, p, causal, scale, groups):
        with _own_dtype(q):
            return AttentionFn._forward(q, k, v, mask, drop, p, causal, scale, groups)

    @staticmethod
    def _forward(q, k, v, mask, drop, p, causal, scale, groups):
        dtype = q.dtype
        q, k, v = opmath(q), repeat_heads(opmath(k), groups), repeat_heads(opmath(v), groups)
        S = scores(q, k, mask, causal, scale)                    # (*, L, S)
        lse = row_logsumexp(S)                                   # ℓ        (*, L)
        P = weights(S, lse)                                      # softmax(S)
        if drop is not None:
            P = P * keep_scale(drop, p, P.dtype)                 # P ⊙ N
        return (P @ v).to(dtype), lse                            # O = (P ⊙ N) V

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, drop, p, causal, scale, groups = inputs
        ctx.p, ctx.causal, ctx.scale, ctx.groups = p, causal, scale, groups
        _O, lse = output
        ctx.save_for_backward(q, k, v, mask, drop, lse)
        ctx.save_for_forward(q, k, v, mask, drop, lse)

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        with _own_dtype(grad_o):
            return AttentionFn._backward(ctx, grad_o, grad_lse)

    @staticmethod
    def _backward(ctx, grad_o, grad_lse):
        q, k, v, mask, drop, lse = ctx.saved_tensors
        g = ctx.groups
        Q, K, V = opmath(q), repeat_heads(opmath(k), g), repeat_heads(opmath(v), g)
        G = opmath(grad_o)                                                   # (*, L, Ev)
        P = weights(scores(Q, K, mask, ctx.causal, ctx.scale), lse)          # recomputed (*, L, S)
        N = None if drop is None else keep_scale(drop, ctx.p, P.dtype)
        PN = P if N is None else P * N                                       # P ⊙ N
        need_q, need_k, need_v, need_m = ctx.needs_input_grad[:4]
        grad_q = grad_k = grad_v = grad_m = None
        if need_v:
            grad_v = sum_heads(PN.mT @ G, g).sum_to_size(v.shape).to(v.dtype)    # (P ⊙ N)ᵀ G
        if need_q or need_k or need_m:
            dP = G @ V.mT                                                    # G Vᵀ   (*, L, S)
            if N is not None:
                dP = dP * N                                                  # ⊙ N
            # rowsum(G ⊙ O) = rowsum(P ⊙ dP), the softmax's row term, taken in the second form:
            # from P and dP in the compute dtype rather than the rounded output O; minus Γ
            row = (P * dP).sum(-1, keepdim=True) - grad_lse.to(P.dtype).unsqueeze(-1)
            dS = P * (dP - row)                                              # (*, L, S)
            if need_q:
                grad_q = (ctx.scale * (dS @ K)).sum_to_size(q.shape).to(q.dtype)         # scale·dS K
            if need_k:
                grad_k = sum_heads(ctx.scale * (dS.mT @ Q), g).sum_to_size(k.shape).to(k.dtype)  # scale·dSᵀ Q
            if need_m:
                grad_m = dS.sum_to_size(mask.shape).to(mask.dtype)                       # dS
        return grad_q, grad_k, grad_v, grad_m, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, _ddrop, _p, _causal, _scale, _groups):
        with _own_dtype(ctx.saved_tensors[0]):
            return AttentionFn._jvp(ctx, dq, dk, dv, dmask)

    @staticmethod
    def _jvp(ctx, dq, dk, dv, dmask):
        q, k, v, mask, drop, lse = ctx.saved_tensors
        g = ctx.groups
        Q, K, V = opmath(q), repeat_heads(opmath(k), g), repeat_heads(opmath(v), g)
        P = weights(scores(Q, K, mask, ctx.causal, ctx.scale), lse)          # (*, L, S)
        dS = torch.zeros((), dtype=P.dtype, device=P.device)
        if dq is not None:
            dS = dS + ctx.scale * (opmath(dq) @ K.mT)                       # scale·Q̇ Kᵀ
        if dk is not None:
            dS = dS + ctx.scale * (Q @ repeat_heads(opmath(dk), g).mT)      # scale·Q K̇ᵀ
        if dmask is not None and mask is not None and mask.is_floating_point():
            dS = dS + opmath(dmask)                                          # Ṁ
        dlse = (P * dS).sum(-1)                                              # ℓ̇ = rowsum(P ⊙ Ṡ)
        dP = P * (dS - dlse.unsqueeze(-1))                                   # Ṗ = P ⊙ (Ṡ − ℓ̇)
        if drop is not None:
            N = keep_scale(drop, ctx.p, P.dtype)
            dP, P = dP * N, P * N
        dO = dP @ V                                                          # Ṗ V
        if dv is not None:
            dO = dO + P @ repeat_heads(opmath(dv), g)                        # + P V̇
        return dO.to(q.dtype), dlse.expand_as(lse).to(lse.dtype)
