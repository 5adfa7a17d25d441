"""Scaled dot-product attention as one Function. Derivation: docs/derivation.md#attention.

The scores S = scale·(Q Kᵀ) + M and the weights P = softmax(S) are (L × S) per head: the Function
saves neither. It saves Q, K, V and the row log-sum-exp ℓ = log Σ_j exp(S_j) (one value per
query row), and the backward recomputes P from them, as flash attention does. ℓ is returned as a
second output (the functional drops it) so that the backward, which reads it, stays
differentiable: its VJP is ∂L/∂S += P ⊙ ∂L/∂ℓ (∂ℓ/∂S = P).

Rounding as torch's kernel for the same call rounds (``scale_forms``): its CPU flash kernel
multiplies each product by the scale once it is summed (scale·(Q Kᵀ), scale·(dS K), scale·(dSᵀ Q): a
GEMM's alpha), so Q and K enter every product unrounded; its math kernel scales Q and K by √scale
each first; multi_head_attention_forward's explicit weights scale Q. Another order than torch's
errs by other roundings, which a gradient that cancels afterwards shows (4× torch's error where
the input projection cancels; 3× on an unbatched call, both found by the fuzzer). float32 is
computed in float32, as torch's kernels do; each weight P is rounded once (torch's softmax kernel
on the fast path).

Two paths compute the same formulas:
- at a small size (``_attention_kernel.KERNEL_WORK``) on CPU float32/float64, with no GQA and no
  mask that requires grad, the fast path is the compiled kernel (``_attention_kernel``), one call
  forward and one backward, in float64;
- else the fast path (``fast_path``: grad mode off, outside torch.func, so every forward and every
  first-order backward), on (n, ·, ·) views of inputs whose batch dims agree, tile by tile
  (``_tiles``: cache-sized; with a causal mask, blocks of ``BLOCK`` query rows over only the keys
  they see), in place in (L × S) workspaces the call owns, the products written into the
  outputs (``out=``);
- the differentiable path, the same formulas out of place (double backward, torch.func, batch dims
  that broadcast, a mask that requires grad).

Masks are kept as given (the user's bool or float tensor, saved by reference, as native saves
it) and the causal mask is rebuilt where needed, so nothing (L × S) is kept beyond the dropout's
bool keep mask, which native keeps too.
"""
from __future__ import annotations

import functools
import math

import torch

from ._attention_kernel import kernel_backward, kernel_forward, kernel_ready
from ._function import HandFunction, fast_path, opmath, own_dtype
from .dropout import keep_scale

__all__ = ["AttentionFn", "BLOCK", "TILE", "scale_forms"]

#: query rows per causal block. The products and exps of a block of rows [r0, r1) run over its
#: r1 visible keys: with T/BLOCK = n blocks that is (n + 1)/(2n) of the full (T × T) work
#: (T = 512: 9/16), for n more Python-level calls per step. Measured at B·H = 64, T = 512, float32:
#: 64 rows 0.97× native, 128 rows 1.05×, 32 rows 1.04× (the calls start to count).
BLOCK = 64

#: the (L × S) elements of one tile of the fast path (512 KiB of float32, a core's L2 cache): the
#: (batch · head) dim is taken that many rows at a time, so a tile's scores stay in cache from the
#: product that writes them to the one that reads them (at B·H = 64, T = 512 the whole-batch
#: products spent half their time waiting on memory). At B·H = 64, T = 256, float32: 2¹⁷ 1.16×
#: native (causal 0.99×), 2¹⁸ 1.20× (1.04×), and each of the three workspaces half the size.
TILE = 1 << 17


def scale_forms(scale: float, form: str) -> tuple[float, float, float]:
    """(s_q, s_k, α): the Function's ``scale`` argument, S = α·((s_q Q)(s_k K)ᵀ) = scale·Q Kᵀ,
    rounded as one of torch's kernels: "gemm" (its CPU flash kernel, the GEMM's alpha:
    (1, 1, scale)), "split" (its math kernel: ±√|scale| on Q, √|scale| on K, (the sign on Q)),
    "query" (multi_head_attention_forward's explicit weights, scale·Q: (scale, 1, 1))."""
    if form == "gemm":
        return 1.0, 1.0, scale
    if form == "query":
        return scale, 1.0, 1.0
    root = math.sqrt(abs(scale))
    return (-root if scale < 0 else root), root, 1.0


