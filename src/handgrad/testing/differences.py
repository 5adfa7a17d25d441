"""The deliberate differences from torch: where torch's behaviour is an accident and handgrad
keeps a better one. Data, read by the differential fuzzer (``handgrad.testing.fuzz``), which
passes a disagreement only if an entry here covers it; ``docs/differences.md`` explains each
(tests/test_fuzz.py checks that every entry is there by name).

Each entry: the op, the comparison it differs in (``kinds``, the fuzzer's mismatch kinds), the
condition on the call (a predicate on ``fuzz.call.Call``: its tensor arguments are ``Spec``s,
with the float64 values of the call's storage and the call's dtype), what torch does, what
handgrad does, and why handgrad's is better.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .differences_attention import ATTENTION

__all__ = ["Difference", "DIFFERENCES", "covering", "render"]


@dataclass(frozen=True)
class Difference:
    name: str
    op: str
    kinds: tuple[str, ...]             # the fuzzer's mismatch kinds it may show as
    when: Callable                     # Call → bool: the calls it covers
    torch: str
    handgrad: str
    why: str
    reproducer: str = ""               # a one-line call showing it


def _input(call):
    return call.args[0] if call.args else None


def _not_tensor(call) -> bool:
    from .fuzz.call import Spec
    return not isinstance(_input(call), Spec)


def _max_abs(spec) -> float:
    v = spec.base.detach().to(spec.dtype).double()
    v = v[v.isfinite()]
    return float(v.abs().max()) if v.numel() else 0.0


def _opmath_max(dtype) -> float:
    return torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).max


def _gelu_tanh_flat(call) -> bool:
    # torch's kernel squares z: z² overflows for |z| ≥ √max (float32 1.8e19, float64 1.3e154), and
    # at ±inf its 0·∞ is nan too
    x = _input(call)
    if _not_tensor(call) or call.kwargs.get("approximate") != "tanh":
        return False
    v = x.base.to(x.dtype).double()
    return bool(v.isinf().any()) or _max_abs(x) >= math.sqrt(_opmath_max(x.dtype)) / 4


def _gelu_left_tail(call) -> bool:
    # torch's Φ(z) = ½(1 + erf(z/√2)) (and the tanh form's ½(1 + tanh u)) has lost more than 6
    # bits to cancellation below z = −2.4
    x = _input(call)
    if _not_tensor(call) or call.kwargs.get("approximate", "none") not in ("none", "tanh"):
        return False
    v = x.base.to(x.dtype).double()
    return bool((v < -2.4).any())


def _has_nan(call) -> bool:
    x = _input(call)
    return not _not_tensor(call) and bool(x.base.to(x.dtype).isnan().any())


def _elu_layer_nonfinite(call) -> bool:
    # an elu layer whose pre-activation may be nan: a nan or inf anywhere in the call
    from .fuzz.call import Spec
    if "elu" not in (call.kwargs.get("activation", "relu" if call.op == "linear_act" else "sigmoid"),
                     call.kwargs.get("last_activation")):
        return False
    return any(not s.base.to(s.dtype).isfinite().all() for s in call.specs() if s.dtype.is_floating_point)


def _noncontiguous_kdim(call) -> bool:
    from .fuzz.call import Spec
    x = _input(call)
    return isinstance(x, Spec) and len(x.shape) >= 3 and bool(x.view)


def _layer_norm_overflow(call) -> bool:
    # (x − μ)² overflows the opmath dtype for |x − μ| ≥ √max (float32 1.8e19, float64 1.3e154)
    x, ns = _input(call), call.args[1] if len(call.args) > 1 else None
    if _not_tensor(call) or not isinstance(ns, (list, tuple)) or not ns or not x.dtype.is_floating_point:
        return False
    v = x.base.detach().to(x.dtype).double()
    if len(x.shape) < len(ns) or v.numel() == 0:
        return False
    from .fuzz.call import _view
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
    from .fuzz.call import _view
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


def _scalar_input(call) -> bool:
    x = _input(call)
    return not _not_tensor(call) and len(x.shape) == 0


def _high_rank_bias(call) -> bool:
    from .fuzz.call import Spec
    b = call.args[2] if len(call.args) > 2 else None
    if not isinstance(b, Spec) or len(b.shape) < 3:
        return False
    x, w = call.args[0], call.args[1]
    out = (*x.shape[:-1], *w.shape[:-1])
    try:
        return tuple(torch.broadcast_shapes(out, b.shape)) == tuple(out)
    except RuntimeError:
        return False


def _softplus_overflow(call) -> bool:
    # torch computes log1p(exp(βz)) below the threshold: exp overflows for βz > log(max)
    x = _input(call)
    if _not_tensor(call):
        return False
    beta, threshold = call.kwargs.get("beta", 1.0), call.kwargs.get("threshold", 20.0)
    if not isinstance(beta, (int, float)) or not isinstance(threshold, (int, float)):
        return False
    v = x.base.to(x.dtype).double() * beta
    v = v[v.isfinite()]
    return bool(((v > math.log(_opmath_max(x.dtype)) - 1) & (v <= threshold)).any())


def _bias_without_weight(call) -> bool:
    return call.kwargs.get("weight") is None and call.kwargs.get("bias") is not None


def _strided_weight(call) -> bool:
    w = call.kwargs.get("weight")
    return w is not None and bool(getattr(w, "view", ()))


def _one_element_groups(call) -> bool:
    from .fuzz.call import Spec
    x, G = _input(call), call.args[1] if len(call.args) > 1 else None
    if not isinstance(x, Spec) or len(x.shape) < 2 or not isinstance(G, int) or G <= 0 or x.shape[1] % G:
        return False
    return x.shape[1] // G * math.prod(x.shape[2:]) == 1



def _adaptive_size(call):
    """adaptive_avg_pool2d's output size as torch resolves it ((H_out, W_out)), or None."""
    x, size = _input(call), call.args[1] if len(call.args) > 1 else None
    if _not_tensor(call) or len(x.shape) not in (3, 4):
        return None
    if isinstance(size, int) and not isinstance(size, bool):
        return size, size
    if not isinstance(size, (tuple, list)) or len(size) != 2 or not all(v is None or isinstance(v, int) for v in size):
        return None
    return tuple(x.shape[-2 + i] if v is None else v for i, v in enumerate(size))


