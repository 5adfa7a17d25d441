"""The normalisations' fast passes (``ops/normalize_fast.py``), as loops, in their Functions'
symbols: NormFn's forward and backward, LayerNormFn's backward, BatchNormEvalFn's forward and
backward, batch norm's running statistics.

Three layouts of the sets S the statistics run over (m elements each):
- rows (layer and RMS norm): X (M, D), one set a row, w and b per column;
- groups (group norm): X (N, C, P), the set of sample n and group g its C/G channels × P,
  w and b per channel;
- channels (batch norm): X (N, C, P), the set of channel c every (n, p), w and b per channel.

Sums accumulate in float64 (a float32 X's sums then round once), partial sums of up to ``CHUNK``
elements along the last axis in X's dtype, where they vectorise (RMS's squares: in float64; one
that overflows gives the forward's rstd = 0 or nan, below). The elementwise passes run in X's
dtype, each set's scalars (μ, rstd, n₁, n₂) rounded to it once through a small array of that
dtype (float64 there halves a float32 pass's vector width: layer norm's backward, 4096×512, took
1.25 ms against 0.73 ms).

A forward returns False where a set's rstd is not positive (an infinite variance: squares or
partial sums that overflow; or nan: a nan or infinite X): the caller then takes the torch-op
path, which rescues the finite sets (``rescue_overflow``) and gives nan or 0 elsewhere, as before.
"""
from __future__ import annotations

import math

import numpy as np

from . import kernel

# the length of a partial sum in X's dtype (vectorised; then added in float64): its rounding
# error grows with √CHUNK, not with a row's length. A row of at most CHUNK is one loop from 0 to
# its length (measured: the only form numba vectorises here at any length); a longer row, chunks of
# CHUNK (they vectorise) and the rest (it does not; a loop bounded by min(j0 + CHUNK, n), 6×
# slower, neither).
CHUNK = 1024


@kernel
def _sum_dev(A, i, x0, z):
    """Σ (a − x₀) over the row a = A[i] of a 2-d A (a row view's layout is not known contiguous:
    its loop would not vectorise); ``z``: 0 in A's dtype."""
    n = A.shape[1]
    if n <= CHUNK:                                          # one partial sum (the loop that vectorises best)
        t = z
        for j in range(n):
            t += A[i, j] - x0
        return np.float64(t)
    full = n // CHUNK * CHUNK
    s = 0.0
    for j0 in range(0, full, CHUNK):
        t = z
        for j in range(CHUNK):
            t += A[i, j0 + j] - x0
        s += t
    t = z
    for j in range(n - full):                               # (the rest, < CHUNK: not vectorised)
        t += A[i, full + j] - x0
    return s + t


@kernel
def _sum_sq_dev(A, i, x0, shift, z):
    """Σ ((a − x₀) − shift)² over the row a = A[i] (shift = μ − x₀)."""
    n = A.shape[1]
    if n <= CHUNK:
        t = z
        for j in range(n):
            d = (A[i, j] - x0) - shift
            t += d * d
        return np.float64(t)
    full = n // CHUNK * CHUNK
    s = 0.0
    for j0 in range(0, full, CHUNK):
        t = z
        for j in range(CHUNK):
            d = (A[i, j0 + j] - x0) - shift
            t += d * d
        s += t
    t = z
    for j in range(n - full):
        d = (A[i, full + j] - x0) - shift
        t += d * d
    return s + t


@kernel
def _sums_g(G, X, i, u, z):
    """(Σ g, Σ g ⊙ (a − u)) over the rows g = G[i], a = X[i]."""
    n = X.shape[1]
    if n <= CHUNK:
        t1 = z
        t2 = z
        for j in range(n):
            gg = G[i, j]
            t1 += gg
            t2 += gg * (X[i, j] - u)
        return np.float64(t1), np.float64(t2)
    full = n // CHUNK * CHUNK
    s1 = 0.0
    s2 = 0.0
    for j0 in range(0, full, CHUNK):
        t1 = z
        t2 = z
        for j in range(CHUNK):
            gg = G[i, j0 + j]
            t1 += gg
            t2 += gg * (X[i, j0 + j] - u)
        s1 += t1
        s2 += t2
    t1 = z
    t2 = z
    for j in range(n - full):
        gg = G[i, full + j]
        t1 += gg
        t2 += gg * (X[i, full + j] - u)
    return s1 + t1, s2 + t2


# --- forward -------------------------------------------------------------------------------------


