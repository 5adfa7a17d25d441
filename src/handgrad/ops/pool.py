r"""Pooling over the two trailing dims: max pooling, and average pooling (fixed and adaptive
windows) as the separable linear map Y = A_h X A_wᵀ. Derivation: docs/derivation.md#pooling.

Shapes (glossary): X (N, C, H, W) (the functional adds N = 1 for unbatched input),
Y (N, C, H_out, W_out); A_h (H_out, H) and A_w (W_out, W) are the averaging matrices.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as TF

from .. import kernels
from .._compat import functorch_transforms_active
from ._function import HandFunction, fast_path, opmath, own_dtype


def _kernel_ok(*tensors) -> bool:
    """May these go to a kernel (``kernels.usable``; never while compiling: Dynamo would trace the
    question)?"""
    return not torch.compiler.is_compiling() and kernels.usable(*tensors)


# --- average pooling: Y = A_h X A_wᵀ ----------------------------------------------------------


def window_matrix(start: torch.Tensor, end: torch.Tensor, size: int, divisor: torch.Tensor, like: torch.Tensor):
    """A (len(start), size), A[i, j] = 1/divisor[i] for start[i] ≤ j < end[i], else 0: row i
    averages window i of one spatial dim."""
    j = torch.arange(size, device=like.device)
    inside = (j >= start[:, None]) & (j < end[:, None])                       # (H_out, H)
    return inside.to(opmath(like).dtype) / divisor[:, None].to(opmath(like).dtype)


_MATRICES: dict = {}     # (build, sizes…, dtype, device) → A: constants, never written to
_PLAIN = (int, bool, type(None))
_LOW = (torch.float16, torch.bfloat16)


def _memo(build):
    """``build(*ints, like)`` once per sizes, dtype and device: an averaging matrix is a constant
    of its sizes (and a dozen small ops to build, per call, per dim). Not while compiling (Dynamo
    traces the build), nor under inference mode (its tensors could not be saved for a backward
    later), nor for a tensor-valued size; at most 256 kept."""

    def cached(*args):
        *sizes, like = args
        for v in sizes:                          # a tensor-valued size is never a key
            if type(v) not in _PLAIN:
                return build(*args)
        if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
            return build(*args)
        dtype = like.dtype
        key = (build, *sizes, torch.float32 if dtype in _LOW else dtype, like.device)   # (opmath's dtype)
        A = _MATRICES.get(key)
        if A is None:
            if len(_MATRICES) >= 256:
                _MATRICES.clear()
            A = _MATRICES[key] = build(*args)
        return A

    cached.__doc__, cached.__name__ = build.__doc__, build.__name__
    return cached


@_memo
def avg_pool_matrix(size: int, out: int, k: int, s: int, p: int, count_include_pad: bool,
                    divisor: int | None, like: torch.Tensor) -> torch.Tensor:
    """Torch's windows: start = i s − p, end = min(start + k, size + p) (ceil_mode's last window is
    cut at the padding's end), then clipped to [0, size). The divisor is the padded window's length
    (``count_include_pad``) or the clipped one; ``divisor_override`` (applied by the caller, once,
    on A_h) replaces both."""
    i = torch.arange(out, device=like.device)
    start = i * s - p
    end = torch.clamp(start + k, max=size + p)
    lo, hi = start.clamp(min=0), end.clamp(max=size)
    length = end - start if count_include_pad else hi - lo
    if divisor is not None:
        length = torch.ones_like(length)
    return window_matrix(lo, hi, size, length, like)


@_memo
def adaptive_matrix(size: int, out: int, like: torch.Tensor) -> torch.Tensor:
    """Torch's adaptive windows: start = ⌊i·size/out⌋, end = ⌈(i + 1)·size/out⌉."""
    i = torch.arange(out, device=like.device)
    start = torch.div(i * size, out, rounding_mode="floor")
    end = torch.div((i + 1) * size + out - 1, out, rounding_mode="floor")
    return window_matrix(start, end, size, end - start, like)


