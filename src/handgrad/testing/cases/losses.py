"""Registry cases for the losses: each loss × the reductions × the options that change the math
(weight, ignore_index present in the batch, label_smoothing, probability targets, K-dim and
unbatched inputs, pos_weight, broadcast targets). Integer targets never require grad; float
targets that torch differentiates do.

'mean' over an empty batch is nan (torch's too), which the registry's parity test (assert_close,
nan ≠ nan) cannot compare, so empty shapes go to the 'sum'/'none' cases; tests/test_losses.py
checks the nan of an empty mean by name.
"""
from __future__ import annotations

import torch
import torch.nn.functional as TF
from ..._compat import nn_reduction as _Reduction

from ... import functional as F
from ..._compat import torch_reference
from ..registry import BadInput, Inputs, OpCase, randn


# Input shapes for the class losses (the shape is the input's: (N, C, d1, …), or (C,) unbatched)
CLASS_SHAPES = ((2, 3), (7, 13), (2, 5, 13), (13,))
K_DIM_SHAPES = ((7, 13), (2, 3, 4, 5), (2, 3, 2, 2, 2), (2, 3, 1, 2, 2, 2))  # K = 0, 2, 3, 4


def half_squared_error_reference(input, target, reduction="sum"):
    """The seed's loss in plain torch ops: Σ_n ½‖x_n − y_n‖²."""
    _Reduction.get_enum(reduction)  # torch's reduction check (ValueError)
    per_row = 0.5 * ((input - target) ** 2).sum(-1)
    return {"none": per_row, "sum": per_row.sum(), "mean": per_row.mean()}[reduction]


# ---------------------------------------------------------------------------------------------
# Input makers
# ---------------------------------------------------------------------------------------------