@kernel
def rms_forward(X, w, has_w, eps, Y, rstd):
    """Rows (M, D): rstd = 1/√(mean(X²) + eps), Y = X·rstd ⊙ w."""
    M, D = X.shape
    ok = True
    sc = np.empty(1, X.dtype)                               # rstd in X's dtype
    for i in range(M):
        s = 0.0
        for j in range(D):                                  # pass 1: Σ X²
            x = np.float64(X[i, j])
            s += x * x
        sc[0] = 1.0 / math.sqrt(s / D + eps)                # rstd
        r = sc[0]
        rstd[i] = r
        ok = ok and r > 0.0
        for j in range(D):                                  # pass 2: Y = X·rstd ⊙ w
            Y[i, j] = X[i, j] * r * w[j] if has_w else X[i, j] * r
    return ok


@kernel
def channels_forward(X, w, b, has_w, has_b, eps, Y, mu, var, rstd):
    """Channels (N, C, P): μ = x₀ + mean(X − x₀) (x₀ the set's first element: a constant set
    gives X − μ = 0 exactly), var = mean((X − μ)²), rstd = 1/√(var + eps),
    Y = (X − μ)·(rstd·w) + b."""
    N, C, P = X.shape
    X2 = X.reshape(N * C, P)                                # rows of P, (n, c) = row n·C + c
    m = N * P
    ok = True
    sc = np.zeros(4, X.dtype)                               # μ − x₀, μ, rstd·w, b in X's dtype
    z = np.zeros(1, X.dtype)                                # a partial sum's 0 in X's dtype
    for c in range(C):
        x0 = X[0, c, 0]
        s = 0.0
        for n in range(N):                                  # pass 1: Σ (X − x₀)
            s += _sum_dev(X2, n * C + c, x0, z[0])
        sc[0] = s / m                                       # μ − x₀
        shift = sc[0]
        q = 0.0
        for n in range(N):                                  # pass 2: Σ (X − μ)²
            q += _sum_sq_dev(X2, n * C + c, x0, shift, z[0])
        v = q / m
        r = 1.0 / math.sqrt(v + eps)
        mu[c], var[c], rstd[c] = np.float64(x0) + shift, v, r
        ok = ok and rstd[c] > 0.0
        sc[1] = np.float64(x0) + shift
        sc[2] = rstd[c] * w[c] if has_w else rstd[c]       # rstd·w
        sc[3] = b[c] if has_b else 0.0
        u, a, beta = sc[1], sc[2], sc[3]
        for n in range(N):                                  # pass 3: Y = (X − μ)·(rstd·w) + b
            for p in range(P):
                Y[n, c, p] = (X[n, c, p] - u) * a + beta
    return ok


@kernel
def groups_forward(X, k, w, b, has_w, has_b, eps, Y, mu, rstd):
    """Groups (N, C, P), ``k`` groups of C/k channels: μ, var, rstd over each group's
    (C/k)·P elements as ``channels_forward``, Y = (X − μ)·(rstd·w) + b per channel."""
    N, C, P = X.shape
    X2 = X.reshape(N * C, P)                                # rows of P, (n, c) = row n·C + c
    Cg = C // k
    m = Cg * P
    ok = True
    sc = np.zeros(4, X.dtype)                               # μ − x₀, μ, rstd·w, b in X's dtype
    z = np.zeros(1, X.dtype)                                # a partial sum's 0 in X's dtype
    for n in range(N):
        for g in range(k):
            c0 = g * Cg
            x0 = X[n, c0, 0]
            s = 0.0
            for c in range(c0, c0 + Cg):                    # pass 1: Σ (X − x₀)
                s += _sum_dev(X2, n * C + c, x0, z[0])
            sc[0] = s / m                                   # μ − x₀
            shift = sc[0]
            q = 0.0
            for c in range(c0, c0 + Cg):                    # pass 2: Σ (X − μ)²
                q += _sum_sq_dev(X2, n * C + c, x0, shift, z[0])
            mu[n, g], rstd[n, g] = np.float64(x0) + shift, 1.0 / math.sqrt(q / m + eps)
            ok = ok and rstd[n, g] > 0.0
            sc[1] = np.float64(x0) + shift
            for c in range(c0, c0 + Cg):                    # pass 3: Y = (X − μ)·(rstd·w) + b
                sc[2] = rstd[n, g] * w[c] if has_w else rstd[n, g]
                sc[3] = b[c] if has_b else 0.0
                u, a, beta = sc[1], sc[2], sc[3]
                for p in range(P):
                    Y[n, c, p] = (X[n, c, p] - u) * a + beta
    return ok


@kernel
def running_update(rmu, rvar, mu, var, momentum, unbias, has_mu, has_var):
    """Batch norm's running statistics, in place, per channel (C,):
    r_μ ← m·μ + (1 − m)·r_μ,  r_var ← m·var·n/(n − 1) + (1 − m)·r_var  (``unbias`` = n/(n − 1)),
    each product and sum rounded to the statistics' dtype as torch's ops round them."""
    sc = np.empty(3, rmu.dtype if has_mu else rvar.dtype)
    for c in range(mu.size):
        if has_mu:
            sc[0] = momentum * mu[c]
            sc[1] = (1 - momentum) * rmu[c]
            rmu[c] = sc[0] + sc[1]
        if has_var:
            sc[0] = momentum * var[c]
            sc[0] = sc[0] * unbias
            sc[1] = (1 - momentum) * rvar[c]
            rvar[c] = sc[0] + sc[1]


