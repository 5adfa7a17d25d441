r"""Kernels of ``handgrad.per_sample``'s rules (``per_sample/_rules.py``): the per-sample terms of
the norm layers' weight and bias, and the embedding's pairwise squared norm, each in one or two
passes over the layer's saved input and its G = ∂L/∂Y, where the torch-op path takes four to six
(x̂ recomputed by the functional, G ⊙ x̂, a sum, a square; the embedding's Δₙ Δₙᵀ GEMM and mask).

Sums accumulate in float64 (float32 inputs: the lowp rule compares to a float64 truth).
Formulas: docs/derivation.md#per-sample-gradients ("Norm weight and bias", "Embedding").
"""
from __future__ import annotations

import math

from . import kernel

__all__ = ["group_norm_terms", "layer_norm_terms", "embedding_pair_sq"]


@kernel
def group_norm_terms(x, G, groups, eps, gw, gb):
    r"""Group norm's ∂Cⁿ/∂w, ∂Cⁿ/∂b: x, G (N, C, L) (L the spatial positions), for each sample n
    and group j (channels c of j: C/groups of them):

        μ = mean_{c∈j, l} x,  var = mean_{c∈j, l} (x − μ)²,  rstd = 1/√(var + eps)
        gw[n, c] = Σ_l G[n, c, l] x̂[n, c, l] = rstd Σ_l G (x − μ),   gb[n, c] = Σ_l G[n, c, l]

    gw, gb (N, C) float64 outputs (written once rounded by the caller)."""
    N, C, L = x.shape
    Cg = C // groups
    for n in range(N):
        for j in range(groups):
            s = 0.0                                   # pass 1: μ
            for c in range(j * Cg, (j + 1) * Cg):
                for l in range(L):
                    s += x[n, c, l]
            mu = s / (Cg * L)
            v = 0.0                                   # pass 2: var, Σ_l G (x − μ), Σ_l G per channel
            for c in range(j * Cg, (j + 1) * Cg):
                gxc = 0.0
                gc = 0.0
                for l in range(L):
                    d = x[n, c, l] - mu
                    v += d * d
                    gxc += G[n, c, l] * d
                    gc += G[n, c, l]
                gw[n, c] = gxc                         # rstd applied below, once var is known
                gb[n, c] = gc
            rstd = 1.0 / math.sqrt(v / (Cg * L) + eps)
            for c in range(j * Cg, (j + 1) * Cg):
                gw[n, c] *= rstd


@kernel
def layer_norm_terms(x, G, eps, gw, gb):
    r"""Layer norm's ∂Cⁿ/∂w, ∂Cⁿ/∂b: x, G (N, T, D) (T rows of sample n, each normalised over its D):

        μₜ = mean_d x[n, t],  varₜ = mean_d (x[n, t] − μₜ)²,  rstdₜ = 1/√(varₜ + eps)
        gw[n, d] = Σ_t G[n, t, d] x̂[n, t, d],   gb[n, d] = Σ_t G[n, t, d]

    gw, gb (N, D) float64 outputs (the sums over t)."""
    N, T, D = x.shape
    for n in range(N):
        for d in range(D):
            gw[n, d] = 0.0
            gb[n, d] = 0.0
        for t in range(T):
            s = 0.0                                   # pass 1: μₜ
            for d in range(D):
                s += x[n, t, d]
            mu = s / D
            v = 0.0                                   # pass 2: varₜ
            for d in range(D):
                e = x[n, t, d] - mu
                v += e * e
            rstd = 1.0 / math.sqrt(v / D + eps)
            for d in range(D):                        # pass 3 (the row in cache): G ⊙ x̂, G
                gw[n, d] += G[n, t, d] * ((x[n, t, d] - mu) * rstd)
                gb[n, d] += G[n, t, d]


@kernel
def embedding_pair_sq(index, D, out):
    r"""‖∂Cⁿ/∂W‖²_F = Σ_{t,s} [iₙₜ = iₙₛ] ⟨δₙₜ, δₙₛ⟩ = Σₜ ‖δₙₜ‖² + 2 Σ_{s<t, iₙₛ = iₙₜ} ⟨δₙₜ, δₙₛ⟩:
    index (N, T) int, D = Δ (N, T, E); out (N,). T²/2 index comparisons and a dot product per
    equal pair only (the torch path: the whole Δₙ Δₙᵀ, T² E)."""
    N, T, E = D.shape
    for n in range(N):
        acc = 0.0
        for t in range(T):
            a = 0.0                                   # ‖δₙₜ‖²
            for e in range(E):
                a += D[n, t, e] * D[n, t, e]
            acc += a
            for s in range(t):
                if index[n, s] == index[n, t]:
                    b = 0.0                           # ⟨δₙₜ, δₙₛ⟩, counted for (t, s) and (s, t)
                    for e in range(E):
                        b += D[n, t, e] * D[n, s, e]
                    acc += 2.0 * b
        out[n] = acc
