"""What the fuzzer draws: shapes (0-size dims, 1-D, 0-d), values (ordinary, tiny, huge, constant
rows, ties at the kinks, ±inf/nan), layouts (contiguous, transposed, sliced, expanded), dtypes
(float64/float32/bfloat16/float16, and integer/bool/complex for invalid-domain calls), and for
each catalogue option a small domain of valid and invalid values.

``DRAW[name](d)`` draws one call of the op ``name`` from ``d`` (a ``Draw``: the seeded random
sources and helpers). Every keyword option the catalogue lists for an op has an entry in
``OPTIONS`` (tests/test_fuzz.py asserts it), so an option added to the catalogue must be given a
domain here before the fuzzer passes.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable

import torch

from ... import catalogue
from .call import Call, Spec
from .domain import one_of as _from
from .layers import DRAW as LAYER_DRAW, OPTIONS as LAYER_OPTIONS
from .tensor_math import DRAW as TENSOR_MATH_DRAW, OPTIONS as TENSOR_MATH_OPTIONS

__all__ = ["Draw", "DRAW", "OPTIONS", "draw_call"]

FLOATS = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
BAD_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64)
_SPECIALS = (0.0, -0.0, math.inf, -math.inf, math.nan, 1e30, -1e30, 1e300, -1e300, 1e-30)


class Draw:
    """The random sources of one call (``random.Random`` for choices, a torch Generator for
    values), both seeded from the call's seed, so the call is redrawn exactly from it."""

    def __init__(self, seed: int):
        self.seed = seed
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)

    # --- choices ----------------------------------------------------------------------------
    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, seq):
        return seq[self.rng.randrange(len(seq))]

    def tier(self, *tiers):
        """One draw among tiers ``(bound, make)`` with increasing bounds: ``make()`` of the first
        tier whose bound the uniform draw falls under (the last tier's bound is ignored: the rest)."""
        r = self.rng.random()
        for bound, make in tiers[:-1]:
            if r < bound:
                return make()
        return tiers[-1][1]()

    def size(self, lo: int = 0) -> int:
        return self.pick([s for s in (0, 1, 1, 2, 3, 3, 5, 7) if s >= lo])

    def shape(self, lo_ndim: int = 0, hi_ndim: int = 4, lo: int = 0) -> tuple[int, ...]:
        return tuple(self.size(lo) for _ in range(self.rng.randint(lo_ndim, hi_ndim)))

    def float_dtype(self) -> torch.dtype:
        return self.pick((torch.float64, torch.float64, torch.float32, torch.float32, torch.bfloat16, torch.float16))

    # --- values -----------------------------------------------------------------------------
    def values(self, shape, dtype=torch.float64, *, scale=None, rows_constant=False) -> torch.Tensor:
        """float64 values of ``shape`` (integer/bool/complex values for those dtypes)."""
        n = math.prod(shape)
        if dtype == torch.bool:
            return torch.rand(shape, generator=self.gen) < 0.5
        if not (dtype.is_floating_point or dtype.is_complex):
            lo = 0 if dtype == torch.uint8 else -3
            return torch.randint(lo, 4, shape, generator=self.gen, dtype=torch.int64)
        kind = self.rng.random()
        if scale is None:
            scale = self.pick((1.0, 1.0, 1.0, 2.0, 1e-3, 10.0, 30.0, 1e4))
        v = torch.randn(shape, generator=self.gen, dtype=torch.float64) * scale
        if kind < 0.08 and n:
            v = torch.randint(-3, 4, shape, generator=self.gen).double()        # ties, kinks at 0
        elif kind < 0.14 and n:
            v = v * 10.0 ** self.rng.uniform(3, 40)                              # huge magnitudes
        elif kind < 0.22 and n:
            flat = v.flatten()
            for i in range(max(1, n // 4)):
                flat[self.rng.randrange(n)] = self.pick(_SPECIALS)
            v = flat.reshape(shape)
        if (rows_constant or (kind > 0.9)) and len(shape) >= 1 and n:
            v = v[..., :1].expand(shape).contiguous()                            # constant rows
        if dtype.is_complex:
            v = torch.complex(v, torch.randn(shape, generator=self.gen, dtype=torch.float64))
        return v

    def tensor(self, shape, dtype=None, *, requires_grad=None, layout=True, values=None, **kw) -> Spec:
        """One tensor argument: a float dtype unless given, and a random layout (transposed,
        sliced or expanded views of a leaf) unless ``layout=False``."""
        dtype = dtype or self.float_dtype()
        shape = tuple(shape)
        view: tuple = ()
        if layout and values is None and self.chance(0.3):
            choices = []
            if len(shape) >= 2:
                choices.append("t")
            if len(shape) >= 1:
                choices.append("slice")
            if any(s == 1 for s in shape) or len(shape) >= 1:
                choices.append("expand")
            view = (self.pick(choices),) if choices else ()
        if view == ("t",):
            storage = (*shape[:-2], shape[-1], shape[-2])
        elif view == ("slice",):
            storage = (*shape[:-1], 2 * shape[-1])
        elif view == ("expand",):
            d = self.rng.randrange(len(shape))
            storage = tuple(1 if i == d else s for i, s in enumerate(shape))
            view = ("expand", shape)
        else:
            storage = shape
        base = values if values is not None else self.values(storage, dtype, **kw)
        if requires_grad is None:
            requires_grad = self.chance(0.8)
        return Spec(base, dtype, view, bool(requires_grad) and (dtype.is_floating_point or dtype.is_complex),
                    leaf=not self.chance(0.3))

    def input_dtype(self, p_bad: float = 0.06) -> torch.dtype:
        """A float dtype, or now and then an integer/bool/complex one (an invalid-domain call)."""
        return self.pick(BAD_DTYPES) if self.chance(p_bad) else self.float_dtype()

    def options(self, name: str, ctx: dict, p: float = 0.5) -> dict:
        """Keyword options of op ``name``: each catalogue option given with probability ``p``, its
        value drawn from ``OPTIONS[name][option]`` (valid mostly, invalid sometimes)."""
        out = {}
        domains = OPTIONS.get(name, {})   # an option without a domain fails tests/test_fuzz.py, not here
        for opt in catalogue.get(name).options:
            if opt in domains and self.chance(p):
                out[opt] = domains[opt](self, ctx)
        return out


# --- option domains: each a function (draw, context) → a value, valid or invalid ----------------

_REDUCTION = _from(("none", "mean", "sum"), ("elementwise_mean", "max", None, "Mean"))
_INPLACE = _from((False, True, True), (0, 1))


def _class_weight(d: Draw, ctx):
    """None, a (C,) weight (sometimes requiring grad), or one of another shape / dtype."""
    C = ctx["C"]
    r = d.rng.random()
    if r < 0.3:
        return None
    if r < 0.85:
        return d.tensor((C,), ctx["dtype"], requires_grad=d.chance(0.2), layout=False, scale=1.0)
    if r < 0.92:
        return d.tensor((C + 1,), ctx["dtype"], requires_grad=False, layout=False)
    return d.tensor((1, C), d.pick((ctx["dtype"], torch.float32, torch.int64)), requires_grad=False, layout=False)


def _like_input(d: Draw, ctx):
    """None, a tensor of the input's shape, one that broadcasts, or one that does not."""
    shape = ctx["shape"]
    r = d.rng.random()
    if r < 0.35:
        return None
    if r < 0.7 or not shape:
        s = shape
    elif r < 0.9:
        s = shape[-1:]
    else:
        s = (*shape[:-1], shape[-1] + 1)
    return d.tensor(s, ctx["dtype"] if d.chance(0.9) else d.pick(FLOATS), requires_grad=d.chance(0.3), scale=1.0)


def _norm_param(d: Draw, ctx):
    """layer_norm's weight or bias: None, normalized_shape in the input's dtype, in float32 (the
    mixed-dtype path), of another shape, or integer."""
    shape, dtype = ctx["row"], ctx["dtype"]
    return d.tier(
        (0.3, lambda: None),
        (0.75, lambda: d.tensor(shape, dtype, scale=1.0)),
        (0.88, lambda: d.tensor(shape, d.pick((torch.float32, torch.float64, torch.float16, torch.bfloat16)), scale=1.0)),
        (0.95, lambda: d.tensor((*shape[:-1], shape[-1] + 1) if shape else (1,), dtype)),
        (1.0, lambda: d.tensor(shape, torch.int64, requires_grad=False)),
    )


OPTIONS: dict[str, dict[str, Callable[[Draw, dict], Any]]] = {
    "linear": {"bias": lambda d, ctx: ctx["bias"]},   # drawn with the weight (_linear_args), passed positionally
    "sigmoid": {},
    "tanh": {},
    "relu": {"inplace": _INPLACE},
    "leaky_relu": {"negative_slope": _from((0.01, 0.2, 0.0, -0.2, 1.0, 3.0), ("a", None, [0.1])),
                   "inplace": _INPLACE},
    "elu": {"alpha": _from((1.0, 0.5, 0.0, -0.5, 2.0), ("a", None)), "inplace": _INPLACE},
    "gelu": {"approximate": _from(("none", "tanh"), ("erf", 1, None))},
    "silu": {"inplace": _INPLACE},
    "softplus": {"beta": _from((1.0, 2.0, 0.5, -1.0, 1e-3, 50.0), ("a", None)),
                 "threshold": _from((20.0, 1.0, 0.0, -1.0, 1e4, 100.0), ("x", None))},
    "softmax": {"dim": lambda d, ctx: _dim(d, ctx),
                "dtype": _from((None, torch.float64, torch.float32, torch.float16, torch.bfloat16),
                               (torch.int64, torch.bool, "float32"), 0.2)},
    "log_softmax": {},  # filled below: softmax's
    "layer_norm": {"weight": _norm_param, "bias": _norm_param,
                   "eps": _from((1e-5, 0.0, 1e-2, 1e-12, 1.0), ("a", None, -1.0))},
    "mse_loss": {"reduction": _REDUCTION, "weight": _like_input},   # torch ≥ 2.10's elementwise weight
    "half_squared_error": {"reduction": _REDUCTION},
    "cross_entropy": {"weight": _class_weight, "ignore_index": _from((-100, 0, 1, -1, 2)), "reduction": _REDUCTION,
                      "label_smoothing": _from((0.0, 0.1, 0.5, 1.0), (-0.1, 1.5, "a"))},
    "nll_loss": {"weight": _class_weight, "ignore_index": _from((-100, 0, 1, -1, 2)), "reduction": _REDUCTION},
    "binary_cross_entropy_with_logits": {"weight": _like_input, "reduction": _REDUCTION, "pos_weight": _like_input},
    "linear_act": {"activation": _from(catalogue.activations(), ("swish", None)),
                   "bias": lambda d, ctx: ctx["bias"]},        # drawn with the weight (_linear_args)
    "mlp": {"activation": _from(catalogue.activations(), ("swish",)),
            "last_activation": _from((None, *catalogue.activations()), ("swish",))},
    "linear_cross_entropy": {"ignore_index": _from((None, -100, 0, 1, -1, 2)), "reduction": _REDUCTION,
                             "label_smoothing": _from((0.0, 0.1, 0.5, 1.0), (-0.1, 1.5)),
                             "weight": _class_weight, "options": _from((None,)),
                             "linear_bias": lambda d, ctx: d.tensor((ctx["C"],), ctx["dtype"], scale=1.0)
                             if d.chance(0.7) else None,
                             # handgrad-only (torch has no twin): valid values only, torch never sees it
                             "chunk_size": _from((None, 1, 2, 1000))},
}
OPTIONS["log_softmax"] = OPTIONS["softmax"]


def _dim(d: Draw, ctx):
    nd = max(len(ctx["shape"]), 1)
    if d.chance(0.9):
        return d.rng.randint(-nd, nd - 1)
    return d.pick((nd, -nd - 1, None, 1.5, "0"))


# --- the tensors of each op -------------------------------------------------------------------

def _activation(name):
    def draw(d: Draw) -> Call:
        dtype = d.input_dtype()
        shape = d.shape()
        x = d.tensor(shape, dtype)
        if d.chance(0.02):
            x = d.pick((1.5, [0.5, -1.0], None))          # not a tensor
        kw = d.options(name, {"shape": shape})
        return Call(name, (x,), kw, d.seed)

    return draw


def _softmax(name):
    def draw(d: Draw) -> Call:
        dtype = d.input_dtype(0.1)
        shape = d.shape()
        x = d.tensor(shape, dtype)
        kw = d.options(name, {"shape": shape}, p=0.7)
        if "dim" not in kw and d.chance(0.8):
            kw["dim"] = _dim(d, {"shape": shape})
        return Call(name, (x,), kw, d.seed)

    return draw


def _layer_norm(d: Draw) -> Call:
    dtype = d.input_dtype(0.05)
    shape = d.shape(1, 4)
    K = d.rng.randint(1, len(shape))
    row = shape[-K:]
    x = d.tensor(shape, dtype, rows_constant=d.chance(0.15))
    ns: Any = list(row) if d.chance(0.5) else tuple(row)
    r = d.rng.random()
    if r < 0.04:
        ns = []
    elif r < 0.08:
        ns = [*row[:-1], row[-1] + 1]
    elif r < 0.1:
        ns = row[-1]                                      # an int: torch's functional refuses it
    ctx = {"row": tuple(row), "dtype": dtype if dtype.is_floating_point else torch.float32}
    kw = d.options("layer_norm", ctx)
    return Call("layer_norm", (x, ns), kw, d.seed)


def _squared(name):
    def draw(d: Draw) -> Call:
        dtype = d.input_dtype(0.03)
        shape = d.shape(1 if name == "half_squared_error" and d.chance(0.9) else 0)
        x = d.tensor(shape, dtype)
        r = d.rng.random()
        ts = shape if r < 0.8 or not shape else (shape[-1:] if r < 0.9 else (*shape[:-1], shape[-1] + 1))
        tdtype = dtype if d.chance(0.85) else d.pick((*FLOATS, torch.int64, torch.bool))
        t = d.tensor(ts, tdtype, requires_grad=d.chance(0.4))
        kw = d.options(name, {"shape": shape, "dtype": dtype}, p=0.3)
        if name == "mse_loss" and "weight" not in catalogue.get(name).options and d.chance(0.2):
            kw["weight"] = _like_input(d, {"shape": shape, "dtype": dtype})   # torch's, not yet catalogued
        return Call(name, (x, t), kw, d.seed)

    return draw


def _class_target(d: Draw, lead: tuple, C: int, dtype: torch.dtype, ignore=(-100,)):
    """Class indices of shape ``lead`` (some ignored, a few out of range), or now and then an
    invalid target: wrong shape, float indices, uint8."""
    r = d.rng.random()
    n = math.prod(lead)
    if r < 0.8:
        hi = max(C, 1)
        y = torch.randint(0, hi, lead, generator=d.gen)
        if n and d.chance(0.3):
            y.view(-1)[d.rng.randrange(n)] = d.pick(ignore)
        if n and d.chance(0.04):
            y.view(-1)[d.rng.randrange(n)] = d.pick((C, -1, -5))        # out of range
        tdt = torch.uint8 if d.chance(0.05) else (torch.int32 if d.chance(0.05) else torch.int64)
        if tdt == torch.uint8:
            y = y.clamp_min(0)
        return Spec(y, tdt)
    if r < 0.9:
        return Spec(torch.randint(0, max(C, 1), (*lead, 2) if lead else (2,), generator=d.gen), torch.int64)
    return d.tensor(lead, d.pick((dtype, torch.bool)), requires_grad=False)


def _classification(name):
    def draw(d: Draw) -> Call:
        dtype = d.input_dtype(0.03)
        C = d.size()
        r = d.rng.random()
        if r < 0.15:
            shape, lead = (C,), ()                                        # unbatched
        elif r < 0.8:
            N = d.size()
            shape, lead = (N, C), (N,)
        else:
            N, extra = d.size(), d.shape(1, 2)
            shape, lead = (N, C, *extra), (N, *extra)
        x = d.tensor(shape, dtype, scale=d.pick((1.0, 3.0, 30.0)))
        ctx = {"C": C, "dtype": dtype if dtype.is_floating_point else torch.float32, "shape": shape}
        kw = d.options(name, ctx)
        probs = name == "cross_entropy" and d.chance(0.25)
        if probs:
            p = torch.softmax(d.values(shape, scale=2.0), 1 if len(shape) > 1 else 0)
            t = d.tensor(shape, dtype if d.chance(0.9) else d.pick(FLOATS), values=p, requires_grad=d.chance(0.3),
                         layout=False)
        else:
            t = _class_target(d, lead, C, dtype, (-100 if kw.get("ignore_index") is None else kw["ignore_index"],))
        return Call(name, (x, t), kw, d.seed)

    return draw


def _bce(d: Draw) -> Call:
    dtype = d.input_dtype(0.03)
    shape = d.shape()
    x = d.tensor(shape, dtype, scale=d.pick((1.0, 3.0, 30.0)))
    r = d.rng.random()
    ts = shape if r < 0.9 or not shape else (*shape[:-1], shape[-1] + 1)
    tdtype = dtype if d.chance(0.9) else d.pick((*FLOATS, torch.int64))
    t = d.tensor(ts, tdtype, values=torch.rand(ts, generator=d.gen, dtype=torch.float64), requires_grad=d.chance(0.3),
                 layout=False)
    kw = d.options("binary_cross_entropy_with_logits", {"shape": shape, "dtype": dtype}, p=0.4)
    return Call("binary_cross_entropy_with_logits", (x, t), kw, d.seed)


def _linear_args(d: Draw, dtype):
    D_in, D_out = d.size(), d.size()
    lead = d.shape(0, 3)
    x = d.tensor((*lead, D_in), dtype, scale=1.0)
    r = d.rng.random()
    ws = (D_out, D_in) if r < 0.85 else ((D_in,) if r < 0.93 else d.pick(((D_out, D_in + 1), (1, D_out, D_in))))
    wdtype = dtype if d.chance(0.95) else d.pick(FLOATS)
    w = d.tensor(ws, wdtype, scale=1.0)
    r = d.rng.random()
    out = (*lead, *ws[:-1])
    if r < 0.3:
        b = None
    else:
        bs = ws[:-1] if r < 0.8 else d.pick(((1,), (), out, (1, *out), (D_out + 1,)))
        b = d.tensor(bs, dtype if d.chance(0.95) else d.pick(FLOATS), scale=1.0)
    return x, w, b


def _linear(d: Draw) -> Call:
    x, w, b = _linear_args(d, d.input_dtype(0.03))
    return Call("linear", (x, w) + ((b,) if b is not None or d.chance(0.5) else ()), {}, d.seed)


def _act_kwargs(d: Draw, act) -> dict:
    """Options of the activation ``act`` (but ``inplace``), as linear_act forwards them."""
    if act not in OPTIONS:
        return {}
    names = [o for o in OPTIONS[act] if o != "inplace"]
    return {o: OPTIONS[act][o](d, {}) for o in names if d.chance(0.4)}


def _linear_act(d: Draw) -> Call:
    x, w, b = _linear_args(d, d.input_dtype(0.02))
    kw = d.options("linear_act", {"bias": b})
    kw.update(_act_kwargs(d, kw.get("activation", "relu")))
    if "bias" in catalogue.get("linear_act").options:   # a keyword: given, or left to its default
        return Call("linear_act", (x, w), kw, d.seed)
    return Call("linear_act", (x, w, b), kw, d.seed)


def _mlp(d: Draw) -> Call:
    dtype = d.input_dtype(0.02)
    L = d.rng.randint(1, 3)
    sizes = [d.size() for _ in range(L + 1)]
    x = d.tensor((*d.shape(0, 2), sizes[0]), dtype, scale=1.0)
    ws = [d.tensor((sizes[i + 1], sizes[i] + (1 if d.chance(0.02) else 0)), dtype, scale=1.0) for i in range(L)]
    bs = None if d.chance(0.2) else [None if d.chance(0.2) else d.tensor((sizes[i + 1],), dtype, scale=1.0)
                                     for i in range(L)]
    return Call("mlp", (x, ws, bs), d.options("mlp", {}), d.seed)


def _linear_cross_entropy(d: Draw) -> Call:
    dtype = d.input_dtype(0.02)
    C, D = d.size(), d.size()
    lead = d.shape(1, 2)
    x = d.tensor((*lead, D), dtype, scale=1.0)
    w = d.tensor((C, D), dtype, scale=1.0)
    kw = d.options("linear_cross_entropy", {"C": C, "dtype": dtype if dtype.is_floating_point else torch.float32})
    t = _class_target(d, lead, C, dtype, (-100 if kw.get("ignore_index") is None else kw["ignore_index"],))
    return Call("linear_cross_entropy", (x, w, t), kw, d.seed)


DRAW: dict[str, Callable[[Draw], Call]] = {
    "linear": _linear,
    **{name: _activation(name) for name in catalogue.activations()},
    "softmax": _softmax("softmax"),
    "log_softmax": _softmax("log_softmax"),
    "layer_norm": _layer_norm,
    "mse_loss": _squared("mse_loss"),
    "half_squared_error": _squared("half_squared_error"),
    "cross_entropy": _classification("cross_entropy"),
    "nll_loss": _classification("nll_loss"),
    "binary_cross_entropy_with_logits": _bce,
    "linear_act": _linear_act,
    "mlp": _mlp,
    "linear_cross_entropy": _linear_cross_entropy,
}

OPTIONS.update(LAYER_OPTIONS)
DRAW.update(LAYER_DRAW)
OPTIONS.update(TENSOR_MATH_OPTIONS)
DRAW.update(TENSOR_MATH_DRAW)


def draw_call(op: str, seed: int) -> Call:
    return DRAW[op](Draw(seed))