def _all_finite(t: torch.Tensor) -> bool:
    """False also where the values cannot be branched on (compiling, a torch.func transform, the
    legacy vmap of batched gradients): there the exact path is always taken."""
    if torch.compiler.is_compiling() or functorch_transforms_active():
        return False
    try:
        return bool(t.isfinite().all())
    except RuntimeError:   # legacy vmap (is_grads_batched, gradcheck's batched check)
        return False


def _window_product(a: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """A Z with IEEE's window semantics: a row of A sees only the entries it weights (A ≠ 0), so
    an inf or nan elsewhere in Z's column leaves it alone (0 · inf would be nan). The finite part
    is A Z̃ (Z̃: Z with its non-finite entries 0); a window holding a nan, or +inf and −inf
    contributions (inf times a negative weight is −inf), is nan, one holding only +inf is +inf."""
    ok = z.isfinite()
    y = a @ z.where(ok, 0.0)                                              # A Z̃
    pos, neg = (a > 0).to(z.dtype), (a < 0).to(z.dtype)
    up, down = (z == torch.inf).to(z.dtype), (z == -torch.inf).to(z.dtype)
    n_up = pos @ up + neg @ down                                          # +inf contributions per window
    n_down = pos @ down + neg @ up
    n_nan = (a != 0).to(z.dtype) @ z.isnan().to(z.dtype)
    y = torch.where(n_up > 0, torch.inf, y)
    y = torch.where(n_down > 0, -torch.inf, y)
    return torch.where((n_nan > 0) | ((n_up > 0) & (n_down > 0)), torch.nan, y)


class SeparablePoolFn(HandFunction):
    r"""Y = A_h X A_wᵀ  — equals ``torch.nn.functional.avg_pool2d`` and ``adaptive_avg_pool2d``
    with A_h, A_w from ``avg_pool_matrix`` / ``adaptive_matrix`` (constants, no gradient).

    Shapes: X (N, C, H, W), A_h (H_out, H), A_w (W_out, W) → Y (N, C, H_out, W_out).
    Backward, G = ∂L/∂Y; linear in X, so its own transpose, the same op on (A_hᵀ, A_wᵀ):
        ∂L/∂X = A_hᵀ G A_w        (N, C, H, W)
    Forward mode: Ẏ = A_h Ẋ A_wᵀ.
    float16/bfloat16: computed in float32, rounded once.
    Derivation: docs/derivation.md#pooling
    """

    @staticmethod
    def forward(x, a_h, a_w):
        with own_dtype(x):                                                # in float32, as torch's pools under autocast
            z = opmath(x)
            y = a_h @ z @ a_w.mT                                          # A_h X A_wᵀ
            if not _all_finite(y):
                # an inf or nan times A's zeros is nan, spread to every window of its rows and
                # columns: each product again, its non-finite entries counted per window
                y = _window_product(a_w, _window_product(a_h, z).mT).mT
            return y.to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, a_h, a_w = inputs
        ctx.save_for_backward(a_h, a_w)
        ctx.save_for_forward(a_h, a_w)

    @staticmethod
    def backward(ctx, grad_y):
        a_h, a_w = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0] and fast_path(grad_y):                 # nothing records it: the product alone
            grad_x = SeparablePoolFn.forward(grad_y, a_h.mT, a_w.mT)      # A_hᵀ G A_w
        elif ctx.needs_input_grad[0]:
            grad_x = SeparablePoolFn.call(grad_y, a_h.mT, a_w.mT)         # A_hᵀ G A_w
        return grad_x, None, None

    @staticmethod
    def jvp(ctx, dx, _h, _w):
        a_h, a_w = ctx.saved_tensors
        return SeparablePoolFn.call(dx, a_h, a_w)                         # A_h Ẋ A_wᵀ


@dataclass(frozen=True)
class AvgPoolOptions:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    ceil_mode: bool
    count_include_pad: bool
    divisor_override: int | None


