"""The deliberate differences of the activations (sigmoid, tanh, gelu, elu, silu, softplus) and of
the fused layers where they come from an activation's rule.
Entries of ``differences.DIFFERENCES`` (see its docstring for the fields)."""
from __future__ import annotations

import math

import torch

from .entry import Difference, _input, _magnitude, _max_abs, _not_tensor, _opmath_max

__all__ = ["ACTIVATIONS"]


def _gelu_tanh_flat(call) -> bool:
    # torch's kernel squares z: z² overflows for |z| ≥ √max (float32 1.8e19, float64 1.3e154), and
    # at ±inf its 0·∞ is nan too
    x = _input(call)
    if _not_tensor(call) or call.kwargs.get("approximate") != "tanh":
        return False
    if call.op == "linear_act":   # its gelu layer: a bound on |x Wᵀ + b|
        return call.kwargs.get("activation") == "gelu" and _layer_bound(call) >= math.sqrt(_opmath_max(x.dtype)) / 4
    v = x.base.to(x.dtype).double()
    return bool(v.isinf().any()) or _max_abs(x) >= math.sqrt(_opmath_max(x.dtype)) / 4


def _layer_bound(call) -> float:
    """A bound on |z| of every layer of linear_act/mlp (inf where an argument is not finite):
    b₀ = max|x|, b_l = D_{l−1}·b_{l−1}·max|W_l| + max|b_l| (the activations do not grow |z|)."""
    from ..fuzz.call import Spec

    x = _input(call)
    if _not_tensor(call):
        return 0.0
    if call.op == "linear_act":
        b = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
        layers = [(call.args[1], b)]
    else:
        ws, bs = call.args[1], call.args[2] if len(call.args) > 2 else call.kwargs.get("biases")
        layers = list(zip(ws, bs if isinstance(bs, (list, tuple)) else [None] * len(ws)))
    bound, width = _magnitude(x), (x.shape[-1] if x.shape else 1)
    for w, b in layers:
        if not isinstance(w, Spec):
            return 0.0
        bound = width * bound * _magnitude(w) + (_magnitude(b) if isinstance(b, Spec) else 0.0)
        width = w.shape[0] if len(w.shape) == 2 else 1
    return bound


def _gelu_lowp_inf(call) -> bool:
    # torch's bfloat16 gelu kernel gives nan at z = +inf: a z that is +inf, or a layer whose z may
    # round to ±inf in bfloat16
    x = _input(call)
    if _not_tensor(call) or x.dtype != torch.bfloat16:
        return False
    if call.op == "gelu":
        return call.kwargs.get("approximate", "none") == "none" and bool((x.base.to(x.dtype) == math.inf).any())
    if "gelu" not in (call.kwargs.get("activation"), call.kwargs.get("last_activation")):
        return False
    return _layer_bound(call) >= torch.finfo(x.dtype).max


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
    if "elu" not in (call.kwargs.get("activation", "relu" if call.op == "linear_act" else "sigmoid"),
                     call.kwargs.get("last_activation")):
        return False
    return (any(not s.base.to(s.dtype).isfinite().all() for s in call.specs() if s.dtype.is_floating_point)
            or _layer_bound(call) >= _opmath_max(_input(call).dtype))    # z = inf − inf = nan


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


ACTIVATIONS: tuple[Difference, ...] = (
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
    *(Difference(
        "gelu tanh: finite gradient at huge |z|", op, ("grad",), _gelu_tanh_flat,
        "gelu(z, approximate='tanh') has gradient nan for |z| ≥ 1.8e19 in float32 (z² overflows, 0·∞), "
        "1.3e154 in float64, and at z = ±inf",
        "the limit: 0 for z → −∞, 1 for z → +∞",
        "The function is flat there and its derivative's limit is finite; nan would poison a whole "
        "backward pass for one large activation.",
        "F.gelu(torch.tensor([1e20], requires_grad=True), approximate='tanh').backward()") for op in ("gelu", "linear_act")),
    Difference(
        "gelu: the left tail exact", "gelu", ("value", "grad"), _gelu_left_tail,
        "gelu(z) = z·½(1 + erf(z/√2)) (approximate='tanh': ½z(1 + tanh u)): the sum cancels for z < 0, "
        "leaving few correct digits below z ≈ −2.4 in float64 and 0 below z ≈ −8.3 (gelu(−12.3) = −0, "
        "its gradient 1% off)",
        "on the differentiable path (double backward, forward AD, torch.func, compile): z·½ erfc(−z/√2) "
        "(tanh: z·σ(2u)), exact to a rounding: gelu(−12.3) = −5.68e-34; the first-order fast path (grad "
        "mode off, float32/float64) takes torch's own gelu kernel for speed, and so torch's values",
        "erfc and σ have no cancellation in the left tail; the value and gradient are correct to the "
        "last digit where torch's have few or none. The fast path trades that for one pass over memory "
        "(gelu 3.4× → 1.1× native time).",
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
        "gelu: inf at z = +inf in bfloat16", op, ("value", "grad"), _gelu_lowp_inf,
        "its bfloat16 gelu kernel gives nan at z = +inf, where its float16 and float32 kernels give inf",
        "inf, as in every other dtype (and so in a layer whose z overflows bfloat16)",
        "z Φ(z) → inf as z → inf; the nan is an accident of one dtype's kernel, which the others do not "
        "have.",
        "F.gelu(torch.tensor([float('inf'), -float('inf')], dtype=torch.bfloat16))") for op in ("gelu", "linear_act", "mlp")),
    *(Difference(
        "elu layer: gradient nan at a nan pre-activation", op, ("grad",), _elu_layer_nonfinite,
        "as for elu: the composition's elu gradient at a nan z is nan or G·1 by the element's position",
        "nan, for every element (the fused op uses elu's spec)",
        "As for elu.",
        "F.linear_act(x, w_with_a_nan, activation='elu')") for op in ("linear_act", "mlp")),
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
        "softplus: no overflow below a large threshold", "softplus", ("value", "grad"), _softplus_overflow,
        "softplus(z, threshold=t) computes log1p(exp(βz))/β for βz ≤ t: inf (and gradient nan) once "
        "βz > 88 in float32 (709 in float64)",
        "max(βz, 0) + log1p(e^{−|βz|}), over β: the exact value (≈ z) and gradient σ(βz) ≈ 1",
        "The function is finite and ≈ z there; the overflow is an artefact of the unstable form.",
        "F.softplus(torch.tensor([100.0]), threshold=1e4)"),
)
