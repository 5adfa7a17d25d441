"""The deliberate differences of the normalisations (layer_norm, group_norm, batch_norm, rms_norm).
Entries of ``differences.DIFFERENCES`` (see its docstring for the fields)."""
from __future__ import annotations

import math

import torch

from .entry import Difference, _complex_argument, _input, _not_tensor, _opmath_max

__all__ = ["NORMS"]


def _layer_norm_overflow(call) -> bool:
    # (x − μ)² overflows the opmath dtype for |x − μ| ≥ √max (float32 1.8e19, float64 1.3e154)
    x, ns = _input(call), call.args[1] if len(call.args) > 1 else None
    if _not_tensor(call) or not isinstance(ns, (list, tuple)) or not ns or not x.dtype.is_floating_point:
        return False
    v = x.base.detach().to(x.dtype).double()
    if len(x.shape) < len(ns) or v.numel() == 0:
        return False
    from ..fuzz.call import _view
    v = _view(v, x.view) if x.view else v
    v = v.where(v.isfinite(), 0.0)
    # torch squares the values themselves (not only their deviations) somewhere: rows of huge
    # values fail there even when constant
    return bool((v.abs() >= math.sqrt(_opmath_max(x.dtype) / max(math.prod(ns), 1)) / 2).any())


def _layer_norm_constant_row(call) -> bool:
    # a row that is constant after rounding (one element: always)
    x, ns = _input(call), call.args[1] if len(call.args) > 1 else None
    if _not_tensor(call) or not isinstance(ns, (list, tuple)) or not ns:
        return False
    if not x.dtype.is_floating_point or len(x.shape) < len(ns) or x.base.numel() == 0:
        return False
    from ..fuzz.call import _view
    v = x.base.detach().to(x.dtype).double()
    v = _view(v, x.view) if x.view else v
    rows = v.reshape(-1, math.prod(ns)) if math.prod(ns) else v.reshape(0, 0)
    if rows.numel() == 0:
        return False
    const = (rows == rows[:, :1]).all(1) & rows[:, 0].isfinite()
    return bool(const.any())


def _half_input_float32_bias(call) -> bool:
    x, w, b = _input(call), call.kwargs.get("weight"), call.kwargs.get("bias")
    return (not _not_tensor(call) and x.dtype in (torch.float16, torch.bfloat16) and w is None
            and getattr(b, "dtype", None) == torch.float32)


def _bias_without_weight(call) -> bool:
    return call.kwargs.get("weight") is None and call.kwargs.get("bias") is not None


def _strided_weight(call) -> bool:
    w = call.kwargs.get("weight")
    return w is not None and bool(getattr(w, "view", ()))


def _constant_groups(call) -> bool:
    # a group that is constant after rounding (one element: always)
    from ..fuzz.call import Spec, _view
    x, G = _input(call), call.args[1] if len(call.args) > 1 else None
    if not isinstance(x, Spec) or len(x.shape) < 2 or not isinstance(G, int) or G <= 0 or x.shape[1] % G:
        return False
    if x.shape[1] // G * math.prod(x.shape[2:]) == 1:
        return True
    if not x.dtype.is_floating_point or x.base.numel() == 0:
        return False
    v = x.base.detach().to(x.dtype).double()
    v = _view(v, x.view) if x.view else v
    if v.numel() == 0:
        return False
    sets = v.reshape(v.shape[0] * G, -1)
    return bool(((sets == sets[:, :1]).all(1) & sets[:, 0].isfinite()).any())


def _squares_overflow(call) -> bool:
    # |x| ≥ √(max/n)/2 somewhere (n: x's elements), so a set's squares may overflow the opmath dtype
    x = _input(call)
    if _not_tensor(call) or not x.dtype.is_floating_point or x.base.numel() == 0:
        return False
    v = x.base.detach().to(x.dtype).double()
    v = v.where(v.isfinite(), 0.0)
    return bool((v.abs() >= math.sqrt(_opmath_max(x.dtype) / max(math.prod(x.shape), 1)) / 2).any())


