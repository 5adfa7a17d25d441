"""Compiled CPU kernels for the fast paths: the fast path's formula, one loop per pass.

A fast path built from torch ops pays one pass over memory (and one 2–5 µs dispatch) per op;
layer norm's backward is ~17 of them where torch's own kernel makes 2. A kernel here is the same
formula written as loops over the op's buffers and compiled by numba (nopython, at first use,
cached on disk; nothing compiles at install time), so each pass reads each element once.

Contract of a kernel module (``kernels/<family>.py``):
- it writes the formula of its Function's docstring, in the Function's symbols, and nothing
  else: no shape handling, no dtype logic (the caller passes contiguous arrays of one dtype and
  the output buffers);
- it is reached only through ``load(family)`` behind ``usable(...)``, so numba is imported the
  first time a kernel is wanted, and a machine without numba, a CUDA tensor, a low-precision
  dtype, a strided view or a compile trace keeps the torch-op fast path;
- tests/test_fast_paths.py runs every registry case with the kernels on and off against the
  differentiable path.

Kernels are serial (``nogil``, no numba threading layer: safe under threads and fork, as DDP's
``ddp_fork`` and DataLoader workers need). On several threads torch's own kernels run in
parallel above ``GRAIN`` elements, where a serial loop would lose: ``usable`` then says no.
``HANDGRAD_KERNELS=0`` in the environment, or ``disabled()``, turns them off.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os

import torch

from .._compat import values_readable

__all__ = ["GRAIN", "arrays", "disabled", "enabled", "load", "usable"]

# torch's at::internal::GRAIN_SIZE: below it, its CPU kernels run on one thread
GRAIN = 32768
# numba's fast-math subset that keeps IEEE semantics for inf/nan: reassociation (sums vectorised
# in another order of rounding), fused multiply-add, the sign of zero. Not nnan/ninf/afn.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})
_FLOATS = (torch.float32, torch.float64)
_TENSORS = (torch.Tensor, torch.nn.Parameter)
_off = [os.environ.get("HANDGRAD_KERNELS", "1") == "0"]


@functools.cache
def _numba():
    try:
        import numba
    except Exception:                  # not installed, or an llvmlite that does not load here
        return None
    return numba


def enabled() -> bool:
    """Kernels are on and numba imports."""
    return not _off[0] and _numba() is not None


@contextlib.contextmanager
def disabled():
    """Within: the torch-op fast paths, as on a machine without numba."""
    before, _off[0] = _off[0], True
    try:
        yield
    finally:
        _off[0] = before


def usable(*tensors: torch.Tensor | None) -> bool:
    """May the fast path hand these tensors (None: an absent operand) to a kernel? Dense,
    contiguous CPU float32/float64 tensors of one dtype, values readable (not a compile trace or
    a fake tensor), kernels enabled, and torch would run the op on one thread (see the module
    docstring)."""
    if _off[0] or not values_readable():   # first: Dynamo's strict mode refuses even t.is_conj()
        return False
    dtype, big = None, False
    for t in tensors:
        if t is None:
            continue
        if (type(t) not in _TENSORS or not t.is_cpu or t.dtype not in _FLOATS or (dtype is not None and t.dtype != dtype)
                or not t.is_contiguous() or t.is_conj() or t.is_neg()):
            return False
        dtype, big = t.dtype, big or t.numel() >= GRAIN
    return dtype is not None and (not big or torch.get_num_threads() == 1) and _numba() is not None


def arrays(*tensors: torch.Tensor | None):
    """The numpy views (no copy) a kernel takes; None stays None."""
    return tuple(None if t is None else t.detach().numpy() if t.requires_grad else t.numpy() for t in tensors)


@functools.cache
def load(family: str):
    """The kernel module ``handgrad.kernels.<family>`` (imported, and so numba, on first use)."""
    return importlib.import_module(f"{__name__}.{family}")


def kernel(fn):
    """``fn`` compiled by numba on its first call: nopython, nogil, cached on disk, numpy's
    error model (x/0 is inf or nan, as in torch, never an exception)."""
    return _numba().njit(fastmath=set(FASTMATH), nogil=True, cache=True, error_model="numpy", boundscheck=False)(fn)
