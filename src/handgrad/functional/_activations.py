from __future__ import annotations

import torch

from ..ops.activations import ElementwiseFn, get_activation
from ._common import check_tensor

__all__ = ["sigmoid"]


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    """``torch.nn.functional.sigmoid``; backward y(1 − y) from the saved output."""
    check_tensor("input", input, fn="sigmoid")
    return ElementwiseFn.call(input, get_activation("sigmoid"))
