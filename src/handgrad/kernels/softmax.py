"""The softmax and log-softmax backward (``ops.softmax``), one row pass each, on rows (M, D)
along the last dim, in ops.softmax's symbols: Y the saved output, G = ∂L/∂Y, (·)1 the row sum.
Sums and the row's arithmetic run in float64 and round once into ``out`` (a buffer of its own:
one that aliases an input keeps LLVM from vectorising the loop).
"""
from __future__ import annotations

import numpy as np

from . import kernel
from ._exp import exp


@kernel
def softmax_vjp(Y, G, out):
    """out = Y ⊙ (G − (G ⊙ Y)1): per row, pass 1 the dot (G ⊙ Y)1, pass 2 the product."""
    M, D = Y.shape
    for i in range(M):
        s = 0.0
        for j in range(D):                                             # (G ⊙ Y)1
            s += np.float64(G[i, j]) * np.float64(Y[i, j])
        for j in range(D):                                             # Y ⊙ (G − (G ⊙ Y)1)
            out[i, j] = np.float64(Y[i, j]) * (np.float64(G[i, j]) - s)


@kernel
def log_softmax_vjp(Y, G, out):
    """out = G − exp(Y) ⊙ (G)1: per row, pass 1 the sum (G)1, pass 2 the difference (e^Y as
    ``_exp.exp``, vectorised)."""
    M, D = Y.shape
    for i in range(M):
        s = 0.0
        for j in range(D):                                             # (G)1
            s += np.float64(G[i, j])
        for j in range(D):                                             # G − exp(Y) ⊙ (G)1
            out[i, j] = np.float64(G[i, j]) - exp(Y[i, j]) * s
