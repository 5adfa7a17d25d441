"""``handgrad.enable()``: inside the region, the torch functions handgrad covers run handgrad's.

    with handgrad.enable():
        loss = model(x)          # F.gelu, torch.sigmoid, x.softmax(-1), F.cross_entropy, … in its
        loss.backward()          # forward are handgrad.functional's: hand-derived backward passes

    @handgrad.enable()           # the same, as a decorator
    def step(x, y): ...

How: a ``torch.overrides.TorchFunctionMode``. While it is on the (thread-local) mode stack,
every call of a torch function, ``torch.nn.functional`` function and Tensor method reaches its
``__torch_function__`` with the callable itself, however the caller got hold of it
(``from torch.nn.functional import gelu`` binds the name before the region, and still reaches the
mode); no global is patched, so other threads are unaffected. A covered call is answered by
the ``handgrad.functional`` function; any other call (``torch.add``, a covered call with
arguments handgrad does not take) runs torch's own.

- What reaches the mode (measured, torch 2.13): the F function itself for the Python ones
  (``F.relu``, ``F.softmax``, ``F.layer_norm``, ``F.cross_entropy``, …), the C++ builtin for
  those that are builtins (``F.gelu is torch._C._nn.gelu``, ``F.linear``, ``F.softplus``,
  ``F.avg_pool2d``, ``F.conv2d is torch.conv2d``), and the Tensor method for ``F.sigmoid`` /
  ``F.tanh`` (they call ``input.sigmoid()`` without dispatching themselves), and ``Tensor.mul``
  for the operators ``a * b`` and ``2 * a`` (``Tensor.__mul__``/``__rmul__`` never reach the mode
  as themselves; ``2 * a`` arrives as ``Tensor.mul(a, 2)``). The routes are the
  catalogue's spellings (``op.torch_function``, ``op.aliases``), which have the functional's own
  signature, plus the ``_ADAPTERS`` table below for the spellings whose signature differs.
- Only while a call is handled is the mode popped (torch pops a mode during its own
  ``__torch_function__``), so handgrad's ops never recurse into it, and a call the mode passes on
  runs wholly native: a non-covered composite such as ``F.multi_head_attention_forward`` computes
  its linears and softmax with torch's kernels. ``Tensor.backward`` and ``torch.autograd.grad``
  reach the mode too, so a backward run inside the region runs with the mode popped, exactly as
  outside (handgrad's backward formulas are not re-routed).
- Nested ``enable()`` regions are one region (an inner one pushes nothing).
- Arguments handgrad does not take fall through to torch: a tensor that is not a plain dense
  strided tensor (sparse, nested, quantized, a tensor subclass with its own
  ``__torch_function__``), no floating-point tensor among the arguments (``torch.relu`` of an int
  tensor), ``out=``, or a spelling's own unsupported option. ``sparse=True`` embeddings are
  handgrad's (its embedding gives the same uncoalesced COO gradient as torch's).
- A mean or a product that records nothing (grad mode off, or no operand requiring grad, and no
  forward-AD level or torch.func transform open) runs torch's own call: no backward node can come
  of it, and MeanFn's and MulFn's forward passes are torch's evaluation, so the values are the
  same. These are most of the products handgrad's own forward passes compute inside a converted
  model's modules (the region is on while they run): through a Function each would cost ~7 µs
  (measured, CPU); passed on, ~0.7 µs more than an uncovered call. The guards run before the
  other tests of a call, so this is their cost.
- ``torch.compile`` and ``torch.func`` compose: see ``tests/test_enable.py``.
"""
from __future__ import annotations

import contextlib
import numbers
from typing import Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from . import _compat, catalogue

__all__ = ["enable", "INTERCEPTED"]

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------
# Spellings whose signature is not the functional's: each adapter takes torch's arguments and
# returns the functional's (args, kwargs), or None to leave the call to torch. A call whose
# arguments do not bind to the adapter (an option the spelling has that handgrad has not) also
# goes to torch, which raises its own error where the call is wrong.


def _method(self):
    # Tensor.sigmoid / .tanh / .relu: self is the input. F.sigmoid and F.tanh reach the mode as these.
    return (self,), {}


def _softmax_method(self, dim, dtype=None):
    # Tensor.softmax(dim, dtype=None) / .log_softmax: a Dimname ``dim`` (named tensors) stays torch's
    return ((self, dim), {"dtype": dtype}) if isinstance(dim, int) else None