def _pair(*, reduction, weight=False, target_shape=None):
    """(input, target) for the elementwise losses; target_shape 'row' broadcasts one row."""

    def make(shape, dtype, device):
        x = randn(shape, dtype, device)
        t_shape = shape[-1:] if target_shape == "row" else shape
        t = randn(t_shape, dtype, device)
        kwargs = {"reduction": reduction}
        if weight:
            kwargs["weight"] = (torch.rand(shape, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device).requires_grad_()
        return Inputs((x, t), kwargs)

    return make


def _class_index_target(shape, device, ignore_index=None):
    """Class indices for an input of ``shape``; every third position (from the third) set to
    ignore_index, so an unbatched target stays kept. An in-range ignore_index also turns up in
    other positions by chance, except the first of each three, which is kept."""
    C = shape[1] if len(shape) >= 2 else shape[0]
    t_shape = shape[:1] + shape[2:] if len(shape) >= 2 else ()
    y = torch.randint(0, C, t_shape)
    if ignore_index is not None:
        flat = y.view(-1)
        flat[2::3] = ignore_index
        if 0 <= ignore_index < C:
            first = flat[0::3]
            flat[0::3] = torch.where(first == ignore_index, (ignore_index + 1) % C, first)
    return y.to(device)


def _classes(*, reduction, weight=False, ignore_index=None, label_smoothing=None, logits_scale=2.0):
    """(logits or log-probs, class-index target) plus the options that change the math."""

    def make(shape, dtype, device):
        C = shape[1] if len(shape) >= 2 else shape[0]
        x = randn(shape, dtype, device, scale=logits_scale)
        kwargs = {"reduction": reduction}
        if weight:
            kwargs["weight"] = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
        if ignore_index is not None:
            kwargs["ignore_index"] = ignore_index
        if label_smoothing is not None:
            kwargs["label_smoothing"] = label_smoothing
        return Inputs((x, _class_index_target(shape, device, ignore_index)), kwargs)

    return make


def _probs(*, reduction, weight=False, label_smoothing=None):
    """(logits, class-probability target, differentiable) for cross_entropy."""

    def make(shape, dtype, device):
        class_dim = 1 if len(shape) >= 2 else 0
        C = shape[class_dim]
        x = randn(shape, dtype, device, scale=2.0)
        t = torch.randn(shape, dtype=torch.float64).softmax(class_dim).to(dtype=dtype, device=device).requires_grad_()
        kwargs = {"reduction": reduction}
        if weight:
            kwargs["weight"] = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
        if label_smoothing is not None:
            kwargs["label_smoothing"] = label_smoothing
        return Inputs((x, t), kwargs)

    return make


def _bce(*, reduction, weight=False, pos_weight=False):
    """(logits, target in [0, 1], differentiable) with per-class weight / pos_weight (D,)."""

    def make(shape, dtype, device):
        x = randn(shape, dtype, device, scale=2.0)
        t = torch.rand(shape, dtype=torch.float64).to(dtype=dtype, device=device).requires_grad_()
        kwargs = {"reduction": reduction}
        if weight:
            kwargs["weight"] = (torch.rand(shape[-1], dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
        if pos_weight:
            kwargs["pos_weight"] = (torch.rand(shape[-1], dtype=torch.float64) * 3).to(dtype=dtype, device=device)
        return Inputs((x, t), kwargs)

    return make


# ---------------------------------------------------------------------------------------------
# Bad inputs (the test derives the expected exception type from torch)
# ---------------------------------------------------------------------------------------------

def _bad(what, make, names):
    return BadInput(what, make, names)


def _idx(*values):
    return torch.tensor(values, dtype=torch.long)


def _class_bad(fn_name):
    bad = [
        _bad("class index out of range", lambda: Inputs((torch.randn(2, 3), _idx(0, 5))), ("target", "5", "[2, 3]")),
        _bad("negative class index", lambda: Inputs((torch.randn(2, 3), _idx(0, -1))), ("target", "-1", "[2, 3]")),
        _bad("batch size mismatch", lambda: Inputs((torch.randn(2, 3), _idx(0, 1, 2))), ("target", "[2, 3]", "[3]")),
        _bad("K-dim target of wrong shape", lambda: Inputs((torch.randn(2, 3, 4), torch.zeros(2, 5, dtype=torch.long))),
             ("target", "[2, 3, 4]", "[2, 5]")),
        _bad("2-D target for 2-D input", lambda: Inputs((torch.randn(2, 3), torch.zeros(2, 1, dtype=torch.long))),
             ("target", "[2, 1]", "[2, 3]")),
        _bad("float class indices", lambda: Inputs((torch.randn(2, 3), torch.tensor([0.0, 1.0]))),
             ("target", "torch.float32")),
        _bad("int32 class indices", lambda: Inputs((torch.randn(2, 3), torch.tensor([0, 1], dtype=torch.int32))),
             ("target", "torch.int32")),
        _bad("weight of wrong size", lambda: Inputs((torch.randn(2, 3), _idx(0, 1)), {"weight": torch.ones(4)}),
             ("weight", "[4]")),
        _bad("weight of another dtype", lambda: Inputs((torch.randn(2, 3), _idx(0, 1)),
                                                       {"weight": torch.ones(3, dtype=torch.float64)}),
             ("weight", "torch.float64")),
        _bad("weight requiring grad", lambda: Inputs((torch.randn(2, 3), _idx(0, 1)),
                                                     {"weight": torch.ones(3, requires_grad=True)}), ("weight",)),
        _bad("0-D input", lambda: Inputs((torch.tensor(1.0), torch.tensor(1.0))), ("input", "[]")),
        _bad("bad reduction", lambda: Inputs((torch.randn(2, 3), _idx(0, 1)), {"reduction": "avg"}), ("avg", "reduction")),
    ]
    if fn_name == "cross_entropy":
        bad += [
            _bad("integer class probabilities", lambda: Inputs((torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))),
                 ("target", "torch.int64")),
            _bad("ignore_index with probabilities", lambda: Inputs((torch.randn(2, 3), torch.rand(2, 3)), {"ignore_index": 1}),
                 ("ignore_index", "target")),
            _bad("label_smoothing above 1", lambda: Inputs((torch.randn(2, 3), _idx(0, 1)), {"label_smoothing": 1.5}),
                 ("label_smoothing", "1.5")),
        ]
    return tuple(bad)


_MSE_BAD = (
    _bad("shapes that do not broadcast", lambda: Inputs((torch.randn(2, 3), torch.randn(2, 4))), ("target", "[2, 3]", "[2, 4]")),
    _bad("weight of another shape", lambda: Inputs((torch.randn(2, 3), torch.randn(2, 3)), {"weight": torch.rand(3)}),
         ("weight", "[3]", "[2, 3]")),
    _bad("bad reduction", lambda: Inputs((torch.randn(2, 3), torch.randn(2, 3)), {"reduction": "avg"}), ("avg", "reduction")),
)

_HSE_BAD = (
    _bad("shapes that do not broadcast", lambda: Inputs((torch.randn(2, 3), torch.randn(2, 4))), ("target", "[2, 3]", "[2, 4]")),
    _bad("bad reduction", lambda: Inputs((torch.randn(2, 3), torch.randn(2, 3)), {"reduction": "avg"}), ("avg", "reduction")),
)

_BCE_BAD = (
    _bad("target of another shape", lambda: Inputs((torch.randn(2, 3), torch.rand(2, 4))), ("target", "[2, 3]", "[2, 4]")),
    _bad("integer target", lambda: Inputs((torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long))), ("target", "torch.int64")),
    _bad("weight that does not broadcast", lambda: Inputs((torch.randn(2, 3), torch.rand(2, 3)), {"weight": torch.rand(4)}),
         ("weight", "[4]", "[2, 3]")),
    _bad("pos_weight that grows the output", lambda: Inputs((torch.randn(2, 3), torch.rand(2, 3)), {"pos_weight": torch.rand(4, 2, 3)}),
         ("pos_weight", "[4, 2, 3]", "[2, 3]")),
    _bad("pos_weight requiring grad", lambda: Inputs((torch.randn(2, 3), torch.rand(2, 3)),
                                                     {"pos_weight": torch.rand(3, requires_grad=True)}), ("pos_weight",)),
    _bad("bad reduction", lambda: Inputs((torch.randn(2, 3), torch.rand(2, 3)), {"reduction": "avg"}), ("avg", "reduction")),
)


# ---------------------------------------------------------------------------------------------
# The cases
# ---------------------------------------------------------------------------------------------

# The first case of each loss takes the registry's default shapes; the variants take smaller
# ones (gradcheck's cost grows with the square of the size; the suite must stay fast on 2 cores).
NONEMPTY = ((2, 3), (7, 13), (2, 5, 13))
WITH_EMPTY = NONEMPTY + ((0, 13),)
SMALL = ((2, 3), (3, 2, 5))
SMALL_WITH_EMPTY = SMALL + ((0, 5),)

CASES = [
    # mse_loss: 'mean' over every element; target differentiable; weight (torch 2.13) divides the
    # mean by Σ w and is differentiable
    OpCase("mse_loss", F.mse_loss, torch_reference("mse_loss"), _pair(reduction="mean"), shapes=NONEMPTY,
           bad_inputs=_MSE_BAD),
    OpCase("mse_loss[sum,broadcast-target]", F.mse_loss, torch_reference("mse_loss"), _pair(reduction="sum", target_shape="row"),
           shapes=SMALL_WITH_EMPTY),
    OpCase("mse_loss[none]", F.mse_loss, torch_reference("mse_loss"), _pair(reduction="none"), shapes=SMALL_WITH_EMPTY),
    OpCase("mse_loss[weight]", F.mse_loss, torch_reference("mse_loss"), _pair(reduction="mean", weight=True), shapes=SMALL),
    # the seed's loss Σ_n ½‖x_n − y_n‖²
    OpCase("half_squared_error", F.half_squared_error, half_squared_error_reference, _pair(reduction="sum"),
           shapes=WITH_EMPTY + ((13,),), bad_inputs=_HSE_BAD),
    OpCase("half_squared_error[mean]", F.half_squared_error, half_squared_error_reference, _pair(reduction="mean"),
           shapes=SMALL),
    OpCase("half_squared_error[none]", F.half_squared_error, half_squared_error_reference, _pair(reduction="none"),
           shapes=SMALL_WITH_EMPTY),
    # cross_entropy, class indices
    OpCase("cross_entropy", F.cross_entropy, TF.cross_entropy, _classes(reduction="mean"), shapes=CLASS_SHAPES,
           bad_inputs=_class_bad("cross_entropy")),
    OpCase("cross_entropy[sum,weight,ignore_index]", F.cross_entropy, TF.cross_entropy,
           _classes(reduction="sum", weight=True, ignore_index=-100), shapes=((0, 13), (7, 13), (2, 3, 2, 3))),
    OpCase("cross_entropy[mean,weight,ignore_index=1,smoothing]", F.cross_entropy, TF.cross_entropy,
           _classes(reduction="mean", weight=True, ignore_index=1, label_smoothing=0.2), shapes=K_DIM_SHAPES),
    OpCase("cross_entropy[none,weight,ignore_index,smoothing]", F.cross_entropy, TF.cross_entropy,
           _classes(reduction="none", weight=True, ignore_index=-100, label_smoothing=0.1),
           shapes=((7, 13), (2, 3, 4), (0, 13), (13,))),
    # cross_entropy, class probabilities (differentiable target)
    OpCase("cross_entropy[probs]", F.cross_entropy, TF.cross_entropy, _probs(reduction="mean"),
           shapes=((2, 3), (5, 7), (2, 3, 2, 3), (13,))),
    OpCase("cross_entropy[probs,none,weight,smoothing]", F.cross_entropy, TF.cross_entropy,
           _probs(reduction="none", weight=True, label_smoothing=0.3), shapes=((5, 7), (2, 3, 4), (0, 13))),
    # nll_loss on log-probability-like inputs (any reals: the loss is linear in them)
    OpCase("nll_loss", F.nll_loss, TF.nll_loss, _classes(reduction="mean"), shapes=CLASS_SHAPES,
           bad_inputs=_class_bad("nll_loss")),
    OpCase("nll_loss[mean,weight,ignore_index=1]", F.nll_loss, TF.nll_loss,
           _classes(reduction="mean", weight=True, ignore_index=1), shapes=K_DIM_SHAPES),
    OpCase("nll_loss[sum,ignore_index]", F.nll_loss, TF.nll_loss, _classes(reduction="sum", ignore_index=-100),
           shapes=((7, 13), (0, 13), (2, 3, 4, 5))),
    OpCase("nll_loss[none,weight,ignore_index]", F.nll_loss, TF.nll_loss,
           _classes(reduction="none", weight=True, ignore_index=-100), shapes=((7, 13), (2, 5, 13), (0, 13), (13,))),
    # binary_cross_entropy_with_logits
    OpCase("binary_cross_entropy_with_logits", F.binary_cross_entropy_with_logits, TF.binary_cross_entropy_with_logits,
           _bce(reduction="mean"), shapes=NONEMPTY, bad_inputs=_BCE_BAD),
    OpCase("binary_cross_entropy_with_logits[sum,weight,pos_weight]", F.binary_cross_entropy_with_logits,
           TF.binary_cross_entropy_with_logits, _bce(reduction="sum", weight=True, pos_weight=True), shapes=SMALL_WITH_EMPTY),
    OpCase("binary_cross_entropy_with_logits[none,pos_weight]", F.binary_cross_entropy_with_logits,
           TF.binary_cross_entropy_with_logits, _bce(reduction="none", pos_weight=True), shapes=SMALL_WITH_EMPTY),
]
