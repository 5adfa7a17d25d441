from __future__ import annotations

import torch

from ... import functional as F
from ..references import torch_reference
from ..tolerances import ROW_REDUCTION_ULPS
from ..types import DEFAULT_SHAPES, BadInput, Inputs, OpCase, randn



def _layer_norm(K: int, weight: bool, bias: bool):
    """Normalise over the last K dims of the shape, with or without w and b."""

    def make(shape, dtype, device):
        row = tuple(shape[len(shape) - K:])
        x = randn(shape, dtype, device, scale=2.0)
        w = randn(row, dtype, device) if weight else None
        b = randn(row, dtype, device) if bias else None
        return Inputs((x, row, w, b))

    return make


def _bad(what, x, normalized_shape, names, w=None, b=None):
    def make():
        tensor = lambda s: None if s is None else torch.randn(s)  # noqa: E731
        return Inputs((x() if callable(x) else torch.randn(x), normalized_shape, tensor(w), tensor(b)))

    return BadInput(what, make, names)


_BAD = (
    _bad("normalized_shape not the trailing dims", (2, 3), [5], ("normalized_shape", "[5]", "[2, 3]")),
    _bad("normalized_shape longer than the input", (2, 3), [2, 3, 4], ("normalized_shape", "[2, 3, 4]", "[2, 3]")),
    _bad("empty normalized_shape", (2, 3), [], ("normalized_shape", "[]")),
    _bad("int normalized_shape", (2, 3), 3, ("normalized_shape", "int")),
    _bad("float in normalized_shape", (2, 3), [3.0], ("normalized_shape", "float")),
    _bad("weight of wrong shape", (2, 3), [3], ("weight", "[4]", "[3]"), w=(4,)),
    _bad("weight with an extra dim", (2, 3), [3], ("weight", "[1, 3]", "[3]"), w=(1, 3)),
    _bad("bias of wrong shape", (2, 3), [3], ("bias", "[4]", "[3]"), w=(3,), b=(4,)),
    BadInput("weight of another dtype",
             lambda: Inputs((torch.randn(2, 3), [3], torch.randn(3, dtype=torch.float64), None)),
             ("weight", "torch.float64", "torch.float32")),
    BadInput("bias of another dtype than the weight",
             lambda: Inputs((torch.randn(2, 3, dtype=torch.bfloat16), [3], torch.randn(3), torch.randn(3).bfloat16())),
             ("bias", "torch.bfloat16", "torch.float32")),
    _bad("integer input", lambda: torch.arange(6).reshape(2, 3), [3], ("input", "torch.int64")),
)

# the backward subtracts a row reduction: tolerances.ROW_REDUCTION_ULPS says why
_ULPS = ROW_REDUCTION_ULPS
_REF = torch_reference("layer_norm")

CASES = [
    OpCase("layer_norm", F.layer_norm, _REF, _layer_norm(1, True, True), lowp_ulps=_ULPS, shapes=(*DEFAULT_SHAPES, (13,)),
           bad_inputs=_BAD),
    OpCase("layer_norm[no-affine]", F.layer_norm, _REF, _layer_norm(1, False, False), lowp_ulps=_ULPS),
    OpCase("layer_norm[weight-only]", F.layer_norm, _REF, _layer_norm(1, True, False), lowp_ulps=_ULPS,
           shapes=((2, 3), (2, 5, 13))),
    OpCase("layer_norm[bias-only]", F.layer_norm, _REF, _layer_norm(1, False, True), lowp_ulps=_ULPS,
           shapes=((2, 3), (2, 5, 13))),
    # normalised over the last two dims; (5, 13) has no batch dim at all
    OpCase("layer_norm[2d-shape]", F.layer_norm, _REF, _layer_norm(2, True, True), lowp_ulps=_ULPS,
           shapes=((2, 3), (2, 5, 13), (0, 5, 13), (5, 13))),
]
