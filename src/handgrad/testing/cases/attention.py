"""Registry cases of attention: scaled_dot_product_attention and multi_head_attention_forward.

A case's shape is the query's, (N, H, L, E) or unbatched (L, E); keys and values have S = 3
positions and values Ev = E + 1 features (so a transposed product cannot pass by accident).
dropout's random draw cannot run inside ``vmap``: the dropout case passes a drawn keep mask to
the Function and compares with torch's reference formula on the same mask, as ``layers.py`` does
for dropout. ``tests/test_attention.py`` checks the random path against
torch on the same seed, and ``nn.MultiheadAttention`` option by option.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from ... import functional as F
from ...functional._common import autocast
from ...ops.attention import AttentionFn, scale_forms
from ..references import torch_reference
from ..types import BadInput, Inputs, OpCase, randn

_S = 3                                            # key/value positions
_SHAPES = ((2, 2, 5, 4), (0, 2, 5, 4))            # (N, H, L, E), and an empty batch
_P = 0.3                                          # drop probability of the given-mask case


def _kv(shape, dtype, device, heads=None):
    *batch, _L, E = shape
    if heads is not None:
        batch[-1] = heads
    return randn((*batch, _S, E), dtype, device), randn((*batch, _S, E + 1), dtype, device)


def _sdpa(mask=None, heads=None, **kw):
    """``mask``: None, "bool" (some rows fully masked, a (L, S) mask broadcast over N, H), or
    "float" (an additive (N, 1, L, S) mask broadcast over heads, requiring grad)."""

    def make(shape, dtype, device):
        L = shape[-2]
        q = randn(shape, dtype, device)
        k, v = _kv(shape, dtype, device, heads)
        extra = dict(kw)
        if mask == "bool":
            keep = torch.rand(L, _S) > 0.4
            keep[0] = False                       # a fully masked row: 0, as torch's CPU kernels
            extra["attn_mask"] = keep.to(device)
        elif mask == "float":
            extra["attn_mask"] = randn((*shape[:-3], 1, L, _S) if len(shape) > 2 else (L, _S), dtype, device)
        return Inputs((q, k, v), extra)

    return make


def _broadcast_keys(shape, dtype, device):
    """(N, L, E) queries against one (1, S, E) set of keys and values, broadcast over the batch."""
    q = randn(shape, dtype, device)
    k, v = _kv((1, *shape[1:]), dtype, device)
    return Inputs((q, k, v))


def _given_mask(shape, dtype, device):
    q = randn(shape, dtype, device)
    k, v = _kv(shape, dtype, device)
    keep = torch.rand((*shape[:-1], _S), dtype=torch.float64) >= _P
    return Inputs((q, k, v, keep.to(device)))


def _attention_with_mask(q, k, v, keep):
    """handgrad's attention Function on a given keep mask (what the functional calls after its
    autocast cast and drawing the mask)."""
    q, k, v = autocast("scaled_dot_product_attention", q, k, v)
    return AttentionFn.call(q, k, v, None, keep, _P, False, scale_forms(1 / math.sqrt(q.shape[-1]), "gemm"), 1)[0]


def _torch_attention_with_mask(q, k, v, keep):
    """torch's documented reference implementation of scaled_dot_product_attention on that mask
    (softmax(Q Kᵀ · scale) · keep / (1 − p), then V): what its CPU math kernel computes given a
    ``dropout_mask`` (that kernel prints a C++ warning no filter silences, so it is not called here;
    tests/test_attention.py compares with torch's own random path on a seed)."""
    P = torch.softmax(q @ k.mT * (1 / math.sqrt(q.shape[-1])), dim=-1)
    return (P * keep.to(P.dtype) / (1 - _P)) @ v


def _bad(what, q, k, v, names, **kw):
    return BadInput(what, lambda: Inputs((torch.randn(q), torch.randn(k), torch.randn(v)), kw), names)


_BAD = (
    _bad("key of another feature size", (2, 5, 4), (2, 3, 5), (2, 3, 4), ("key", "[2, 5, 4]", "[2, 3, 5]")),
    _bad("value of another length", (2, 5, 4), (2, 3, 4), (2, 2, 4), ("value", "[2, 3, 4]", "[2, 2, 4]")),
    _bad("gqa heads not dividing", (1, 4, 5, 4), (1, 3, 3, 4), (1, 3, 3, 4), ("heads", "[1, 4, 5, 4]", "[1, 3, 3, 4]"),
         enable_gqa=True),
    BadInput("attn_mask with is_causal",
             lambda: Inputs((torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4)),
                            {"attn_mask": torch.ones(5, 3, dtype=torch.bool), "is_causal": True}),
             ("attn_mask", "is_causal", "[5, 3]")),
    BadInput("integer attn_mask",
             lambda: Inputs((torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4)),
                            {"attn_mask": torch.ones(5, 3, dtype=torch.int64)}),
             ("attn_mask", "torch.int64")),
    BadInput("value of another dtype",
             lambda: Inputs((torch.randn(5, 4), torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64))),
             ("value", "torch.float64")),
)