class AvgPool2dFn(HandFunction):
    r"""Y = A_h X A_wᵀ  — equals ``torch.nn.functional.avg_pool2d``, A_h and A_w from ``avg_pool_matrix``
    (constants, no gradient; ``divisor_override`` folded into A_h).

    Shapes: X (N, C, H, W), A_h (H_out, H), A_w (W_out, W) → Y (N, C, H_out, W_out).
    The forward is torch's average pooling kernel (the same sum: each window's mean, with IEEE's
    semantics for what lies outside the window); the backward never calls its backward. G = ∂L/∂Y:
        ∂L/∂X = A_hᵀ G A_w        (N, C, H, W)   (SeparablePoolFn on the transposes)
    where the windows tile X (stride = kernel, no padding, k | H and k | W) every entry of A is the
    same a (a_h a_w = 1/(k_h k_w), or 1/divisor_override), and A_hᵀ G A_w is G[⌊h/k_h⌋, ⌊w/k_w⌋] · a_h a_w:
    G scaled once, each entry repeated k_h × k_w times (the fast path: one pass instead of two
    products; kernels/pool.py ``tile_backward`` on CPU float32/float64).
    Forward mode: Ẏ = A_h Ẋ A_wᵀ.
    Derivation: docs/derivation.md#pooling
    """

    @staticmethod
    def forward(x, opts, a_h, a_w):
        o = opts
        with own_dtype(x):                                                # in its own dtype, as torch's pools under autocast
            return TF.avg_pool2d(x, o.kernel_size, o.stride, o.padding, o.ceil_mode, o.count_include_pad,
                                 o.divisor_override)                       # A_h X A_wᵀ

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, opts, a_h, a_w = inputs
        ctx.save_for_backward(a_h, a_w)
        ctx.save_for_forward(a_h, a_w)
        (H, W), (H_out, W_out) = x.shape[2:], output.shape[2:]
        (k_h, k_w), o = opts.kernel_size, opts
        ctx.opts = opts
        # the windows tile X: a_h a_w = 1/(k_h k_w), or 1/divisor_override (avg_pool_matrix's entries)
        tiles = o.stride == o.kernel_size and o.padding == (0, 0) and H == H_out * k_h and W == W_out * k_w
        ctx.tile = (1.0 / (o.divisor_override or k_h * k_w)) if tiles else None

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        if ctx.tile is not None and fast_path(grad_y):                     # nothing records it: one pass
            N, C, H_out, W_out = grad_y.shape
            k_h, k_w = ctx.opts.kernel_size
            grad_x = grad_y.new_empty((N, C, H_out * k_h, W_out * k_w))
            if _kernel_ok(grad_y, grad_x):
                g, out = kernels.arrays(grad_y, grad_x)
                kernels.load("pool").tile_backward(g, ctx.tile, k_h, k_w, out)   # G[⌊h/k_h⌋, ⌊w/k_w⌋] a_h a_w
            else:
                g = opmath(grad_y) * ctx.tile                              # G a_h a_w
                if g.dtype != grad_y.dtype:
                    g = g.to(grad_y.dtype)
                grad_x = g.view(N, C, H_out, 1, W_out, 1).expand(N, C, H_out, k_h, W_out, k_w).reshape(
                    N, C, H_out * k_h, W_out * k_w)                            # G[⌊h/k_h⌋, ⌊w/k_w⌋] a_h a_w
        else:
            a_h, a_w = ctx.saved_tensors
            grad_x = SeparablePoolFn.call(grad_y, a_h.mT, a_w.mT)         # A_hᵀ G A_w
        return grad_x, None, None, None

    @staticmethod
    def jvp(ctx, dx, _o, _h, _w):
        a_h, a_w = ctx.saved_tensors
        return AvgPool2dFn.call(dx, ctx.opts, a_h, a_w)                   # A_h Ẋ A_wᵀ


