"""Scaled dot-product attention as one Function. Derivation: docs/derivation.md#attention.

The scores S = scale·Q Kᵀ + M and the weights P = softmax(S) are (L × S) per head: the Function
saves neither. It saves Q, K, V and the row log-sum-exp ℓ = log Σ_j exp(S_j) (one value per
query row), and the backward recomputes P = exp(S − ℓ) from them, as flash attention does. ℓ is returned as a second output (the functional
drops it) so that the backward, which reads it, stays differentiable: its VJP is
∂L/∂S += P ⊙ ∂L/∂ℓ (∂ℓ/∂S = P).

float32 is computed in float32, as torch's kernels do, each weight P rounded once (``weights``),
the same in the forward and in the backward's recomputation, the backward's row term refined once. With a causal mask the query rows are taken in blocks of ``BLOCK`` and each block meets only
the keys it can see, so the masked upper triangle is neither multiplied nor exponentiated.
Outside a double backward and torch.func (grad mode off) the (L × S) work runs in place on the
buffers the Function owns; otherwise the same formulas run out of place (the ``ip`` flag).

Masks are kept as given (the user's bool or float tensor, saved by reference, as native saves
it) and the causal mask is rebuilt where needed, so nothing (L × S) is allocated to be kept
beyond the dropout's bool keep mask, which native keeps too.
"""
from __future__ import annotations

import functools
import math

import torch

from .. import _compat
from ._function import HandFunction, opmath
from .dropout import keep_scale

__all__ = ["AttentionFn", "BLOCK"]

#: query rows per causal block. The products and exps of a block of rows [r0, r1) run over its
#: r1 visible keys: with T/BLOCK = n blocks that is (n + 1)/(2n) of the full (T × T) work
#: (T = 512: 9/16), for n more Python-level calls per step. Measured at B·H = 64, T = 512, float32:
#: 64 rows 0.97× native, 128 rows 1.05×, 32 rows 1.04× (the calls start to count).
BLOCK = 64


def _own_dtype(t: torch.Tensor):
    """Every product runs in the compute dtype chosen here: autocast's cast is made once, by the
    functional (recorded outside the Function), never again inside forward, backward or jvp."""
    return torch.autocast(t.device.type, enabled=False)


def _in_place() -> bool:
    """May the (L × S) steps overwrite their inputs? Only outside autograd (a double backward
    differentiates the backward) and outside torch.func (its batched tensors)."""
    return not torch.is_grad_enabled() and not _compat.functorch_transforms_active()


# the elementwise steps, in place on a buffer the Function owns (ip) or out of place
def _sub(a, b, ip):
    return a.sub_(b) if ip else a - b


def _mul(a, b, ip):
    return a.mul_(b) if ip else a * b


def _exp(a, ip):
    return a.exp_() if ip else a.exp()


def _hide(a, hidden, ip):
    return a.masked_fill_(hidden, -math.inf) if ip else a.masked_fill(hidden, -math.inf)


def _causal_hidden(L: int, S: int, row0: int, device) -> torch.Tensor:
    """The keys rows row0 … row0 + L − 1 may not see under the top-left aligned causal mask:
    True where j > i, i.e. ``torch.ones(L, S).triu(row0 + 1)`` (L, S)."""
    if torch.compiler.is_compiling():
        return torch.ones(L, S, dtype=torch.bool, device=device).triu(row0 + 1)
    return _cached_hidden(L, S, row0, device)


@functools.lru_cache(maxsize=64)
def _cached_hidden(L, S, row0, device):
    return torch.ones(L, S, dtype=torch.bool, device=device).triu(row0 + 1)


def repeat_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """GQA: each of the Hkv key/value heads serves ``groups`` query heads (repeat_interleave on dim -3)."""
    return t if groups == 1 else t.repeat_interleave(groups, dim=-3)


