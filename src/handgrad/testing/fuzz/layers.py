"""What the fuzzer draws for the layer ops (convolution, pooling, the batch/group/RMS norms,
embedding, dropout): shapes torch accepts for each — (N, C, L) / (N, C, H, W) or unbatched,
weights (C_out, C_in/groups, k…), channel dims for the norms, integer indices and a 2-D table
for embedding — now and then one it refuses, and a domain of valid and invalid values for each
catalogue option. ``draw.py`` merges ``OPTIONS`` and ``DRAW`` into its tables.

dropout is compared mask for mask: handgrad draws its mask as torch's CPU dropout does
(``functional/_dropout.py``), and ``compare.run_side`` seeds torch's generator from the call's
seed before each side, so both draw the same mask for any ``p``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from .call import Call, Spec
from .domain import one_of as _from

__all__ = ["OPTIONS", "DRAW"]


def _per_channel(d, ctx, p_none=0.3):
    """None, a (C,) tensor in the input's dtype (now and then float32: the mixed-dtype path), or
    one of another shape."""
    C, dtype = ctx["C"], ctx["dtype"]
    r = d.rng.random()
    if r < p_none:
        return None
    if r < 0.85:
        return d.tensor((C,), dtype, scale=1.0)
    if r < 0.93:
        return d.tensor((C,), d.pick((torch.float32, torch.float64)), scale=1.0)
    return d.tensor((C + 1,), dtype, scale=1.0)


def _spatial(d, dims: int, lo: int = 1) -> tuple[int, ...]:
    return tuple(d.pick([s for s in (0, 1, 2, 3, 4, 5, 7) if s >= lo]) for _ in range(dims))


def _ints(dims, valid, invalid=()):
    """An int, or a tuple of ``dims`` of them (now and then one of the wrong length)."""
    def draw(d, ctx):
        if invalid and d.chance(0.08):
            return d.pick(invalid)
        if d.chance(0.3):
            n = dims if d.chance(0.9) else dims + 1
            return tuple(d.pick(valid) for _ in range(n))
        return d.pick(valid)

    return draw


# --- convolution ----------------------------------------------------------------------------------

def _conv_options(dims):
    return {
        "bias": lambda d, ctx: ctx["bias"],                                   # drawn with the weight
        "stride": _ints(dims, (1, 1, 2, 3), (0, -1)),
        "padding": lambda d, ctx: (d.pick(("same", "valid")) if d.chance(0.25) else
                                   _ints(dims, (0, 1, 2), (-1, "full"))(d, ctx)),
        "dilation": _ints(dims, (1, 1, 2), (0, -1)),
        "groups": lambda d, ctx: ctx["groups"] if d.chance(0.92) else d.pick((0, -1, ctx["groups"] + 1)),
    }


def _conv(dims):
    name = f"conv{dims}d"

    def draw(d) -> Call:
        dtype = d.input_dtype(0.03)
        g = d.pick((1, 1, 1, 2, 3))
        C_in, C_out = g * d.pick((1, 1, 2)), g * d.pick((1, 2, 3))
        k = _spatial(d, dims, 1)
        S = tuple(s + d.pick((0, 0, 1, 2, 4)) for s in k)                    # mostly at least the kernel
        lead = () if d.chance(0.15) else (d.size(),)
        x = d.tensor((*lead, C_in, *S), dtype, scale=1.0)
        ws = (C_out, C_in // g, *k)
        if d.chance(0.05):
            ws = d.pick(((C_out, C_in // g + 1, *k), (C_out, *k), (C_out, C_in // g, *k, 1)))
        wdtype = dtype if d.chance(0.95) else d.pick((torch.float32, torch.float64))
        w = d.tensor(ws, wdtype, scale=1.0)
        b = None if d.chance(0.35) else d.tensor((C_out,) if d.chance(0.92) else (C_out + 1,), wdtype, scale=1.0)
        kw = d.options(name, {"bias": b, "groups": g})
        if g > 1 and "groups" not in kw and d.chance(0.9):
            kw["groups"] = g
        return Call(name, (x, w), kw, d.seed)

    return draw


# --- pooling --------------------------------------------------------------------------------------

def _pool_input(d):
    dtype = d.input_dtype(0.03)
    S = _spatial(d, 2, 0 if d.chance(0.05) else 1)
    lead = (d.size(1) if d.chance(0.95) else 0,) if d.chance(0.8) else ()
    C = d.size(1)
    return d.tensor((*lead, C, *S), dtype), dtype


def _kernel(d):
    k = d.pick((1, 2, 2, 3, (2, 1), (1, 3), (3, 2)))
    return d.pick((0, (2, 0), -1)) if d.chance(0.04) else k


def _max_pool2d(d) -> Call:
    x, _ = _pool_input(d)
    k, kw = _kernel(d), d.options("max_pool2d", {})
    for opt in ("dilation", "padding", "ceil_mode", "stride"):
        if _torch_corrupts_memory(x.shape, k, kw):
            kw.pop(opt, None)
    return Call("max_pool2d", (x, k), kw, d.seed)


def _torch_corrupts_memory(shape, k, kw) -> bool:
    """A window of only padding (dilated taps that skip the input): torch's CPU max_pool2d returns
    an argmax outside the input there and its backward writes through it (heap corruption), so the
    fuzzer cannot run the call; handgrad refuses it (tests/test_fuzz.py)."""
    from ...functional._pool import _out_size, _window_args, empty_window
    try:
        k, s, p, dil = _window_args("max_pool2d", k, kw.get("stride"), kw.get("padding", 0), kw.get("dilation", 1))
        sizes = shape[-2:]
        return len(shape) >= 3 and any(
            empty_window(sizes[i], _out_size(sizes[i], k[i], s[i], p[i], dil[i], bool(kw.get("ceil_mode"))),
                         k[i], s[i], p[i], dil[i]) for i in range(2))
    except (RuntimeError, TypeError, ValueError):
        return False


def _avg_pool2d(d) -> Call:
    x, _ = _pool_input(d)
    return Call("avg_pool2d", (x, _kernel(d)), d.options("avg_pool2d", {}), d.seed)


def _adaptive_avg_pool2d(d) -> Call:
    x, _ = _pool_input(d)
    r = d.rng.random()
    if r < 0.4:
        size: Any = d.pick((1, 2, 3, 5))
    elif r < 0.9:
        size = (d.pick((1, 2, 3, 4, None)), d.pick((1, 2, 5, None)))
    else:
        size = d.pick((0, -1, (2,), (1, 2, 3), "a"))
    return Call("adaptive_avg_pool2d", (x, size), {}, d.seed)


_WINDOW = {
    "stride": _from((None, 1, 2, 3, (1, 2), (2, 1)), (0, (1, 0), -1)),
    "padding": _from((0, 0, 1, (1, 0), (0, 1)), (-1, 2, (3, 0))),
    "ceil_mode": _from((False, True)),
}


# --- the batch, group and RMS norms ---------------------------------------------------------------

def _channels_input(d, lo_spatial=0):
    dtype = d.input_dtype(0.04)
    C = d.size(1) if d.chance(0.95) else 0
    N = d.size(1) if d.chance(0.9) else d.pick((0, 1))
    x = d.tensor((N, C, *d.shape(lo_spatial, 2, 1)), dtype, scale=d.pick((1.0, 1.0, 3.0, 1e3)))
    return x, dtype, C


def _batch_norm(d) -> Call:
    x, dtype, C = _channels_input(d)
    fdt = dtype if dtype.is_floating_point else torch.float32
    ctx = {"C": C, "dtype": fdt}
    kw = d.options("batch_norm", ctx)
    stats = []
    for var in (False, True):
        if d.chance(0.1):
            stats.append(None)                     # training only: torch refuses it in eval
        else:
            sdt = fdt if d.chance(0.85) else torch.float32
            v = d.values((C,), scale=1.0)
            stats.append(d.tensor((C,) if d.chance(0.95) else (C + 1,), sdt, requires_grad=False, layout=False,
                                  values=v.abs() + 0.1 if var else v))
    return Call("batch_norm", (x, *stats), kw, d.seed)


def _group_norm(d) -> Call:
    x, dtype, C = _channels_input(d)
    divisors = [g for g in range(1, C + 1) if C % g == 0] or [1]
    groups = d.pick(divisors) if d.chance(0.92) else d.pick((0, C + 1, 2.0))
    kw = d.options("group_norm", {"C": C, "dtype": dtype if dtype.is_floating_point else torch.float32})
    return Call("group_norm", (x, groups), kw, d.seed)


def _rms_norm(d) -> Call:
    dtype = d.input_dtype(0.04)
    shape = d.shape(1, 4)
    row = shape[-d.rng.randint(1, len(shape)):]
    x = d.tensor(shape, dtype, rows_constant=d.chance(0.1))
    r = d.rng.random()
    ns: Any = list(row) if r < 0.45 else tuple(row)
    if r > 0.95:
        ns = [*row[:-1], row[-1] + 1]
    elif r > 0.92:
        ns = row[-1]                                # an int: torch accepts it here (unlike layer_norm's)
    kw = d.options("rms_norm", {"row": tuple(row), "dtype": dtype if dtype.is_floating_point else torch.float32})
    return Call("rms_norm", (x, ns), kw, d.seed)


def _rms_weight(d, ctx):
    row, dtype = ctx["row"], ctx["dtype"]
    return d.tier(
        (0.3, lambda: None),
        (0.85, lambda: d.tensor(row, dtype, scale=1.0)),
        (0.93, lambda: d.tensor(row, d.pick((torch.float32, torch.float64)), scale=1.0)),
        (1.0, lambda: d.tensor((*row[:-1], row[-1] + 1), dtype, scale=1.0)),
    )


# --- embedding and dropout ------------------------------------------------------------------------

def _embedding(d) -> Call:
    V, D = d.size(1) if d.chance(0.95) else 0, d.size()
    lead = d.shape(0, 3)
    idx = torch.randint(0, max(V, 1), lead, generator=d.gen)
    n = idx.numel()
    if n and d.chance(0.05):
        idx.view(-1)[d.rng.randrange(n)] = d.pick((V, -1))                  # out of range
    r = d.rng.random()
    if r < 0.9:
        x: Any = Spec(idx, torch.int64 if d.chance(0.8) else torch.int32)
    else:
        x = Spec(idx, d.pick((torch.int16, torch.uint8, torch.float32)))
    wdtype = d.input_dtype(0.02)
    w = d.tensor((V, D) if d.chance(0.95) else d.pick(((V,), (V, D, 1))), wdtype,
                 scale=d.pick((1.0, 1.0, 3.0)))
    kw = d.options("embedding", {"V": V})
    return Call("embedding", (x, w), kw, d.seed)


def _dropout(d) -> Call:
    dtype = d.input_dtype(0.04)
    x = d.tensor(d.shape(), dtype)
    kw = d.options("dropout", {}, p=0.7)
    return Call("dropout", (x,), kw, d.seed)


def _attention(d) -> Call:
    dtype = d.input_dtype(0.03)
    N, L, S, E = d.size(), d.size(1), d.size(1), d.size(1)
    H = d.pick((1, 2, 4))
    Hkv = H if d.chance(0.8) else d.pick((1, 2))
    lead = () if d.chance(0.1) else (N, H)
    kv = () if not lead else (N, Hkv)
    q, k = d.tensor((*lead, L, E), dtype, scale=1.0), d.tensor((*kv, S, E), dtype, scale=1.0)
    v = d.tensor((*kv, S, E if d.chance(0.8) else d.size(1)), dtype, scale=1.0)
    kw = d.options("scaled_dot_product_attention", {"L": L, "S": S, "dtype": dtype}, p=0.4)
    return Call("scaled_dot_product_attention", (q, k, v), kw, d.seed)


def _attn_mask(d, ctx):
    L, S = ctx["L"], ctx["S"]
    dtype = ctx["dtype"] if ctx["dtype"].is_floating_point else torch.float32
    return d.tier(
        (0.3, lambda: None),
        (0.6, lambda: Spec(torch.rand((L, S), generator=d.gen) < 0.7, torch.bool)),
        (0.95, lambda: d.tensor((L, S), dtype, scale=1.0, requires_grad=d.chance(0.3))),
        (1.0, lambda: d.tensor((L, S + 1), dtype, scale=1.0, requires_grad=d.chance(0.3))),
    )


def _mha(d) -> Call:
    """nn.MultiheadAttention's functional form, self- or cross-attention, (L, N, E) or unbatched."""
    dtype = d.float_dtype()
    H = d.pick((1, 2))
    E, L, S, N = H * d.pick((1, 2, 3)), d.size(1), d.size(1), d.size(1)
    batch = (N,) if d.chance(0.85) else ()
    q = d.tensor((L, *batch, E), dtype, scale=1.0)
    k, v = d.tensor((S, *batch, E), dtype, scale=1.0), d.tensor((S, *batch, E), dtype, scale=1.0)
    w_in, w_out = d.tensor((3 * E, E), dtype, scale=0.5), d.tensor((E, E), dtype, scale=0.5)
    b_in = d.tensor((3 * E,), dtype, scale=0.5) if d.chance(0.7) else None
    b_out = d.tensor((E,), dtype, scale=0.5) if d.chance(0.7) else None
    kw = d.options("multi_head_attention_forward", {"L": L, "S": S, "N": batch, "dtype": dtype}, p=0.4)
    kw["need_weights"] = False               # the weights (a second float output) are not compared yet
    return Call("multi_head_attention_forward",
                (q, k, v, E, H, w_in, b_in, None, None, False, 0.0, w_out, b_out), kw, d.seed)