class GlobalAvgPoolFn(HandFunction):
    r"""Y[n, c] = (1 / HW) Σ_{h, w} X[n, c, h, w]  — equals ``torch.nn.functional.adaptive_avg_pool2d``
    with output_size 1 (torch itself takes ``mean`` over the two dims there).

    The separable map with A_h = 1ᵀ/H (1, H) and A_w = 1ᵀ/W (1, W): Y = A_h X A_wᵀ is the mean, so
    the two products collapse to one reduction, and the transposes to a broadcast.
    Shapes: X (N, C, H, W) → Y (N, C, 1, 1). Backward, G = ∂L/∂Y (N, C, 1, 1):
        ∂L/∂X = A_hᵀ G A_w = G / (HW), broadcast over (H, W)      (N, C, H, W), an expanded view
    Forward mode: Ẏ = mean_{h, w} Ẋ.
    An inf or nan reaches exactly the one window it is in (all of H × W): no 0 · inf to avoid.
    Derivation: docs/derivation.md#pooling
    """

    @staticmethod
    def forward(x):
        return x.mean((2, 3), keepdim=True)                               # (1/HW) Σ_{h,w} X

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, = inputs
        ctx.x_shape = x.shape

    @staticmethod
    def backward(ctx, grad_y):
        N, C, H, W = ctx.x_shape
        return (grad_y / (H * W)).expand(N, C, H, W)                      # G / (HW), broadcast

    @staticmethod
    def jvp(ctx, dx):
        return GlobalAvgPoolFn.call(dx)                                   # mean_{h,w} Ẋ


# --- max pooling ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MaxPoolOptions:
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    ceil_mode: bool


def _planes(t: torch.Tensor) -> torch.Tensor:
    """(N, C, A, B) → (N, C, A·B) (reshape, not flatten: the legacy vmap of batched gradcheck
    has no rule for flatten)."""
    return t.reshape(t.shape[0], t.shape[1], t.shape[2] * t.shape[3])


class MaxPool2dFn(HandFunction):
    r"""Y[n, c, i] = X[n, c, a(i)], a(i) = argmax over window i  — equals
    ``torch.nn.functional.max_pool2d(..., return_indices=True)``.

    Shapes: X (N, C, H, W) → Y (N, C, H_out, W_out) and the argmax indices I (same shape, int64,
    flat over H·W, torch's: its tie and NaN choices, windows never wholly in the padding).
    Y is a selection, Y = gather(X, I), linear in X with a 0/1 matrix S (one 1 per row), so with
    G = ∂L/∂Y:
        ∂L/∂X = Sᵀ G = scatter_add(0, I, G)       (N, C, H, W): each G lands on its argmax;
                                                   windows that share an argmax add up
    Forward mode: Ẏ = S Ẋ = gather(Ẋ, I).
    The forward is torch's max pooling kernel (it gives Y and I); the backward never calls its
    backward. Saves I only.
    Derivation: docs/derivation.md#pooling
    """

    @staticmethod
    def forward(x, opts):
        o = opts
        return TF.max_pool2d(x, o.kernel_size, o.stride, o.padding, o.dilation, o.ceil_mode, return_indices=True)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _ = inputs
        _, idx = output
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        ctx.save_for_forward(idx)
        ctx.x_shape = x.shape

    @staticmethod
    def backward(ctx, grad_y, _grad_idx):
        idx, = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            N, C, H, W = ctx.x_shape
            flat = grad_y.new_zeros(N, C, H * W)                                         # (N, C, H·W)
            add = flat.scatter_add_ if fast_path(grad_y) else flat.scatter_add          # in place on the fresh zeros
            grad_x = add(2, _planes(idx), _planes(grad_y)).reshape(ctx.x_shape)          # Sᵀ G
        return grad_x, None

    @staticmethod
    def jvp(ctx, dx, _):
        idx, = ctx.saved_tensors
        dy = _planes(dx).gather(2, _planes(idx)).reshape(idx.shape)                     # S Ẋ
        return dy, None
