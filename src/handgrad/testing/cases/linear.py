from __future__ import annotations

import torch
import torch.nn.functional as TF

from ... import functional as F
from ..._compat import torch_reference
from ..registry import BadInput, Inputs, OpCase, randn


def _linear(bias: str):
    """bias: 'vector' (D_out,), 'none', or 'full' (broadcast over the whole output)."""

    def make(shape, dtype, device):
        D_in, D_out = shape[-1], 4
        x = randn(shape, dtype, device)
        w = randn((D_out, D_in), dtype, device, scale=max(D_in, 1) ** -0.5)
        b = {"vector": lambda: randn((D_out,), dtype, device), "none": lambda: None,
             "full": lambda: randn((*shape[:-1], D_out), dtype, device)}[bias]()
        return Inputs((x, w, b))

    return make


def _weight_1d(shape, dtype, device):
    # torch accepts a 1-D weight only without bias (addmm refuses a 1-D mat2)
    return Inputs((randn(shape, dtype, device), randn((shape[-1],), dtype, device)))


def _bad(what, x, w, b, names):
    return BadInput(what, lambda: Inputs((torch.randn(x), torch.randn(w), None if b is None else torch.randn(b))), names)


_BAD = (
    _bad("features mismatch", (2, 3), (5, 4), None, ("input", "weight", "[2, 3]", "[5, 4]")),
    _bad("bias of wrong size", (2, 3), (5, 3), (4,), ("bias", "[4]")),
    _bad("bias that would grow the output", (2, 4, 3), (5, 3), (3, 2, 4, 5), ("bias", "[3, 2, 4, 5]")),
    _bad("3-D weight", (2, 3), (2, 5, 3), None, ("weight", "[2, 5, 3]")),
    _bad("0-D input", (), (5, 3), None, ("input",)),
    BadInput("weight of another dtype", lambda: Inputs((torch.randn(2, 3), torch.randn(5, 3, dtype=torch.float64))),
             ("weight", "torch.float64")),
)

CASES = [
    OpCase("linear", F.linear, TF.linear, _linear("vector"), shapes=((2, 3), (7, 13), (2, 5, 13), (0, 13), (13,)),
           bad_inputs=_BAD),
    OpCase("linear[no-bias]", F.linear, TF.linear, _linear("none")),
    OpCase("linear[full-bias]", F.linear, torch_reference("linear"), _linear("full"), shapes=((2, 3), (2, 5, 13))),
    OpCase("linear[1d-weight]", F.linear, TF.linear, _weight_1d, shapes=((2, 3), (13,))),
]
