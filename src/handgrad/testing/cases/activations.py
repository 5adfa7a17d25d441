from __future__ import annotations

import torch

from ... import functional as F
from ..registry import Inputs, OpCase, randn


def _x(shape, dtype, device):
    return Inputs((randn(shape, dtype, device, scale=2.0),))


CASES = [
    OpCase("sigmoid", F.sigmoid, torch.sigmoid, _x),
]