def sum_heads(g: torch.Tensor, groups: int) -> torch.Tensor:
    """The adjoint of ``repeat_heads``: the gradients of a head's ``groups`` copies, summed."""
    return g if groups == 1 else g.reshape(*g.shape[:-3], g.shape[-3] // groups, groups, *g.shape[-2:]).sum(-3)


def scores(qs, k, mask, causal: bool, row0: int = 0, ip: bool = False) -> torch.Tensor:
    """S = (scale·Q) Kᵀ + M   (*, l, s), ``qs`` = scale·Q; M is −∞ where a bool mask (or the
    causal one, for query rows row0 …) is False, the float mask added otherwise."""
    S = qs @ k.mT                                                # scale·Q Kᵀ       (*, l, s)
    if causal:
        S = _hide(S, _causal_hidden(S.shape[-2], S.shape[-1], row0, S.device), ip)
    if mask is not None:
        if mask.dtype == torch.bool:
            S = _hide(S, ~mask, ip)
        else:
            S = S.add_(mask.to(S.dtype)) if ip else S + mask.to(S.dtype)
    return S


def _max_shift(S: torch.Tensor) -> torch.Tensor:
    """m, the row max of S (*, l, 1), 0 on a fully masked row; a constant shift (detached)."""
    m = S.detach().amax(-1, keepdim=True)
    return m.masked_fill(m == -math.inf, 0)


def _normalise(E: torch.Tensor, m: torch.Tensor, lse: torch.Tensor, ip: bool) -> torch.Tensor:
    """P = E·exp(m − ℓ) for E = exp(S − m) (*, l, s): exp(m − ℓ) = 1/rowsum E, 0 where ℓ = +∞
    (a fully masked row)."""
    return _mul(E, (m - lse.unsqueeze(-1)).exp(), ip)


def weights(S: torch.Tensor, lse: torch.Tensor, ip: bool = False, masked: bool = True) -> torch.Tensor:
    """P = softmax(S) along the keys (*, l, s). In place (grad mode off, every ordinary backward)
    torch's softmax kernel itself (a forward kernel): each weight rounded once as torch's math
    kernel rounds it; exp(S − ℓ) from the rounded ℓ would scale a whole row by one error (Σ P ≠ 1
    by eps·|ℓ|: up to 8× torch's float32 error in the gradients, measured). Differentiably (a
    double backward, torch.func) exp(S − m)·exp(m − ℓ), m the row max, a constant shift (P does
    not depend on it). ``masked``: a row may be fully masked (an attn_mask; the causal mask never
    hides key 0), so P = 0 is set there."""
    if ip:
        return _softmax(S, lse.isinf().unsqueeze(-1) if masked else None)
    m = _max_shift(S)
    return _normalise(_exp(_sub(S, m, ip), ip), m, lse, ip)


def _softmax(S: torch.Tensor, empty: torch.Tensor | None) -> torch.Tensor:
    """torch.softmax(S) (a forward kernel) with the ``empty`` rows (fully masked) 0, as torch's
    ``_safe_softmax``."""
    P = torch.softmax(S, -1)
    return P.masked_fill_(empty, 0) if _any(empty) else P


def _any(t: torch.Tensor | None) -> bool:
    """Is any element of the bool ``t`` set (None: no)? Under torch.compile assumed so: a
    data-dependent branch would not trace, and the fill it guards is then always made."""
    return t is not None and (torch.compiler.is_compiling() or bool(t.any()))


def _blocks(L: int, S: int, causal: bool, blocked: bool):
    """(r0, r1, s): query rows [r0, r1) and the s keys they meet; one block unless causal."""
    if not (causal and blocked) or L <= BLOCK:
        return ((0, L, S),)
    return tuple((r0, min(r0 + BLOCK, L), min(S, r0 + BLOCK)) for r0 in range(0, L, BLOCK))


def _part(t, r0, r1, s):
    """A mask's (or keep mask's) entries for query rows [r0, r1) and keys [0, s), where it has those dims."""
    if t is None:
        return None
    if t.dim() >= 1 and t.shape[-1] != 1:
        t = t[..., :s]
    if t.dim() >= 2 and t.shape[-2] != 1:
        t = t[..., r0:r1, :]
    return t


#: the (L × S) elements of one tile of the fast path (1 MiB of float32, a core's L2 cache): the
#: (batch · head) dim is taken that many rows at a time, so a tile's scores stay in cache from the
#: product that writes them to the one that reads them (at B·H = 64, T = 512 the whole-batch
#: products spent half their time waiting on memory).
TILE = 1 << 18


def _flat(q, k, v, mask, drop):
    """(n, ·, ·) views of Q, K, V, the mask and the keep mask when their batch dims agree (the
    mask's may be absent or all 1), else None: the fast path's layout."""
    batch = q.shape[:-2]
    if k.shape[:-2] != batch or v.shape[:-2] != batch or (drop is not None and drop.shape[:-2] != batch):
        return None
    if mask is not None and mask.dim() > 2 and mask.shape[:-2] != batch:
        if any(d != 1 for d in mask.shape[:-2]):
            return None
        mask = mask.reshape(mask.shape[-2:])
    n = math.prod(batch)
    flat = [t.reshape(n, *t.shape[-2:]) for t in (q, k, v)]
    if mask is not None and mask.dim() > 2:
        mask = mask.reshape(n, *mask.shape[-2:])
    return (*flat, mask, None if drop is None else drop.reshape(n, *drop.shape[-2:]))


def _tiles(n: int, L: int, S: int, causal: bool):
    """(b0, b1, r0, r1, s): batch rows [b0, b1), query rows [r0, r1) and the s keys they meet."""
    for r0, r1, s in _blocks(L, S, causal, True):
        c = max(1, TILE // max(1, (r1 - r0) * s))
        for b0 in range(0, n, c):
            yield b0, min(n, b0 + c), r0, r1, s


def _like(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """g summed to t's shape (over broadcast dims), in t's dtype."""
    if g.shape != t.shape:
        g = g.sum_to_size(t.shape)
    return g if g.dtype == t.dtype else g.to(t.dtype)


def _one_tile(q, L: int, S: int, causal: bool) -> bool:
    """Does the whole call fit one tile (no causal blocks)? Then it runs without the tiles'
    reshapes and copies (the per-call overhead of a small attention)."""
    return (not causal or L <= BLOCK) and math.prod(q.shape[:-2]) * L * S <= TILE


def _batch(t, b0, b1):
    return t if t is None or t.dim() <= 2 else t[b0:b1]


def _forward_rows(qs, k, v, mask, drop, p, causal, row0, ip):
    """One block of query rows: P = softmax(S) and ℓ = m + log l, with m the row max (0 on a
    fully masked row, where ℓ = +∞), l = rowsum exp(S − m); O = (P ⊙ N) V. In place: P by
    torch's softmax (a forward kernel) and ℓ = m − log max_j P_j (max_j P_j = 1/l)."""
    S = scores(qs, k, mask, causal, row0, ip)                    # (*, l, s)
    if ip:
        m = S.amax(-1, keepdim=True)                             # (*, l, 1)
        empty = (m == -math.inf) if mask is not None else None   # fully masked rows: P = 0, ℓ = +∞
        P = _softmax(S, empty)
        lse = m - P.amax(-1, keepdim=True).log()                 # m + log l
        if _any(empty):
            lse = lse.masked_fill(empty, math.inf)
    else:
        m = _max_shift(S)                                        # row max    (*, l, 1)
        E = _exp(_sub(S, m, ip), ip)                             # exp(S − m); 0 on a fully masked row
        l = E.sum(-1, keepdim=True)                              # (*, l, 1)
        lse = (m + l.log()).masked_fill(l == 0, math.inf)
        P = _normalise(E, m, lse.squeeze(-1), ip)                # softmax(S)
    if drop is not None:
        P = _mul(P, keep_scale(drop, p, P.dtype), ip)            # P ⊙ N
    return P @ v, lse.squeeze(-1)                                # O = (P ⊙ N) V   (*, l, Ev)


def _backward_rows(qs, k, v, G, glse, mask, drop, p, causal, lse, row0, ip, need_v, need_qkm):
    """One block of query rows, from the recomputed P: ∂L/∂V = (P ⊙ N)ᵀ G and
    dS = P ⊙ (dP − rowsum(P ⊙ dP) + Γ) (for ∂L/∂Q, ∂L/∂K, ∂L/∂M)."""
    P = weights(scores(qs, k, mask, causal, row0, ip), lse, ip, mask is not None)   # recomputed (*, l, s)
    N = None if drop is None else keep_scale(drop, p, P.dtype)
    dv = ((P if N is None else P * N).mT @ G) if need_v else None   # (P ⊙ N)ᵀ G
    if not need_qkm:
        return dv, None
    dP = G @ v.mT                                                # G Vᵀ   (*, l, s)
    if N is not None:
        dP = _mul(dP, N, ip)                                     # ⊙ N
    # rowsum(P ⊙ dP) = rowsum(G ⊙ O), taken in the first form (from P, as torch's math kernel):
    # where V's rows are equal it cancels with dP exactly, and it needs no saved O
    row = torch.linalg.vecdot(P, dP).unsqueeze(-1)
    # D = dP − row, the difference first (exact where dP ≈ row), then once refined: the row's own
    # rounding (eps·|dP|, all of dS where one weight dominates) is rowsum(P ⊙ D) (0 in exact
    # arithmetic), taken from the small D accurately. Without it 3× torch's float32 error there.
    D = _sub(dP, row, ip)
    D = _sub(D, torch.linalg.vecdot(P, D).unsqueeze(-1), ip)
    if glse is not None:
        D = D + glse.unsqueeze(-1)                               # + Γ
    return dv, _mul(D, P, ip)                                    # dS = P ⊙ D


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
        dS = P ⊙ (dP − rowsum(P ⊙ dP) + Γ),   rowsum(P ⊙ dP) = rowsum(G ⊙ O)
        ∂L/∂Q = scale·dS K            ∂L/∂K = scale·dSᵀ Q            ∂L/∂M = dS (summed to M)
    Forward mode:
        Ṡ = scale(Q̇ Kᵀ + Q K̇ᵀ) + Ṁ,   ℓ̇ = rowsum(P ⊙ Ṡ),   Ṗ = P ⊙ (Ṡ − ℓ̇)
        Ȯ = (Ṗ ⊙ N) V + (P ⊙ N) V̇
    Saves Q, K, V, M, D and ℓ; P is recomputed. float16/bfloat16 run in float32 (``opmath``).
    With grad mode off (outside a double backward and torch.func) the same rows run tile by tile
    (``_tiles``: cache-sized, and causal blocks over only the keys they see), in place.
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
        L, S = q.shape[-2], k.shape[-2]
        if S == 0:                                               # no keys: every row fully masked
            shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
            out = q.new_zeros((*shape, L, v.shape[-1]))
            return out.to(dtype), q.new_full((*shape, L), math.inf)
        qs = q * scale                                           # scale·Q     (*, L, E)
        ip = _in_place()
        flat = _flat(qs, k, v, mask, drop) if ip and not _one_tile(qs, L, S, causal) else None
        if flat is None:
            O, lse = _forward_rows(qs, k, v, mask, drop, p, causal, 0, ip)
            return O.to(dtype), lse
        qs, k, v, mask, drop = flat                              # (n, ·, ·)
        n = qs.shape[0]
        O, lse = qs.new_empty((n, L, v.shape[-1])), qs.new_empty((n, L))
        for b0, b1, r0, r1, s in _tiles(n, L, S, causal):
            O[b0:b1, r0:r1], lse[b0:b1, r0:r1] = _forward_rows(
                qs[b0:b1, r0:r1], k[b0:b1, :s], v[b0:b1, :s], _part(_batch(mask, b0, b1), r0, r1, s),
                _part(_batch(drop, b0, b1), r0, r1, s), p, causal, r0, True)
        batch = q.shape[:-2]
        return O.view(*batch, L, O.shape[-1]).to(dtype), lse.view(*batch, L)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, mask, drop, p, causal, scale, groups = inputs
        ctx.p, ctx.causal, ctx.scale, ctx.groups = p, causal, scale, groups
        _O, lse = output
        ctx.set_materialize_grads(False)             # Γ = None unless a double backward reads ℓ
        ctx.save_for_backward(q, k, v, mask, drop, lse)
        ctx.save_for_forward(q, k, v, mask, drop, lse)

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        if grad_o is None:                          # only ℓ was differentiated (unmaterialised grads)
            _q, _k, v, _m, _d, lse = ctx.saved_tensors
            grad_o = lse.new_zeros((*lse.shape, v.shape[-1]))
        with _own_dtype(grad_o):
            return AttentionFn._backward(ctx, grad_o, grad_lse)

    @staticmethod
    def _backward(ctx, grad_o, grad_lse):
        q, k, v, mask, drop, lse = ctx.saved_tensors
        g, scale, p, causal = ctx.groups, ctx.scale, ctx.p, ctx.causal
        need_q, need_k, need_v, need_m = ctx.needs_input_grad[:4]
        Q, K, V = opmath(q), repeat_heads(opmath(k), g), repeat_heads(opmath(v), g)
        G = opmath(grad_o)                                                   # (*, L, Ev)
        glse = None if grad_lse is None else grad_lse.to(G.dtype)                # Γ   (*, L)
        need_qkm = need_q or need_k or need_m
        qs, ks = Q * scale, K * scale                                        # scale·Q, scale·K
        ip = _in_place()
        tiled = ip and not need_m and not _one_tile(qs, qs.shape[-2], ks.shape[-2], causal)
        flat = _flat(qs, K, V, mask, drop) if tiled else None
        if flat is None:
            dV, dS = _backward_rows(qs, K, V, G, glse, mask, drop, p, causal, lse, 0, ip, need_v,
                                    need_qkm)
            dQ = dS @ ks if need_q else None                                 # scale·dS K
            dK = dS.mT @ qs if need_k else None                              # scale·dSᵀ Q
        else:
            dQ, dK, dV = AttentionFn._backward_tiles(flat, scale, G, glse, lse, p, causal, need_q, need_k,
                                                     need_v)
        grad_q = None if dQ is None else _like(dQ, q)
        grad_k = None if dK is None else _like(sum_heads(dK, g), k)
        grad_v = None if dV is None else _like(sum_heads(dV, g), v)
        grad_m = _like(dS, mask) if need_m else None                         # dS
        return grad_q, grad_k, grad_v, grad_m, None, None, None, None, None

    @staticmethod
    def _backward_tiles(flat, scale, G, glse, lse, p, causal, need_q, need_k, need_v):
        """The backward's fast path, tile by tile on (n, ·, ·) views (no mask gradient): ∂L/∂Q
        rows are written by their tile, ∂L/∂K and ∂L/∂V summed over the tiles that meet a key."""
        qs, K, V, mask, drop = flat                                          # scale·Q, K, V
        n, L, S = qs.shape[0], qs.shape[-2], K.shape[-2]
        ks = K * scale                                                       # scale·K
        batch = G.shape[:-2]
        G, lse = G.reshape(n, L, G.shape[-1]), lse.reshape(n, L)
        glse = None if glse is None else glse.expand(*batch, L).reshape(n, L)
        dQ = qs.new_empty(qs.shape) if need_q else None
        dK = qs.new_zeros(ks.shape) if need_k else None
        dV = qs.new_zeros(V.shape) if need_v else None
        for b0, b1, r0, r1, s in _tiles(n, L, S, causal):
            dv, dS = _backward_rows(qs[b0:b1, r0:r1], K[b0:b1, :s], V[b0:b1, :s], G[b0:b1, r0:r1],
                                    None if glse is None else glse[b0:b1, r0:r1],
                                    _part(_batch(mask, b0, b1), r0, r1, s), _part(_batch(drop, b0, b1), r0, r1, s),
                                    p, causal, lse[b0:b1, r0:r1], r0, True, need_v, need_q or need_k)
            if need_v:
                dV[b0:b1, :s] += dv                                          # += (P ⊙ N)ᵀ G
            if need_q:
                torch.matmul(dS, ks[b0:b1, :s], out=dQ[b0:b1, r0:r1])         # scale·dS K
            if need_k:
                dK[b0:b1, :s].baddbmm_(dS.mT, qs[b0:b1, r0:r1])             # += scale·dSᵀ Q
        view = lambda t: None if t is None else t.view(*batch, *t.shape[-2:])
        return view(dQ), view(dK), view(dV)
    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, _ddrop, _p, _causal, _scale, _groups):
        with _own_dtype(ctx.saved_tensors[0]):
            return AttentionFn._jvp(ctx, dq, dk, dv, dmask)

    @staticmethod
    def _jvp(ctx, dq, dk, dv, dmask):
        q, k, v, mask, drop, lse = ctx.saved_tensors
        g = ctx.groups
        Q, K, V = opmath(q), repeat_heads(opmath(k), g), repeat_heads(opmath(v), g)
        P = weights(scores(Q * ctx.scale, K, mask, ctx.causal), lse)        # softmax(S)   (*, L, S)
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