_H = 2  # heads of the multi-head cases; a case's shape is the query's (L, N, E), E even


def _mha(need_weights: bool, mask: bool = False):
    """query (L, N, E); key and value (S, N, E); packed in-projection, biases, out-projection.
    The case's function returns the output (need_weights=False: the attention Function's path)
    or the head-averaged weights (need_weights=True: P through handgrad's softmax)."""

    def make(shape, dtype, device):
        L, Nb, E = shape
        E = max(_H, E - E % _H)                  # the embedding splits into _H heads (a drawn E may not)
        shape = (L, Nb, E)
        q = randn(shape, dtype, device)
        k, v = randn((_S, Nb, E), dtype, device), randn((_S, Nb, E), dtype, device)
        w_in, b_in = randn((3 * E, E), dtype, device, scale=0.5), randn((3 * E,), dtype, device)
        w_out, b_out = randn((E, E), dtype, device, scale=0.5), randn((E,), dtype, device)
        kw = {"need_weights": need_weights}
        if mask:
            kpm = torch.zeros(Nb, _S, dtype=torch.bool)
            kpm[:, -1] = True                     # True = ignore (nn.MultiheadAttention's convention)
            kw["key_padding_mask"] = kpm.to(device)
        return Inputs((q, k, v, w_in, b_in, w_out, b_out), kw)

    return make


def _mha_fn(mha, need_weights: bool | None = None):
    """``mha`` as a function of tensors: the output, or the weights where the call asks for them.
    ``need_weights=True`` forces torch's explicit-weights path for the reference's output: its
    sdpa path's flash backward has no vmap rule, and torch warns about it in the vmap checks."""

    def run(q, k, v, w_in, b_in, w_out, b_out, **kw):
        want_weights = kw.get("need_weights", True)
        if need_weights is not None:
            kw = {**kw, "need_weights": need_weights}
        out, weights = mha(q, k, v, q.shape[-1], _H, w_in, b_in, None, None, False, 0.0, w_out, b_out, **kw)
        return weights if want_weights else out

    return run


def _mha_bad(what, names, E=6, heads=_H, **kw):
    def make():
        x = torch.randn(5, 2, E)
        return Inputs((x, x, x, E, heads, torch.randn(3 * E, E), None, None, None, False, 0.0, torch.randn(E, E),
                       None), kw)

    return BadInput(what, make, names)


_MHA_BAD = (
    _mha_bad("embed_dim not divisible by num_heads", ("embed_dim 6", "num_heads 4"), heads=4),
    _mha_bad("2-d attn_mask of the wrong shape", ("attn_mask", "torch.Size([2, 2])", "(5, 5)"),
             attn_mask=torch.zeros(2, 2)),
)

_MHA = "multi_head_attention_forward"
_SDPA = "scaled_dot_product_attention"
CASES = [
    OpCase(_SDPA, F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"), _sdpa(), shapes=_SHAPES,
           bad_inputs=_BAD),
    OpCase(f"{_SDPA}[causal]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"),
           _sdpa(is_causal=True), shapes=_SHAPES),
    OpCase(f"{_SDPA}[bool-mask]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"), _sdpa("bool"),
           shapes=_SHAPES),
    OpCase(f"{_SDPA}[float-mask]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"), _sdpa("float"),
           shapes=_SHAPES[:1]),   # no empty batch: torch's gives the mask no gradient (None) under autocast
    OpCase(f"{_SDPA}[scale]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"), _sdpa(scale=0.3),
           shapes=_SHAPES[:1]),
    OpCase(f"{_SDPA}[gqa]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"),
           _sdpa(heads=1, enable_gqa=True), shapes=((2, 4, 5, 4), (0, 4, 5, 4))),
    OpCase(f"{_SDPA}[unbatched]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"), _sdpa(),
           shapes=((5, 4), (1, 4))),
    OpCase(f"{_SDPA}[unbatched,float-mask]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"),
           _sdpa("float"), shapes=((5, 4),)),
    OpCase(f"{_SDPA}[3d,broadcast-keys]", F.scaled_dot_product_attention, torch_reference("scaled_dot_product_attention"),
           _broadcast_keys, shapes=((2, 5, 4), (0, 5, 4))),
    OpCase(f"{_SDPA}[given-dropout-mask]", _attention_with_mask, _torch_attention_with_mask, _given_mask,
           shapes=_SHAPES),
    OpCase(_MHA, _mha_fn(F.multi_head_attention_forward), _mha_fn(TF.multi_head_attention_forward, True),
           _mha(False), shapes=((5, 2, 4), (5, 0, 4))),
    OpCase(f"{_MHA}[weights,key_padding_mask]", _mha_fn(F.multi_head_attention_forward),
           _mha_fn(TF.multi_head_attention_forward), _mha(True, mask=True), shapes=((5, 2, 4),)),
]