def _adaptive_mean_path(call) -> bool:
    # torch's adaptive_avg_pool2d takes input.mean((-1, -2)) for an output size (1, 1)
    return _adaptive_size(call) == (1, 1)


def _adaptive_empty_output(call) -> bool:
    size = _adaptive_size(call)
    return size is not None and 0 in size


def _int64_input(call) -> bool:
    return not _not_tensor(call) and _input(call).dtype == torch.int64


def _specs(call, *names):
    """The call's tensor arguments (``Spec``s): positional ones, then the named keywords."""
    from .fuzz.call import Spec
    out = [a for a in call.args if isinstance(a, Spec)]
    return out + [call.kwargs[n] for n in names if isinstance(call.kwargs.get(n), Spec)]


def _complex_argument(call) -> bool:
    return any(s.dtype.is_complex for s in _specs(call, "weight"))


def _weighted_nonfloat_mse(call) -> bool:
    # the weighted path's result type is integer or complex: torch computes it elementwise
    specs = _specs(call, "weight")
    if call.kwargs.get("weight") is None or len(specs) < 3:
        return False
    dtype = specs[0].dtype
    for s in specs[1:]:
        dtype = torch.promote_types(dtype, s.dtype)
    return not dtype.is_floating_point and dtype != torch.bool and torch.bool not in (specs[0].dtype, specs[1].dtype)


def _magnitude(spec) -> float:
    """max |v| over the argument's values as its dtype holds them (inf where one is not finite)."""
    v = spec.base.detach().to(spec.dtype)
    if not v.is_floating_point() or v.numel() == 0:
        return 0.0 if v.numel() == 0 or v.is_complex() else float(v.double().abs().max())
    v = v.double()
    return math.inf if not bool(v.isfinite().all()) else float(v.abs().max())


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
    from .fuzz.call import _view
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