def _padding_mask(d, ctx):
    if d.chance(0.6):
        return None
    return Spec(torch.rand((*ctx["N"], ctx["S"]), generator=d.gen) < 0.8, torch.bool)


_NONE = _from((None,))     # the separate projections and static keys: not drawn (None, the default)

OPTIONS: dict[str, dict[str, Callable]] = {
    "multi_head_attention_forward": {
        "training": _from((True, False)), "key_padding_mask": _padding_mask,
        "need_weights": _from((False,)),       # (True returns the weights too; not compared yet)
        "attn_mask": lambda d, ctx: None if d.chance(0.5) else Spec(
            torch.rand((ctx["L"], ctx["S"]), generator=d.gen) < 0.8, torch.bool),
        "use_separate_proj_weight": _from((False,)), "q_proj_weight": _NONE, "k_proj_weight": _NONE,
        "v_proj_weight": _NONE, "static_k": _NONE, "static_v": _NONE,
        "average_attn_weights": _from((True, False)), "is_causal": _from((False,))},
    "scaled_dot_product_attention": {"attn_mask": _attn_mask,
                                     "dropout_p": _from((0.0, 0.0, 0.5), (-0.1, 1.5)),
                                     "is_causal": _from((False, True)),
                                     "scale": _from((None, 0.5, 1.0, 2.0), (0.0, "a")),
                                     "enable_gqa": _from((False, True))},
    "conv1d": _conv_options(1),
    "conv2d": _conv_options(2),
    "max_pool2d": {**_WINDOW, "dilation": _from((1, 1, 2, (1, 2)), (0, (0, 1))),
                   "return_indices": _from((False, True))},
    "avg_pool2d": {**_WINDOW, "count_include_pad": _from((True, False)),
                   "divisor_override": _from((None, 1, 3, 7), (0, -1, 1.5))},
    "adaptive_avg_pool2d": {},
    "batch_norm": {"weight": _per_channel, "bias": _per_channel, "training": _from((False, True)),
                   "momentum": _from((0.1, 0.0, 1.0, 0.5), ("a",)),
                   "eps": _from((1e-5, 0.0, 1e-3, 1.0), ("a", None))},
    "group_norm": {"weight": _per_channel, "bias": _per_channel,
                   "eps": _from((1e-5, 0.0, 1e-3, 1.0), ("a", None))},
    "rms_norm": {"weight": _rms_weight, "eps": _from((None, 1e-5, 0.0, 1e-2, 1.0), ("a",))},
    "embedding": {"padding_idx": lambda d, ctx: (d.pick((ctx["V"], -ctx["V"] - 1)) if d.chance(0.1) else
                                                 d.pick((None, 0, 1, -1)) if ctx["V"] > 1 else None),
                  "max_norm": _from((None, 1.0, 0.5, 3.0)),
                  "norm_type": _from((2.0, 1.0, 3.0, float("inf"))),
                  "scale_grad_by_freq": _from((False, True)),
                  "sparse": _from((False,), (True,), 0.05)},
    "dropout": {"p": _from((0.0, 0.5, 1.0, 0.2, 0.9), (-0.1, 1.5, "a")), "training": _from((True, True, False)),
                "inplace": _from((False, True))},
}

DRAW: dict[str, Callable[[Any], Call]] = {
    "scaled_dot_product_attention": _attention,
    "multi_head_attention_forward": _mha,
    "conv1d": _conv(1),
    "conv2d": _conv(2),
    "max_pool2d": _max_pool2d,
    "avg_pool2d": _avg_pool2d,
    "adaptive_avg_pool2d": _adaptive_avg_pool2d,
    "batch_norm": _batch_norm,
    "group_norm": _group_norm,
    "rms_norm": _rms_norm,
    "embedding": _embedding,
    "dropout": _dropout,
}