def _pre(t: torch.Tensor, s: float) -> torch.Tensor:
    """s·t, t itself for s = 1 (the products' own scale, ``scale_forms``)."""
    return t if s == 1.0 else t * s


def _no_autocast(t: torch.Tensor) -> bool:
    return not torch.is_autocast_enabled(t.device.type)


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


def _any(t: torch.Tensor | None) -> bool:
    """Is any element of the bool ``t`` set (None: no)? Under torch.compile assumed so: a
    data-dependent branch would not trace, and the fill it guards is then always made."""
    return t is not None and (torch.compiler.is_compiling() or bool(t.any()))


def _like(g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """g summed to t's shape (over broadcast dims), in t's dtype."""
    if g.shape != t.shape:
        g = g.sum_to_size(t.shape)
    return g if g.dtype == t.dtype else g.to(t.dtype)


def grad_scores(P: torch.Tensor, dP: torch.Tensor, glse: torch.Tensor | None, ip: bool,
                W: torch.Tensor | None = None) -> torch.Tensor:
    """dS = P ⊙ (dP − c + Γ), c = rowsum(P ⊙ dP)   (*, l, s); in place in dP where ``ip`` (the
    fast path), the products in the workspace W where given. c is taken in the first form (from P, as
    torch's math kernel: where V's rows are equal it cancels with dP exactly, and it needs no saved
    O), D = dP − c first (exact where dP ≈ c: a product P ⊙ dP − P c would keep eps·|dP| there,
    4× torch's error on a fuzzer call), then refined once: c's own rounding (eps·|dP|, all of dS where
    one weight dominates) is r = rowsum(P ⊙ D) (0 in exact arithmetic), taken from the small D
    accurately. Without the refinement 3× torch's float32 error there."""
    prod = torch.mul if W is None else (lambda a, b: torch.mul(a, b, out=W))
    c = prod(P, dP).sum(-1, keepdim=True)                        # (*, l, 1)
    D = dP.sub_(c) if ip else dP - c
    r = prod(P, D).sum(-1, keepdim=True)
    D = D.sub_(r) if ip else D - r
    if glse is not None:
        D = D.add_(glse.unsqueeze(-1)) if ip else D + glse.unsqueeze(-1)   # + Γ
    return D.mul_(P) if ip else D * P


# --- the differentiable path: the formulas out of place, on any broadcastable batch dims ------

def scores(q, k, mask, causal: bool, scale: float) -> torch.Tensor:
    """S = scale·(Q Kᵀ) + M   (*, L, S); M is −∞ where a bool mask (or the causal one) is False,
    the float mask added otherwise."""
    S = (q @ k.mT) * scale                                       # scale·(Q Kᵀ)
    if causal:
        S = S.masked_fill(_causal_hidden(S.shape[-2], S.shape[-1], 0, S.device), -math.inf)
    if mask is not None:
        S = S.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else S + mask.to(S.dtype)
    return S


def _max_shift(S: torch.Tensor) -> torch.Tensor:
    """m, the row max of S (*, l, 1), 0 on a fully masked row; a constant shift (detached)."""
    m = S.detach().amax(-1, keepdim=True)
    return m.masked_fill(m == -math.inf, 0)


def weights(S: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """P = softmax(S) = exp(S − m)·exp(m − ℓ)  (*, L, S), m the row max (a constant shift: P does
    not depend on it); exp(m − ℓ) = 0 on a fully masked row (ℓ = +∞)."""
    m = _max_shift(S)
    return (S - m).exp() * (m - lse.unsqueeze(-1)).exp()


def _forward_math(q, k, v, mask, drop, p, causal, scale):
    """P = softmax(S), ℓ = m + log l with l = rowsum exp(S − m) (+∞ on a fully masked row),
    O = (P ⊙ N) V."""
    S = scores(q, k, mask, causal, scale)                        # (*, L, S)
    m = _max_shift(S)                                            # (*, L, 1)
    E = (S - m).exp()                                            # exp(S − m); 0 on a fully masked row
    l = E.sum(-1, keepdim=True)
    lse = (m + l.log()).masked_fill(l == 0, math.inf)            # (*, L, 1)
    P = E * (m - lse).exp()                                      # softmax(S)
    if drop is not None:
        P = P * keep_scale(drop, p, P.dtype)                     # P ⊙ N
    return P @ v, lse.squeeze(-1)                                # O = (P ⊙ N) V   (*, L, Ev)


def _backward_math(q, k, v, G, glse, mask, drop, p, causal, lse, scale, need_v, need_qkm):
    """∂L/∂V = (P ⊙ N)ᵀ G; dS (for ∂L/∂Q, ∂L/∂K, ∂L/∂M) from the recomputed P."""
    P = weights(scores(q, k, mask, causal, scale), lse)          # recomputed (*, L, S)
    N = None if drop is None else keep_scale(drop, p, P.dtype)
    dv = ((P if N is None else P * N).mT @ G) if need_v else None   # (P ⊙ N)ᵀ G
    if not need_qkm:
        return dv, None
    dP = G @ v.mT                                                # G Vᵀ   (*, L, S)
    if N is not None:
        dP = dP * N                                              # ⊙ N
    return dv, grad_scores(P, dP, glse, False)


# --- the fast path: (n, ·, ·) views, tile by tile, in place in workspaces the call owns --------

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
    if len(batch) == 1:
        flat = [q, k, v]
    else:
        n = math.prod(batch)
        flat = [t.reshape(n, *t.shape[-2:]) for t in (q, k, v)]
        if mask is not None and mask.dim() > 2:
            mask = mask.reshape(n, *mask.shape[-2:])
        if drop is not None:
            drop = drop.reshape(n, *drop.shape[-2:])
    return (*flat, mask, drop)


def _tiles(n: int, L: int, S: int, causal: bool):
    """(b0, b1, r0, r1, s): batch rows [b0, b1), query rows [r0, r1) and the s keys they meet."""
    blocks = (((0, L, S),) if not causal or L <= BLOCK else
              tuple((r0, min(r0 + BLOCK, L), min(S, r0 + BLOCK)) for r0 in range(0, L, BLOCK)))
    out = []
    for r0, r1, s in blocks:
        c = max(1, TILE // max(1, (r1 - r0) * s))
        out += [(b0, min(n, b0 + c), r0, r1, s) for b0 in range(0, n, c)]
    return out


def _cut(t, b0: int, b1: int, r0: int, r1: int):
    """t[b0:b1, r0:r1] of an (n, ·, ·) tensor; t itself where that is all of it (a slice is a call)."""
    if b0 or b1 != t.shape[0]:
        t = t[b0:b1]
    return t if not r0 and r1 == t.shape[1] else t[:, r0:r1]


def _part(t, b0: int, b1: int, r0: int, r1: int, s: int):
    """A (·, l, s) mask's entries for the tile, where it has those dims (size 1: broadcast)."""
    if t is None:
        return None
    if t.dim() == 3 and t.shape[0] != 1 and (b0 or b1 != t.shape[0]):
        t = t[b0:b1]
    if t.shape[-2] != 1 and (r0 or r1 != t.shape[-2]):
        t = t[..., r0:r1, :]
    return t if t.shape[-1] == 1 or s == t.shape[-1] else t[..., :s]


def _workspace(like: torch.Tensor, tiles, count: int) -> list[torch.Tensor | None]:
    """``count`` buffers of the largest tile's (b, l, s) elements (scores and weights; dP and dS;
    the products of ``grad_scores``); None for one tile, whose steps allocate their results (a
    buffer is one more call: each call costs ~2 µs at a small size)."""
    if len(tiles) == 1:
        return [None] * count
    size = max([0] + [(b1 - b0) * (r1 - r0) * s for b0, b1, r0, r1, s in tiles])   # (Dynamo: no max(default=))
    return [like.new_empty(size) for _ in range(count)]


def _rows_workspace(like: torch.Tensor, tiles, e: int) -> torch.Tensor:
    """A buffer for the largest (b, l or s, e) product of a tile (``_gemm``'s ``tmp``)."""
    return like.new_empty(max([0] + [(b1 - b0) * max(r1 - r0, s) * e for b0, b1, r0, r1, s in tiles]))


def _view(buf: torch.Tensor, shape) -> torch.Tensor:
    size = math.prod(shape)
    return (buf if buf.numel() == size else buf[:size]).view(shape)


def _gemm(out, a, b, alpha: float, add: bool, tmp) -> None:
    """out = alpha·(a b), or out += alpha·(a b) with ``add`` (b, ·, ·): into ``out`` where it is
    contiguous; through the workspace ``tmp`` where it is a causal block's rows or keys (into a
    strided ``out`` torch's batched GEMM runs one GEMM per batch row: 3× slower, measured)."""
    if out.is_contiguous():
        if add:
            out.baddbmm_(a, b, alpha=alpha)
        else:
            torch.baddbmm(out, a, b, beta=0, alpha=alpha, out=out)
        return
    t = _view(tmp, out.shape)
    torch.baddbmm(t, a, b, beta=0, alpha=alpha, out=t)
    out.add_(t) if add else out.copy_(t)


def _masks(mask, dtype):
    """(the float mask to add, in the compute dtype, or None; the bool mask of hidden keys, or None)."""
    if mask is None:
        return None, None
    return (None, mask.logical_not()) if mask.dtype == torch.bool else (mask.to(dtype), None)


def _tile_weights(buf, q, k, add, hide, causal: bool, r0: int, scale: float, lse=None):
    """One tile: S = scale·(Q Kᵀ) + M into ``buf`` (the float mask as the GEMM's beta input,
    hidden keys −∞), then P = softmax(S) in place (torch's kernel, a forward kernel). ``lse``:
    the backward's ℓ (b, l), which marks the fully masked rows (+∞); None in the forward, which
    returns ℓ (b, l, 1) too: m − log max_j P_j (= m + log Σ exp(S − m), m the row max; torch's
    ``logsumexp`` costs 50 µs a call at a small size). A fully masked row gets P = 0, ℓ = +∞."""
    shape = (q.shape[0], q.shape[1], k.shape[1])
    S = q.new_empty(shape) if buf is None else _view(buf, shape)
    if add is not None:
        S = torch.baddbmm(add, q, k.mT, alpha=scale, out=S)
    else:
        S = torch.baddbmm(S, q, k.mT, beta=0, alpha=scale, out=S)
    if causal and S.shape[2] > r0:           # keys [0, r0) are seen by every row of the block
        S[..., r0:].masked_fill_(_causal_hidden(S.shape[1], S.shape[2] - r0, 0, S.device), -math.inf)
    if hide is not None:
        S.masked_fill_(hide, -math.inf)
    masked = add is not None or hide is not None                 # (the causal mask never hides key 0)
    if lse is not None:                                          # the backward: P only
        P = torch.softmax(S, -1, out=S)
        if masked:
            empty = lse.isinf().unsqueeze(-1)
            if _any(empty):
                P.masked_fill_(empty, 0)
        return P, None
    m = S.amax(-1, keepdim=True)                                 # (b, l, 1)
    P = torch.softmax(S, -1, out=S)
    ell = m - P.amax(-1, keepdim=True).log()                     # m + log l (max_j P_j = 1/l)
    if masked:
        empty = m == -math.inf                                   # fully masked rows
        if _any(empty):
            P.masked_fill_(empty, 0)
            ell = ell.masked_fill(empty, math.inf)
    return P, ell


def _fast_forward(q, k, v, mask, drop, p, causal, scale):
    """O (n, L, Ev), ℓ (n, L) of (n, ·, ·) inputs, tile by tile."""
    n, L = q.shape[0], q.shape[1]
    tiles = _tiles(n, L, k.shape[1], causal)
    add, hide = _masks(mask, q.dtype)
    buf, = _workspace(q, tiles, 1)
    if len(tiles) == 1:
        P, ell = _tile_weights(buf, q, k, add, hide, causal, 0, scale)
        if drop is not None:
            P.mul_(keep_scale(drop, p, P.dtype))                 # P ⊙ N
        return torch.bmm(P, v), ell.squeeze(-1)                  # O = (P ⊙ N) V
    O, lse = q.new_empty((n, L, v.shape[-1])), q.new_empty((n, L, 1))
    tmp = _rows_workspace(q, tiles, v.shape[-1]) if causal else None
    for b0, b1, r0, r1, s in tiles:
        P, ell = _tile_weights(buf, _cut(q, b0, b1, r0, r1), _cut(k, b0, b1, 0, s), _part(add, b0, b1, r0, r1, s),
                               _part(hide, b0, b1, r0, r1, s), causal, r0, scale)
        if drop is not None:
            P.mul_(keep_scale(_part(drop, b0, b1, r0, r1, s), p, P.dtype))
        _gemm(_cut(O, b0, b1, r0, r1), P, _cut(v, b0, b1, 0, s), 1.0, False, tmp)   # O = (P ⊙ N) V
        _cut(lse, b0, b1, r0, r1).copy_(ell)
    return O, lse.squeeze(-1)


def _fast_backward(q, k, v, G, glse, mask, drop, p, causal, lse, scale, aq, ak, need_q, need_k, need_v):
    """∂L/∂Q' = aq·(dS K), ∂L/∂K' = ak·(dSᵀ Q), ∂L/∂V of (n, ·, ·) inputs, tile by tile: ∂L/∂Q rows written by their tile,
    ∂L/∂K and ∂L/∂V summed over the tiles that meet a key (several only with a causal mask)."""
    n, L, S = q.shape[0], q.shape[1], k.shape[1]
    tiles = _tiles(n, L, S, causal)[::-1]   # the last rows first: they meet every key they write
    add, hide = _masks(mask, q.dtype)
    buf, buf2, buf3 = _workspace(q, tiles, 3)
    tmp = _rows_workspace(q, tiles, max(q.shape[-1], v.shape[-1])) if causal else None
    dQ = q.new_empty(q.shape) if need_q else None
    dK = q.new_empty(k.shape) if need_k else None
    one = len(tiles) == 1
    dV = q.new_empty(v.shape) if need_v and not one else None
    seen = tiles[0][4] if tiles else S                           # keys past every query row: 0
    for d in (dK, dV):
        if d is not None and seen < S:
            d[:, seen:].zero_()
    for b0, b1, r0, r1, s in tiles:
        more = r1 != L                                           # a block of rows after the last: +=
        qt, kt, vt, Gt = _cut(q, b0, b1, r0, r1), _cut(k, b0, b1, 0, s), _cut(v, b0, b1, 0, s), _cut(G, b0, b1, r0, r1)
        P, _ = _tile_weights(buf, qt, kt, _part(add, b0, b1, r0, r1, s), _part(hide, b0, b1, r0, r1, s), causal,
                             r0, scale, _cut(lse, b0, b1, r0, r1))
        N = None if drop is None else keep_scale(_part(drop, b0, b1, r0, r1, s), p, P.dtype)
        if need_v:
            PN = P if N is None else P * N if one else torch.mul(P, N, out=_view(buf2, P.shape))
            if one:
                dV = torch.bmm(PN.mT, Gt)                                       # (P ⊙ N)ᵀ G
            else:
                _gemm(_cut(dV, b0, b1, 0, s), PN.mT, Gt, 1.0, more, tmp)        # (+)= (P ⊙ N)ᵀ G
        if need_q or need_k:
            dP = torch.bmm(Gt, vt.mT) if one else torch.bmm(Gt, vt.mT, out=_view(buf2, P.shape))   # G Vᵀ
            if N is not None:
                dP.mul_(N)                                       # ⊙ N
            dS = grad_scores(P, dP, None if glse is None else _cut(glse, b0, b1, r0, r1), True,
                             None if one else _view(buf3, P.shape))
            if need_q:
                _gemm(_cut(dQ, b0, b1, r0, r1), dS, kt, aq, False, tmp)        # aq·(dS K)
            if need_k:
                _gemm(_cut(dK, b0, b1, 0, s), dS.mT, qt, ak, more, tmp)        # (+)= ak·(dSᵀ Q)
    return dQ, dK, dV


class AttentionFn(HandFunction):
    r"""O = softmax(scale·Q Kᵀ + M) V, with dropout on the weights — equals
    ``torch.nn.functional.scaled_dot_product_attention`` (the dropout mask D given).

    Shapes: Q (*, L, E), K (*, Hkv, S, E), V (*, Hkv, S, Ev) (batch dims broadcast; Hkv = H/groups
    with GQA), M broadcastable to (*, L, S) (bool: True = attend, or float: added), D (*, L, S)
    bool or None → O (*, L, Ev), ℓ (*, L). ``scale`` is (s_q, s_k, α) of ``scale_forms``: below,
    Q and K stand for s_q Q and s_k K, scale for α, and ∂L/∂Q, ∂L/∂K carry one more s_q, s_k.
    Forward (N = D/(1 − p), the dropout's scaled keep mask, 1 without dropout):
        S = scale·(Q Kᵀ) + M,   P = softmax(S) = exp(S − ℓ),   O = (P ⊙ N) V
    Backward, G = ∂L/∂O, Γ = ∂L/∂ℓ (zero unless a double backward reads ℓ):
        ∂L/∂V = (P ⊙ N)ᵀ G            dP = (G Vᵀ) ⊙ N
        dS = P ⊙ (dP − rowsum(P ⊙ dP) + Γ),   rowsum(P ⊙ dP) = rowsum(G ⊙ O)
        ∂L/∂Q = scale·(dS K)          ∂L/∂K = scale·(dSᵀ Q)          ∂L/∂M = dS (summed to M)
    Forward mode:
        Ṡ = scale(Q̇ Kᵀ + Q K̇ᵀ) + Ṁ,   ℓ̇ = rowsum(P ⊙ Ṡ),   Ṗ = P ⊙ (Ṡ − ℓ̇)
        Ȯ = (Ṗ ⊙ N) V + (P ⊙ N) V̇
    Saves Q, K, V, M, D and ℓ; P is recomputed. float16/bfloat16 run in float32 (``opmath``).
    Derivation: docs/derivation.md#attention
    """

    @staticmethod
    def forward(q, k, v, mask, drop, p, causal, scale, groups):
        if _no_autocast(q):
            return AttentionFn._forward(q, k, v, mask, drop, p, causal, scale, groups)
        with own_dtype(q):
            return AttentionFn._forward(q, k, v, mask, drop, p, causal, scale, groups)

    @staticmethod
    def _forward(q, k, v, mask, drop, p, causal, scale, groups):
        # small: the compiled kernel; not for a mask that requires grad, whose backward (the
        # differentiable path) recomputes P from ℓ: ℓ from its own rounding of S, or P ≠ 1 for one key
        if (kernel_ready(q, k, v, mask, drop, groups, causal) and (mask is None or not mask.requires_grad)
                and fast_path()):
            out = kernel_forward(q, k, v, mask, drop, p, causal, scale[0] * scale[1] * scale[2])   # S = s_q s_k α·(Q Kᵀ) + M
            if out is not None:
                return out
        dtype = q.dtype
        q, k, v = opmath(q), repeat_heads(opmath(k), groups), repeat_heads(opmath(v), groups)
        sq, sk, scale = scale
        q, k = _pre(q, sq), _pre(k, sk)                          # s_q Q, s_k K
        L, S = q.shape[-2], k.shape[-2]
        if S == 0:                                               # no keys: every row fully masked
            shape = torch.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
            out = q.new_zeros((*shape, L, v.shape[-1]))
            return out.to(dtype), q.new_full((*shape, L), math.inf)
        flat = _flat(q, k, v, mask, drop) if fast_path() else None
        if flat is None:
            O, lse = _forward_math(q, k, v, mask, drop, p, causal, scale)
            return O.to(dtype), lse
        O, lse = _fast_forward(*flat, p, causal, scale)         # (n, L, Ev), (n, L)
        batch = q.shape[:-2]
        if len(batch) != 1:
            O, lse = O.view(*batch, L, O.shape[-1]), lse.view(*batch, L)
        return (O if O.dtype == dtype else O.to(dtype)), lse

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
        if _no_autocast(grad_o):
            return AttentionFn._backward(ctx, grad_o, grad_lse)
        with own_dtype(grad_o):
            return AttentionFn._backward(ctx, grad_o, grad_lse)

    @staticmethod
    def _backward(ctx, grad_o, grad_lse):
        q, k, v, mask, drop, lse = ctx.saved_tensors
        g, (sq, sk, scale), p, causal = ctx.groups, ctx.scale, ctx.p, ctx.causal
        need_q, need_k, need_v, need_m = ctx.needs_input_grad[:4]
        if grad_lse is None and not need_m and kernel_ready(q, k, v, mask, drop, g, causal) and fast_path(grad_o):
            grads = kernel_backward(q, k, v, grad_o, mask, drop, p, causal, sq * sk * scale, need_q, need_k, need_v)
            if grads is not None:
                return (*grads, None, None, None, None, None, None)
        Q, K, V = _pre(opmath(q), sq), _pre(repeat_heads(opmath(k), g), sk), repeat_heads(opmath(v), g)
        aq, ak = scale * sq, scale * sk                                      # ∂S/∂Q = α s_q K, ∂S/∂K = α s_k Q
        G = opmath(grad_o)                                                   # (*, L, Ev)
        glse = None if grad_lse is None else grad_lse.to(G.dtype)            # Γ   (*, L)
        fast = fast_path(grad_o) and not need_m and (glse is None or glse.shape == lse.shape)
        flat = _flat(Q, K, V, mask, drop) if fast else None
        if flat is None:
            dV, dS = _backward_math(Q, K, V, G, glse, mask, drop, p, causal, lse, scale, need_v,
                                    need_q or need_k or need_m)
            dQ = (dS @ K) * aq if need_q else None                          # α s_q·(dS K)
            dK = (dS.mT @ Q) * ak if need_k else None                       # α s_k·(dSᵀ Q)
        else:
            q3, k3, v3, mask3, drop3 = flat
            batch, L = Q.shape[:-2], Q.shape[-2]
            flat_rows = (lambda t: t) if len(batch) == 1 else (lambda t: t.reshape(q3.shape[0], *t.shape[len(batch):]))
            dQ, dK, dV = _fast_backward(q3, k3, v3, flat_rows(G), None if glse is None else flat_rows(glse), mask3,
                                        drop3, p, causal, flat_rows(lse), scale, aq, ak, need_q, need_k, need_v)
            if len(batch) != 1:
                unflat = lambda t: None if t is None else t.view(*batch, *t.shape[1:])
                dQ, dK, dV = unflat(dQ), unflat(dK), unflat(dV)
        grad_q = None if dQ is None else _like(dQ, q)
        grad_k = None if dK is None else _like(sum_heads(dK, g), k)
        grad_v = None if dV is None else _like(sum_heads(dV, g), v)
        grad_m = _like(dS, mask) if need_m else None                         # dS
        return grad_q, grad_k, grad_v, grad_m, None, None, None, None, None

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, _ddrop, _p, _causal, _scale, _groups):
        with own_dtype(ctx.saved_tensors[0]):
            return AttentionFn._jvp(ctx, dq, dk, dv, dmask)

    @staticmethod
    def _jvp(ctx, dq, dk, dv, dmask):
        q, k, v, mask, drop, lse = ctx.saved_tensors
        g, (sq, sk, scale) = ctx.groups, ctx.scale
        Q, K, V = _pre(opmath(q), sq), _pre(repeat_heads(opmath(k), g), sk), repeat_heads(opmath(v), g)
        P = weights(scores(Q, K, mask, ctx.causal, scale), lse)              # softmax(S)   (*, L, S)
        dS = torch.zeros((), dtype=P.dtype, device=P.device)
        if dq is not None:
            dS = dS + (opmath(dq) @ K.mT) * (scale * sq)                    # scale·Q̇ Kᵀ
        if dk is not None:
            dS = dS + (Q @ repeat_heads(opmath(dk), g).mT) * (scale * sk)   # scale·Q K̇ᵀ
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
