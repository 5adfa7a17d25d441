"""Softmax and log-softmax along one dim. Derivation: docs/derivation.md#softmax-and-log-softmax.

Both are reductions along ``dim`` followed by an elementwise map, so every equation below is
written for one slice along ``dim`` (a row x ∈ ℝᴰ) and ``1`` means "sum along dim, keep it":
(A)1 = Σ_j A_j, broadcast back over the row. Each Jacobian is a function of the output alone,
so both Functions save Y and never X (STYLE.md §3).

The per-row vector-Jacobian and Jacobian-vector products are module-level helpers so fused
ops (a linear layer into cross-entropy) reuse them instead of writing the math again.
"""
from __future__ import annotations

import torch

from .. import kernels
from .._compat import forward_ad_active, functorch_transforms_active
from ._function import HandFunction, accurate_sum, opmath
from .activations import exp, fast


# --- forward, in the stable forms -----------------------------------------------------------

def _shifted(X: torch.Tensor, dim: int) -> torch.Tensor:
    """X − max_j X_j along dim: every exponent is ≤ 0, so exp never overflows (±1e4 logits).
    A row of −inf or with a +inf gives NaN, as torch's kernel does (−inf − (−inf), inf − inf)."""
    return X - X.amax(dim, keepdim=True)                       # (*, D, *)


def softmax_forward(X: torch.Tensor, dim: int) -> torch.Tensor:
    """Y = exp(X − m) / (exp(X − m))1,  m = max_j X_j."""
    E = _shifted(X, dim).exp_()                                  # exp(X − m)   (*, D, *)
    return E.div_(accurate_sum(E, dim, keepdim=True))            # E / (E)1     (*, D, *)


def log_softmax_forward(X: torch.Tensor, dim: int) -> torch.Tensor:
    """Y = (X − m) − log((exp(X − m))1)  — log-sum-exp with the max taken out."""
    Z = _shifted(X, dim)                                         # X − m        (*, D, *)
    lse = accurate_sum(Z.exp(), dim, keepdim=True).log_()        # log(exp(Z))1 (*, 1, *)
    return Z.sub_(lse)                                           # Z − lse      (*, D, *)


def log_softmax_rows(X: torch.Tensor, inplace: bool = False, accurate: bool = True, scratch=None) -> torch.Tensor:
    """log p = Z − log((exp(Z))1) of rows X (M, C), Z = X − m, with log((exp(Z))1) taken as
    log1p(r): the row max's own term is exactly e^0 = 1, so (exp(Z))1 = 1 + r with
    r = Σ_{j ≠ argmax} e^{Z_j}, and log1p(r) keeps r's digits when one class dominates
    ((exp(Z))1 ≈ 1), where log of the rounded 1 + r would lose them. The losses' log-softmax
    (cross_entropy, linear_cross_entropy per chunk). No classes (C = 0) gives the empty log p.
    ``inplace``: X is a buffer the caller owns and nothing records this (a chunk's logits), so
    log p overwrites it. ``accurate``: r is summed by ``accurate_sum`` (float64 for float32 on
    CPU: cross_entropy's error then stays within torch's); False sums in X's dtype (torch's
    pairwise sum, a few ulps of r, so of log p), sparing a float64 copy of every chunk in the
    chunked linear_cross_entropy's training step. ``scratch``: a contiguous (M, C) buffer for
    e^{Z}, reused across chunks (a fresh 4 MiB buffer a chunk costs its page faults each time)."""
    M, C = X.shape
    if C == 0:                                                   # max refuses an empty dim
        return X if inplace else X.clone()
    m, top = X.max(1, keepdim=True)                              # m = max_j X_j, one argmax  (M, 1)
    Z = X.sub_(m) if inplace else X - m                          # Z ≤ 0, Z_top = 0          (M, C)
    E = Z.exp() if scratch is None else torch.exp(Z, out=scratch)   # e^{Z}                  (M, C)
    if E.is_contiguous():                                        # 0 at the argmax, in place
        E.view(-1).index_fill_(0, top.view(-1) + torch.arange(M, device=X.device) * C, 0)
    else:                                                        # exp keeps a strided X's layout
        E = E.scatter(1, top, 0.0)
    r = accurate_sum(E, 1, keepdim=True) if accurate else E.sum(1, keepdim=True)   # r        (M, 1)
    r = r + (m - m)          # a row max of ±inf or nan: e^{Z_top} = e^{nan}, so the row is nan (as torch's)
    return Z.sub_(torch.log1p(r)) if inplace else Z - torch.log1p(r)   # log p = Z − log(1 + r)