def _infinite_input(call) -> bool:
    # ±inf in x, with rows of one element (normalized_shape's product 1)
    x, ns = _input(call), call.args[1] if len(call.args) > 1 else None
    if _not_tensor(call) or not isinstance(ns, (list, tuple)) or math.prod(ns) != 1 or not x.dtype.is_floating_point:
        return False
    return x.base.numel() > 0 and bool(x.base.detach().to(x.dtype).isinf().any())


def _zero_eps_constant_group(call) -> bool:
    # eps = 0 (batch norm refuses it in training) and a group constant after rounding
    return call.kwargs.get("eps") == 0 and _constant_groups(call)


def _float_weight(call):
    """The call's floating, non-empty weight ``Spec`` (batch_norm's may be positional), or None."""
    from ..fuzz.call import Spec
    w = call.kwargs.get("weight")
    if call.op == "batch_norm" and not isinstance(w, Spec) and len(call.args) > 3:
        w = call.args[3]
    return w if isinstance(w, Spec) and w.dtype.is_floating_point and w.base.numel() > 0 else None


def _infinite_weight(call) -> bool:
    # a weight with ±inf after rounding to its dtype (1e300 in bfloat16 is inf)
    w = _float_weight(call)
    return w is not None and not bool(w.base.detach().to(w.dtype).isfinite().all())


def _gradient_may_overflow(call) -> bool:
    # ∂L/∂x = rstd·(G⊙w − …) with rstd ≤ 1/√eps: a weight near max·√eps may take it past the dtype
    x, w = _input(call), _float_weight(call)
    if _not_tensor(call) or w is None:
        return False
    eps = call.kwargs.get("eps")
    eps = torch.finfo(x.dtype).eps if not isinstance(eps, (int, float)) or eps <= 0 else eps
    wmax = float(w.base.detach().to(w.dtype).double().abs().max())
    return wmax / math.sqrt(eps) >= torch.finfo(x.dtype).max / 64


