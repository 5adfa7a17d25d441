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

__all__ = ["affine", "conv_weight", "summed", "scaled", "rows", "sq"]


def sq(g: torch.Tensor) -> torch.Tensor:
    """‖gₙ‖²_F for each n: g (N, …) → (N,) (vector_norm: no temporary of g's size)."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()


def affine(X: torch.Tensor, D: torch.Tensor, grads: bool, gram=None) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""A weight entering as Yₙ = Xₙ Wᵀ (one affine map applied to the T rows of sample n):

        ∂Cⁿ/∂W = Δₙᵀ Xₙ                                  (D_out, D_in)
        ‖Δₙᵀ Xₙ‖²_F = ⟨Xₙ Xₙᵀ, Δₙ Δₙᵀ⟩_F  (T × T Gram matrices; = ‖δₙ‖² ‖xₙ‖² for T = 1)

    Shapes: X (N, T, D_in), D = Δ (N, T, D_out). The norm takes the Gram form when T² ≤
    D_in·D_out (ghost clipping's choice: the smaller intermediate), else forms Δₙᵀ Xₙ. ``gram``:
    a function giving Xₙ Xₙᵀ (N, T, T), where several maps share X (attention's q, k, v)."""
    N, T, D_in = X.shape
    D_out = D.shape[-1]
    if grads or T * T > D_in * D_out:
        g = D.mT * X if T == 1 else D.mT @ X             # Δₙᵀ Xₙ  (N, D_out, D_in); T = 1: δₙ xₙᵀ
        return (g, None) if grads else (None, sq(g))
    if T == 1:                                           # ‖xₙ‖² ‖δₙ‖²
        return None, (torch.linalg.vector_norm(X, dim=(1, 2)) * torch.linalg.vector_norm(D, dim=(1, 2))).square()
    XX = X @ X.mT if gram is None else gram()            # Xₙ Xₙᵀ (N, T, T)
    return None, (XX * (D @ D.mT)).sum((1, 2))           # ⟨Xₙ Xₙᵀ, Δₙ Δₙᵀ⟩


def conv_weight(x: torch.Tensor, D: torch.Tensor, k_size: tuple[int, ...], stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int) -> torch.Tensor:
    r"""A convolution's weight, Yₙ[o, p] = Σ_{c, k} W[o, c, k] Xₙ[g(o) C_g + c, s p + d k − pad]:

        ∂Cⁿ/∂W[o, c, k] = Σ_p Δₙ[o, p] Xₙ[g(o) C_g + c, s p + d k − pad]   (= Δₙᵀ Xₙ,col: ``affine``
                                                                            over the L positions)

    for every n at once as one forward convolution, without the im2col matrix (L·C_g·|k| per
    sample): X's sample and channel dims swap (input (C_g, N·g, *S): batch c, channel (n, group)),
    Δ is the weight (N·C_out, 1, *S_out) with one group per (n, group), stride and dilation swap
    roles (tap k sits at d k + s p), the padding stays. Its spatial output is at least K (rows no
    window reaches give more): the first K are kept. x (N, C_in, *S), D = Δ (N, C_out, *S_out);
    returns (N, C_out, C_g, *K), a new tensor."""
    N, C_in, *S = x.shape
    C_out, C_g, d = D.shape[1], C_in // groups, len(k_size)
    dt = torch.promote_types(x.dtype, D.dtype)
    if N == 0:                                                                              # no sample, no group
        return x.new_zeros((0, C_out, C_g, *k_size), dtype=dt)
    xt = x.to(dt).reshape(N, groups, C_g, *S).movedim(2, 0).reshape(C_g, N * groups, *S)    # (C_g, N·g, *S)
    w = D.to(dt).reshape(N * C_out, 1, *D.shape[2:])                                        # (N·C_out, 1, *S_out)
    v = torch.convolution(xt, w, None, dilation, padding, stride, False, (0,) * d, N * groups)  # (C_g, N·C_out, *K')
    v = v[(..., *(slice(0, K) for K in k_size))]                                            # (C_g, N·C_out, *K)
    return v.reshape(C_g, N, C_out, *k_size).movedim(0, 2).contiguous()                     # (N, C_out, C_g, *K)


def summed(D: torch.Tensor, grads: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""A bias added to each of the T rows: ∂Cⁿ/∂b = 1ᵀ Δₙ (D_out,). D = Δ (N, T, D_out).
    Without ``grads`` the gradient is not returned (for T = 1 its norm is ‖δₙ‖, no copy)."""
    if not grads and D.shape[1] == 1:
        return None, sq(D)                               # ‖δₙ‖²
    g = D[:, 0].clone() if D.shape[1] == 1 else D.sum(1)   # 1ᵀ Δₙ  (N, D_out)
    return (g if grads else None), sq(g)


def scaled(xhat: torch.Tensor, D: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    r"""An elementwise scale Y = x̂ ⊙ γ (γ broadcast along ``dims``; the norms' weight):
    ∂Cⁿ/∂γ = Σ_{dims} (Δ ⊙ x̂)ₙ. A shift (the norms' bias) is the same with x̂ = 1:
    pass ``xhat=None``. xhat, D (N, …); the result (N, *γ's shape). ``xhat`` is the caller's
    fresh tensor and is overwritten by Δ ⊙ x̂ where the dtypes allow (one temporary of x's
    size fewer: at CNN sizes a new buffer costs more in page faults than the product)."""
    if xhat is None:
        g = D
    elif xhat.shape == D.shape and xhat.dtype == torch.promote_types(xhat.dtype, D.dtype):
        g = xhat.mul_(D)                                 # Δ ⊙ x̂, in x̂'s buffer
    else:
        g = D * xhat
    g = g.sum(dims) if dims else (g.clone() if g is D else g)   # Σ_{dims} (sum(()) would sum every dim); never Δ itself
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