@kernel
def nonzero(a):
    """Is every element of ``a`` nonzero (nan counts, as in torch.all)? LayerNormFn's check for
    rstd = 0 (squares that overflow) after torch's forward kernel, without torch.all's 3 µs."""
    for i in range(a.size):
        if a[i] == 0:
            return False
    return True


# --- backward ------------------------------------------------------------------------------------
# G = ∂L/∂Y, gy = G ⊙ w, x̂ = (X − μ)·rstd, per set:
#     ∂L/∂X = rstd·(gy + n₁ + x̂·n₂),  n₁ = −mean(gy) (RMS: 0),  n₂ = −mean(gy ⊙ x̂)
#     ∂L/∂w = Σ_rest G ⊙ x̂,  ∂L/∂b = Σ_rest G
# from the forward's μ and rstd: one pass for the sums, one for ∂L/∂X (x̂ formed before ·n₂, so
# no rstd² that could underflow or overflow).


@kernel
def rows_backward(G, X, mu, rstd, w, has_w, center, gx, gw, gb, need_x, need_w, need_b):
    """Rows (M, D), μ and rstd (M,) (RMS: ``center`` False, μ unread)."""
    M, D = X.shape
    sw = np.zeros(D)                                        # Σ_rows G ⊙ x̂
    sb = np.zeros(D)                                        # Σ_rows G
    sc = np.empty(4, X.dtype)                               # a row's scalars in X's dtype (see the module)
    for i in range(M):
        sc[0] = mu[i] if center else 0.0
        sc[1] = rstd[i]
        u, r = sc[0], sc[1]
        s1 = 0.0
        s2 = 0.0
        for j in range(D):                                  # pass 1: Σ gy, Σ gy ⊙ (X − μ), the column sums
            g = G[i, j]
            xc = X[i, j] - u
            gy = g * w[j] if has_w else g
            s1 += gy
            s2 += gy * xc
            sw[j] += g * xc * r
            sb[j] += g
        if need_x:
            sc[2] = -s1 / D if center else 0.0              # n₁ = −mean(gy)
            sc[3] = -s2 * np.float64(r) / D                 # n₂ = −mean(gy ⊙ x̂)
            n1, n2 = sc[2], sc[3]
            for j in range(D):                              # pass 2: rstd·(gy + n₁ + x̂·n₂)
                gy = G[i, j] * w[j] if has_w else G[i, j]
                gx[i, j] = r * (gy + n1 + ((X[i, j] - u) * r) * n2)
    if need_w:
        for j in range(D):
            gw[j] = sw[j]
    if need_b:
        for j in range(D):
            gb[j] = sb[j]


@kernel
def groups_backward(G, X, k, mu, rstd, w, has_w, gx, gw, gb, need_x, need_w, need_b):
    """Groups (N, C, P), μ and rstd (N, k): per (n, c) Σ G and Σ G ⊙ (X − μ), which give
    ∂L/∂w, ∂L/∂b and, ⊙ w summed over the group's channels, n₁ and n₂."""
    N, C, P = X.shape
    X2 = X.reshape(N * C, P)                                # rows of P, (n, c) = row n·C + c
    G2 = G.reshape(N * C, P)
    Cg = C // k
    m = Cg * P
    sw = np.zeros(C)                                        # Σ_n,p G ⊙ x̂
    sb = np.zeros(C)                                        # Σ_n,p G
    sc = np.empty(5, X.dtype)                               # a set's scalars in X's dtype
    sc[4] = 1.0                                             # (w absent; sc[4] − sc[4]: 0)
    for n in range(N):
        for g in range(k):
            sc[0], sc[1] = mu[n, g], rstd[n, g]
            u, r = sc[0], sc[1]
            s1 = 0.0
            s2 = 0.0
            for c in range(g * Cg, (g + 1) * Cg):           # pass 1: per (n, c) sums
                t1, t2 = _sums_g(G2, X2, n * C + c, u, sc[4] - sc[4])   # Σ G, Σ G ⊙ (X − μ)
                sb[c] += t1
                sw[c] += t2 * r
                wc = np.float64(w[c]) if has_w else 1.0
                s1 += t1 * wc                               # Σ gy
                s2 += t2 * wc                               # Σ gy ⊙ (X − μ)
            if need_x:
                sc[2] = -s1 / m                             # n₁ = −mean(gy)
                sc[3] = -s2 * np.float64(r) / m             # n₂ = −mean(gy ⊙ x̂)
                n1, n2 = sc[2], sc[3]
                for c in range(g * Cg, (g + 1) * Cg):       # pass 2: rstd·(gy + n₁ + x̂·n₂)
                    wc = w[c] if has_w else sc[4]
                    for p in range(P):
                        gx[n, c, p] = r * (G[n, c, p] * wc + n1 + ((X[n, c, p] - u) * r) * n2)
    if need_w:
        for c in range(C):
            gw[c] = sw[c]
    if need_b:
        for c in range(C):
            gb[c] = sb[c]