NORMS: tuple[Difference, ...] = (
    *(Difference(
        f"{op}: a gradient past the dtype's range has its sign", op, ("grad",), _gradient_may_overflow,
        "∂L/∂x = rstd·(G⊙w − mean(G⊙w) − x̂·mean(G⊙w⊙x̂)) with a weight near the dtype's max: its kernel "
        "forms rstd·(G⊙w) and rstd·x̂·(…) apart, both overflow, and inf − inf gives nan",
        "±inf with the sign of the float64 gradient: the bracket first, then ·rstd (rstd·n₂ is formed only "
        "where it fits)",
        "The true gradient is finite but past the dtype's range, so the rounded answer is ±inf of its "
        "sign; nan says the value is undefined, which it is not.",
        "torch.autograd.grad(F.rms_norm(x, (3,), w), x, torch.ones(3)) for x = torch.tensor([1.4e-3, 1.6e-3, "
        "-1.9e-3]), w = torch.full((3,), 6.7e37) (torch: nan, nan, inf; handgrad inf, inf, inf; float64: "
        "3.3e40, 3.2e40, 5.0e40)") for op in ("layer_norm", "rms_norm", "group_norm", "batch_norm")),
    Difference(
        "layer_norm: rows of values whose squares overflow", "layer_norm", ("value", "grad"),
        _layer_norm_overflow,
        "rows with |x| ≥ √(max/D) (float32 ~1e19, float64 ~1e154) normalise to nan or to 0 by the "
        "row: (1e24, −1e24, 3) gives 0, neither being the normalised row (1.22, −1.22, 0); even a "
        "constant or one-element row of −1e300 gives nan",
        "the exact x̂ where the deviations' squares fit (a constant row: 0), nan where they overflow",
        "handgrad squares only the deviations from the row's first element, so it loses a row only "
        "when its deviations overflow, and then says so with a nan instead of a plausible wrong 0. "
        "(An overflow-free variance would cost an extra pass over every row.)",
        "F.layer_norm(torch.tensor([[1e24, -1e24, 3.0]]), (3,))"),
    Difference(
        "layer_norm: constant rows are exact", "layer_norm", ("grad",), _layer_norm_constant_row,
        "its backward's x̂ of a constant row is a rounding residue of about |x|·eps·rstd (so ∂L/∂w = "
        "Σ G ⊙ x̂ is −2e-13 for a one-element float64 row of −63); its float32 ∂L/∂x of a constant row of "
        "magnitude ≥ ~1e6 is 0 (its backward cancels x against the row mean)",
        "x̂ = 0 exactly (the row is shifted by its first element), ∂L/∂w = 0, and ∂L/∂x = rstd·(G − mean G)",
        "Those are the exact values, the ones torch's own float64 gives for ∂L/∂x; torch's are "
        "cancellation residues.",
        "torch.autograd.grad(F.layer_norm(torch.full((5,), 1e12, requires_grad=True), (5,)), ..., "
        "torch.tensor([1., -2., .5, .25, 3.]))"),
    Difference(
        "layer_norm: half input with a float32 bias differentiates", "layer_norm", ("backward",),
        _half_input_float32_bias,
        "layer_norm(x_half, shape, bias=b_float32) computes the forward (its mixed-dtype kernel) but "
        "its backward raises RuntimeError: expected scalar type Half but found Float",
        "the same forward, and a backward: ∂L/∂x in half, ∂L/∂b in float32",
        "A forward torch accepts should be differentiable; the backward refusal is an accident of "
        "torch's dtype dispatch (with a float32 weight as well, torch differentiates it).",
        "F.layer_norm(torch.randn(2, 3, dtype=torch.half, requires_grad=True), (3,), "
        "bias=torch.zeros(3, requires_grad=True)).sum().backward()"),
    Difference(
        "group_norm: a bias without a weight differentiates", "group_norm", ("backward",), _bias_without_weight,
        "group_norm(x, G, bias=b) computes the forward, but its backward raises RuntimeError: tensor does not "
        "have a device (for any dtype, whether or not x requires grad)",
        "the same forward, and its backward: ∂L/∂x as with a weight of ones, ∂L/∂b = Σ G per channel",
        "A forward torch accepts should be differentiable; with a weight as well torch differentiates it, so "
        "the refusal is an accident of its backward's undefined-weight path.",
        "F.group_norm(torch.randn(2, 4, 3, requires_grad=True), 2, bias=torch.zeros(4)).sum().backward()"),
    Difference(
        "group_norm: constant groups are exact", "group_norm", ("value", "grad"),
        lambda call: call.kwargs.get("eps") != 0 and _constant_groups(call),
        "a constant group (one element: always) normalises to a rounding residue of x·rstd: its "
        "Y = X·(rstd·w) + (b − μ·rstd·w) rounds the two products apart (∂L/∂x of a one-element group is "
        "1e-13, not 0, in float64; its float32 output is off by 5e-3 for |x| ~ 1e3; ∂L/∂w of float64 "
        "groups of 1e39 is 2e24, not 0), and its ∂L/∂x may cancel to 0 where it is rstd·(gy − mean gy)",
        "x̂ = 0 exactly, so y = b, ∂L/∂w = 0 and ∂L/∂x = rstd·(gy − mean(gy)) (0 for one element)",
        "Those are the exact values: a constant group is its own mean. As for layer_norm's constant rows.",
        "F.group_norm(torch.tensor([[601.14, -1200.3]]).repeat(2, 1), 2, bias=torch.zeros(2))"),
    *(Difference(
        f"{op}: an infinite weight", op, ("value", "grad"), _infinite_weight,
        "w = ±inf: Y = X·(rstd·w) + (b − μ·rstd·w) is inf − inf = nan where X and μ share a sign, ±inf "
        "elsewhere (its eval kernel: nan or ±inf by the input's layout, contiguous or strided)",
        "training: Y = x̂·w + b, ±inf (nan only where x̂ = 0); eval: X·α + β as torch's contiguous kernel",
        "x̂·w is the limit of the normalised output as w grows; torch's nan comes from the order of its "
        "per-channel products, not from the math (its own float64 gives it too).",
        "F.group_norm(torch.tensor([[[1.0, 2.0, 4.0]]]), 1, weight=torch.tensor([math.inf]))")
      for op in ("batch_norm", "group_norm")),
    *(Difference(
        f"{op}: an infinite weight's ∂L/∂x", op, ("grad",), _infinite_weight,
        "gy = G ⊙ w is infinite, and its ∂L/∂x = rstd·(gy − mean(gy) − x̂·mean(gy ⊙ x̂)) subtracts "
        "infinities: nan (for a one-element RMS row too, where the derivative is w·eps·rstd³)",
        "the same formula in its own order (±inf or nan by element); a one-element RMS row's exact "
        "gy·eps·rstd³ = ±inf",
        "Where the row has more than one element the value is ∞ − ∞, undefined either way; where it has "
        "one, ±inf is the limit and torch's nan the cancellation form's artefact.",
        "torch.autograd.grad(F.rms_norm(torch.tensor([-2.0], requires_grad=True), (1,), "
        "weight=torch.tensor([math.inf])), ...)")
      for op in ("layer_norm", "rms_norm")),
    *(Difference(
        f"{op}: sets whose squares overflow are normalised", op, ("value", "grad"), _squares_overflow,
        "a set with |x − μ| past √max (float32 ~1e19, float64 ~1e154) has var = inf: rstd = 0, so x̂ = 0 "
        "(Y = b, no share in ∂L/∂w), or nan by its kernel's order",
        "the normalised set: its statistics again with X scaled by max|X − x₀| (ops/normalize_fast.py, "
        "rescue_overflow), on the fast path (eager forward, first-order backward)",
        "x̂ is scale-invariant and finite; the overflow is an artefact of squaring unscaled values. "
        "(layer_norm gives nan there instead: its own entry.)",
        repro)
      for op, repro in (("batch_norm", "F.batch_norm(torch.tensor([[1e24], [-1e24], [3.0]]), None, None, training=True)"),
                        ("group_norm", "F.group_norm(torch.tensor([[[1e24, -1e24, 3.0]]]), 1)"),
                        ("rms_norm", "F.rms_norm(torch.tensor([[1e24, -1e24, 3.0]]), (3,))"))),
    Difference(
        "group_norm: eps = 0 and a constant group", "group_norm", ("value", "grad"), _zero_eps_constant_group,
        "var = 0, rstd = inf: x̂ = (x − μ)·rstd is a rounding residue of x − μ times inf (±inf, or nan), "
        "and ∂L/∂w = Σ G ⊙ x̂ with it",
        "x − μ = 0 exactly, so x̂ = 0·inf = nan, and ∂L/∂w nan",
        "x̂ is 0/0 there, undefined: nan says so, where torch's ±inf depends on how its mean rounds.",
        "F.group_norm(torch.full((2, 3, 4), 0.1), 3, eps=0.0)"),
    Difference(
        "rms_norm: an infinite x in a one-element row", "rms_norm", ("grad",), _infinite_input,
        "x = ±inf: rstd = 0, and rstd·(v − x̂·mean(v ⊙ x̂)) is 0·(inf − inf) = nan",
        "∂L/∂x = v·eps·rstd³ = 0 (ops/normalize.py's one-element form)",
        "0 is the limit of eps/(x² + eps)^{3/2} as |x| grows; torch's nan is its cancellation form's.",
        "torch.autograd.grad(F.rms_norm(torch.tensor([-math.inf], requires_grad=True), (1,)), ...)"),
    Difference(
        "batch_norm: a non-contiguous weight", "batch_norm", ("value", "grad"), _strided_weight,
        "batch_norm's CPU backward with a strided weight view (w[::2]) gives a wrong ∂L/∂x (3.18 where the "
        "same weight, contiguous, gives 2.70), in float64 too",
        "the same gradient for any layout of the weight",
        "The gradient cannot depend on the weight's memory layout; torch's reads the weight as if it were "
        "contiguous.",
        "x = torch.randn(7, 5, dtype=torch.double, requires_grad=True); w = torch.randn(10, dtype=torch.double)"
        "[::2]; compare torch.autograd.grad(F.batch_norm(x, None, None, w, training=True), x, G) with "
        "w.contiguous()"),
    Difference(
        "rms_norm: complex input refused", "rms_norm", ("exception",), _complex_argument,
        "its composite computes x · rsqrt(mean(x²) + eps) for complex x too: mean(x²) is not the mean square "
        "|x|², so the result is not normalised (and depends on the phase)",
        "NotImplementedError, as torch's own layer_norm, batch_norm and group_norm for complex input",
        "An RMS norm of complex values needs |x|²; a wrong-valued result is worse than a refusal.",
        "F.rms_norm(torch.tensor([[1j, 1.0]]), (2,))"),
)
