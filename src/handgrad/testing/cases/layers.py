"""Registry cases of issue 10's layers: batch, group and RMS norm, embedding, dropout.

Running-statistics updates (training with buffers), embedding's padding_idx /
scale_grad_by_freq / max_norm and dropout's random training path are not registry cases: a
finite-difference check cannot see the first (not differentiated), the padding row and the
1/count factor are torch's definitions rather than derivatives, and random draws are refused
inside ``vmap`` (torch's own dropout included). ``tests/test_layers.py`` checks each against
torch by name.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as TF

from ... import functional as F
from ...ops.dropout import DropoutFn
from ..tolerances import ROW_REDUCTION_ULPS
from ..types import DEFAULT_SHAPES, BadInput, Inputs, OpCase, randn

# (N, C), (N, C, L), (N, C, H, W), an empty batch
_CHANNEL_SHAPES = ((4, 3), (7, 13), (2, 5, 13), (0, 13), (2, 3, 2, 2))


def _at_least_two_values(shape, channels_per_set: int = 1):
    """torch refuses one value per normalised set in training (ValueError, a named BadInput
    below): a set is N·Π spatial values per channel (batch norm, ``channels_per_set=1``) or
    N·(C/G)·Π spatial (group norm, C/G channels per group). A drawn shape with one value per set
    is widened to N = 2, so every drawn shape is a valid call."""
    if shape[0] * channels_per_set * math.prod(shape[2:]) == 1:
        return (2, *shape[1:])
    return shape


def _batch_norm(training: bool, affine: bool):
    def make(shape, dtype, device):
        shape = _at_least_two_values(shape) if training else shape
        C = shape[1]
        x = randn(shape, dtype, device, scale=2.0)
        w = randn((C,), dtype, device) if affine else None
        b = randn((C,), dtype, device) if affine else None
        if training:  # batch statistics, no buffers (track_running_stats=False)
            return Inputs((x, None, None, w, b), {"training": True})
        mean = randn((C,), dtype, device, requires_grad=False)
        var = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
        return Inputs((x, mean, var, w, b), {"training": False})

    return make


def _bn_bad(what, x, names, mean=(3,), var=(3,), w=None, b=None, **kw):
    def make():
        t = lambda s: None if s is None else torch.randn(s)  # noqa: E731
        return Inputs((x() if callable(x) else torch.randn(x), t(mean), None if var is None else torch.rand(var) + 1,
                       t(w), t(b)), kw)

    return BadInput(what, make, names)


_BN_BAD = (
    _bn_bad("running_mean of wrong size", (2, 3), ("running_mean", "[4]", "[2, 3]"), mean=(4,)),
    _bn_bad("weight of wrong size", (2, 3), ("weight", "[4]", "[2, 3]"), w=(4,)),
    _bn_bad("bias of wrong size", (2, 3), ("bias", "[4]", "[2, 3]"), b=(4,)),
    _bn_bad("eval without running statistics", (2, 3), ("running_mean",), mean=None, var=None),
    _bn_bad("one value per channel in training", (1, 3), ("torch.Size([1, 3])",), training=True),
    _bn_bad("integer input", lambda: torch.arange(6).reshape(2, 3), ("input", "torch.int64")),
    _bn_bad("momentum None", (2, 3), ("momentum", "NoneType"), training=True, momentum=None),
    BadInput("weight of another dtype",
             lambda: Inputs((torch.randn(2, 3), torch.zeros(3), torch.ones(3), torch.ones(3, dtype=torch.float64), None)),
             ("weight", "torch.float64", "torch.float32")),
)


def _group_divisor(C: int) -> int:
    """The largest divisor of C below C (1 for a prime): groups of several channels."""
    return next((g for g in range(C - 1, 0, -1) if C % g == 0), 1)


def _group_norm(per_channel: bool):
    def make(shape, dtype, device):
        G = shape[1] if per_channel else _group_divisor(shape[1])
        shape = _at_least_two_values(shape, shape[1] // G)
        C = shape[1]
        x = randn(shape, dtype, device, scale=2.0)
        return Inputs((x, G, randn((C,), dtype, device), randn((C,), dtype, device)))

    return make


def _gn_bad(what, shape, groups, names, w=None, b=None):
    t = lambda s: None if s is None else torch.randn(s)  # noqa: E731
    return BadInput(what, lambda: Inputs((torch.randn(shape), groups, t(w), t(b))), names)


_GN_BAD = (
    _gn_bad("channels not divisible by num_groups", (2, 6), 4, ("num_groups", "4", "[2, 6]")),
    _gn_bad("weight of wrong size", (2, 6), 3, ("weight", "[4]", "[2, 6]"), w=(4,)),
    _gn_bad("bias of wrong size", (2, 6), 3, ("bias", "[4]", "[2, 6]"), b=(4,)),
    _gn_bad("1-d input", (6,), 3, ("input", "[6]")),
    _gn_bad("one value per group", (1, 3), 3, ("1 value per channel", "[1, 3]")),
    BadInput("integer input", lambda: Inputs((torch.arange(12).reshape(2, 6), 3)), ("input", "torch.int64")),
)


def _rms_norm(K: int, weight: bool, eps=None):
    def make(shape, dtype, device):
        row = tuple(shape[len(shape) - K:])
        x = randn(shape, dtype, device, scale=2.0)
        return Inputs((x, row, randn(row, dtype, device) if weight else None), {"eps": eps})

    return make


def _rms_bad(what, shape, normalized_shape, names, w=None):
    return BadInput(what, lambda: Inputs((torch.randn(shape), normalized_shape, None if w is None else torch.randn(w))),
                    names)


_RMS_BAD = (
    _rms_bad("normalized_shape not the trailing dims", (2, 3), [4], ("normalized_shape", "[4]", "[2, 3]")),
    _rms_bad("weight of wrong shape", (2, 3), [3], ("weight", "[4]", "[3]"), w=(4,)),
    _rms_bad("int normalized_shape", (2, 3), 3, ("normalized_shape", "int")),
    _rms_bad("empty normalized_shape", (2, 3), [], ("normalized_shape", "[]")),
    BadInput("integer input", lambda: Inputs((torch.arange(6).reshape(2, 3), [3])), ("input", "torch.int64")),
)

_V = 7  # rows of the embedding table


def _embedding(index_dtype):
    """shape (*, D): indices of shape (*) into a (7, D) table, every row index drawn."""

    def make(shape, dtype, device):
        idx = torch.randint(0, _V, shape[:-1], dtype=index_dtype, device=device)
        return Inputs((idx, randn((_V, shape[-1]), dtype, device)))

    return make


def _emb_bad(what, idx, names, weight=(5, 3), **kw):
    return BadInput(what, lambda: Inputs((idx(), torch.randn(weight)), kw), names)


_EMB_BAD = (
    _emb_bad("float indices", lambda: torch.tensor([1.0, 2.0]), ("indices", "torch.float32")),
    _emb_bad("index out of range", lambda: torch.tensor([5]), ("index out of range", "[5, 3]")),
    _emb_bad("negative index", lambda: torch.tensor([-1]), ("index out of range", "[5, 3]")),
    _emb_bad("1-d weight", lambda: torch.tensor([1]), ("weight", "[5]"), weight=(5,)),
    _emb_bad("padding_idx out of range", lambda: torch.tensor([1]), ("padding_idx=5", "[5, 3]"), padding_idx=5),
)

_P = 0.3  # drop probability of the given-mask case


def _given_mask(shape, dtype, device):
    """x and a bool keep mask m ~ Bernoulli(1 − p), drawn from the (test-seeded) global RNG."""
    keep = torch.rand(shape, dtype=torch.float64) >= _P
    return Inputs((randn(shape, dtype, device), keep.to(device)))


def _dropout_with_mask(x, mask):
    """handgrad's dropout Function on a given mask (what ``F.dropout`` calls after drawing it)."""
    return DropoutFn.call(x, mask, _P, False)


