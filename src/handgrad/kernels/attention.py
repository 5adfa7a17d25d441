"""Attention's fast path at small sizes (ops/attention.py ``AttentionFn``), one query row at a time.

Symbols as in ``AttentionFn``: per batch row b and query row i, S_ij = α·(q_i · k_j) + M_ij over
the keys j the row sees (j ≤ i under the causal mask), P_ij = softmax_j(S_ij), O_i = Σ_j P_ij N_ij v_j.
M (the float mask, (n, L, S), −∞ where hidden) and N (the dropout's scaled keep mask D/(1 − p),
(n, L, S)) may be None: no mask, no dropout (bool masks stay on the torch-op path). A row whose
every key is hidden has P = 0, ℓ = +∞. Every sum is accumulated in float64 and each output rounded
once; P is never stored beyond one row (S floats).
"""
from __future__ import annotations

import math

import numpy as np

from . import kernel


@kernel
def _row_weights(q, k, add, b, i, top, alpha, p):
    """p[:top] = P_i·, the softmax of S_ij = α·(q_i · k_j) + M_ij, j < top; returns (m, l): the row
    max and l = Σ_j exp(S_ij − m), so that ℓ_i = m + log l (m = −∞, l = 0, P = 0: all hidden by the
    mask; without one, a row of −∞ scores is nan, as torch's softmax)."""
    E = q.shape[2]
    m = -np.inf
    for j in range(top):                                  # pass 1: S_ij = α·(q_i · k_j) + M_ij, m = max_j S_ij
        d = 0.0
        for e in range(E):
            d += np.float64(q[b, i, e]) * np.float64(k[b, j, e])
        d *= alpha
        if add is not None:
            d += add[b, i, j]
        p[j] = d
        if d > m or d != d:                               # (a nan propagates, as torch's max)
            m = d
    if m == -np.inf and add is not None:                  # every key hidden by the mask
        p[:top] = 0.0
        return m, 0.0
    l = 0.0
    for j in range(top):                                  # pass 2: exp(S_ij − m), l = Σ_j exp(S_ij − m)
        p[j] = math.exp(p[j] - m)
        l += p[j]
    for j in range(top):                                  # pass 3: P_ij = exp(S_ij − m) / l
        p[j] /= l
    return m, l


@kernel
def forward(q, k, v, add, keep, alpha, causal, O, lse):
    """O_i = Σ_j P_ij N_ij v_j, ℓ_i = m + log Σ_j exp(S_ij − m)   (q (n, L, E), k (n, S, E), v (n, S, Ev))."""
    n, L = q.shape[0], q.shape[1]
    S, Ev = k.shape[1], v.shape[2]
    p = np.empty(S, np.float64)
    acc = np.empty(Ev, np.float64)
    for b in range(n):
        for i in range(L):
            top = min(S, i + 1) if causal else S
            m, l = _row_weights(q, k, add, b, i, top, alpha, p)
            lse[b, i] = np.inf if l == 0.0 else m + math.log(l)   # ℓ_i (no key seen: +∞, O_i = 0)
            acc[:] = 0.0
            for j in range(top):                          # O_i = Σ_j P_ij N_ij v_j
                pj = p[j] if keep is None else p[j] * keep[b, i, j]
                for e in range(Ev):
                    acc[e] += pj * np.float64(v[b, j, e])
            for e in range(Ev):
                O[b, i, e] = acc[e]


@kernel
def backward(q, k, v, add, keep, G, alpha, causal, dQ, dK, dV):
    """With P recomputed row by row, G = ∂L/∂O (n, L, Ev):
    ∂L/∂V_j = Σ_i P_ij N_ij G_i,   dP_ij = (G_i · v_j) N_ij,   dS_ij = P_ij (dP_ij − Σ_j' P_ij' dP_ij'),
    ∂L/∂Q_i = α·Σ_j dS_ij k_j,   ∂L/∂K_j = α·Σ_i dS_ij q_i.   dQ, dK or dV None: not wanted.
    The row term c is summed in float64: its rounding (eps₆₄·|dP|) is below the outputs' own, so
    ``grad_scores``' refinement of c (for float32 sums) is not needed here."""
    n, L, E = q.shape[0], q.shape[1], q.shape[2]
    S, Ev = k.shape[1], v.shape[2]
    p = np.empty(S, np.float64)
    ds = np.empty(S, np.float64)
    gk = np.empty((S, E), np.float64)
    gv = np.empty((S, Ev), np.float64)
    gq = np.empty(E, np.float64)
    for b in range(n):
        gk[:] = 0.0
        gv[:] = 0.0
        for i in range(L):
            top = min(S, i + 1) if causal else S
            _row_weights(q, k, add, b, i, top, alpha, p)
            c = 0.0
            for j in range(top):                          # dP_ij = (G_i · v_j) N_ij, c = Σ_j P_ij dP_ij
                d = 0.0
                for e in range(Ev):
                    d += np.float64(G[b, i, e]) * np.float64(v[b, j, e])
                if keep is not None:
                    d *= keep[b, i, j]
                ds[j] = d
                c += p[j] * d
            for j in range(top):                          # dS_ij = P_ij (dP_ij − c)
                ds[j] = p[j] * (ds[j] - c)
            if dV is not None:
                for j in range(top):                      # ∂L/∂V_j += P_ij N_ij G_i
                    pj = p[j] if keep is None else p[j] * keep[b, i, j]
                    for e in range(Ev):
                        gv[j, e] += pj * np.float64(G[b, i, e])
            if dK is not None:
                for j in range(top):                      # ∂L/∂K_j += dS_ij q_i   (α below)
                    dj = ds[j]
                    for e in range(E):
                        gk[j, e] += dj * np.float64(q[b, i, e])
            if dQ is not None:
                gq[:] = 0.0
                for j in range(top):                      # ∂L/∂Q_i = α·Σ_j dS_ij k_j
                    dj = ds[j]
                    for e in range(E):
                        gq[e] += dj * np.float64(k[b, j, e])
                for e in range(E):
                    dQ[b, i, e] = alpha * gq[e]
        if dK is not None:
            for j in range(S):
                for e in range(E):
                    dK[b, j, e] = alpha * gk[j, e]
        if dV is not None:
            for j in range(S):
                for e in range(Ev):
                    dV[b, j, e] = gv[j, e]
