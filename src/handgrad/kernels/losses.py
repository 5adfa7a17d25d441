"""The backward of the cross entropy and the NLL loss for class-index targets (``ops.losses``),
one row pass each, on rows (M, C), in ops.losses' symbols:

    keep_i = [y_i ≠ ignore_index],  a_i = w_{y_i} keep_i  (w = 1 without a class weight),
    ĝ_i = g/Σ_i a_i ('mean'), g ('sum'), g_i ('none'); 0 on ignored rows.

``g`` is the incoming gradient, 0-d (a scalar) or (M,) ('none'); ``mean`` says whether
ĝ divides by Σ a. Ignored rows take class 0 in place of y_i (their ĝ is 0). Sums and each
element's arithmetic run in float64 and round once.
"""
from __future__ import annotations

import numpy as np

from . import kernel
from ._exp import exp


@kernel
def _row_scales(y, w, g, ignore_index, mean, ghat, a, col):
    """ĝ_i, a_i and col_i = y_i (0 where ignored) per row; first, for 'mean', Σ_i a_i (a pass over y)."""
    M = y.shape[0]
    g = g.reshape(g.size)                                              # (1,) or (M,)
    den = 0.0
    if mean:
        for i in range(M):                                             # Σ_i a_i
            if y[i] != ignore_index:
                den += 1.0 if w is None else np.float64(w[y[i]])
    for i in range(M):
        if y[i] == ignore_index:
            ghat[i], a[i], col[i] = 0.0, 0.0, 0                        # ĝ_i = a_i = 0
        else:
            gi = np.float64(g[0] if g.shape[0] == 1 else g[i])        # g or g_i
            ghat[i] = gi / den if mean else gi                         # ĝ_i
            a[i] = 1.0 if w is None else np.float64(w[y[i]])           # a_i = w_{y_i}
            col[i] = y[i]


@kernel
def cross_entropy_grad(logp, y, w, g, ignore_index, mean, eps, out):
    """out = ∂L/∂X = ĝ ⊙ (P ⊙ (Q 1) − Q), P = exp(log p), with c_i = (1−ε) a_i, s_i = (ε/C) keep_i,
    Σw = Σ_c w_c (C without a weight):
        ĝ_i [c_i (P_i − e_{y_i}) + s_i (Σw P_i − w)]
    p_{i,y_i} − 1 taken as −Σ_{j≠y_i} p_ij (the same number, Σ p = 1; a sum of small terms where
    p_y ≈ 1, no cancellation). Per row: pass 1 P into ``out`` and that sum, pass 2 the scaling in
    place, then the y_i entry."""
    M, C = logp.shape
    ghat, a, col = np.empty(M, np.float64), np.empty(M, np.float64), np.empty(M, np.int64)
    _row_scales(y, w, g, ignore_index, mean, ghat, a, col)
    wsum = 0.0
    if w is None:
        wsum = np.float64(C)
    else:
        for j in range(C):                                             # Σw
            wsum += np.float64(w[j])
    for i in range(M):
        yi = col[i]
        gc = (1.0 - eps) * ghat[i] * a[i]                              # ĝ_i c_i
        gs = ghat[i] * (eps / C) if y[i] != ignore_index else 0.0      # ĝ_i s_i
        # ĝ_i (c_i + s_i Σw); without smoothing no Σw term at all (0·Σw is nan for an infinite weight)
        u = gc + gs * wsum if eps != 0.0 else gc
        r = 0.0
        for j in range(yi):                                            # P, and Σ_{j≠y} p_ij: below y, then above
            p = exp(logp[i, j])
            out[i, j] = p
            r += p
        for j in range(yi + 1, C):
            p = exp(logp[i, j])
            out[i, j] = p
            r += p
        p_y = exp(logp[i, yi])
        if eps == 0.0:
            for j in range(C):                                         # ĝ_i c_i p_ij
                out[i, j] = u * np.float64(out[i, j])
        elif w is None:
            for j in range(C):                                         # ĝ_i [(c_i + s_i Σw) p_ij − s_i]
                out[i, j] = u * np.float64(out[i, j]) - gs
        else:
            for j in range(C):                                         # ĝ_i [(c_i + s_i Σw) p_ij − s_i w_j]
                out[i, j] = u * np.float64(out[i, j]) - gs * np.float64(w[j])
        # at y: ĝ_i [c_i (p_y − 1) + s_i (Σw p_y − w_y)], each part without cancellation: p_y − 1 as
        # −Σ_{j≠y} p_j where p_y ≈ 1, Σw p_y − w_y where smoothing dominates (ε = 1: p_y − 1/C, as
        # torch's). The + 0·p_y·u keeps a nan p_y (an infinite logit) or an infinite u (class
        # weight) undefined, as torch's p_y·u − u is
        out[i, yi] = gc * (0.0 * p_y * u - r)
        if eps != 0.0:
            out[i, yi] += gs * (wsum * p_y - (1.0 if w is None else np.float64(w[yi])))


@kernel
def nll_grad_(y, w, g, ignore_index, mean, out):
    """out = −(ĝ ⊙ a) ⊙ E_y (M, C), E_y the one-hot rows of y, into zeros: −ĝ_i a_i at (i, y_i)."""
    M = out.shape[0]
    ghat, a, col = np.empty(M, np.float64), np.empty(M, np.float64), np.empty(M, np.int64)
    _row_scales(y, w, g, ignore_index, mean, ghat, a, col)
    for i in range(M):
        out[i, col[i]] = -(ghat[i] * a[i])                             # −ĝ_i a_i