def _torch_dropout_formula(x, mask):
    """torch's CPU dropout on that mask: ``input * noise``, noise = m.div_(1 − p) in x's dtype."""
    return x * mask.to(x.dtype).div_(1 - _P)


def _dropout(**kw):
    return lambda shape, dtype, device: Inputs((randn(shape, dtype, device),), kw)


_DROP_BAD = (
    BadInput("p above 1", lambda: Inputs((torch.randn(3),), {"p": 1.5}), ("p", "1.5")),
    BadInput("negative p", lambda: Inputs((torch.randn(3),), {"p": -0.1}), ("p", "-0.1")),
)

# Low precision: the normalisations in training mode subtract set reductions from G as layer
# norm does, so they take its margin (ROW_REDUCTION_ULPS, and its reason; batch_norm[train] at
# (2, 3, 2, 2) exceeded 2 ulps by 3% of the allowed error in float32); the eval batch norm, the
# embedding and dropout are elementwise or gathers and keep the default 2 ulps.
CASES = [
    OpCase("batch_norm[train]", F.batch_norm, TF.batch_norm, _batch_norm(True, True), lowp_ulps=ROW_REDUCTION_ULPS, shapes=_CHANNEL_SHAPES,
           bad_inputs=_BN_BAD),
    OpCase("batch_norm[train,no-affine]", F.batch_norm, TF.batch_norm, _batch_norm(True, False),
           lowp_ulps=ROW_REDUCTION_ULPS, shapes=((4, 3), (2, 5, 13))),
    OpCase("batch_norm[eval]", F.batch_norm, TF.batch_norm, _batch_norm(False, True), shapes=_CHANNEL_SHAPES,),
    OpCase("batch_norm[eval,no-affine]", F.batch_norm, TF.batch_norm, _batch_norm(False, False),
           shapes=((4, 3), (2, 5, 13))),
    OpCase("group_norm", F.group_norm, TF.group_norm, _group_norm(False),
           lowp_ulps=ROW_REDUCTION_ULPS, shapes=((2, 6), (7, 13), (2, 6, 5), (0, 6), (2, 4, 3, 3)), bad_inputs=_GN_BAD),
    OpCase("group_norm[per-channel]", F.group_norm, TF.group_norm, _group_norm(True),
           lowp_ulps=ROW_REDUCTION_ULPS, shapes=((2, 6, 5), (2, 4, 3, 3))),
    OpCase("rms_norm", F.rms_norm, TF.rms_norm, _rms_norm(1, True), lowp_ulps=ROW_REDUCTION_ULPS, shapes=(*DEFAULT_SHAPES, (13,)),
           bad_inputs=_RMS_BAD),
    OpCase("rms_norm[no-weight]", F.rms_norm, TF.rms_norm, _rms_norm(1, False), lowp_ulps=ROW_REDUCTION_ULPS, shapes=((2, 3), (2, 5, 13)),),
    OpCase("rms_norm[2d-shape,eps]", F.rms_norm, TF.rms_norm, _rms_norm(2, True, 1e-3),
           lowp_ulps=ROW_REDUCTION_ULPS, shapes=((2, 3), (2, 5, 13), (0, 5, 13), (5, 13))),
    OpCase("embedding", F.embedding, TF.embedding, _embedding(torch.int64), shapes=(*DEFAULT_SHAPES, (13,)),
           bad_inputs=_EMB_BAD),
    OpCase("embedding[int32]", F.embedding, TF.embedding, _embedding(torch.int32), shapes=((2, 3), (2, 5, 13))),
    OpCase("dropout[given-mask]", _dropout_with_mask, _torch_dropout_formula, _given_mask),
    OpCase("dropout[p=1]", F.dropout, TF.dropout, _dropout(p=1.0), bad_inputs=_DROP_BAD),
    OpCase("dropout[eval]", F.dropout, TF.dropout, _dropout(training=False), shapes=((2, 3), (2, 5, 13))),
]
