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

import inspect

import torch

from .. import _compat

_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


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
        twin = type(cls.__name__ + "NoJvp", (torch.autograd.Function,), attrs)
        raw_apply = super(torch.autograd.Function, cls).apply   # the C++ apply under Function.apply
        unwrap = _compat.unwrap_dead_wrappers
        # forward's signature, read once per class: positional arguments that fill it exactly
        # (or reach its *args) need no binding; anything else is bound as apply binds it.
        sig = inspect.signature(cls.forward)
        n_pos = sum(p.kind in _POSITIONAL for p in sig.parameters.values())
        varargs = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())

        names = set(sig.parameters)
        any_keyword = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())

        def bind(args, kwargs):
            unknown = [k for k in kwargs if k not in names]
            if unknown and not any_keyword:   # named first (bind would report a missing one first)
                raise TypeError(f"{cls.__name__}.call{sig}: unexpected keyword argument(s) "
                                f"{', '.join(map(repr, unknown))}")
            try:
                bound = sig.bind(*args, **kwargs)
            except TypeError as e:
                raise TypeError(f"{cls.__name__}.call{sig}: {e}") from None
            bound.apply_defaults()
            return bound.args, bound.kwargs

        def call(*args, **kwargs):
            if torch.compiler.is_compiling():
                return twin.apply(*args, **kwargs)       # Dynamo binds apply's arguments itself
            if kwargs or not (len(args) == n_pos or (varargs and len(args) > n_pos)):
                args, kwargs = bind(args, kwargs)        # keywords, defaults: as Function.apply
            if unwrap is None or _compat.functorch_transforms_active():
                return cls.apply(*args, **kwargs)
            # Outside torch.func, what Function.apply does minus its per-call
            # inspect.signature(forward).bind (which only fills defaults and keywords, done above
            # where there are any): ~3× less overhead per op.
            return raw_apply(*unwrap(args), **kwargs)

        cls.call = staticmethod(call)


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
