"""Average pooling's fast backward (ops/pool.py ``AvgPool2dFn``) in one pass.

Symbols as in ``AvgPool2dFn``: G = ∂L/∂Y (N, C, H_out, W_out). (Max pooling's scatter was
measured as a kernel too: no faster than torch's scatter_add_ at the small size, 0.87× at the
large one; not kept.)
"""
from __future__ import annotations

from . import kernel


@kernel
def tile_backward(g, a, kh, kw, out):
    """∂L/∂X[n, c, h, w] = a·G[n, c, ⌊h/k_h⌋, ⌊w/k_w⌋]   (a = a_h a_w: windows that tile X)."""
    N, C, H_out, W_out = g.shape
    for n in range(N):
        for c in range(C):
            for i in range(H_out):
                for r in range(kh):
                    h = i * kh + r
                    for j in range(W_out):
                        v = a * g[n, c, i, j]
                        for s in range(kw):
                            out[n, c, h, j * kw + s] = v