DIFFERENCES: tuple[Difference, ...] = (
    Difference(
        "non-tensor input: TypeError", "sigmoid", ("exception",), _not_tensor,
        "F.sigmoid(1.5) raises AttributeError ('float' object has no attribute 'sigmoid'): it calls "
        "input.sigmoid() without a check",
        "TypeError: sigmoid(): argument 'input' must be Tensor, not float",
        "A wrong argument type is a TypeError everywhere else in torch.nn.functional; the AttributeError "
        "is an accident of the method call and names no argument.",
        "F.sigmoid(1.5)"),
    Difference(
        "non-tensor input: TypeError", "tanh", ("exception",), _not_tensor,
        "F.tanh(1.5) raises AttributeError ('float' object has no attribute 'tanh')",
        "TypeError: tanh(): argument 'input' must be Tensor, not float",
        "As for sigmoid: the AttributeError is an accident of calling input.tanh().",
        "F.tanh(1.5)"),
    Difference(
        "gelu tanh: finite gradient at huge |z|", "gelu", ("grad",), _gelu_tanh_flat,
        "gelu(z, approximate='tanh') has gradient nan for |z| ≥ 1.8e19 in float32 (z² overflows, 0·∞), "
        "1.3e154 in float64, and at z = ±inf",
        "the limit: 0 for z → −∞, 1 for z → +∞",
        "The function is flat there and its derivative's limit is finite; nan would poison a whole "
        "backward pass for one large activation.",
        "F.gelu(torch.tensor([1e20], requires_grad=True), approximate='tanh').backward()"),
    Difference(
        "gelu: the left tail exact", "gelu", ("value", "grad"), _gelu_left_tail,
        "gelu(z) = z·½(1 + erf(z/√2)) (approximate='tanh': ½z(1 + tanh u)): the sum cancels for z < 0, "
        "leaving few correct digits below z ≈ −2.4 in float64 and 0 below z ≈ −8.3 (gelu(−12.3) = −0, "
        "its gradient 1% off)",
        "z·½ erfc(−z/√2) (tanh: z·σ(2u)), exact to a rounding: gelu(−12.3) = −5.68e-34",
        "erfc and σ have no cancellation in the left tail; the value and gradient are correct to the "
        "last digit where torch's have few or none.",
        "F.gelu(torch.tensor([-12.3], dtype=torch.float64))"),
    Difference(
        "elu: gradient nan at a nan input", "elu", ("grad",), _has_nan,
        "elu's gradient at z = nan is nan in its vectorised loop but G·1 in its scalar tail: which "
        "one an element gets depends on the tensor's length and the element's position",
        "nan, for every element (f' is tested as z > 0)",
        "The derivative at nan is undefined; one consistent answer is better than one that depends "
        "on where the element falls in a SIMD loop.",
        "F.elu(torch.full((40,), float('nan'), requires_grad=True)) then .sum().backward(): "
        "torch's grad[0] is nan, grad[-1] is 1"),
    *(Difference(
        "elu layer: gradient nan at a nan pre-activation", op, ("grad",), _elu_layer_nonfinite,
        "as for elu: the composition's elu gradient at a nan z is nan or G·1 by the element's position",
        "nan, for every element (the fused op uses elu's spec)",
        "As for elu.",
        "F.linear_act(x, w_with_a_nan, activation='elu')") for op in ("linear_act", "mlp")),
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
        "silu in place on complex: the conjugate", "silu", ("grad",),
        lambda call: not _not_tensor(call) and _input(call).dtype.is_complex and bool(call.kwargs.get("inplace")),
        "silu_(z) on a complex non-leaf differentiates as G ⊙ f'(z) (out of place torch refuses complex "
        "autograd for silu altogether)",
        "G ⊙ conj f'(z), torch's convention for every holomorphic op (exp, tanh, sigmoid)",
        "torch's own convention for complex gradients is the conjugate (its docs' 'Autograd for Complex "
        "Numbers'); the in-place kernel's missing conj is inconsistent with it.",
        "torch.autograd.grad(F.silu(z * 1, inplace=True), z, G) for a complex z"),
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
        "half_squared_error: refuses a 0-d input", "half_squared_error", ("exception",), _scalar_input,
        "its composition 0.5·((x − y)²).sum(−1) treats a 0-d x as one row of one feature",
        "ValueError: half_squared_error: input must have at least 1 dimension (the features)",
        "The loss is defined over rows of features (Σ_n ½‖x_n − y_n‖²); a 0-d tensor has none, and "
        "silently treating it as one feature hides a wrong shape.",
        "F.half_squared_error(torch.tensor(1.0), torch.tensor(0.0))"),
    Difference(
        "linear: a bias of 3 or more dims that broadcasts", "linear", ("exception",), _high_rank_bias,
        "F.linear(x (1, 1, 3), w (3, 3), b (1, 1, 3)) raises RuntimeError (its addmm path expands the "
        "bias to 2-D (rows, out)), while it computes x (1, 2, 3) with b (1, 2, 3)",
        "x Wᵀ + b with b broadcast to the output, on every path",
        "The result is well defined and torch computes it for other shapes of the same rank; the "
        "refusal depends on which internal kernel the shapes select.",
        "F.linear(torch.randn(1, 1, 3), torch.randn(3, 3), torch.randn(1, 1, 3))"),
    Difference(
        "softplus: no overflow below a large threshold", "softplus", ("value", "grad"), _softplus_overflow,
        "softplus(z, threshold=t) computes log1p(exp(βz))/β for βz ≤ t: inf (and gradient nan) once "
        "βz > 88 in float32 (709 in float64)",
        "max(βz, 0) + log1p(e^{−|βz|}), over β: the exact value (≈ z) and gradient σ(βz) ≈ 1",
        "The function is finite and ≈ z there; the overflow is an artefact of the unstable form.",
        "F.softplus(torch.tensor([100.0]), threshold=1e4)"),
    Difference(
        "group_norm: a bias without a weight differentiates", "group_norm", ("backward",), _bias_without_weight,
        "group_norm(x, G, bias=b) computes the forward, but its backward raises RuntimeError: tensor does not "
        "have a device (for any dtype, whether or not x requires grad)",
        "the same forward, and its backward: ∂L/∂x as with a weight of ones, ∂L/∂b = Σ G per channel",
        "A forward torch accepts should be differentiable; with a weight as well torch differentiates it, so "
        "the refusal is an accident of its backward's undefined-weight path.",
        "F.group_norm(torch.randn(2, 4, 3, requires_grad=True), 2, bias=torch.zeros(4)).sum().backward()"),
    Difference(
        "group_norm: one-element groups are exact", "group_norm", ("value", "grad"), _one_element_groups,
        "a group of one element normalises to a rounding residue of x·rstd (its ∂L/∂x is 1e-13, not 0, in "
        "float64; its float32 output is off by 5e-3 for |x| ~ 1e3)",
        "x̂ = 0 exactly, so y = b and ∂L/∂x = 0",
        "Those are the exact values: a one-element group is its own mean. As for layer_norm's constant rows.",
        "F.group_norm(torch.tensor([[601.14, -1200.3]]).repeat(2, 1), 2, bias=torch.zeros(2))"),
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
        "adaptive_avg_pool2d: output (1, 1) follows the pooling rules", "adaptive_avg_pool2d", ("exception",),
        _adaptive_mean_path,
        "for output_size (1, 1) it returns input.mean((-1, -2)) instead of pooling: so that size alone accepts "
        "complex input and an empty H or W (a nan result), and refuses integer input with mean()'s RuntimeError "
        "where every other size gives NotImplementedError",
        "the rules of every other output size: floating input (NotImplementedError otherwise), H and W not empty "
        "(RuntimeError)",
        "The output size chooses the windows, not which inputs are valid; the (1, 1) exceptions are the "
        "accident of a shortcut.",
        "F.adaptive_avg_pool2d(torch.ones(1, 2, 3, dtype=torch.int32), 1) (RuntimeError; size 2: NotImplementedError)"),
    Difference(
        "adaptive_avg_pool2d: an empty output differentiates", "adaptive_avg_pool2d", ("backward",),
        _adaptive_empty_output,
        "an output size with a 0 computes the empty forward, then its backward raises RuntimeError: Expected "
        "grad_output to have non-zero size",
        "the forward, and its gradient: zeros of the input's shape (no output depends on any input)",
        "A forward torch accepts should be differentiable, and the gradient of an empty output is exactly zero; "
        "the refusal is a shape check of the backward kernel written for the forward's input.",
        "F.adaptive_avg_pool2d(torch.randn(1, 2, 3, requires_grad=True), 0).sum().backward()"),
    Difference(
        "avg_pool2d: int64 input refused", "avg_pool2d", ("exception",), _int64_input,
        "the CPU kernel accepts int64 (alone among the integer types: int32, uint8, bool raise "
        "NotImplementedError) and truncates each window's average to an integer",
        "NotImplementedError, as for every other non-floating dtype",
        "A truncated mean is not the average the op computes, and has no gradient; torch's own "
        "adaptive_avg_pool2d refuses int64.",
        "F.avg_pool2d(torch.ones(1, 1, 2, 2, dtype=torch.long), 2)"),
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
    Difference(
        "rms_norm: complex input refused", "rms_norm", ("exception",), _complex_argument,
        "its composite computes x · rsqrt(mean(x²) + eps) for complex x too: mean(x²) is not the mean square "
        "|x|², so the result is not normalised (and depends on the phase)",
        "NotImplementedError, as torch's own layer_norm, batch_norm and group_norm for complex input",
        "An RMS norm of complex values needs |x|²; a wrong-valued result is worse than a refusal.",
        "F.rms_norm(torch.tensor([[1j, 1.0]]), (2,))"),
    Difference(
        "mean: keepdim without dim", "mean", ("exception",),
        lambda call: len(call.args) == 1 and "keepdim" in call.kwargs and "dim" not in call.kwargs,
        "torch.mean(x, keepdim=True) raises TypeError (no overload of its binding has keepdim without dim), "
        "though torch.mean(x, None, True) is accepted and means every dim",
        "every dim, as torch.mean(x, None, keepdim)",
        "One signature, mean(input, dim=None, keepdim=False, *, dtype=None): an omitted dim is dim=None, as "
        "written out; torch's refusal is its overload resolution, not a rule about the call.",
        "torch.mean(torch.ones(2, 3), keepdim=True)"),
    Difference(
        "embedding: sparse gradient of a 0-d index with padding_idx", "embedding", ("backward",),
        lambda call: call.kwargs.get("sparse") is True and call.kwargs.get("padding_idx") is not None
        and not call.args[0].shape,
        "its sparse backward masks the 0-d indices and the (D,) gradient with one 0-d mask: IndexError "
        "'too many indices for tensor of dimension 0'",
        "the sparse gradient, as for the same index in a 1-element tensor (no entry where it is padding_idx)",
        "A 0-d index is one row, and its forward is accepted; the backward's refusal is an accident of "
        "indexing the unflattened tensors.",
        "F.embedding(torch.tensor(1), torch.randn(3, 2, requires_grad=True), padding_idx=0, sparse=True).sum().backward()"),
    *(Difference(*fields) for fields in ATTENTION),
)


def covering(call, kind: str, table=DIFFERENCES) -> Difference | None:
    """The entry of ``table`` that covers a ``kind`` mismatch of ``call``, if one does."""
    for d in table:
        if d.op == call.op and kind in d.kinds and d.when(call):
            return d
    return None


def render(table=DIFFERENCES) -> str:
    """The table as Markdown, one row per entry: docs/differences.md holds it verbatim (between
    its ``<!-- table -->`` markers; tests/test_fuzz.py checks they are the same)."""
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    rows = ["| op | difference | torch | handgrad | why handgrad's | reproducer |",
            "|---|---|---|---|---|---|"]
    for d in table:
        rows.append(f"| `{d.op}` | {cell(d.name)} | {cell(d.torch)} | {cell(d.handgrad)} | {cell(d.why)} | "
                    f"`{cell(d.reproducer)}` |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(render(), end="")