# --- the fast path: the same formulas in fewer passes ------------------------------------
# Taken where nothing records the computation (``activations.fast``: grad mode off, no transform,
# float32/float64). The forward is torch's forward kernel (``torch.softmax``/``torch.log_softmax``,
# the Y of the formulas above in one fused pass, as ``attention`` and ``losses`` use it; a forward
# kernel, not a backward one): the formulas take five passes and five calls (6–9 µs more per call
# at (8, 64), 1.2–1.5× the time at (4096, 512)). The backward is the hand-derived product below
# in fewer passes, along the last dim only: there row sums accumulate in the tensor's own dtype,
# as torch's CPU kernels do (in float64 in the compiled row pass); along another dim torch sums in double, and so there the formulas'
# float64 sums run (float32 ones measured a few eps of the row scale worse than torch on (64, 13)
# columns, tests/test_softmax_norms.py).

# elements: from here on the compiled row pass (one pass, as torch's backward kernel) wins; below,
# its fixed cost (the checks, three numpy views: ~7 µs at (8, 64)) is more than the three torch
# calls' (~4 µs). Measured (4096, 512) float32: 0.8 ms against the torch ops' 1.6 ms, native 0.6 ms.
KERNEL_FROM = 1 << 13


def _kernel(name: str, Y: torch.Tensor, G: torch.Tensor) -> torch.Tensor:
    """∂L/∂X from the compiled row pass ``kernels.softmax.<name>`` on rows (M, D), a fresh buffer."""
    out = torch.empty_like(Y)
    D = Y.shape[-1]
    rows = (Y, G, out) if Y.dim() == 2 else [t.view(-1, D) for t in (Y, G, out)]   # (M, D)
    getattr(kernels.load("softmax"), name)(*kernels.arrays(*rows))
    return out


def fast_softmax_vjp(Y: torch.Tensor, G: torch.Tensor, dim: int) -> torch.Tensor:
    """∂L/∂X = Y ⊙ (G − (G ⊙ Y)1) = G ⊙ Y − Y ⊙ (G ⊙ Y)1: one row pass (``kernels.softmax``), or
    with torch ops the products' buffer reused for the result (three passes: the products, their
    row sums, one addcmul)."""
    if Y.numel() >= KERNEL_FROM and kernels.usable(Y, G):
        return _kernel("softmax_vjp", Y, G)
    P = torch.mul(G, Y)                                                        # G ⊙ Y
    return torch.addcmul(P, Y, P.sum(dim, keepdim=True), value=-1, out=P)      # G ⊙ Y − Y ⊙ (G ⊙ Y)1


_EXP2_FROM = 1 << 12     # elements: below, one exp call costs less than exp2's two (measured: even at 4096)


def fast_log_softmax_vjp(Y: torch.Tensor, G: torch.Tensor, dim: int) -> torch.Tensor:
    """∂L/∂X = G − exp(Y) ⊙ (G)1: one row pass (``kernels.softmax``), or with torch ops in exp(Y)'s
    buffer (exp as exp2 on large tensors, ``activations.exp``)."""
    if Y.numel() >= KERNEL_FROM and kernels.usable(Y, G):
        return _kernel("log_softmax_vjp", Y, G)
    P = Y.exp() if Y.numel() < _EXP2_FROM else exp(Y)                           # exp(Y)
    return torch.addcmul(G, P, G.sum(dim, keepdim=True), value=-1, out=P)      # G − exp(Y) ⊙ (G)1


# --- the hand-derived products, from the output Y -------------------------------------------

def _minus_row_dot(G: torch.Tensor, A: torch.Tensor, B: torch.Tensor, dim: int) -> torch.Tensor:
    """G − (A ⊙ B)1. For float32 on CPU the products and their sum are formed in float64 and
    subtracted in two float32 parts, hi + lo = the float64 sum, so G − hi is exact where it
    cancels (Sterbenz) and neither the products' nor the sum's rounding to float32 is left in
    the result, as in torch's CPU kernel, which keeps them in double."""
    if G.dtype != torch.float32 or G.device.type != "cpu":
        return G - accurate_sum(A * B, dim, keepdim=True)
    s64 = (A.double() * B.double()).sum(dim, keepdim=True)           # (A ⊙ B)1 in float64
    hi = s64.to(G.dtype)
    lo = (s64 - hi.double()).to(G.dtype)                              # its rounding error
    return (G - hi) - lo


def softmax_vjp(Y: torch.Tensor, G: torch.Tensor, dim: int) -> torch.Tensor:
    """∂L/∂X = Y ⊙ (G − (G ⊙ Y)1)   (the Jacobian diag(y) − y yᵀ applied to each row of G).
    G − (G ⊙ Y)1 cancels where one y is ≈ 1, so the row sum is kept to float64 accuracy there
    (``_minus_row_dot``)."""
    return Y * _minus_row_dot(G, G, Y, dim)


def log_softmax_vjp(Y: torch.Tensor, G: torch.Tensor, dim: int) -> torch.Tensor:
    """∂L/∂X = G − exp(Y) ⊙ (G)1   (the Jacobian I − 1 softmax(x)ᵀ, transposed, on each row);
    (G)1 accumulated in float64, as in ``softmax_vjp``."""
    return G - Y.exp() * accurate_sum(G, dim, keepdim=True)


