"""Op cases for the elementwise activations: one entry per function and per option variant
whose derivative takes another code path (f' from y or from z, the softplus threshold)."""
from __future__ import annotations

import torch

from ... import functional as F
from ..references import torch_reference
from ..types import BadInput, Inputs, OpCase, randn

def _x(**kwargs):
    """z ~ 2·N(0, 1), and the options as keyword arguments."""

    def make(shape, dtype, device):
        return Inputs((randn(shape, dtype, device, scale=2.0),), dict(kwargs))

    return make


def _above(shift: float, **kwargs):
    """As _x, but every third element moved up by ``shift``, so a softplus threshold is crossed
    by many elements in every shape."""

    def make(shape, dtype, device):
        z = torch.randn(shape, dtype=torch.float64) * 2.0
        z.view(-1)[::3] += shift
        return Inputs((z.to(dtype=dtype, device=device).requires_grad_(),), dict(kwargs))

    return make


def _list(**kwargs):
    return lambda: Inputs(([0.5, -1.0],), kwargs)


def _int(**kwargs):
    return lambda: Inputs((torch.tensor([1, -2]),), kwargs)


def _t(**kwargs):
    return lambda: Inputs((torch.randn(2, 3),), kwargs)


def _not_tensor(**kwargs):
    return BadInput("input not a tensor", _list(**kwargs), ("input", "list"))


def _integer(**kwargs):
    return BadInput("integer input", _int(**kwargs), ("input", "torch.int64"))


def _case(name, make=None, reference=None, **kw):
    """The op ``name`` (``relu``, or a variant ``relu[...]``): handgrad's functional against the
    torch function the catalogue names (or ``reference``, another spelling of it)."""
    base = name.split("[")[0]
    return OpCase(name, getattr(F, base), reference or torch_reference(base), make or _x(), **kw)


CASES = [
    # torch.sigmoid and torch.tanh, the catalogue's other spellings: F.sigmoid(a list) raises
    # AttributeError (it calls input.sigmoid()), torch.sigmoid the TypeError handgrad raises too
    _case("sigmoid", reference=torch.sigmoid, bad_inputs=(_not_tensor(),)),
    _case("tanh", reference=torch.tanh, shapes=((2, 3), (7, 13), (2, 5, 13), (0, 13), ()), bad_inputs=(_not_tensor(),)),
    _case("relu", bad_inputs=(
        _not_tensor(),
        BadInput("complex input", lambda: Inputs((torch.tensor([1j]),)), ("input", "complex")),
        BadInput("bool input", lambda: Inputs((torch.tensor([True]),)), ("input", "torch.bool")),
    )),
    _case("leaky_relu", bad_inputs=(
        _not_tensor(), _integer(),
        BadInput("negative_slope not a number", _t(negative_slope="a"), ("negative_slope", "str")),
    )),
    _case("leaky_relu[slope=0.2]", _x(negative_slope=0.2)),
    # a negative slope: f' is read from z, not y
    _case("leaky_relu[slope=-0.2]", _x(negative_slope=-0.2)),
    _case("elu", bad_inputs=(
        _not_tensor(), _integer(),
        BadInput("alpha not a number", _t(alpha="a"), ("alpha", "str")),
    )),
    _case("elu[alpha=0.5]", _x(alpha=0.5)),
    # a negative α: f' is read from z, not y
    _case("elu[alpha=-0.5]", _x(alpha=-0.5)),
    _case("gelu", bad_inputs=(
        _not_tensor(), _integer(),
        BadInput("approximate not a method", _t(approximate="bogus"), ("approximate", "bogus")),
        BadInput("approximate not a str", _t(approximate=None), ("approximate", "NoneType")),
    )),
    _case("gelu[tanh]", _x(approximate="tanh"), bad_inputs=(_integer(approximate="tanh"),)),
    _case("silu", bad_inputs=(_not_tensor(), _integer())),
    _case("softplus", _above(18.0), bad_inputs=(
        _not_tensor(), _integer(),
        BadInput("beta not a number", _t(beta="a"), ("beta", "str")),
        BadInput("threshold not a number", _t(threshold=[1]), ("threshold", "list")),
    )),
    # βz > 5 for z > 2.5: a third of the elements are shifted past it, onto the linear branch
    _case("softplus[beta=2,threshold=5]", _above(4.0, beta=2.0, threshold=5.0)),
]