def _torch_softmax(input, dim, dtype=None):
    # torch.softmax(input, dim, dtype=None) / torch.log_softmax: no _stacklevel, so dtype is third
    return ((input, dim), {"dtype": dtype}) if isinstance(dim, int) else None


def _torch_layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    # torch.layer_norm: F.layer_norm's arguments plus a cudnn flag (a kernel choice, not math)
    return (input, normalized_shape, weight, bias, eps), {}


def _torch_batch_norm(input, weight, bias, running_mean, running_var, training, momentum, eps, cudnn_enabled):
    # torch.batch_norm: weight and bias come before the running statistics; all positional
    return (input, running_mean, running_var, weight, bias, training, momentum, eps), {}


def _torch_group_norm(input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    # torch.group_norm: F.group_norm's arguments plus a cudnn flag
    return (input, num_groups, weight, bias, eps), {}


def _torch_embedding(weight, indices, padding_idx=-1, scale_grad_by_freq=False, sparse=False):
    # torch.embedding(weight, indices, ...): the operands swapped, -1 for "no padding index", no
    # max_norm (F.embedding renormalises before calling it); sparse=True: handgrad's COO gradient
    if not isinstance(padding_idx, int) or not -1 <= padding_idx < weight.shape[0]:
        return None
    return (indices, weight, None if padding_idx == -1 else padding_idx, None, 2.0, scale_grad_by_freq, sparse), {}


def _torch_dropout(input, p, train):
    # torch.dropout(input, p, train): F.dropout's ``training`` is called ``train``, all required
    return (input, p, train), {}


def _torch_max_pool2d(input, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    # torch.max_pool2d: an empty stride means "the kernel size" (F.max_pool2d's None); no indices
    return (input, kernel_size, stride if len(stride) else None, padding, dilation, ceil_mode), {}


def _max_pool2d_with_indices(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,
                             return_indices=False):
    # F.max_pool2d(..., return_indices=True) reaches the mode as this; it returns the indices
    # whatever its own return_indices says
    return (input, kernel_size, stride, padding, dilation, ceil_mode, True), {}


# torch callable → (handgrad.functional name, adapter)
_ADAPTERS: dict[Callable, tuple[str, Callable]] = {
    **{getattr(Tensor, name): (name, _method) for name in ("sigmoid", "tanh", "relu")},
    **{getattr(Tensor, name): (name, _softmax_method) for name in ("softmax", "log_softmax")},
    **{getattr(torch, name): (name, _torch_softmax) for name in ("softmax", "log_softmax")},
    torch.layer_norm: ("layer_norm", _torch_layer_norm),
    torch.batch_norm: ("batch_norm", _torch_batch_norm),
    torch.group_norm: ("group_norm", _torch_group_norm),
    torch.embedding: ("embedding", _torch_embedding),
    torch.dropout: ("dropout", _torch_dropout),
    torch.max_pool2d: ("max_pool2d", _torch_max_pool2d),
    nn.functional.max_pool2d_with_indices: ("max_pool2d", _max_pool2d_with_indices),
}


def _records_nothing(a, b=None) -> bool:
    """No autograd graph and no tangent can come out of a call on ``a`` (and ``b``): grad mode is
    off or neither requires grad, and no forward-AD level or torch.func transform is open.
    (Two operands spelled out: a generator over ``*args`` costs as much again as this.)"""
    if torch.is_grad_enabled() and ((isinstance(a, Tensor) and a.requires_grad)
                                    or (isinstance(b, Tensor) and b.requires_grad)):
        return False
    return not (_compat.forward_ad_active() or _compat.functorch_transforms_active())


def _f_mean(input, dim=None, keepdim=False, *, dtype=None):
    # torch.mean / Tensor.mean: named dims are torch's alone. Where nothing is differentiated
    # (inside a handgrad Function's forward, under no_grad, on buffers) torch's own call has the
    # same values (MeanFn's forward is torch's CPU evaluation) at a third of the cost.
    if isinstance(dim, str) or (isinstance(dim, (list, tuple)) and any(isinstance(d, str) for d in dim)):
        return None
    return None if _records_nothing(input) else ((input, dim, keepdim), {"dtype": dtype})


def _f_mul(input, other):
    # torch.mul / Tensor.mul, which ``a * b`` and ``2 * a`` reach the mode as: MulFn's forward is
    # torch's multiplication, so where nothing is differentiated torch's own call is the same call
    # without the Function around it (most products handgrad's own ops compute in a converted
    # model's forward are of this kind). A non-number ``other`` gets torch's own error.
    if not isinstance(other, (Tensor, numbers.Number)) or _records_nothing(input, other):
        return None
    return (input, other), {}


# catalogue op name → the adapter of its spellings that share the functional's signature, where
# handgrad's functional refuses an option torch's takes, or where torch's own call is the same
# (F.embedding needs none: handgrad's takes every option of torch's, sparse=True included)
_GUARDS: dict[str, Callable] = {"mean": _f_mean, "mul": _f_mul}


def _routes() -> dict[Callable, tuple[Callable, Callable | None]]:
    """torch callable → (handgrad functional, adapter or None for "call it as it was called")."""
    routes: dict[Callable, tuple[Callable, Callable | None]] = {}
    for op in catalogue.ops():
        for f in op.torch_functions:   # the catalogue's spellings share the functional's signature
            routes[f] = (op.functional, _GUARDS.get(op.name))
    for f, (name, adapter) in _ADAPTERS.items():
        assert f not in routes, f"{f} is a catalogue spelling; it needs no adapter"
        routes[f] = (catalogue.get(name).functional, adapter)
    return routes


_ROUTES = _routes()


def _names(f) -> list[str]:
    """The names a user writes for ``f`` (``F.conv2d is torch.conv2d``: both)."""
    name = getattr(f, "__name__", "")
    return [f"{prefix}.{name}" for prefix, namespace in (("torch.nn.functional", nn.functional), ("torch", torch),
                                                         ("torch.Tensor", Tensor))
            if getattr(namespace, name, None) is f]


#: what ``enable()`` routes to handgrad, by the names a user writes (``torch.nn.functional.gelu``,
#: ``torch.softmax``, ``torch.Tensor.softmax``)
INTERCEPTED: tuple[str, ...] = tuple(sorted({n for f in _ROUTES for n in _names(f)}))

# types a call may carry and still be routed: Parameter and Buffer (torch ≥ 2.5) dispatch as plain tensors
_PLAIN = tuple(t for t in (Tensor, nn.Parameter, getattr(nn, "Buffer", None)) if t is not None)


def _handgrad_can_take(args, kwargs) -> bool:
    """Every tensor argument (top level: no covered op takes tensors in lists) is dense and
    strided, and at least one is floating point."""
    floating = False
    for a in (*args, *kwargs.values()):
        if isinstance(a, Tensor):
            if a.layout is not torch.strided or a.is_nested or a.is_quantized:
                return False
            floating = floating or a.is_floating_point()
    return floating


class _HandgradMode(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        # torch has popped this mode for the duration of this call: what runs here is not seen by it
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None and "out" not in kwargs:
            fn, adapter = route
            if adapter is None:
                call = args, kwargs
            else:
                try:  # first: a guard that passes the call on (mean, mul) is the cheapest test
                    call = adapter(*args, **kwargs)
                except (TypeError, AttributeError):  # an argument handgrad's spelling does not take
                    call = None                         # (or not a tensor where one is read): torch's
            if (call is not None and (not types or all(t in _PLAIN for t in types))
                    and _handgrad_can_take(args, kwargs)):
                return fn(*call[0], **call[1])
        return func(*args, **kwargs)


def _active() -> bool:
    return any(isinstance(m, _HandgradMode) for m in _get_current_function_mode_stack())


class enable(contextlib.ContextDecorator):
    """Route the covered torch functions (``INTERCEPTED``) to ``handgrad.functional`` inside a
    ``with`` block or a decorated function; see the module docstring. Nestable; thread-safe, as
    the mode lives on the entering thread's mode stack only. One ``enable`` object is entered by
    one thread at a time (``with handgrad.enable():`` makes one per region, and a decorated
    function one per call, so it may run on many threads at once)."""

    def __init__(self):
        self._modes: list[_HandgradMode | None] = []  # pushed per entry (None: nested in a region)

    def _recreate_cm(self):  # ContextDecorator: one object per decorated call
        return type(self)()

    def __enter__(self):
        mode = None if _active() else _HandgradMode()
        if mode is not None:
            mode.__enter__()
        self._modes.append(mode)
        return self

    def __exit__(self, *exc):
        mode = self._modes.pop()
        if mode is not None:
            mode.__exit__(*exc)
        return False

    def __repr__(self) -> str:
        return "handgrad.enable()"
