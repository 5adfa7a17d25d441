"""The activations' fast path (ops.activations): the machinery every spec's ``fast_df`` and
``kernel`` run under, and ``fast_vjp``, the backward G ⊙ f'(Z) that the activation Functions and
the fused ops (ops.fused) share.

Taken where nothing records the computation (``fast``). The backward is, in order of preference:
- a compiled kernel (``Activation.kernel``, handgrad.kernels.activations): one pass over G and the
  saved tensor into the result, as torch's own ``*_backward`` kernel (CPU float32/float64,
  contiguous, numba present: ``kernels.usable``);
- else f'(Z) block by block into a cache-sized scratch (``Activation.fast_df``: ``out=``,
  ``lerp``/``addcmul``/``maximum``, exp as exp2 or through the vectorised sigmoid/gelu kernels),
  times G into one buffer, so it allocates what torch's one-pass backward kernel does (CUDA,
  strided tensors, no numba, several threads on a large tensor, and the small tensors of
  ``Activation.kernel_min``).
Both compute the spec's formula; the registry's reference check and tests/test_fast_paths.py
compare them with the differentiable path.
"""
from __future__ import annotations

import math

import torch

from .. import kernels
from .._compat import values_readable
from ._function import fast_path

_FAST_DTYPES = (torch.float32, torch.float64)


def fast(*tensors: torch.Tensor, grad: torch.Tensor | None = None) -> bool:
    """May the fast path run? ``fast_path`` (nothing records it, no torch.func transform, no
    batched incoming ``grad``), no Dynamo tracing it (it takes the formula), and every tensor
    float32/float64 (half types and complex take the formula, which computes in opmath). The
    registry compares both paths: ``reference`` runs the backward with and without ``create_graph``."""
    if not values_readable(grad) or not fast_path(grad):
        return False
    return all(t.dtype in _FAST_DTYPES for t in tensors) and (grad is None or grad.dtype in _FAST_DTYPES)


_CONSTS: dict[tuple, torch.Tensor] = {}


def const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor ``value`` of ``like``'s dtype and device, made once: ``lerp``'s end and
    ``addcmul``'s input take tensors, not numbers."""
    key = (value, like.dtype, like.device)
    c = _CONSTS.get(key)
    if c is None:
        c = _CONSTS[key] = torch.full((), value, dtype=like.dtype, device=like.device)
    return c


_LOG2E = 1 / math.log(2)


def exp_(t: torch.Tensor) -> torch.Tensor:
    """t ← e^t as 2^{t log₂e}, in place: torch's CPU exp kernel runs ~4× slower than its exp2
    (float32, one thread: 1.5 ms against 0.4 ms for 2²¹ elements); the scaling rounds the
    exponent once, a relative error of |t|·eps in e^t, which is small where e^t is not."""
    return t.mul_(_LOG2E).exp2_()


def exp(t: torch.Tensor) -> torch.Tensor:
    """e^t as ``exp_``, into a fresh buffer."""
    return torch.mul(t, _LOG2E).exp2_()


_BLOCK = 1 << 17   # elements per block of a multi-pass vjp (512 KiB in float32: its temporaries stay in L2)


def _blocks(out: torch.Tensor, *ts: torch.Tensor, scratch: int = 0):
    """``(out_b, *ts_b, *scratch_b)`` for each block of ``_BLOCK`` elements of the flattened
    tensors (one shape, all contiguous), each scratch a block-sized buffer reused for every block.
    A formula of several passes then allocates one full-size buffer (``out``, the result, as
    torch's one-pass kernel does) and its temporaries stay in cache: the peak is native's, and
    no pass pays for faulting in a fresh buffer. Anything non-contiguous: one block, the whole
    tensors, full-size scratch."""
    n = out.numel()
    if n <= _BLOCK or not all(t.is_contiguous() for t in (out, *ts)):
        yield (out, *ts, *(torch.empty_like(out) for _ in range(scratch)))
        return
    flat = [t.view(-1) for t in (out, *ts)]
    bufs = [out.new_empty(_BLOCK) for _ in range(scratch)]
    for s in range(0, n, _BLOCK):
        e = min(s + _BLOCK, n)
        yield (*(f[s:e] for f in flat), *(b[: e - s] for b in bufs))


def _all_finite(*ts: torch.Tensor) -> bool:
    """No element of ``ts`` is inf or nan (their sums are finite; an overflowing sum says no)."""
    return all(bool(torch.isfinite(t.sum())) for t in ts)


def fast_vjp(act, g: torch.Tensor, z: torch.Tensor | None, y: torch.Tensor | None,
             out: torch.Tensor | None = None) -> torch.Tensor | None:
    """G ⊙ f'(Z) on the fast path (``act`` an ops.activations.Activation) into ``out``: a fresh
    buffer, or G itself where the caller owns it (a fused stack's Δ). By ``act.kernel`` in one
    pass where the kernels take the tensors (from ``act.kernel_min`` elements on); else f'(Z)
    block by block into a block-sized scratch (``act.fast_df``), times G: one full-size
    buffer at most, as torch's one-pass kernel allocates; f''s temporaries span one block and stay
    in cache. ``act.select`` (relu) runs instead where G or the saved tensor holds an inf or nan
    (always off CPU, where checking would sync; the kernel selects as torch does). None where the
    spec has a kernel but no ``fast_df`` and the kernel cannot run: the caller's formula then."""
    saved = y if z is None else z
    if (act.kernel is not None and saved.numel() >= act.kernel_min and g.shape == saved.shape
            and kernels.usable(g, saved, out)):
        if out is None:
            out = torch.empty_like(saved)
        act.kernel(g, saved, out)                                   # G ⊙ f'(Z), one pass
        return out
    if act.fast_df is None:                                         # a kernel only (elu α ≠ 1): not taken
        return None
    fresh = out is None
    if fresh:
        out = torch.empty_like(saved)
    cpu = saved.device.type == "cpu"
    if act.select is not None and not (cpu and (fresh or _all_finite(g, saved))):
        return out.copy_(act.select(g, z, y))                    # torch's selection, inf/nan kept
    if fresh and act.one_pass:
        act.fast_df(z, y, out)                                   # f'(Z)
        out.mul_(g)                                              # G ⊙ f'(Z)
    elif saved.numel() <= _BLOCK:                                # one block: no slicing
        d = torch.empty_like(saved)
        act.fast_df(z, y, d)                                     # f'(Z)
        torch.mul(g, d, out=out)                                 # G ⊙ f'(Z)
    else:
        for ob, gb, sb, d in _blocks(out, g, saved, scratch=1):
            act.fast_df(None if z is None else sb, None if y is None else sb, d)   # f'(Z)
            torch.mul(gb, d, out=ob)                              # G ⊙ f'(Z)
    if act.select is not None and fresh and not _all_finite(out):
        return act.select(g, z, y)                                # (an inf or nan G or saved value)
    return out
