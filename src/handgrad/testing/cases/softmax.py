from __future__ import annotations

import torch
import torch.nn.functional as TF

from ... import functional as F
from ..._compat import torch_reference
from ..registry import DEFAULT_SHAPES, BadInput, Inputs, OpCase, randn

# the defaults plus a 1-d row and a 0-d input (softmax of a scalar is 1, its log 0)
_SHAPES = (*DEFAULT_SHAPES, (13,), ())
# a middle dim needs a 3-d input; (2, 0, 3) has that dim empty
_MIDDLE_SHAPES = ((2, 5, 13), (3, 4, 2), (2, 0, 3))


def _x(dim, out_dtype=None):
    def make(shape, dtype, device):
        # scale 3: rows from near-uniform to near-one-hot, so both regimes of Y ⊙ (G − (G ⊙ Y)1) are hit
        kwargs = {"dim": dim} if out_dtype is None else {"dim": dim, "dtype": out_dtype}
        return Inputs((randn(shape, dtype, device, scale=3.0),), kwargs)

    return make


def _bad(what, x, names, **kwargs):
    return BadInput(what, lambda: Inputs((x(),), kwargs), names)


_BAD = (
    _bad("dim past the last", lambda: torch.randn(2, 3), ("dim", "[2, 3]", "5"), dim=5),
    _bad("negative dim past the first", lambda: torch.randn(2, 3), ("dim", "[2, 3]", "-3"), dim=-3),
    _bad("dim 1 of a 0-d input", lambda: torch.randn(()), ("dim", "[]"), dim=1),
    _bad("float dim", lambda: torch.randn(2, 3), ("dim", "float"), dim=1.0),
    _bad("integer input", lambda: torch.arange(6).reshape(2, 3), ("input", "torch.int64"), dim=1),
    _bad("integer dtype", lambda: torch.randn(2, 3), ("dtype", "torch.int64"), dim=1, dtype=torch.int64),
    _bad("dtype not a dtype", lambda: torch.randn(2, 3), ("dtype", "str"), dim=1, dtype="float64"),
)




# Low precision, 4 ulps instead of 2: the backward subtracts a row reduction from G (a sum
# that nearly cancels where rows are confident or constant) and starts from the rounded
# saved output, so a few roundings land at the scale of the summed terms (measured: up to
# ~1.3× torch's worst float32 error on 2 seeds in 4 at 2 ulps).
_ULPS = 4.0


def _cases(name, fn, reference):
    return [
        OpCase(name, fn, reference, _x(-1), shapes=_SHAPES, bad_inputs=_BAD, lowp_ulps=_ULPS),
        OpCase(f"{name}[dim=0]", fn, reference, _x(0), lowp_ulps=_ULPS),
        OpCase(f"{name}[dim=1-of-3d]", fn, reference, _x(1), shapes=_MIDDLE_SHAPES, lowp_ulps=_ULPS),
        # dtype=float64 casts the input first: the output is float64, the gradient comes back in
        # the input's dtype (checked on float32 inputs by the autocast test and in
        # tests/test_softmax_norms.py). Not in the low-precision test, which wants the output in
        # the input's dtype; in float64 the cast is a no-op, so gradcheck sees the op itself.
        OpCase(f"{name}[dtype=float64]", fn, reference, _x(1, torch.float64), shapes=((2, 3), (2, 5, 13)),
               lowp_dtypes=()),
    ]


CASES = [*_cases("softmax", F.softmax, torch_reference("softmax")), *_cases("log_softmax", F.log_softmax, TF.log_softmax)]
