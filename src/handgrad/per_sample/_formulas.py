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

import math

import torch
import torch.nn.functional as TF

__all__ = ["affine", "conv_cols", "conv_weight", "summed", "scaled", "rows", "sq"]


def sq(g: torch.Tensor) -> torch.Tensor:
    """‖gₙ‖²_F for each n: g (N, …) → (N,) (vector_norm: no temporary of g's size)."""
    return torch.linalg.vector_norm(g.flatten(1), dim=1).square()


def affine(X: torch.Tensor, D: torch.Tensor, grads: bool, gram=None,
           d_sq: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
    r"""A weight entering as Yₙ = Xₙ Wᵀ (one affine map applied to the T rows of sample n):

        ∂Cⁿ/∂W = Δₙᵀ Xₙ                                  (D_out, D_in)
        ‖Δₙᵀ Xₙ‖²_F = ⟨Xₙ Xₙᵀ, Δₙ Δₙᵀ⟩_F  (T × T Gram matrices; = ‖δₙ‖² ‖xₙ‖² for T = 1)

    Shapes: X (N, T, D_in), D = Δ (N, T, D_out). The norm takes the Gram form when T² ≤
    D_in·D_out (ghost clipping's choice: the smaller intermediate), else forms Δₙᵀ Xₙ. ``gram``:
    a function giving Xₙ Xₙᵀ (N, T, T), where several maps share X (attention's q, k, v); ``d_sq``:
    ‖δₙ‖² (N,) for T = 1 where the caller has it (the bias's norm)."""
    N, T, D_in = X.shape
    D_out = D.shape[-1]
    if grads or T * T > D_in * D_out:
        g = D.mT * X if T == 1 else D.mT @ X             # Δₙᵀ Xₙ  (N, D_out, D_in); T = 1: δₙ xₙᵀ
        return (g, None) if grads else (None, sq(g))
    if T == 1:                                           # ‖xₙ‖² ‖δₙ‖²
        if d_sq is not None:
            return None, sq(X).mul_(d_sq)
        return None, (torch.linalg.vector_norm(X, dim=(1, 2)) * torch.linalg.vector_norm(D, dim=(1, 2))).square()
    XX = X @ X.mT if gram is None else gram()            # Xₙ Xₙᵀ (N, T, T)
    return None, (XX * (D @ D.mT)).sum((1, 2))           # ⟨Xₙ Xₙᵀ, Δₙ Δₙᵀ⟩


#: the im2col rows of a chunk of samples held at once (float elements: 1 MiB of float32), so that
#: the patches of a big batch are never one buffer of N·C_in·|k|·L (memory, and page faults)
COLS_CHUNK = 2 ** 18


def conv_cols(x: torch.Tensor, k_size: tuple[int, ...], stride: tuple[int, ...], padding: tuple[int, ...],
              dilation: tuple[int, ...], S_out: tuple[int, ...], chunk: int = COLS_CHUNK):
    r"""Xₙ,col, the im2col matrix of each sample, a chunk of samples at a time: yields
    ``(a, b, cols)`` with cols (b − a, C_in·|k|, L) = Xₙ,col for n ∈ [a, b),

        Xₙ,col[(c, k), p] = X_pad[n, c, s p + d k]        (rows (c, k) as W's flattened (C_in, *k))

    as one strided view of the zero-padded X (tap k at offset d k, position p at s p, per spatial
    dim) copied into a buffer reused across chunks: no ``unfold`` (im2col, 2–4× slower than the
    copy at the CNN bench's sizes) and no N·C_in·|k|·L buffer for a big batch. x (N, C_in, *S); S_out: the output
    positions (G's spatial shape)."""
    N, C = x.shape[:2]
    if any(padding):
        x = TF.pad(x, [q for pad in reversed(padding) for q in (pad, pad)])     # X_pad (N, C_in, *S_pad)
    x = x.contiguous()
    S_pad = x.shape[2:]
    if any(s * (L - 1) + d * (K - 1) >= P for s, L, d, K, P in zip(stride, S_out, dilation, k_size, S_pad)):
        raise RuntimeError(f"per_sample.capture: a conv's output positions {list(S_out)} do not fit its padded "
                           f"input {list(S_pad)} (kernel {list(k_size)}, stride {list(stride)})")
    st = x.stride()
    shape = (C, *k_size, *S_out)                                                # (C_in, *k, *S_out)
    strides = (st[1], *(d * t for d, t in zip(dilation, st[2:])), *(s * t for s, t in zip(stride, st[2:])))
    rows, L = C * math.prod(k_size), math.prod(S_out)
    B = max(1, min(N, chunk // max(1, rows * L)))
    buf = x.new_empty((B, *shape))
    for a in range(0, N, B):
        b = min(N, a + B)
        view = x.as_strided((b - a, *shape), (st[0], *strides), x.storage_offset() + a * st[0])
        cols = buf[: b - a]
        cols.copy_(view)
        yield a, b, cols.view(b - a, rows, L)                                   # (b − a, C_in·|k|, L)


def conv_weight(x: torch.Tensor, D: torch.Tensor, k_size: tuple[int, ...], stride: tuple[int, ...],
                padding: tuple[int, ...], dilation: tuple[int, ...], groups: int,
                grads: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    r"""A convolution's weight, Yₙ[o, p] = Σ_{c, k} W[o, c, k] Xₙ[g(o) C_g + c, s p + d k − pad]:
    the affine map W_col on the patches, per group j (C_g = C_in/g input, C_out/g output channels):

        ∂Cⁿ/∂W_j = Δₙ,j Xₙ,col,jᵀ        (C_out/g, C_g·|k|)
        ∂Cⁿ/∂W[o, c, k] = Σ_p Δₙ[o, p] Xₙ,col[(g(o) C_g + c, k), p]

    for every n as one batched GEMM per chunk of samples (``conv_cols``), the squared norm
    ‖∂Cⁿ/∂W‖²_F = Σ_j ‖Δₙ,j Xₙ,col,jᵀ‖²_F of each chunk's product (``grads=False``: nothing of
    N·|W| is kept). x (N, C_in, *S), D = Δ (N, C_out, *S_out); returns ``(grad, sq_norm)``: grad
    (N, C_out, C_g, *k), a new tensor (None without ``grads``), sq_norm (N,) (None with it)."""
    N, C_in, *S = x.shape
    C_out, C_g = D.shape[1], C_in // groups
    dt = torch.promote_types(x.dtype, D.dtype)
    rows = C_g * math.prod(k_size)
    out = x.new_empty((N, groups, C_out // groups, rows), dtype=dt) if grads else None   # (N, g, C_out/g, C_g·|k|)
    sq_norm = None if grads else x.new_empty((N,), dtype=dt)
    Dm = D.to(dt).reshape(N, groups, C_out // groups, math.prod(D.shape[2:]))            # (N, g, C_out/g, L)
    # the GEMM whose output has the longer side as its (contiguous) columns is the faster (MKL, one
    # thread, batch 64: a stem, C_g·|k| = 9 < C_out = 16, takes 0.29 ms as (Xₙ,col Δₙᵀ)ᵀ against
    # 0.40 ms; the CNN's second conv, 144 > 32, 1.87 ms as Δₙ Xₙ,colᵀ against 2.04)
    transposed = rows < C_out // groups
    for a, b, cols in conv_cols(x.to(dt), k_size, stride, padding, dilation, tuple(D.shape[2:])):
        cols = cols.view(b - a, groups, rows, cols.shape[-1])                           # (b − a, g, C_g·|k|, L)
        if transposed:
            g = (cols @ Dm[a:b].mT).mT                                                  # (Xₙ,col,j Δₙ,jᵀ)ᵀ
        elif grads:
            torch.matmul(Dm[a:b], cols.mT, out=out[a:b])                                # Δₙ,j Xₙ,col,jᵀ
            continue
        else:
            g = Dm[a:b] @ cols.mT                                                       # Δₙ,j Xₙ,col,jᵀ
        if grads:
            out[a:b] = g
        else:
            sq_norm[a:b] = torch.linalg.vector_norm(g, dim=(1, 2, 3)).square()          # Σ_j ‖Δₙ,j Xₙ,col,jᵀ‖²
    return (None if out is None else out.view(N, C_out, C_g, *k_size)), sq_norm


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
