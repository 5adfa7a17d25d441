r"""Convolution, 1-d and 2-d, as three bilinear Functions closed under differentiation.

Derivation: docs/derivation.md#convolution. With X_col the im2col matrix of the zero-padded
input (one column per output position, one row per (input channel of the group, kernel tap)):

    Y = W_col X_col + b                       Conv(X, W) + b          (ConvFn)
    ∂L/∂X = col2im(W_colᵀ G)                  ConvT(G, W)             (ConvInputGradFn)
    ∂L/∂W = G X_colᵀ                          ConvW(X, G)             (ConvWeightGradFn)
    ∂L/∂b = Σ_{n, p} G

Each of the three is bilinear, and the pairing ⟨G, Conv(X, W)⟩ = ⟨ConvT(G, W), X⟩ = ⟨ConvW(X, G), W⟩
gives every one's backward and jvp in terms of the other two (and itself): the gradient of a
gradient is again one of the three, never torch's convolution backward (``aten.convolution_backward``,
``torch.nn.grad``). Each forward evaluates its product with a forward convolution primitive
(``torch.convolution``, transposed or not), which is the same sum: see the helpers' comments.

Shapes (glossary): N batch, C_in / C_out channels, g groups, C_g = C_in / g, S the spatial size
(1 or 2 dims), K the kernel size, S_out = ⌊(S + lo + hi − d(K − 1) − 1) / s⌋ + 1.
X (N, C_in, *S), W (C_out, C_g, *K), b (C_out,), G and Y (N, C_out, *S_out).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as TF

from .. import _compat
from .._compat import functorch_transforms_active, is_batched_tensor, is_functorch_wrapped
from ._function import HandFunction, fast_path, opmath, own_dtype


@dataclass(frozen=True)
class ConvOptions:
    """stride s, zero padding lo (before) and hi (after), dilation d, per spatial dim; groups g.
    ``lo ≠ hi`` is ``padding='same'`` with an even effective kernel (torch pads the extra at the end)."""

    stride: tuple[int, ...]
    pad_lo: tuple[int, ...]
    pad_hi: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int

    @property
    def symmetric(self) -> bool:
        return self.pad_lo == self.pad_hi

    def padded(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """X and the padding to give torch.convolution: asymmetric padding is applied to X first
        (zeros; inside a Function's forward, so not recorded), symmetric by the primitive."""
        if self.symmetric:
            return x, self.pad_lo
        pairs = [p for lo, hi in zip(reversed(self.pad_lo), reversed(self.pad_hi)) for p in (lo, hi)]
        return TF.pad(x, pairs), (0,) * len(self.pad_lo)

    def lifted(self) -> ConvOptions:
        """A 1-D convolution's options as 2-D over (1, S): a leading dim of stride 1, no padding."""
        return ConvOptions((1, *self.stride), (0, *self.pad_lo), (0, *self.pad_hi), (1, *self.dilation), self.groups)

    def out_size(self, in_size, k_size) -> tuple[int, ...]:
        """S_out = ⌊(S + lo + hi − d(K − 1) − 1) / s⌋ + 1."""
        return tuple((S + lo + hi - d * (K - 1) - 1) // s + 1 for S, K, s, lo, hi, d in
                     zip(in_size, k_size, self.stride, self.pad_lo, self.pad_hi, self.dilation))


@dataclass(frozen=True)
class Spatial:
    """A spatial size (S or K) passed to a Function as one opaque argument: a plain tuple would be
    flattened by torch.func's pytree into several arguments, and forward-over-reverse
    (``torch.func.hessian``) would then count more inputs than the jvp has tangents."""

    dims: tuple[int, ...]


# A product whose im2col matrix has at most this many elements is "tiny": a oneDNN primitive's fixed
# cost (~35 µs a call on the CPU of the bench) is then most of its time, and aten's im2col + GEMM
# kernels (what torch itself picks for the smallest convs) take 3-10 µs; measured on (2, 4, 8, 8) 3×3.
_TINY = 1 << 15


def _eager(*ts) -> bool:
    """Plain eager tensors: neither traced nor batched nor wrapped by torch.func (a layout, or a
    kernel without a batching rule, is then not ours to choose)."""
    return not (torch.compiler.is_compiling() or functorch_transforms_active()
                or any(is_functorch_wrapped(t) or is_batched_tensor(t) for t in ts))


def _im2col_kernel(x, w, o: ConvOptions, kernel, n_cols: int):
    """aten's im2col + GEMM ``kernel`` (a _compat name, None where this torch lacks it) for a tiny
    2-D CPU product without groups or (for the forward) dilation; else None: torch.convolution."""
    if (kernel is None or not 0 < n_cols <= _TINY or o.groups != 1 or x.device.type != "cpu"
            or x.dtype not in (torch.float32, torch.float64) or not _eager(x, w)):
        return None
    if x.dim() == 4:
        return kernel

    def lifted(x, w, K, b, stride, pad, *rest):                                   # 1-D as 2-D over (1, S)
        rest = tuple((p, *v) for p, v in zip((0, 1), rest))                       # output_padding, dilation
        return kernel(x.unsqueeze(2), w.unsqueeze(2), (1, *K), b, (1, *stride), (0, *pad), *rest).squeeze(2)
    return lifted


def _complex(product, a, b, bias=None):
    """A product bilinear in its two tensors (plus a bias), for complex ones from real products, as
    torch's own complex convolution takes them (Gauss's three: its rounding, not a fourth product's):
    (a_r + i a_i) ⋆ (b_r + i b_i) = a_r ⋆ b_r − a_i ⋆ b_i + i ((a_r + a_i) ⋆ (b_r + b_i) − a_r ⋆ b_r − a_i ⋆ b_i).
    ``product(u, v, c)``: the real product plus bias c (None: none)."""
    a, b = a.resolve_conj(), b.resolve_conj()
    ar, ai, br, bi = a.real, a.imag, b.real, b.imag
    p = product(ar, br, None if bias is None else bias.real)                  # a_r ⋆ b_r + b_r'
    q = product(ai, bi, None)                                                 # a_i ⋆ b_i
    r = product(ar + ai, br + bi, None if bias is None else bias.real + bias.imag)
    return torch.complex(p - q, r - p - q)


def _conj(t):
    """conj(t) for a complex t, t itself for a real one: torch's gradient of a product with a
    complex coefficient is the adjoint, the conjugated coefficient's (conjugate Wirtinger)."""
    return t.conj() if t is not None and t.dtype.is_complex else t


def _no_overflow(product, dt, *ts):
    """product(*ts) computed in float32 for a float16/bfloat16 result: where it overflows (a sum
    of terms near bfloat16's max, 3.4e38, is past float32's), the same sum again in float64, rounded
    once, as torch's lowp kernels get it (CPU only: the finiteness test is a device sync on CUDA)."""
    out = product(*ts)
    if (dt in (torch.float16, torch.bfloat16) and out.device.type == "cpu" and _eager(out)
            and not bool(out.isfinite().all()) and all(bool(t.isfinite().all()) for t in ts if t is not None)):
        out = product(*(None if t is None else t.double() for t in ts))
    return out


def _conv(x, w, b, o: ConvOptions):
    """Y[n, o, p] = b[o] + Σ_{c, k} W[o, c, k] X_pad[n, g(o) C_g + c, s p + d k]  — W_col X_col + b."""
    if x.dtype.is_complex:
        # each real product through torch.convolution, the primitive torch's complex convolution calls
        return _complex(lambda u, v, c: _conv_primitive(*o.padded(u), v, c, o), x, w, b)
    if x.dtype in (torch.float16, torch.bfloat16) and x.device.type == "cpu":
        dt = x.dtype
        return _no_overflow(lambda u, v, c: _conv(u, v, c, o), dt, opmath(x), opmath(w), opmath(b)).to(dt)
    xp, pad = o.padded(x)
    K = w.shape[2:]
    n_cols = x.shape[0] * w.shape[1] * math.prod(K) * math.prod(o.out_size(x.shape[2:], K))
    thnn = _im2col_kernel(x, w, o, _compat.thnn_conv2d, n_cols) if all(d == 1 for d in o.dilation) else None
    if thnn is not None:
        return thnn(xp, w, K, b, o.stride, pad)                                   # the same sum, im2col + GEMM
    return _conv_primitive(xp, pad, w, b, o)


def _conv_primitive(xp, pad, w, b, o: ConvOptions):
    with own_dtype(xp):
        return torch.convolution(xp, w, b, o.stride, pad, o.dilation, False, (0,) * len(pad), o.groups)


def _conv_input_grad(g, w, o: ConvOptions, in_size):
    """col2im(W_colᵀ G): every output position p sends W[o, c, k] G[n, o, p] back to input
    position s p + d k − lo, which is the transposed convolution of G with W. Its natural length
    (S_out − 1)s + d(K − 1) + 1 falls short of the padded length by r = (S + lo + hi − d(K − 1) − 1)
    mod s (< s) rows no window reaches: output_padding r restores them (as zeros); then the
    padding is cropped (by the primitive when lo = hi)."""
    if g.dtype.is_complex:
        return _complex(lambda u, v, _: _conv_input_grad(u, v, o, in_size), g, w)
    dt, in_size = g.dtype, in_size.dims
    g, w = opmath(g), opmath(w)
    if dt != g.dtype and g.device.type == "cpu":
        return _no_overflow(lambda u, v: _conv_input_grad(u, v, o, Spatial(in_size)), dt, g, w).to(dt)
    k_size = w.shape[2:]
    r = tuple((S + lo + hi - d * (K - 1) - 1) % s for S, K, s, lo, hi, d in
              zip(in_size, k_size, o.stride, o.pad_lo, o.pad_hi, o.dilation))
    pad = o.pad_lo if o.symmetric else (0,) * len(r)
    n_cols = g.shape[0] * w.shape[1] * math.prod(k_size) * math.prod(g.shape[2:])
    slow = _im2col_kernel(g, w, o, _compat.slow_conv_transpose2d, n_cols)
    if slow is not None:
        full = slow(g, w, k_size, None, o.stride, pad, r, o.dilation)             # the same sum, GEMM + col2im
    else:
        with own_dtype(g):
            full = torch.convolution(g, w, None, o.stride, pad, o.dilation, True, r, o.groups)
    if o.symmetric:
        return full.to(dt)                                                        # (N, C_in, *S)
    return _fresh(_crop(full, o.pad_lo, in_size).to(dt))                          # (N, C_in, *S)


def _conv_weight_grad(x, g, o: ConvOptions, k_size):
    """G X_colᵀ: ∂L/∂W[o, c, k] = Σ_{n, p} G[n, o, p] X_pad[n, g(o) C_g + c, s p + d k].

    Two evaluations of the same sum, by the sizes: where X_col (N, C_in·|K|, P) is no larger than G
    (C_in·|K| ≤ C_out: a stem on RGB, every 1×1 conv into as many channels or more) or is tiny, X_col
    itself (unfold) and one batched GEMM per group; else a convolution over the batch (a forward
    primitive, which never builds X_col): X's batch and channel dims swap (input (C_g, g·N, *S):
    batch c, channel (group, n)), G is the weight (C_out, N, *S_out), stride and dilation swap roles
    (tap k at position d k + s p), groups stay; its spatial output is at least K (trailing positions
    no window reaches give more): the first K are kept."""
    if x.dtype.is_complex:
        return _complex(lambda u, v, _: _conv_weight_grad(u, v, o, k_size), x, g)
    dt, k_size = x.dtype, k_size.dims
    x, g = opmath(x), opmath(g)
    if dt != x.dtype and x.device.type == "cpu":
        return _no_overflow(lambda u, v: _conv_weight_grad(u, v, o, Spatial(k_size)), dt, x, g).to(dt)
    N, C_in, *S = x.shape
    C_out, groups = g.shape[1], o.groups
    if N == 0:
        return x.new_zeros((C_out, C_in // groups, *k_size)).to(dt)
    C_g = C_in // groups
    n_cols = N * C_in * math.prod(k_size) * math.prod(g.shape[2:])
    if n_cols <= _TINY and x.dtype == torch.float32 and x.device.type == "cpu":
        # a tiny sum in float64 (free at this size): the batched GEMM's float32 order errs up to 2.4×
        # oneDNN's on (3, 3, 9, 9) with 5×5 kernels, groups 3 (the fuzzer's find)
        return _weight_grad_unfolded(x.double(), g.double(), o, k_size).to(dt)
    if groups > 1 and n_cols <= 4 * _TINY and x.dtype == torch.float32 and x.device.type == "cpu":
        # a small grouped sum in float64 too: oneDNN's forward kernel over the batch orders each
        # group's N·P terms otherwise than its backward kernel, and errs past torch's on (7, 4, 11, 8)
        # with 7×7 kernels, groups 2 (the fuzzer's seed 3); in float64 it costs torch's time there
        return _conv_weight_grad(x.double(), g.double(), o, Spatial(k_size)).to(dt)
    if C_in * math.prod(k_size) <= C_out or n_cols <= _TINY:
        return _weight_grad_unfolded(x, g, o, k_size).to(dt)
    xt = x.reshape(N, groups, C_g, *S).transpose(0, 2).reshape(C_g, groups * N, *S)   # (C_g, g·N, *S)
    gt = g.transpose(0, 1)                                                             # (C_out, N, *S_out)
    eager = _eager(x, g)
    if eager and len(S) == 1:
        # 1-D as 2-D over (1, S): what torch's kernel does anyway, here so that G can be channels-last
        xt, gt, o, k_size = xt.unsqueeze(2), gt.unsqueeze(2), o.lifted(), (1, *k_size)
    if eager:
        # G as the weight stored channels-last (N innermost): the layout oneDNN's forward kernel
        # reads without a reorder of its own (the weight gradient of a 3×3, 64 → 64 conv on
        # (8, 64, 32, 32): 6.2 ms instead of 9.0; kernel 3 on (16, 64, 512): 4.6 instead of 6.9).
        gt = gt.contiguous(memory_format=torch.channels_last)
    xp, pad = o.padded(xt)
    zeros = (0,) * len(pad)
    with own_dtype(x):
        v = torch.convolution(xp, gt, None, o.dilation, pad, o.stride, False, zeros, groups)  # (C_g, C_out, *K')
    v = _crop(v, (0,) * len(k_size), k_size)                                           # (C_g, C_out, *K)
    if v.dim() != x.dim():
        v = v.squeeze(2)                                                               # the lifted dim of a 1-D conv
    return _fresh(v.transpose(0, 1).to(dt))                                            # (C_out, C_g, *K)


def _weight_grad_unfolded(x, g, o: ConvOptions, k_size):
    """∂L/∂W = Σ_n G_n X_col,nᵀ per group, X_col = unfold(X_pad) (im2col; 1-D as 2-D over (1, S))."""
    N, C_in = x.shape[:2]
    C_out, groups = g.shape[1], o.groups
    K = k_size
    if x.dim() == 3:
        x, g, o, K = x.unsqueeze(2), g.unsqueeze(2), o.lifted(), (1, *k_size)
    xp, pad = o.padded(x)
    cols = TF.unfold(xp, K, dilation=o.dilation, padding=pad, stride=o.stride)         # (N, C_in·|K|, P)
    P = cols.shape[-1]
    cols = cols.reshape(N, groups, C_in // groups * math.prod(K), P)                   # (N, g, C_g·|K|, P)
    gm = g.reshape(N, groups, C_out // groups, P)                                      # (N, g, C_out/g, P)
    # as (Σ_n X_col,n G_nᵀ)ᵀ: the GEMM with the long dim P inner to both operands' rows is twice
    # as fast (a stem, (16, 3, 32, 32) → 32: 0.41 ms against 0.80)
    vt = (cols @ gm.transpose(-1, -2)).sum(0)                                          # Σ_n X_col,n G_nᵀ (g, C_g·|K|, C_out/g)
    return vt.transpose(-1, -2).reshape(C_out, C_in // groups, *k_size)                # (C_out, C_g, *K)


def _crop(t, starts, sizes):
    """t[..., a:a+S, b:b+T] over the trailing dims, each narrowed only where it must be (a slice
    that keeps a whole dim is an ``alias``, which the legacy vmap of batched gradcheck refuses)."""
    lead = t.dim() - len(sizes)
    for i, (a, S) in enumerate(zip(starts, sizes)):
        if a != 0 or t.shape[lead + i] != S:
            t = t.narrow(lead + i, a, S)
    return t


def _fresh(t):
    """A copy of the view ``t``: a Function's output must not be a view of a temporary, or
    forward-mode AD demands its tangent share the view's layout (an internal assert, torch 2.13).
    Always a copy (asking ``t._is_view()`` would break Dynamo's graph)."""
    return t.clone(memory_format=torch.contiguous_format)


def _bias_shape(b, dims):
    return b.reshape(-1, *(1,) * dims)   # (C_out, 1, …): broadcast over positions


def _bilinear_jvp(f, a, b, da, db):
    """ḟ = f(ȧ, b) + f(a, ḃ): the tangent of an op linear in each of its two tensors (conv, and
    its input and weight gradients); a None tangent contributes nothing, None if both are."""
    terms = [f(da, b) if da is not None else None, f(a, db) if db is not None else None]
    terms = [t for t in terms if t is not None]
    return None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]


class ConvFn(HandFunction):
    r"""Y = W_col X_col + b  — equals ``torch.nn.functional.conv1d`` / ``conv2d`` (batched input).

    Shapes: X (N, C_in, *S), W (C_out, C_g, *K), b (C_out,) or None → Y (N, C_out, *S_out).
    Backward, G = ∂L/∂Y:
        ∂L/∂X = col2im(W_colᵀ G) = ConvT(G, W)      (N, C_in, *S)
        ∂L/∂W = G X_colᵀ        = ConvW(X, G)      (C_out, C_g, *K)
        ∂L/∂b = Σ_{n, p} G                          (C_out,)
    Forward mode: Ẏ = Conv(Ẋ, W) + Conv(X, Ẇ) + ḃ.
    Complex X, W: the same sums (three real products each, as torch's); each backward product takes
    the conjugate of its saved operand, ConvT(G, W̄) and ConvW(X̄, G): torch's conjugate-Wirtinger
    gradient (the adjoint), and likewise in the two gradient Functions below.
    Saves X only if W needs a gradient, W only if X does.
    Derivation: docs/derivation.md#convolution
    """

    @staticmethod
    def forward(x, weight, bias, opts):
        return _conv(x, weight, bias, opts)                               # W_col X_col + b

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, opts = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(x, weight)
        ctx.opts, ctx.in_size, ctx.k_size = opts, Spatial(tuple(x.shape[2:])), Spatial(tuple(weight.shape[2:]))
        ctx.has_bias = bias is not None

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_x = grad_w = grad_b = None
        # nothing records this (fast path): the products alone, not as ops a double backward needs
        fast = fast_path(grad_y)
        if ctx.needs_input_grad[0]:
            grad_x = (_conv_input_grad(grad_y, _conj(weight), ctx.opts, ctx.in_size) if fast else
                      ConvInputGradFn.call(grad_y, _conj(weight), ctx.opts, ctx.in_size))  # col2im(W_colᴴ G)
        if ctx.needs_input_grad[1]:
            grad_w = (_conv_weight_grad(_conj(x), grad_y, ctx.opts, ctx.k_size) if fast else
                      ConvWeightGradFn.call(_conj(x), grad_y, ctx.opts, ctx.k_size))  # G X_colᴴ
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_y.sum([0, *range(2, grad_y.dim())])                      # Σ_{n,p} G
        return grad_x, grad_w, grad_b, None

    @staticmethod
    def jvp(ctx, dx, dw, db, _):
        x, weight = ctx.saved_tensors
        dy = _bilinear_jvp(lambda a, b: ConvFn.call(a, b, None, ctx.opts), x, weight, dx, dw)  # Conv(Ẋ, W) + Conv(X, Ẇ)
        if db is not None:
            t = _bias_shape(db, len(ctx.in_size.dims))                             # ḃ
            out_size = ctx.opts.out_size(ctx.in_size.dims, ctx.k_size.dims)
            dy = t.expand(x.shape[0], -1, *out_size) if dy is None else dy + t
        return dy


class ConvInputGradFn(HandFunction):
    r"""Z = ConvT(G, W) = col2im(W_colᵀ G): the input gradient of a convolution, as an op.

    Shapes: G (N, C_out, *S_out), W (C_out, C_g, *K) → Z (N, C_in, *S).
    Linear in G and in W; ⟨H, ConvT(G, W)⟩ = ⟨Conv(H, W), G⟩ = ⟨ConvW(H, G), W⟩, so, H = ∂L/∂Z:
        ∂L/∂G = Conv(H, W)         (N, C_out, *S_out)
        ∂L/∂W = ConvW(H, G)        (C_out, C_g, *K)
    Forward mode: Ż = ConvT(Ġ, W) + ConvT(G, Ẇ).
    Derivation: docs/derivation.md#convolution
    """

    @staticmethod
    def forward(g, weight, opts, in_size):
        return _conv_input_grad(g, weight, opts, in_size)                 # col2im(W_colᵀ G)

    @staticmethod
    def setup_context(ctx, inputs, output):
        g, weight, opts, in_size = inputs
        ctx.save_for_backward(g if ctx.needs_input_grad[1] else None, weight if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(g, weight)
        ctx.opts, ctx.in_size, ctx.k_size = opts, in_size, Spatial(tuple(weight.shape[2:]))

    @staticmethod
    def backward(ctx, grad_z):
        g, weight = ctx.saved_tensors
        grad_g = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_g = ConvFn.call(grad_z, _conj(weight), None, ctx.opts)           # Conv(H, W̄)
        if ctx.needs_input_grad[1]:
            grad_w = ConvWeightGradFn.call(grad_z, _conj(g), ctx.opts, ctx.k_size)  # ConvW(H, Ḡ)
        return grad_g, grad_w, None, None

    @staticmethod
    def jvp(ctx, dg, dw, _o, _s):
        g, weight = ctx.saved_tensors
        return _bilinear_jvp(lambda a, b: ConvInputGradFn.call(a, b, ctx.opts, ctx.in_size),
                             g, weight, dg, dw)                                   # ConvT(Ġ, W) + ConvT(G, Ẇ)


class ConvWeightGradFn(HandFunction):
    r"""V = ConvW(X, G) = G X_colᵀ: the weight gradient of a convolution, as an op.

    Shapes: X (N, C_in, *S), G (N, C_out, *S_out) → V (C_out, C_g, *K).
    Linear in X and in G; ⟨H, ConvW(X, G)⟩ = ⟨G, Conv(X, H)⟩ = ⟨ConvT(G, H), X⟩, so, H = ∂L/∂V:
        ∂L/∂X = ConvT(G, H)        (N, C_in, *S)
        ∂L/∂G = Conv(X, H)         (N, C_out, *S_out)
    Forward mode: V̇ = ConvW(Ẋ, G) + ConvW(X, Ġ).
    Derivation: docs/derivation.md#convolution
    """

    @staticmethod
    def forward(x, g, opts, k_size):
        return _conv_weight_grad(x, g, opts, k_size)                      # G X_colᵀ

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, g, opts, k_size = inputs
        ctx.save_for_backward(x if ctx.needs_input_grad[1] else None, g if ctx.needs_input_grad[0] else None)
        ctx.save_for_forward(x, g)
        ctx.opts, ctx.in_size, ctx.k_size = opts, Spatial(tuple(x.shape[2:])), k_size

    @staticmethod
    def backward(ctx, grad_v):
        x, g = ctx.saved_tensors
        grad_x = grad_g = None
        if ctx.needs_input_grad[0]:
            grad_x = ConvInputGradFn.call(_conj(g), grad_v, ctx.opts, ctx.in_size)  # ConvT(Ḡ, H)
        if ctx.needs_input_grad[1]:
            grad_g = ConvFn.call(_conj(x), grad_v, None, ctx.opts)                # Conv(X̄, H)
        return grad_x, grad_g, None, None

    @staticmethod
    def jvp(ctx, dx, dg, _o, _k):
        x, g = ctx.saved_tensors
        return _bilinear_jvp(lambda a, b: ConvWeightGradFn.call(a, b, ctx.opts, ctx.k_size),
                             x, g, dx, dg)                                        # ConvW(Ẋ, G) + ConvW(X, Ġ)