@kernel
def channels_backward(G, X, mu, rstd, w, has_w, gx, gw, gb, need_x, need_w, need_b):
    """Channels (N, C, P), μ and rstd (C,): w is constant over a set, so
    ∂L/∂X = rstd·w·(G + n₁ + x̂·n₂) with n₁ = −mean(G), n₂ = −mean(G ⊙ x̂)."""
    N, C, P = X.shape
    X2 = X.reshape(N * C, P)                                # rows of P, (n, c) = row n·C + c
    G2 = G.reshape(N * C, P)
    m = N * P
    sc = np.zeros(6, X.dtype)                               # a set's scalars in X's dtype (sc[5]: 0)
    for c in range(C):
        sc[0], sc[1] = mu[c], rstd[c]
        u, r = sc[0], sc[1]
        t1 = 0.0
        t2 = 0.0
        for n in range(N):                                  # pass 1: Σ G, Σ G ⊙ (X − μ)
            a1, a2 = _sums_g(G2, X2, n * C + c, u, sc[5])
            t1 += a1
            t2 += a2
        if need_w:
            gw[c] = t2 * np.float64(r)                      # Σ G ⊙ x̂
        if need_b:
            gb[c] = t1                                      # Σ G
        if need_x:
            sc[2] = -t1 / m                                 # n₁ = −mean(G)
            sc[3] = -t2 * np.float64(r) / m                 # n₂ = −mean(G ⊙ x̂)
            sc[4] = r * w[c] if has_w else r                # rstd·w
            n1, n2, a = sc[2], sc[3], sc[4]
            for n in range(N):                              # pass 2: rstd·w·(G + n₁ + x̂·n₂)
                for p in range(P):
                    gx[n, c, p] = a * (G[n, c, p] + n1 + ((X[n, c, p] - u) * r) * n2)


@kernel
def eval_channels_forward(X, rmu, rvar, w, b, has_w, has_b, eps, Y):
    """BatchNormEvalFn, channels (N, C, P): α = w·r_rstd, β = b − r_μ·α (r_rstd = 1/√(r_var + eps)),
    Y = X ⊙ α + β in one pass."""
    N, C, P = X.shape
    sc = np.empty(3, X.dtype)                               # r_var + eps, α, β in X's dtype
    for c in range(C):
        sc[0] = rvar[c] + eps
        sc[1] = 1.0 / math.sqrt(sc[0])                      # r_rstd
        if has_w:
            sc[1] = sc[1] * w[c]                            # α = w·r_rstd
        sc[2] = -rmu[c] * sc[1]                             # β = b − r_μ·α
        if has_b:
            sc[2] = sc[2] + b[c]
        a, beta = sc[1], sc[2]
        for n in range(N):
            for p in range(P):
                Y[n, c, p] = X[n, c, p] * a + beta          # X ⊙ α + β


@kernel
def eval_channels_backward(G, X, rmu, rvar, w, has_w, eps, gx, gw, gb, need_x, need_w, need_b):
    """BatchNormEvalFn, channels (N, C, P), in one pass: ∂L/∂X = G ⊙ w·r_rstd,
    ∂L/∂w = Σ G ⊙ (X − r_μ)·r_rstd, ∂L/∂b = Σ G (G ⊙ (X − r_μ) in float64: its float32 products
    and partial sums may pass float32's range where the whole does not)."""
    N, C, P = G.shape
    sc = np.empty(3, G.dtype)                               # r_var + eps, r_rstd, w·r_rstd in G's dtype
    for c in range(C):
        sc[0] = rvar[c] + eps
        sc[1] = 1.0 / math.sqrt(sc[0])                      # r_rstd
        sc[2] = sc[1] * w[c] if has_w else sc[1]            # w·r_rstd
        a = sc[2]
        u = np.float64(rmu[c])
        t1 = 0.0
        t2 = 0.0
        for n in range(N):
            for p in range(P):
                gg = G[n, c, p]
                if need_x:
                    gx[n, c, p] = gg * a                    # G ⊙ w·r_rstd
                t1 += gg
                if need_w:                                  # (X absent otherwise)
                    t2 += np.float64(gg) * (np.float64(X[n, c, p]) - u)
        if need_w:
            gw[c] = t2 * np.float64(sc[1])                  # Σ G ⊙ x̂
        if need_b:
            gb[c] = t1                                      # Σ G
