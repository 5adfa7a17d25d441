"""Attention's fast path at small sizes: the compiled kernel (kernels/attention.py), one call for
the forward and one for the backward of ``AttentionFn`` (ops/attention.py), where the torch-op
fast path makes ~10 and ~20 calls of 2–5 µs each. The kernel computes the Function's formulas in
float64 (S = α·(Q Kᵀ) + M, P = softmax(S), O = (P ⊙ N) V and the backward's dS), each output
rounded once; masks and the dropout's keep mask are handed to it as (*, L, S) float operands.
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from .dropout import keep_scale

__all__ = ["KERNEL_WORK", "kernel_backward", "kernel_forward", "kernel_ready"]

#: the most multiply-adds n·L·S·(E + Ev) (halved under the causal mask: a row meets only the keys
#: it sees) for which the fast path is the compiled kernel (kernels/attention.py: one call
#: forward, one backward, instead of ~10 and ~20 torch calls of 2–5 µs each); above it torch's
#: GEMMs win. Measured, forward + backward, float32, one thread, kernel against torch ops:
#: n·L·S·(E+Ev) = 2·8·8·64: 0.56×, 4·16·16·64: 0.75×, 8·16·16·64 (2¹⁷): 0.91×, 4·32·32·64: 1.17×.
KERNEL_WORK = 1 << 17


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t, or a contiguous copy of a strided one (the kernel path runs at small sizes only)."""
    return t if t.is_contiguous() else t.contiguous()


def kernel_ready(q, k, v, mask, drop, groups: int, causal: bool) -> bool:
    """Does the compiled kernel take this call: no GQA, one batch layout (a mask broadcasts), at
    most ``KERNEL_WORK`` multiply-adds per product? Never while compiling (Dynamo would trace
    ``kernels.usable``'s queries)."""
    if groups != 1 or torch.compiler.is_compiling():
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    batch = qs[:-2]
    return (ks[:-2] == batch and vs[:-2] == batch and (drop is None or drop.shape[:-2] == batch)
            and q.numel() // max(1, qs[-1]) * ks[-2] * (qs[-1] + vs[-1]) <= KERNEL_WORK * (2 if causal else 1))


def _kernel_masks(q, mask, drop, p: float, S: int):
    """The kernel's M (the float mask; a bool one as 0 / −∞, as ``scores`` reads it) and N = D/(1 − p),
    each (*, L, S) in Q's dtype, contiguous; None where absent."""
    shape = (*q.shape[:-1], S)
    add = keep = None
    if mask is not None:
        if mask.dtype == torch.bool:
            mask = torch.where(mask, 0.0, -math.inf)                 # M: −∞ where a bool mask is False
        add = _dense((mask if mask.dtype == q.dtype else mask.to(q.dtype)).expand(shape))
    if drop is not None:
        keep = _dense(keep_scale(drop, p, q.dtype).expand(shape))    # N
    return add, keep


def _rows(a, n: int):
    """The (n, ·, ·) view of a kernel operand's numpy array (None stays None)."""
    return None if a is None else a.reshape(n, a.shape[-2], a.shape[-1])


def kernel_forward(q, k, v, mask, drop, p: float, causal: bool, alpha: float):
    """O (*, L, Ev), ℓ (*, L) from the kernel (S = alpha·(Q Kᵀ) + M: the scale forms' product, taken
    in float64), or None where kernels are off."""
    q, k, v = _dense(q), _dense(k), _dense(v)
    if not (q.numel() and k.numel() and v.numel()) or not kernels.usable(q, k, v):   # (no element: numpy's
        return None                                                                 # reshape of a 0 dim fails)
    qs, vs = q.shape, v.shape
    batch, L = qs[:-2], qs[-2]
    add, keep = (None, None) if mask is None and drop is None else _kernel_masks(q, mask, drop, p, vs[-2])
    O, lse = q.new_empty((*batch, L, vs[-1])), q.new_empty((*batch, L))
    qa, ka, va, Ma, Na, Oa, la = kernels.arrays(q, k, v, add, keep, O, lse)
    if len(batch) != 1:                                          # (n, ·, ·) views
        n = q.numel() // max(1, L * qs[-1])
        qa, ka, va, Ma, Na, Oa, la = (_rows(qa, n), _rows(ka, n), _rows(va, n), _rows(Ma, n), _rows(Na, n),
                                      _rows(Oa, n), la.reshape(n, L))
    kernels.load("attention").forward(qa, ka, va, Ma, Na, alpha, causal, Oa, la)
    return O, lse


def kernel_backward(q, k, v, G, mask, drop, p: float, causal: bool, alpha: float, need_q, need_k, need_v):
    """(∂L/∂Q, ∂L/∂K, ∂L/∂V) from the kernel (``backward``; None where not needed), or None where
    kernels are off."""
    q, k, v, G = _dense(q), _dense(k), _dense(v), _dense(G)
    if not (q.numel() and k.numel() and v.numel()) or not kernels.usable(q, k, v, G):
        return None
    qs = q.shape
    add, keep = (None, None) if mask is None and drop is None else _kernel_masks(q, mask, drop, p, k.shape[-2])
    dQ = q.new_empty(qs) if need_q else None
    dK = k.new_empty(k.shape) if need_k else None
    dV = v.new_empty(v.shape) if need_v else None
    arrs = kernels.arrays(q, k, v, add, keep, G, dQ, dK, dV)
    if len(qs) != 3:                                             # (n, ·, ·) views
        n = q.numel() // max(1, qs[-2] * qs[-1])
        arrs = [_rows(a, n) for a in arrs]
    kernels.load("attention").backward(*arrs[:6], alpha, causal, *arrs[6:])
    return dQ, dK, dV
