"""Linear + cross-entropy as one autograd node, chunked over rows: the logits of one chunk at a
time, never the (N, C) matrix. Derivation: docs/derivation.md#fused-operations.

As for the stack (``ops.fused``): ``backward`` with grad mode off works in place on buffers it owns
(the softmax into the logits buffer); with grad mode on the same equations run out of place.
The cross entropy's formulas come from ``ops.losses`` and the affine rule from ``ops.linear``:
nothing here writes either again (STYLE.md §4).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._compat import functorch_transforms_active
from ._function import HandFunction, fast_path, opmath
from ._function import accurate_sum as _sum
from .linear import LinearFn, affine, affine_jvp, affine_vjp
from .losses import (CrossEntropyFn, CrossEntropyOptions, ce_chunk_fast, ce_denominator, ce_direction, ce_losses,
                     ce_row_scale, reduce_loss)
from .softmax import log_softmax_rows


@dataclass(frozen=True)
class LCEOptions:
    """The non-tensor options of ``LinearCrossEntropyFn`` (STYLE.md §5): the cross entropy's own
    (``ce``, class-index targets) and the chunking.

    ``precompute``: which of (∂/∂X, ∂/∂W, ∂/∂b) the forward computes as it goes (decided by the
    public function from ``requires_grad``; empty when no gradient will be needed or when the
    reduction is 'none', whose per-row incoming gradient cannot be folded in before it is known).
    ``out_dtype``: the loss dtype (float32 under autocast, as torch's cross_entropy).
    """

    ce: CrossEntropyOptions
    chunk_size: int
    out_dtype: torch.dtype
    precompute: tuple[bool, bool, bool] = (False, False, False)


def default_chunk_size(n_rows: int, n_classes: int) -> int:
    """Rows per chunk: a chunk of logits holds about 2²¹ float32 values (8 MiB), whatever C is;
    at least 1 row and at most all of them, a multiple of 8 when above 8 (aligned GEMMs).
    The trade-off (bench `lce`, N=4096, D=256, C=16384, one CPU thread): the step's peak is
    ∂L/∂W + ∂L/∂X + the chunk's one buffer (the training step's fast chunk, ops.losses.ce_chunk_fast,
    works in the logits' own buffer): 8 MiB chunks measured 28 MiB (3.6% of native) at 0.75×
    native's CPU time, 4 MiB chunks 0.9×. Smaller chunks cost time: each chunk's ∂L/∂W += dZᵀ X
    rereads all of ∂L/∂W, and a GEMM with few rows is memory-bound."""
    rows = max(1, (1 << 21) // max(n_classes, 1))
    if rows > 8:
        rows -= rows % 8
    return max(1, min(rows, max(n_rows, 1)))


def _chunk_logp(X, W, b, T, w, ce, differentiable: bool, scratch=None):
    """log p = log_softmax(X Wᵀ + b) of one chunk (n, C), in opmath. ``differentiable`` (a
    backward that is itself recorded): through ``LinearFn`` and ``CrossEntropyFn``'s log p
    output, so the double backward runs their hand-derived rules, not autograd's of torch ops.
    With grad mode off, log p overwrites the chunk's logits (a buffer only this op holds)."""
    if differentiable:
        Z = opmath(LinearFn.call(X, W, b))                         # Z_c = X_c Wᵀ + b   (n, C)
        return CrossEntropyFn.call(Z, T, w, ce)[1]                 # log p, connected to Z
    fast = not torch.is_grad_enabled()
    Z = opmath(affine(X, W, b))                                    # Z_c                (n, C)
    E = None if scratch is None else scratch[: Z.shape[0]]
    return log_softmax_rows(Z, inplace=fast, accurate=False, scratch=E)   # log p           (n, C)


def _lce_accumulate(dZ, Xc, W, needs, gW, gb, gX, s, e, gX_chunks, write_out):
    """One chunk's share of the gradients, in place (nothing records it): ∂L/∂X_c = dZ_c W into gX
    (or appended), ∂L/∂W += dZ_cᵀ X_c, ∂L/∂b += 1ᵀ dZ_c. Returns the running (gW, gb)."""
    need_x, need_w, need_b = needs
    with torch.autocast(Xc.device.type, enabled=False):            # the gradient GEMMs stay in opmath
        gX_c, gW, gb = affine_vjp(dZ, Xc, W, needs, acc=(gW, gb))
    if write_out:
        gX[s:e].copy_(gX_c)                                        # ∂L/∂X_c = dZ_c W   (n, D)
    elif need_x:
        gX_chunks.append(gX_c)
    return gW, gb


def _lce_chunks(X, W, b, T, w, opts: LCEOptions, *, want_loss: bool, g, den, needs, inplace: bool,
                own_g: bool = False):
    r"""One pass over row chunks of X: the per-row losses and/or the gradients, each chunk through
    the cross entropy's own formulas (ops.losses) and the affine rules (ops.linear).

    Per chunk c, Z_c = X_c Wᵀ + b (n, C), log p = log_softmax(Z_c) and, with Q the weighted,
    smoothed target of ``ops.losses.ce_losses``:
        ℓ_n = −Q_n · log p_n                       (ce_losses; ignored rows: 0)
        dZ_c = ĝ ⊙ (P ⊙ (Q 1) − Q)                 (ce_direction, ce_row_scale: ĝ = g/den, g or g_n)
        ∂L/∂X_c = dZ_c W      ∂L/∂W = Σ_c dZ_cᵀ X_c      ∂L/∂b = Σ_c 1ᵀ dZ_c   (affine_vjp)
    ``g``: the incoming gradient (a scalar, or (N,) for 'none'), None when no gradient is wanted;
    ``den``: the 'mean' denominator over all rows; ``needs``: which of the three gradients.
    ``inplace``: nothing records this pass, so each chunk's logits become log p, then R, in place
    and ∂L/∂W, ∂L/∂b accumulate in place; with ``own_g`` too (the forward's g = 1, which no vmap
    batches) ĝ scales R in place and ∂L/∂X is written into one buffer.
    Returns (losses (N,) opmath or None, gX, gW, gb) in opmath.
    Never more than one chunk of logits exists at a time.
    """
    N, D = X.shape
    C = W.shape[0]
    ce = opts.ce
    need_x, need_w, need_b = needs if g is not None else (False, False, False)
    grads = need_x or need_w or need_b
    differentiable = grads and not inplace and torch.is_grad_enabled()
    Wo, Xo = opmath(W), opmath(X)                                  # GEMMs of gradients in opmath
    losses, gX_chunks = [], []
    gW = gb = None
    # ∂L/∂X copied chunk by chunk into one buffer, where no vmap batches the chunks (an in-place
    # copy cannot grow the buffer's batch: a batched g would); else the chunks are concatenated
    unbatched = inplace and not functorch_transforms_active()
    write_out = need_x and own_g and unbatched
    gX = Xo.new_empty(N, D) if write_out else None
    # e^{Z} of each chunk into one buffer (out= has no batching rule either)
    scratch = Wo.new_empty(min(opts.chunk_size, N), C) if unbatched and N else None
    # index targets without smoothing, nothing recorded: ops.losses.ce_chunk_fast, in fewer passes
    # (the chunk's one buffer: the logits' GEMM writes into the scratch buffer unless it rounds to a half type)
    quick = scratch is not None and C and not ce.probs and not ce.label_smoothing and (own_g or fast_path(g))
    into = quick and X.dtype == scratch.dtype and not torch.is_autocast_enabled(X.device.type)
    for s in range(0, N, opts.chunk_size):
        e = min(s + opts.chunk_size, N)
        Tc = T[s:e]
        if quick:
            gc = None if not grads else g if g.dim() == 0 else g[s:e]
            Z = affine(X[s:e], W, b, out=scratch[: e - s]) if into else opmath(affine(X[s:e], W, b))   # Z_c (n, C)
            loss_c, dZ = ce_chunk_fast(Z, Tc, w, ce, gc, den, want_loss)   # ℓ_n, dZ_c in Z_c's buffer
            if want_loss:
                losses.append(loss_c)                              # ℓ_n                    (n,)
            if grads:
                gW, gb = _lce_accumulate(dZ, Xo[s:e], Wo, needs, gW, gb, gX, s, e, gX_chunks, write_out)
            continue
        logp = _chunk_logp(X[s:e], W, b, Tc, w, ce, differentiable, scratch)   # log p  (n, C)
        if want_loss:
            losses.append(ce_losses(logp, Tc, w, ce))              # ℓ_n = −Q_n · log p_n   (n,)
        if not grads:
            continue
        R, keep = ce_direction(logp, Tc, w, ce, inplace=not differentiable and not torch.is_grad_enabled())
        logp = None                                                # R = P ⊙ (Q 1) − Q      (n, C)
        gc = g if g.dim() == 0 else g[s:e]                         # g, or g_n for 'none'
        scale = ce_row_scale(gc, ce, den, keep)                    # ĝ                      (n, 1)
        # dZ_c = ĝ ⊙ (P (Q 1) − Q); in place unless ĝ may be batched by vmap where R is not
        dZ = R.mul_(scale) if own_g and inplace else scale * R
        R = None
        acc = (gW, gb) if inplace else (None, None)
        with torch.autocast(X.device.type, enabled=False):         # the gradient GEMMs stay in opmath
            gX_c, gW_c, gb_c = affine_vjp(dZ, Xo[s:e], Wo, (need_x, need_w, need_b), acc=acc)
        if write_out:
            gX[s:e].copy_(gX_c)                                    # ∂L/∂X_c = dZ_c W   (n, D)
        elif need_x:
            gX_chunks.append(gX_c)
        if need_w:
            gW = gW_c if inplace or gW is None else gW + gW_c      # ∂L/∂W += dZ_cᵀ X_c  (C, D)
        if need_b:
            gb = gb_c if inplace or gb is None else gb + gb_c      # ∂L/∂b += 1ᵀ dZ_c   (C,)
        dZ = gX_c = None              # free this chunk before the next is allocated
    out_losses = None
    if want_loss:
        out_losses = torch.cat(losses) if losses else X.new_zeros(0, dtype=opmath(X[:0]).dtype)
    if need_x and not write_out:
        gX = torch.cat(gX_chunks) if gX_chunks else Xo.new_zeros(0, D)
    if need_w and gW is None:
        gW = Wo.new_zeros(C, D)                                    # no rows: ∂L/∂W = 0
    if need_b and gb is None:
        gb = Wo.new_zeros(C)
    return out_losses, gX, gW, gb


def _is_one(g: torch.Tensor) -> bool:
    """Is the incoming gradient the scalar 1? (False for a vmap-batched g, which has no one value.)"""
    if g.numel() != 1 or functorch_transforms_active() or torch.compiler.is_compiling():
        return False   # (traced: a data-dependent branch; multiplying by g is always right)
    try:
        return bool(g == 1)
    except RuntimeError:   # legacy vmap (gradcheck's batched check) cannot take a single value
        return False


class LinearCrossEntropyFn(HandFunction):
    r"""L = cross_entropy(X Wᵀ + b, t, w) without the (N, C) logits — equals
    ``torch.nn.functional.linear_cross_entropy(x, W, t, linear_bias=b, weight=w, ignore_index=…,
    reduction=…, label_smoothing=…)`` for class-index targets.

    Shapes: X (N, D), W (C, D), b (C,) or None, t (N,) class indices, w (C,) class weights or
    None → L () or (N,) ('none').
    Per chunk of rows, Z = X Wᵀ + b and the cross entropy's formulas (``ops.losses``, with Q the
    weighted, smoothed one-hot target, 'mean' over Σ_n w_{t_n} of the kept rows):
        ℓ_n = −Q_n · log softmax(Z_n)
    Backward, ĝ per row (g/den, g or g_n; 0 on ignored rows), P = softmax(Z):
        ∂L/∂Z = ĝ ⊙ (P ⊙ (Q 1) − Q)     (per chunk only)
        ∂L/∂X = (∂L/∂Z) W        (N, D)
        ∂L/∂W = (∂L/∂Z)ᵀ X       (C, D)
        ∂L/∂b = 1ᵀ (∂L/∂Z)       (C,)
    Forward mode, tangents Ẋ, Ẇ, ḃ: Ż = Ẋ Wᵀ + X Ẇᵀ + ḃ (per chunk),
    ℓ̇_n = (P_n (Q_n 1) − Q_n) · Ż_n, reduced as ℓ.
    The rows are processed ``chunk_size`` at a time, so at most one chunk of logits exists.
    For 'mean' and 'sum' the forward also computes ∂L/∂X, ∂L/∂W, ∂L/∂b as it goes (the
    chunk's logits are at hand: 3 GEMMs per chunk in all, as unchunked autograd); backward then
    only scales them by g. Those gradients are extra outputs marked non-differentiable.
    With grad mode on in backward (double backward) or for 'none', backward recomputes the
    chunks; recorded (double backward), through ``LinearFn`` and ``CrossEntropyFn``'s log p, so
    the second derivative is their hand-derived rules. Float16/bfloat16: logits' GEMM in the
    input dtype (as torch), the softmax and the gradients' GEMMs in float32.
    Derivation: docs/derivation.md#fused-operations
    """

    @staticmethod
    def forward(x, weight, bias, target, w, opts):
        pre = any(opts.precompute)
        den = ce_denominator(target, w, opts.ce, opmath(x[:0]).dtype)
        g = opmath(x[:0]).new_ones(()) if pre else None              # g = 1
        losses, gX, gW, gb = _lce_chunks(x, weight, bias, target, w, opts, want_loss=True, g=g, den=den,
                                         needs=opts.precompute, inplace=True, own_g=True)
        loss = reduce_loss(losses, opts.ce.reduction, den).to(opts.out_dtype)
        grads = [g.to(t.dtype) for g, t in ((gX, x), (gW, weight), (gb, bias)) if g is not None]
        return (loss, *grads) if grads else loss

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, target, w, opts = inputs
        ctx.opts = opts
        pre = output[1:] if isinstance(output, tuple) else ()
        if pre:
            ctx.mark_non_differentiable(*pre)
        ctx.set_materialize_grads(False)
        # The precomputed gradients are held on ctx, not saved: the first backward hands them
        # over and drops them (so AccumulateGrad adopts them without a copy, and nothing the
        # caller then does to them in place can reach this node); a later backward (retain_graph)
        # recomputes. They are non-differentiable outputs without a grad_fn: no reference cycle.
        ctx.pre = list(pre) or None
        ctx.save_for_backward(x, weight, bias, target, w)
        ctx.save_for_forward(x, weight, bias, target, w)

    @staticmethod
    def backward(ctx, g, *_):
        x, weight, bias, target, w = ctx.saved_tensors
        opts, needs = ctx.opts, ctx.needs_input_grad[:3]
        if g is None or not any(needs):
            return None, None, None, None, None, None
        result = [None, None, None]
        pre = ctx.pre
        if pre and not torch.is_grad_enabled() and all(p or not n for p, n in zip(opts.precompute, needs)):
            # Fast path: the forward already holds ∂L/∂· for g = 1; scale by g, or for g = 1
            # (loss.backward()) hand the tensors over as they are, no copy.
            ctx.pre = None
            one = _is_one(g)
            it = iter(pre)
            for i, p in enumerate(opts.precompute):
                grad = next(it) if p else None
                if needs[i]:
                    result[i] = grad if one else grad * g          # g · ∂L/∂·
        else:
            # Recompute chunk by chunk (recorded when grad mode is on: differentiable).
            G = opmath(g)
            den = ce_denominator(target, w, opts.ce, G.dtype)
            _, gX, gW, gb = _lce_chunks(x, weight, bias, target, w, opts, want_loss=False, g=G.reshape(G.numel())
                                        if G.dim() else G, den=den, needs=needs, inplace=not torch.is_grad_enabled())
            result = [None if r is None else r.to(t.dtype) for r, t in zip((gX, gW, gb), (x, weight, bias))]
        return (*result, None, None, None)

    @staticmethod
    def jvp(ctx, dx, dw, db, _target, _w, _opts):
        x, weight, bias, target, w = ctx.saved_tensors
        opts, ce = ctx.opts, ctx.opts.ce
        dls = []
        for s in range(0, x.shape[0], opts.chunk_size):
            e = min(s + opts.chunk_size, x.shape[0])
            logp = _chunk_logp(x[s:e], weight, bias, target[s:e], w, ce, False)   # log p   (n, C)
            R, _ = ce_direction(logp, target[s:e], w, ce)                          # P (Q 1) − Q
            dZ = affine_jvp(x[s:e], weight, None if dx is None else dx[s:e], dw, db)   # Ż = Ẋ Wᵀ + X Ẇᵀ + ḃ
            dls.append(_sum(R * opmath(dZ), 1))                    # ℓ̇_n = (P_n (Q_n 1) − Q_n) · Ż_n
        dl = torch.cat(dls) if dls else x.new_zeros(0, dtype=opmath(x[:0]).dtype)
        den = ce_denominator(target, w, ce, dl.dtype)
        dloss = reduce_loss(dl, ce.reduction, den).to(opts.out_dtype)
        n_pre = sum(opts.precompute)
        return (dloss, *([None] * n_pre)) if n_pre else dloss