# Ẏ = Y ⊙ (Ẋ − (Ẋ ⊙ Y)1): diag(y) − y yᵀ is symmetric, so the jvp is the vjp with G = Ẋ.
softmax_jvp = softmax_vjp


def log_softmax_jvp(Y: torch.Tensor, dX: torch.Tensor, dim: int) -> torch.Tensor:
    """Ẏ = Ẋ − (Ẋ ⊙ exp(Y))1   (each output moves by its tangent less the p-weighted mean tangent)."""
    return dX - (dX * Y.exp()).sum(dim, keepdim=True)


def _along_dim(x, dim, exact, kernel):
    """Y = exact(X) along dim (in opmath, rounded once), or on the fast path torch's forward kernel."""
    if fast(x):
        return kernel(x, dim)
    if x.numel() == 0:                                           # amax refuses an empty dim
        return torch.empty_like(x)
    return exact(opmath(x), dim).to(x.dtype)


def _along_dim_vjp(ctx, grad_y, exact, fast_version):
    """∂L/∂X = exact(Y, G) along dim (in opmath, rounded once), or its fast path along the last dim."""
    y, = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None
    if ctx.dim == y.dim() - 1 and grad_y.dtype == y.dtype and fast(y, grad=grad_y):
        return fast_version(y, grad_y, ctx.dim), None
    return exact(opmath(y), opmath(grad_y), ctx.dim).to(y.dtype), None


class _AlongDimFn(HandFunction):
    """What SoftmaxFn and LogSoftmaxFn share: save Y, the only tensor either Jacobian needs."""

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, dim = inputs
        ctx.dim = dim
        ctx.save_for_backward(output)                            # Y: both Jacobians need only Y
        if forward_ad_active() or functorch_transforms_active():  # only where a jvp can be asked for
            ctx.save_for_forward(output)


class SoftmaxFn(_AlongDimFn):
    r"""Y = softmax(X) along ``dim``  — equals ``torch.softmax(x, dim)``.

    Forward, per slice along dim (m = max_j X_j, subtracted so no exponent is positive):
        Y = exp(X − m) / (exp(X − m))1
    Shapes: X (*) any shape, ``dim`` a valid non-negative dim (0 for a 0-d X) → Y (*).
    Backward, G = ∂L/∂Y (*), sums (·)1 along dim:
        ∂L/∂X = Y ⊙ (G − (G ⊙ Y)1)          (*)
    Forward mode, tangent Ẋ:
        Ẏ = Y ⊙ (Ẋ − (Ẋ ⊙ Y)1)
    Saves Y only. float16/bfloat16 run in float32 and round once, as torch's kernels do.
    Derivation: docs/derivation.md#softmax-and-log-softmax
    """

    @staticmethod
    def forward(x, dim):
        return _along_dim(x, dim, softmax_forward, torch.softmax)          # Y = exp(X − m) / (exp(X − m))1

    @staticmethod
    def backward(ctx, grad_y):
        return _along_dim_vjp(ctx, grad_y, softmax_vjp, fast_softmax_vjp)   # Y ⊙ (G − (G ⊙ Y)1)

    @staticmethod
    def jvp(ctx, dx, _):
        y, = ctx.saved_tensors
        return softmax_jvp(opmath(y), opmath(dx), ctx.dim).to(y.dtype)   # Y ⊙ (Ẋ − (Ẋ ⊙ Y)1)


class LogSoftmaxFn(_AlongDimFn):
    r"""Y = log softmax(X) along ``dim``  — equals ``torch.log_softmax(x, dim)``.

    Forward, per slice along dim (log-sum-exp with the max m = max_j X_j taken out):
        Y = (X − m) − log((exp(X − m))1)
    Shapes: X (*) any shape, ``dim`` a valid non-negative dim (0 for a 0-d X) → Y (*).
    Backward, G = ∂L/∂Y (*), sums (·)1 along dim:
        ∂L/∂X = G − exp(Y) ⊙ (G)1           (*)
    Forward mode, tangent Ẋ:
        Ẏ = Ẋ − (Ẋ ⊙ exp(Y))1
    Saves Y only (exp(Y) is the softmax). float16/bfloat16 run in float32 and round once.
    Derivation: docs/derivation.md#softmax-and-log-softmax
    """

    @staticmethod
    def forward(x, dim):
        return _along_dim(x, dim, log_softmax_forward, torch.log_softmax)  # Y = (X − m) − log((exp(X − m))1)

    @staticmethod
    def backward(ctx, grad_y):
        return _along_dim_vjp(ctx, grad_y, log_softmax_vjp, fast_log_softmax_vjp)   # G − exp(Y) ⊙ (G)1

    @staticmethod
    def jvp(ctx, dx, _):
        y, = ctx.saved_tensors
        return log_softmax_jvp(opmath(y), opmath(dx), ctx.dim).to(y.dtype)   # Ẋ − (Ẋ ⊙ exp(Y))1
