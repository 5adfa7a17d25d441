"""The one mechanism every handgrad Function goes through.

Every op is a ``HandFunction``: ``forward`` without ctx, ``setup_context``, a differentiable
``backward`` built from torch ops, and a hand-derived ``jvp`` for forward-mode AD. ``vmap``
comes from ``generate_vmap_rule`` (forward and backward are plain torch ops, so torch.func
can batch them).

Ops are called through ``Fn.call(...)``, not ``Fn.apply``: Dynamo refuses to trace an
autograd.Function that defines ``jvp`` ("Unsupported custom jvp", torch 2.4 … 2.13; a test in
tests/test_compat.py fails once it accepts one), so under ``torch.compile`` ``call`` dispatches
to a twin class that is identical but for the ``jvp``. Forward-mode AD is not traced by Dynamo
anyway, so nothing is lost there. Outside compile and torch.func, ``call`` also skips
``Function.apply``'s per-call signature binding when the arguments are already positional and
complete (see ``call``); it accepts every argument form ``apply`` does.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch

from .. import _compat

class HandFunction(torch.autograd.Function):
    generate_vmap_rule = True

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        # The twin without ``jvp``, built once when the op is defined, for Dynamo to trace.
        attrs = {}
        for klass in reversed(cls.__mro__[: cls.__mro__.index(HandFunction) + 1]):
            attrs.update({k: v for k, v in vars(klass).items() if not k.startswith("__") or k == "__doc__"})
        for name in ("jvp", "call"):
            attrs.pop(name, None)
        if "forward" in vars(cls):
            cls.forward = attrs["forward"] = staticmethod(_owning(vars(cls)["forward"].__func__))
        twin = type(cls.__name__ + "NoJvp", (torch.autograd.Function,), attrs)
        raw_apply = super(torch.autograd.Function, cls).apply   # the C++ apply under Function.apply
        unwrap, wrapped = _compat.unwrap_dead_wrappers, _compat.is_functorch_wrapped
        n, varargs, bind = _binder(cls)
        Tensor, compiling, transforms = torch.Tensor, torch.compiler.is_compiling, _compat.functorch_transforms_active

        def call(*args, **kwargs):
            if kwargs or (len(args) != n and not (varargs and len(args) > n)):
                args = bind(args, kwargs)                # keywords, defaults: as Function.apply
            if compiling():
                return twin.apply(*args)
            if unwrap is None or transforms():
                return cls.apply(*args)
            # Outside torch.func, what Function.apply does minus its per-call
            # inspect.signature(forward).bind (which only fills defaults and keywords, done above
            # where there are any): half the overhead (a tiny linear: 12 µs per call, apply 25 µs).
            # With no transform running, a functorch-wrapped tensor is a dead one, which apply
            # unwraps; asking each tensor (0.2 µs) spares rebuilding the arguments (1–2 µs).
            for a in args:
                if isinstance(a, Tensor) and wrapped(a):
                    return raw_apply(*unwrap(args))
            return raw_apply(*args)

        cls.call = staticmethod(call)


def _owning(forward):
    """``forward`` whose outputs are never views of its own buffers: a reshape at the end of a
    forward would otherwise make autograd refuse every in-place op on the output ("Output 0 of
    … is a view and is being modified inplace": ``nn.ReLU(inplace=True)`` after the layer).
    ``detach()`` gives the same storage, strides and version counter (so autograd still catches
    an in-place change of a tensor the backward saved) without the view record, for 0.3 µs. A
    view of an input stays one (autograd then knows the output aliases it). Eager only: under a
    torch.func transform or Dynamo the outputs are wrapped or traced, and ``_base`` means nothing."""
    def owned(out, inputs):
        base = out._base
        if base is None or any(a is base or getattr(a, "_base", None) is base for a in inputs):
            return out
        return out.detach()

    Tensor, compiling, transforms = torch.Tensor, torch.compiler.is_compiling, _compat.functorch_transforms_active

    @functools.wraps(forward)
    def forward_owning(*args):
        out = forward(*args)
        if compiling():
            return out
        if isinstance(out, Tensor):
            # the common case first: an output that is no view has nothing to own (0.1 µs)
            return out if out._base is None or transforms() else owned(out, args)
        if isinstance(out, tuple) and not transforms():
            return tuple(owned(o, args) if isinstance(o, Tensor) else o for o in out)
        return out
    return forward_owning


def _binder(cls):
    """``n, varargs, bind``: positional arguments that fill ``cls.forward``'s ``n`` parameters
    exactly (or reach its ``*args``) need no binding. ``bind(args, kwargs)``: the positional
    arguments ``Function.apply`` would pass (keywords placed, defaults filled), or a TypeError
    naming the op and the argument. Read from the signature once per class; plain Python, run
    before the twin too, since Dynamo's tracing of ``apply`` does not fill defaults (torch 2.13:
    setup_context then gets fewer inputs than forward's parameters)."""
    P = inspect.Parameter
    sig = inspect.signature(cls.forward)
    params = list(sig.parameters.values())
    keyword_only = any(p.kind in (P.KEYWORD_ONLY, P.VAR_KEYWORD) for p in params)
    if keyword_only and cls.forward is not torch.autograd.Function.forward:
        raise TypeError(f"{cls.__name__}.forward{sig}: a HandFunction's forward takes positional parameters only")
    names = [p.name for p in params if p.kind in (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)]
    by_keyword = {p.name for p in params if p.kind is P.POSITIONAL_OR_KEYWORD}
    defaults = {p.name: p.default for p in params if p.default is not P.empty}
    varargs, n = any(p.kind is P.VAR_POSITIONAL for p in params), len(names)
    where = f"{cls.__name__}.call{sig}"

    def bind(args, kwargs):
        unknown = [k for k in kwargs if k not in by_keyword]
        if unknown:
            raise TypeError(f"{where}: unexpected keyword argument {unknown[0]!r}")
        if len(args) > n and not varargs:
            raise TypeError(f"{where}: takes {n} positional arguments but {len(args)} were given")
        twice = [k for k in names[: len(args)] if k in kwargs]
        if twice:
            raise TypeError(f"{where}: got multiple values for argument {twice[0]!r}")
        out = list(args)
        for name in names[len(args):]:
            if name in kwargs:
                out.append(kwargs[name])
            elif name in defaults:
                out.append(defaults[name])
            else:
                raise TypeError(f"{where}: missing a required argument: {name!r}")
        return tuple(out)

    return n, varargs, bind


def opmath(t: torch.Tensor | None) -> torch.Tensor | None:
    """Compute in float32 for float16/bfloat16 inputs, as torch's own kernels do internally."""
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def accurate_sum(t: torch.Tensor, dim=None, keepdim: bool = False) -> torch.Tensor:
    """Σ, accumulated in float64 for float32 on CPU (as torch's CPU loss kernels do, acc_type) and
    in the tensor's own dtype elsewhere; the result keeps t's dtype. Used where one sum sets the
    error of every output (a loss, a softmax's row sum): a float32 sum of many terms would make
    handgrad less accurate than torch (softmax: 2.7e-7 against torch's 2.0e-7 worst error on
    2000×13 float32 rows; 4e-8 with this)."""
    acc = torch.float64 if t.dtype == torch.float32 and t.device.type == "cpu" else None
    if dim is None:
        return t.sum(dtype=acc).to(t.dtype)
    return t.sum(dim, keepdim=keepdim, dtype=acc).to(t.dtype)


def fast_path(grad: torch.Tensor | None = None) -> bool:
    """May an op take its fast path: in-place work on buffers it allocated itself, fewer passes,
    the same formula? Yes when nothing records the computation (grad mode off: inside a forward,
    or a first-order backward, not ``create_graph``) and no torch.func transform wraps it (under
    vmap an in-place op on an unbatched buffer with a batched operand is refused), nor the
    batched gradients of ``autograd.grad(..., is_grads_batched=True)`` (``grad``, the incoming
    gradient of a backward: a batched tensor there). The differentiable path, built from
    out-of-place torch ops, serves double backward, forward AD, vmap and the transforms; the
    registry's cases compare the two (tests/test_fast_paths.py)."""
    if torch.is_grad_enabled() or _compat.functorch_transforms_active():
        return False
    if grad is None or torch.compiler.is_compiling():                 # (Dynamo cannot ask the last)
        return True
    return not _compat.is_batched_tensor(grad)


def own_dtype(t: torch.Tensor):
    """Each product runs in the dtype it is given: autocast's cast is made once, by the functional
    (recorded outside the Function), never again inside a forward, backward or jvp run in its
    region. Outside autocast, nothing to switch off (a context entered per product costs ~5 µs)."""
    if not (torch.is_autocast_enabled("cpu") or torch.is_autocast_enabled("cuda")):
        return contextlib.nullcontext()
    return torch.autocast(t.device.type, enabled=False)
