r"""The per-sample gradients ∂Cⁿ/∂θ of each parameter kind, and their squared norms without
forming them: each formula written once (docs/derivation.md#per-sample-gradients).

Every function takes the per-sample quantities a layer's backward already has in hand, the
incoming gradient ``Δ = ∂L/∂Y`` and the saved input, with the sample dimension first, and
returns ``(grad, sq_norm)``: ``grad`` (N, *param shape) or None where only the norm was asked
for, and ``sq_norm`` (N,) = ‖∂Cⁿ/∂θ‖²_F (None from the large ones when ``grads``: the norm is
then taken of the accumulated gradient). ``Δ`` already carries the loss's reduction (1/N for a
mean), so Σₙ grad[n] is the batch gradient ``∂L/∂θ``. ``grad`` is always a new tensor (never
a view of Δ or x), so the caller may accumulate into it in place.
"""
from __future__ import annotations

import torch

__all__ = ["affine", "summed", "scaled", "rows", "sq"]


def sq(g: torch.Tensor) -> torch.Tensor:
    """‖gₙ‖²_F for each n: g (N, …) → (N,) (vector_norm: no temporary of g's size)."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()


def affine(X: torch.Tensor, D: torch.Tensor, grads: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""A weight entering as Yₙ = Xₙ Wᵀ (one affine map applied to the T rows of sample n):

        ∂Cⁿ/∂W = Δₙᵀ Xₙ                                  (D_out, D_in)
        ‖Δₙᵀ Xₙ‖²_F = ⟨Xₙ Xₙᵀ, Δₙ Δₙᵀ⟩_F  (T × T Gram matrices; = ‖δₙ‖² ‖xₙ‖² for T = 1)

    Shapes: X (N, T, D_in), D = Δ (N, T, D_out). The norm takes the Gram form when T² ≤
    D_in·D_out (ghost clipping's choice: the smaller intermediate), else forms Δₙᵀ Xₙ."""
    N, T, D_in = X.shape
    D_out = D.shape[-1]
    if grads or T * T > D_in * D_out:
        g = D.mT * X if T == 1 else D.mT @ X             # Δₙᵀ Xₙ  (N, D_out, D_in); T = 1: δₙ xₙᵀ
        return (g, None) if grads else (None, sq(g))
    if T == 1:                                           # ‖xₙ‖² ‖δₙ‖²
        return None, (torch.linalg.vector_norm(X, dim=(1, 2)) * torch.linalg.vector_norm(D, dim=(1, 2))).square()
    return None, ((X @ X.mT) * (D @ D.mT)).sum((1, 2))   # ⟨Xₙ Xₙᵀ, Δₙ Δₙᵀ⟩  from (N, T, T)


def summed(D: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""A bias added to each of the T rows: ∂Cⁿ/∂b = 1ᵀ Δₙ (D_out,). D = Δ (N, T, D_out)."""
    g = D[:, 0].clone() if D.shape[1] == 1 else D.sum(1)   # 1ᵀ Δₙ  (N, D_out)
    return g, sq(g)


def scaled(xhat: torch.Tensor, D: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""An elementwise scale Y = x̂ ⊙ γ (γ broadcast along ``dims``; the norms' weight):
    ∂Cⁿ/∂γ = Σ_{dims} (Δ ⊙ x̂)ₙ. A shift (the norms' bias) is the same with x̂ = 1:
    pass ``xhat=None``. xhat, D (N, …); the result (N, *γ's shape)."""
    g = D if xhat is None else D * xhat                  # Δ ⊙ x̂
    g = g.sum(dims) if dims else g.clone()               # Σ_{dims}  (sum(()) would sum every dim; a copy, not Δ)
    return g, sq(g)


def rows(index: torch.Tensor, D: torch.Tensor, num_rows: int, grads: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""A lookup Yₙₜ = W[iₙₜ] (the embedding):

        ∂Cⁿ/∂W[v] = Σ_{t: iₙₜ = v} δₙₜ                    (scatter-add of Δₙ's rows)
        ‖∂Cⁿ/∂W‖²_F = Σ_{t,s} [iₙₜ = iₙₛ] ⟨δₙₜ, δₙₛ⟩

    Shapes: index (N, T) int, D = Δ (N, T, E), W (num_rows, E). The norm takes the pairwise
    form when T² ≤ num_rows·E, else scatters."""
    N, T, E = D.shape
    if grads or T * T > num_rows * E:
        flat = (index + num_rows * torch.arange(N, device=index.device).unsqueeze(1)).reshape(-1)  # n·V + iₙₜ
        g = D.new_zeros(N * num_rows, E).index_add_(0, flat, D.reshape(N * T, E)).view(N, num_rows, E)
        return (g, None) if grads else (None, sq(g))
    same = index.unsqueeze(2) == index.unsqueeze(1)      # [iₙₜ = iₙₛ]  (N, T, T)
    return None, ((D @ D.mT) * same).sum((1, 2))         # Σ_{t,s} [iₙₜ = iₙₛ] ⟨δₙₜ, δₙₛ⟩
