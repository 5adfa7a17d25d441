"""The compiled kernels' mechanism (handgrad.kernels): when the fast path may hand tensors to a
kernel, and that numba stays unimported until a kernel is wanted. (Each kernel's numbers are
tests/test_fast_paths.py's: every registry case with the kernels on and off.)"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from handgrad import kernels


def test_usable_takes_dense_contiguous_cpu_floats_of_one_dtype():
    x, w = torch.randn(4, 8), torch.randn(8)
    assert kernels.usable(x, w, None) == kernels.enabled()
    assert not kernels.usable(x.t())                                   # strided view
    assert not kernels.usable(x.half())                                # low precision: the torch-op path
    assert not kernels.usable(x, w.double())                           # two dtypes
    assert not kernels.usable(torch.randint(0, 3, (4,)))               # integers
    assert not kernels.usable(torch.randn(3, dtype=torch.cfloat))      # complex
    assert not kernels.usable(None)                                    # nothing to run on
    with kernels.disabled():
        assert not kernels.usable(x)
    assert kernels.usable(x) == kernels.enabled()                      # restored on exit


def test_a_large_tensor_on_several_threads_stays_with_torch():
    """A kernel is serial: above GRAIN elements torch's own kernels run on every thread."""
    big, small = torch.randn(kernels.GRAIN), torch.randn(kernels.GRAIN - 1)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert not kernels.usable(big)
        assert kernels.usable(small) == kernels.enabled()
        torch.set_num_threads(1)
        assert kernels.usable(big) == kernels.enabled()
    finally:
        torch.set_num_threads(before)


def _python(code: str, **env) -> str:
    import os
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, **env}).stdout.strip()


def test_import_handgrad_does_not_import_numba():
    assert _python("import sys, handgrad, handgrad.functional, handgrad.nn; print('numba' in sys.modules)") == "False"


def test_handgrad_kernels_0_turns_them_off(monkeypatch):
    import importlib
    monkeypatch.setenv("HANDGRAD_KERNELS", "0")
    try:
        assert not importlib.reload(kernels).enabled()
    finally:
        monkeypatch.delenv("HANDGRAD_KERNELS")
        importlib.reload(kernels)
