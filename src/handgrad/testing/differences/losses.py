"""The deliberate differences of the losses (nll_loss, cross_entropy, linear_cross_entropy,
mse_loss, binary_cross_entropy_with_logits, half_squared_error).
Entries of ``differences.DIFFERENCES`` (see its docstring for the fields)."""
from __future__ import annotations

import math

import torch

from .entry import Difference, _complex_argument, _input, _magnitude, _not_tensor, _specs

__all__ = ["LOSSES"]


def _noncontiguous_kdim(call) -> bool:
    from ..fuzz.call import Spec
    x = _input(call)
    return isinstance(x, Spec) and len(x.shape) >= 3 and bool(x.view)


def _scalar_input(call) -> bool:
    x = _input(call)
    return not _not_tensor(call) and len(x.shape) == 0


def _weighted_nonfloat_mse(call) -> bool:
    # the weighted path's result type is integer or complex: torch computes it elementwise
    specs = _specs(call, "weight")
    if call.kwargs.get("weight") is None or len(specs) < 3:
        return False
    dtype = specs[0].dtype
    for s in specs[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return not dtype.is_floating_point and dtype != torch.bool and torch.bool not in (specs[0].dtype, specs[1].dtype)


def _loss_may_overflow(call) -> bool:
    # a non-finite argument, or a loss term (or a partial sum of them, or Σ w) past the largest
    # value of a dtype the formula rounds to: the arguments' own and the result's
    specs = _specs(call, "weight", "pos_weight")
    if len(specs) < 2 or not all(s.dtype.is_floating_point for s in specs[:2]):
        return False
    mags = [_magnitude(s) for s in specs]
    if any(math.isinf(m) for m in mags):
        return True
    n = max(max(math.prod(s.shape) for s in specs), 1)
    x, t = mags[0], mags[1]
    try:
        term = (x + t) ** 2 if call.op == "mse_loss" else x + t
    except OverflowError:
        return True
    for m in mags[2:]:
        term *= max(m, 1.0)
    smallest = min(torch.finfo(s.dtype).max for s in specs)
    return term * n >= smallest or any(m * n >= smallest for m in mags[2:])


def _weighted_mean_one_distance(call) -> bool:
    # a weighted 'mean' mse_loss whose squared errors are all equal (one element, or constant)
    from ..fuzz.call import _view
    specs = _specs(call)
    if call.kwargs.get("weight") is None or call.kwargs.get("reduction", "mean") not in ("mean", "elementwise_mean"):
        return False
    if len(specs) < 2 or not all(s.dtype.is_floating_point for s in specs[:2]):
        return False
    x, y = (_view(s.base.to(s.dtype).double(), s.view) for s in specs[:2])
    try:
        d2 = (x - y) ** 2
    except RuntimeError:
        return False
    return d2.numel() > 0 and bool((d2 == d2.reshape(-1)[0]).all())


def _class_call(call):
    """(input, target, kwargs) of a cross_entropy / nll_loss / linear_cross_entropy call."""
    if call.op == "linear_cross_entropy":
        return call.args[0], call.args[2] if len(call.args) > 2 else None
    return call.args[0], call.args[1] if len(call.args) > 1 else None


def _smoothing(call) -> float:
    eps = call.kwargs.get("label_smoothing", 0.0)
    return float(eps) if isinstance(eps, (int, float)) and not isinstance(eps, bool) else 0.0


def _byte_target_smoothed_weighted(call) -> bool:
    _, t = _class_call(call)
    return getattr(t, "dtype", None) == torch.uint8 and _smoothing(call) > 0 and call.kwargs.get("weight") is not None


def _byte_target_kdim_empty(call) -> bool:
    x, t = _class_call(call)
    dims = len(x.shape) + (len(call.args[1].shape) - 2 if call.op == "linear_cross_entropy" else 0)
    return getattr(t, "dtype", None) == torch.uint8 and dims > 2 and math.prod(t.shape) == 0


def _no_classes_smoothed(call) -> bool:
    x, t = _class_call(call)
    if call.op == "linear_cross_entropy":
        C = call.args[1].shape[0]
    else:
        C = x.shape[1] if len(x.shape) > 1 else (x.shape[0] if x.shape else 1)
    return C == 0 and _smoothing(call) > 0


LOSSES: tuple[Difference, ...] = (
    *(Difference(
        "K-dim input, non-contiguous: a backward", op, ("backward",), _noncontiguous_kdim,
        "nll_loss/cross_entropy of a non-contiguous (N, C, d1, …) input computes the loss, then its "
        "backward raises RuntimeError: grad_input must be contiguous",
        "the gradient, for any layout",
        "The forward is accepted; a layout is not a reason to refuse its gradient (torch's own message "
        "names an internal buffer, not an argument).",
        "F.nll_loss(torch.randn(1, 2, 5, 3).transpose(1, 3).requires_grad_(), torch.zeros(1, 5, 2, "
        "dtype=torch.long)).backward()") for op in ("nll_loss", "cross_entropy")),
    Difference(
        "half_squared_error: refuses a 0-d input", "half_squared_error", ("exception",), _scalar_input,
        "its composition 0.5·((x − y)²).sum(−1) treats a 0-d x as one row of one feature",
        "ValueError: half_squared_error: input must have at least 1 dimension (the features)",
        "The loss is defined over rows of features (Σ_n ½‖x_n − y_n‖²); a 0-d tensor has none, and "
        "silently treating it as one feature hides a wrong shape.",
        "F.half_squared_error(torch.tensor(1.0), torch.tensor(0.0))"),
    Difference(
        "half_squared_error: complex refused", "half_squared_error", ("exception", "dtype"), _complex_argument,
        "its composition 0.5·((x − y)²).sum(−1) returns a complex (x − y)², not the squared distance |x − y|²",
        "NotImplementedError: a squared error is computed in floating types only",
        "(x − y)² of complex values is not a squared error (it is not even real); a wrong-typed result is "
        "worse than a refusal. torch's own mse_loss refuses complex input (NotImplementedError).",
        "F.half_squared_error(torch.ones(2, dtype=torch.complex64), torch.zeros(2, dtype=torch.complex64))"),
    Difference(
        "mse_loss: a weighted integer or complex loss refused", "mse_loss", ("exception", "dtype", "output", "value"),
        _weighted_nonfloat_mse,
        "with weight, its Python path computes (x − y)² ⊙ w elementwise: integer arguments give an integer loss "
        "(and 'mean' a float one), complex ones a complex (x − y)²; without weight the same dtypes raise "
        "NotImplementedError (\"mse_cpu\" not implemented)",
        "NotImplementedError, with or without weight",
        "Whether an integer or complex input is valid cannot depend on whether a weight is given; torch's "
        "own kernel refuses those dtypes, and (x − y)² of complex values is not a squared error.",
        "F.mse_loss(torch.ones(2, dtype=torch.long), torch.zeros(2, dtype=torch.long), weight=torch.ones(2, "
        "dtype=torch.long), reduction='sum')"),
    *(Difference(
        "an infinite argument or an overflowing loss", op, ("value", "grad"), _loss_may_overflow,
        "the loss is computed in the arguments' dtypes by its direct formula: an inf argument or a term past "
        "the dtype's largest value makes inf − inf or 0 · inf, so nan (mse_loss's float16 weighted loss sums "
        "+inf and −inf terms; binary_cross_entropy_with_logits's (1 − t)x − log σ(x) at x = −inf)",
        "the stable form in float32 (float64 for float64), rounded once: the loss's limit, ±inf with the "
        "truth's sign where the value overflows the result's dtype",
        "An overflow to ±inf of the right sign is the correctly rounded result; nan from an intermediate "
        "that overflows where the true value (or its limit) exists is an artefact of the formula.",
        "F.binary_cross_entropy_with_logits(torch.tensor([-math.inf]), torch.tensor([0.5]))")
      for op in ("mse_loss", "binary_cross_entropy_with_logits")),
    Difference(
        "mse_loss: the weight's gradient exact where every squared error is equal", "mse_loss", ("grad",),
        _weighted_mean_one_distance,
        "the weighted 'mean' L = Σ w(x − y)² / Σ w has ∂L/∂w_k = ((x_k − y_k)² − L)/Σ w, 0 where every "
        "(x − y)² is the same (one element); torch's is a rounding residue of the two terms (3e-8 for a "
        "float64 (x − y)² of 5e7)",
        "0 exactly: both terms are taken relative to one of the squared errors",
        "That is the exact value; torch's is the residue of a cancellation.",
        "torch.autograd.grad(F.mse_loss(torch.tensor(7115.4, dtype=torch.double), torch.tensor(1.09, dtype="
        "torch.double), weight=w), w) for w = torch.tensor(0.685, dtype=torch.double, requires_grad=True)"),
    *(Difference(
        "Byte targets with label smoothing and a class weight", op, ("exception",), _byte_target_smoothed_weighted,
        "RuntimeError: gather(): Expected dtype int32/int64 for index: its label-smoothing path gathers the class "
        "weight with the target as an index, which must not be uint8 there (it is accepted everywhere else, "
        "smoothed or weighted alone)",
        "the loss, as for an int64 target of the same values",
        "Byte targets are valid for 1-D and 2-D inputs; the refusal is an internal gather's dtype rule leaking "
        "out of one combination of options.",
        "F.cross_entropy(torch.randn(3, 2), torch.zeros(3, dtype=torch.uint8), weight=torch.ones(2), "
        "label_smoothing=0.5)") for op in ("cross_entropy", "linear_cross_entropy")),
    *(Difference(
        "an empty Byte target with a K-dim input", op, ("exception", "backward"), _byte_target_kdim_empty,
        "Byte targets are refused for K-dim input (RuntimeError) except when the target is empty and the "
        "reduction 'mean' or 'sum': then the forward runs and its backward raises the same RuntimeError",
        "an empty target is accepted, forward and backward (the loss of no element, its gradient zeros)",
        "A forward torch accepts should be differentiable; with no element there is no index whose type matters.",
        "F.nll_loss(torch.randn(2, 3, 0, 4, requires_grad=True), torch.zeros(2, 0, 4, dtype=torch.uint8))"
        ".backward()") for op in ("cross_entropy", "nll_loss", "linear_cross_entropy")),
    *(Difference(
        "label smoothing with no classes", op, ("value",), _no_classes_smoothed,
        "with C = 0 classes its smoothing term is −(ε/C) Σ log p = 0 · (ε/0), so a 'sum' is nan",
        "0: with no class there is no smoothing term (a 'mean' is 0/0 = nan, as torch's)",
        "The smoothing spreads ε over the classes; with none there is nothing to spread, and the sum of no "
        "term is 0.",
        "F.cross_entropy(torch.randn(0, 0), torch.zeros(0, dtype=torch.long), reduction='sum', label_smoothing=0.5)")
      for op in ("cross_entropy", "linear_cross_entropy")),
)
