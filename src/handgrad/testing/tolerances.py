"""The one tolerance policy of handgrad.testing: every tolerance the checks, the registry and the
tests use, each with its reason (STYLE.md §7). Nothing else defines a tolerance rule; a case that
needs a wider margin names one of the constants below.

float64, the checks' own arithmetic:

- against finite differences (gradcheck, gradgradcheck, forward_ad): ``FD_ATOL`` 1e-5,
  ``FD_RTOL`` 1e-3, torch.autograd.gradcheck's defaults. Central differences with step
  ``FD_EPS`` 1e-6 are off by O(eps²·f''') plus rounding O(1e-16/eps) ≈ 1e-10; the margin leaves
  room for curvature.
- between two exact computations of the same float64 quantity (reference, vmap, compile,
  noncontiguous, needs_grad, torch_func): ``EXACT_ATOL`` 1e-7, ``EXACT_RTOL`` 1e-7,
  torch.testing.assert_close's float64 defaults: only the order of summation differs.

Low precision (float32, bfloat16, float16) against a float64 truth: ``LOWP_RULE``, computed by
``allowed_lowp_error``, with a margin of ``ulps`` roundings (``DEFAULT_LOWP_ULPS`` unless a case
names a wider one below) at the size of the element, of the tensor, and of the terms the element
is a sum of (``TERM_SCALES``, where a gradient is a difference of terms that cancel). The named
edge-case tests use its element-by-element form at a scale they derive from where the error
lives, ``SCALED_LOWP_RULE`` (``scaled_lowp_excess``).
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

import torch

__all__ = ["FD_ATOL", "FD_RTOL", "FD_EPS", "EXACT_ATOL", "EXACT_RTOL", "LOWP_RULE", "allowed_lowp_error",
           "TERM_SCALES", "term_scales", "SCALED_LOWP_RULE", "scaled_lowp_excess",
           "DEFAULT_LOWP_ULPS", "ROW_REDUCTION_ULPS", "FUSED_ULPS", "DEEP_MLP_ULPS"]

FD_ATOL, FD_RTOL = 1e-5, 1e-3          # against finite differences: torch.autograd.gradcheck's defaults
FD_EPS = 1e-6                          # central-difference step (torch.autograd.gradcheck's)
EXACT_ATOL, EXACT_RTOL = 1e-7, 1e-7    # two float64 computations of one quantity: assert_close's defaults

LOWP_RULE = "|ours − truth| ≤ 2·max|reference − truth| + ulps·eps·(|truth| + mean|truth| + terms)"

#: the margin of an op computed in the order torch computes it: a rounding or two.
DEFAULT_LOWP_ULPS = 2.0

#: softmax, log_softmax, layer_norm (and batch, group and RMS norm, over their sets): the
#: backward subtracts a row reduction from G (a sum that nearly cancels where rows are confident
#: or constant) and starts from the rounded saved output,
#: so a few roundings land at the scale of the summed terms (measured: up to ~1.3× torch's worst
#: float32 error on 2 seeds in 4 at 2 ulps).
ROW_REDUCTION_ULPS = 4.0

#: the fused ops: a fused op rounds in another order than torch's op-by-op chain
#: (Δ = G ⊙ (y(1 − y)) against torch's sigmoid_backward (G(1 − y))y; the loss as lse − Q·Z against
#: −Σ Q log_softmax), and the reductions 1ᵀΔ, ΔᵀX, Σℓ cancel, so an element's error follows the sum
#: of |terms|, not |sum|. Measured worst (float32, the registry's inputs): 3.6 ulps
#: (linear_cross_entropy, smoothing).
FUSED_ULPS = 4.0

#: a three-layer fused MLP: each Δ_l's rounding difference (``FUSED_ULPS``) is carried through the
#: layers below by their GEMMs: measured up to 10.4 float32 ulps with the registry's inputs.
DEEP_MLP_ULPS = 16.0


def allowed_lowp_error(ref_err: torch.Tensor, truth: torch.Tensor, eps: float, ulps: float,
                       terms: torch.Tensor | None = None) -> torch.Tensor:
    """STYLE.md §7, the one rule every low-precision comparison uses (``LOWP_RULE``): at each
    element, the error allowed to handgrad given the reference's errors ``ref_err`` against the
    float64 ``truth``. The reference's error is its worst over the tensor: rounding in another
    order moves the error between elements (most where a row sum nearly cancels), so an
    element-by-element comparison would fail at random. It is counted twice (another order may
    round as badly, and the two need not cancel), plus ``ulps`` roundings at the element's own
    size, at the tensor's typical size and at ``terms``, the size of the terms the element sums
    (``term_scales``; none for an op without cancelling terms). Non-finite truth elements are the
    caller's to mask."""
    finite = truth.isfinite()
    worst = ref_err[finite].max() if finite.any() else ref_err.new_zeros(())
    typical = truth[finite].abs().mean() if finite.any() else truth.new_zeros(())
    scale = truth.abs() + typical
    if terms is not None:
        scale = scale + terms.where(terms.isfinite(), 0.0)
    return 2 * worst + ulps * eps * scale


# --- the terms a gradient sums --------------------------------------------------------------------
# Where a gradient element is a difference of terms that nearly cancel, every implementation errs
# by a few roundings of the terms, not of their difference: the forward-error bound of a sum
# Σ t_k is (a few)·eps·Σ |t_k|. torch's error there is as large, except where its order of
# summation happens to cancel exactly, so "twice torch's worst error" is a bound only by luck
# (measured: the norms' ∂L/∂x of 6e-7 erred by 5e-8 in handgrad, 2e-8 in torch; a float32 softmax
# row with one y ≈ 1 erred by 4e-9 against torch's 3e-9 and a truth of ~1e-10). So the rule adds
# ulps roundings at Σ|t_k|: the float64 value of the same computation with every term replaced by
# its absolute value (the "absolute computation"), one function per op below, each written from
# the op's backward formula. It allows nothing where the terms are small: a wrong gradient (a
# sign, an error of 10 roundings of the terms where it cancels) still fails
# (tests/test_testing_terms.py). Measured on the registry's low-precision cases, 30 draws each:
# 10 of 2520 checks failed by rounding luck under the rule without terms, none with them.

def _legacy_softmax_dim(ndim: int) -> int:
    return 0 if ndim in (0, 1, 3) else 1          # torch's _get_softmax_dim for dim=None


def _softmax_terms(G, input, dim=None, _stacklevel=3, dtype=None):
    # ∂L/∂x = Y ⊙ (G − (G ⊙ Y)1): on each element |y|·|g| and y·Σ|g y|
    dim = _legacy_softmax_dim(input.dim()) if dim is None else dim
    y, g = torch.softmax(input.double(), dim), G.double().abs()
    return {"input": y * (g + (g * y).sum(dim, keepdim=True))}


def _log_softmax_terms(G, input, dim=None, _stacklevel=3, dtype=None):
    # ∂L/∂x = G − Y·(G 1): on each element |g| and y·Σ|g|
    dim = _legacy_softmax_dim(input.dim()) if dim is None else dim
    y, g = torch.softmax(input.double(), dim), G.double().abs()
    return {"input": g + y * g.sum(dim, keepdim=True)}


def _gelu_terms(G, input, approximate="none"):
    # ∂L/∂z = G ⊙ (Φ(z) + z φ(z)) cancels for z < 0 (−0.75: 0.227 − 0.224): |g|·(Φ + |z| φ);
    # tanh form: G ⊙ σ(2u)(1 + 2z σ(−2u) c (1 + 3κz²)), u = c(z + κz³): |g|·σ(2u)(1 + |2z σ(−2u) c (1 + 3κz²)|)
    z, g = input.double(), G.double().abs()
    if approximate == "tanh":
        c, k = math.sqrt(2 / math.pi), 0.044715
        s = torch.sigmoid(2 * c * (z + k * z ** 3))
        return {"input": g * s * (1 + (2 * z * (1 - s) * c * (1 + 3 * k * z * z)).abs())}
    phi = torch.exp(-z * z / 2) / math.sqrt(2 * math.pi)
    return {"input": g * (torch.special.ndtr(z) + z.abs() * phi)}


def _normalised(x, dims, centred, eps, stats=None):
    """(|x̂|, rstd) of the norms, |x̂| as its absolute computation: x̂ = (x − μ)·rstd over ``dims``
    (``centred``: μ the mean; RMS norm: μ = 0) has the terms (|x| + |μ|)·rstd, the size its
    rounding follows (a row far from 0 relative to its spread has every x̂ uncertain by
    eps·|x|·rstd, in torch as in handgrad). ``stats``: (μ, rstd) given (eval batch norm)."""
    if stats is None:
        mu = x.mean(dims, keepdim=True) if centred else x.new_zeros(())
        rstd = (((x - mu) ** 2).mean(dims, keepdim=True) + eps).rsqrt()
    else:
        mu, rstd = stats
    return (x.abs() + mu.abs()) * rstd, rstd


def _dx_terms(v, xa, rstd, dims, centred):
    # ∂L/∂x = rstd·(v − mean v − x̂·mean(v ⊙ x̂)), v = G ⊙ w: rstd·(|v| + mean|v| + |x̂|·mean|v ⊙ x̂|)
    mean = (lambda t: t.mean(dims, keepdim=True))
    return rstd * (v + (mean(v) if centred else 0.0) + xa * mean(v * xa))


def _affine_terms(g, xa, weight, bias, rest):
    # ∂L/∂w = Σ G ⊙ x̂ and ∂L/∂b = Σ G over the dims ``rest``: Σ|G ⊙ x̂| and Σ|G|
    out = {}
    if weight is not None:
        out["weight"] = _sum(g.abs() * xa, rest).reshape(weight.shape)
    if bias is not None:
        out["bias"] = _sum(g.abs(), rest).reshape(bias.shape)
    return out


def _sum(t, dims):
    return t.sum(tuple(dims)) if len(dims) else t          # t.sum(()) would sum every dim


def _trailing_norm_terms(G, x, K, weight, bias, centred, eps):
    # layer and RMS norm: over the last K dims, the affine parameters of their shape
    if K == 0 or x.dim() < K:
        raise ValueError("no trailing dims to normalise")
    x, g = x.double(), G.double()
    dims = tuple(range(x.dim() - K, x.dim()))
    xa, rstd = _normalised(x, dims, centred, eps)
    v = (g if weight is None else g * weight.double()).abs()
    return {"input": _dx_terms(v, xa, rstd, dims, centred),
            **_affine_terms(g, xa, weight, bias, tuple(range(x.dim() - K)))}


def _trailing(x, normalized_shape):
    if tuple(x.shape[x.dim() - len(normalized_shape):]) != tuple(normalized_shape):
        raise ValueError("normalized_shape is not the input's trailing dims")


def _layer_norm_terms(G, input, normalized_shape, weight=None, bias=None, eps=1e-5):
    _trailing(input, normalized_shape)
    return _trailing_norm_terms(G, input, len(normalized_shape), weight, bias, True, eps)


def _rms_norm_terms(G, input, normalized_shape, weight=None, eps=None):
    _trailing(input, normalized_shape)
    eps = torch.finfo(input.dtype).eps if eps is None else eps
    return _trailing_norm_terms(G, input, len(normalized_shape), weight, None, False, eps)


def _per_channel(t, x):
    return None if t is None else t.double().reshape(1, -1, *[1] * (x.dim() - 2))


def _batch_norm_terms(G, input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                      eps=1e-5):
    # over every dim but the channels (dim 1); eval: the running statistics, ∂L/∂x = G·w·rstd
    # elementwise (its terms are its value: none to add)
    x, g = input.double(), G.double()
    dims = tuple(d for d in range(x.dim()) if d != 1)
    stats = None if training else (_per_channel(running_mean, x), (_per_channel(running_var, x) + eps).rsqrt())
    xa, rstd = _normalised(x, dims, True, eps, stats)
    out = _affine_terms(g, xa, weight, bias, dims)
    if training:
        v = (g if weight is None else g * _per_channel(weight, x)).abs()
        out["input"] = _dx_terms(v, xa, rstd, dims, True)
    return out


def _group_norm_terms(G, input, num_groups, weight=None, bias=None, eps=1e-5):
    # the statistics over each group: x viewed as (N, groups, C/groups · spatial)
    x, g = input.double(), G.double()
    grouped = (x.shape[0], num_groups, x.shape[1] // num_groups * math.prod(x.shape[2:]))
    xa, rstd = _normalised(x.reshape(grouped), (2,), True, eps)
    v = (g if weight is None else g * _per_channel(weight, x)).abs().reshape(grouped)
    dx = _dx_terms(v, xa, rstd, (2,), True).reshape(x.shape)
    return {"input": dx, **_affine_terms(g, xa.reshape(x.shape), weight, bias,
                                         tuple(d for d in range(x.dim()) if d != 1))}


def _linear_cross_entropy_terms(G, input, linear_weight, target, *, linear_bias=None, weight=None, reduction="mean",
                                ignore_index=None, label_smoothing=0.0, **_):
    # Z = X Wᵀ + b (W (C, …, D): the classes, any K dims, the features), Δ = ∂L/∂Z = s ⊙ (P − Q)
    # row by row; ∂L/∂X = Δ W, ∂L/∂W = Δᵀ X, ∂L/∂b = 1ᵀΔ: the terms |Δ| |W|, |Δ|ᵀ |X| and 1ᵀ|Δ|
    # (Δ itself from torch's cross_entropy in float64)
    x, w = input.double(), linear_weight.double()
    lead, inner = x.dim() - 1, list(range(w.dim() - 1))
    z = torch.tensordot(x, w, dims=([lead], [w.dim() - 1]))
    z = (z if linear_bias is None else z + linear_bias.double()).detach().requires_grad_(True)
    with torch.enable_grad():
        loss = torch.nn.functional.cross_entropy(z, target, weight=None if weight is None else weight.double(),
                                                 ignore_index=-100 if ignore_index is None else ignore_index,
                                                 reduction=reduction, label_smoothing=label_smoothing)
        d = torch.autograd.grad(loss, z, G.double())[0].abs()
    rows = list(range(lead))
    out = {"input": torch.tensordot(d, w.abs(), dims=([lead + i for i in inner], inner)),
           "linear_weight": torch.tensordot(d, x.abs(), dims=(rows, rows))}
    if linear_bias is not None:
        out["linear_bias"] = _sum(d, rows)
    return out


def _reduction(size_average, reduce, reduction):
    if size_average is not None or reduce is not None:      # torch's legacy flags
        from .._compat import _legacy_get_string
        return _legacy_get_string(size_average, reduce, emit_warning=False)
    return "mean" if reduction == "elementwise_mean" else reduction


def _cross_entropy_terms(G, input, target, weight=None, size_average=None, ignore_index=-100, reduce=None,
                         reduction="mean", label_smoothing=0.0):
    # ∂L/∂z = s·(S P − q) per sample: P = softmax(z) over the classes, q the target's coefficients,
    # (1 − ε) w_y [c = y] + (ε/C) w_c for a class index y (0 where y is ignored), w_c ((1 − ε) t_c + ε/C)
    # for probabilities t; S = Σ_c q_c; s = |G|, divided by the mean's denominator (Σ of the kept
    # samples' w_y; the sample count for probabilities): the terms s·(S P + q)
    z, red = input.double(), _reduction(size_average, reduce, reduction)
    cdim = 0 if z.dim() == 1 else 1
    C, eps = z.shape[cdim], max(float(label_smoothing), 0.0)          # (torch takes ε < 0 as 0)
    shape = [1] * z.dim()
    shape[cdim] = C
    w = (torch.ones(C, dtype=torch.float64) if weight is None else weight.double()).reshape(shape)
    if target.is_floating_point():
        q = w * ((1 - eps) * target.double() + eps / C)
        denom = z.numel() // max(C, 1)
    else:
        t = target.long().unsqueeze(cdim)
        keep = (t != ignore_index).double()
        t = t.where(t != ignore_index, 0)
        wy = w.expand_as(z).gather(cdim, t)                              # w_y (…, 1, …)
        q = ((1 - eps) * torch.zeros_like(z).scatter(cdim, t, 1.0) * wy + eps / C * w) * keep
        denom = (wy * keep).sum()
    P = torch.softmax(z, cdim)
    g = G.double().abs()
    g = g.unsqueeze(cdim) if red == "none" else g
    g = g / abs(denom) if red == "mean" else g
    qa = q.abs()                                                         # (a class weight may be < 0)
    out = {"input": g * (qa.sum(cdim, keepdim=True) * P + qa)}
    if target.is_floating_point():
        # probabilities: ∂L/∂t = −s w (1 − ε) log P, ∂L/∂w = −Σ_samples s ((1 − ε) t + ε/C) log P,
        # log P = z − lse(z) (its terms |z| + |lse|)
        logp = z.abs() + torch.logsumexp(z, cdim, keepdim=True).abs()
        out["target"] = g * w.abs() * (1 - eps) * logp
        if weight is not None:
            coef = ((1 - eps) * target.double() + eps / C).abs()
            out["weight"] = (g * coef * logp).sum_to_size(shape).reshape(weight.shape)
    return out


def _mse_loss_terms(G, input, target, size_average=None, reduce=None, reduction="mean", weight=None):
    # L = R(w ⊙ d²), d = x − y (broadcast), R a sum, a mean (÷ numel, or ÷ Σw with weight) or none:
    # ∂L/∂x = Σ_bcast 2 s w d, ∂L/∂y its negative, ∂L/∂w = Σ_bcast s d² − [mean] G·A/W² (A = Σ w d²,
    # W = Σw): the terms Σ_bcast |2 s w d|, Σ_bcast |s| d² + |G A|/W²
    red = _reduction(size_average, reduce, reduction)
    x, y = torch.broadcast_tensors(input.double(), target.double())
    d, g = x - y, G.double().abs()
    w = torch.ones((), dtype=torch.float64) if weight is None else weight.double()
    W = w.sum().abs() if weight is not None else torch.tensor(float(d.numel()), dtype=torch.float64)
    s = g if red == "none" else g / W if red == "mean" else g
    out = {"input": (2 * s * (w * d).abs()).sum_to_size(input.shape),        # (W = |Σw|: a weight may be < 0)
           "target": (2 * s * (w * d).abs()).sum_to_size(target.shape)}
    if weight is not None:
        extra = g * (w * d * d).sum().abs() / (W * W) if red == "mean" else 0.0
        out["weight"] = (s * d * d).sum_to_size(weight.shape) + extra
    return out


def _activation_terms(name, kwargs, g, z):
    # |g| ⊙ the absolute computation of f′(z): gelu's sum of terms, else |g ⊙ f′(z)|
    if name == "gelu":
        return _gelu_terms(g, z, **kwargs)["input"]
    z = z.detach().requires_grad_(True)
    with torch.enable_grad():
        y = getattr(torch.nn.functional, name)(z, **kwargs)
        return torch.autograd.grad(y, z, g)[0].abs()


def _stack_terms(G, input, layers):
    # the fused stacks: z_l = h_{l−1} W_lᵀ + b_l, h_l = f_l(z_l); backward δ_l = (δ_{l+1} W_{l+1}) ⊙ f_l′(z_l),
    # ∂L/∂W_l = δ_lᵀ h_{l−1}, ∂L/∂b_l = 1ᵀ δ_l, ∂L/∂x = δ_1 W_1: the same products of the terms'
    # sizes, |δ_l| from |g| through each f′'s terms and |W|, against |h| (layers: (W, b, f, kwargs))
    hs, zs = [input.double().reshape(-1, input.shape[-1])], []        # h_0 = x (rows, features)
    for W, b, f, kw in layers:
        zs.append(hs[-1] @ W.double().mT + (0.0 if b is None else b.double()))
        hs.append(zs[-1] if f is None else getattr(torch.nn.functional, f)(zs[-1], **kw))
    t = G.double().abs().reshape(zs[-1].shape)
    gw, gb = [None] * len(layers), [None] * len(layers)
    for l in reversed(range(len(layers))):
        W, b, f, kw = layers[l]
        t = t if f is None else _activation_terms(f, kw, t, zs[l])          # |δ_l|
        gw[l], gb[l] = t.mT @ hs[l].abs(), None if b is None else t.sum_to_size(b.shape)
        t = t @ W.double().abs()
    return {"input": t.reshape(input.shape), "weights": gw, "biases": gb, "weight": gw[0], "bias": gb[0]}


def _linear_act_terms(G, input, weight, bias=None, activation="relu", **activation_kwargs):
    return _stack_terms(G, input, [(weight, bias, activation, activation_kwargs)])


def _mlp_terms(G, input, weights, biases, activation="sigmoid", last_activation=None):
    weights = list(weights)
    biases = [None] * len(weights) if biases is None else list(biases)
    fs = [activation] * (len(weights) - 1) + [last_activation]
    return _stack_terms(G, input, [(w, b, f, {}) for w, b, f in zip(weights, biases, fs)])


#: catalogue op name → its absolute computation: (G, *the op's arguments) → {parameter name: the
#: terms of that gradient, one per element}
TERM_SCALES: dict[str, Callable[..., dict[str, torch.Tensor]]] = {
    "gelu": _gelu_terms,
    "softmax": _softmax_terms,
    "log_softmax": _log_softmax_terms,
    "layer_norm": _layer_norm_terms,
    "rms_norm": _rms_norm_terms,
    "batch_norm": _batch_norm_terms,
    "group_norm": _group_norm_terms,
    "linear_cross_entropy": _linear_cross_entropy_terms,
    "cross_entropy": _cross_entropy_terms,
    "mse_loss": _mse_loss_terms,
    "linear_act": _linear_act_terms,
    "mlp": _mlp_terms,
}


def term_scales(terms: Callable | None, G, args: tuple, kwargs: dict, diff) -> list[torch.Tensor | None]:
    """The terms of each gradient in ``diff`` (the differentiable tensors among ``args`` and
    ``kwargs``, matched by identity) by ``terms``, an op's absolute computation (``TERM_SCALES``),
    in float64; None where there is none, for a G of several outputs, or where the absolute
    computation does not apply to the call (a call torch refuses, a shape it broadcasts): the
    rule is then the stricter one."""
    if terms is None or not isinstance(G, torch.Tensor):
        return [None] * len(diff)
    def detached(v):
        return v.detach() if isinstance(v, torch.Tensor) else v

    try:
        bound = inspect.signature(terms).bind(G, *args, **kwargs).arguments
        by_name = terms(detached(G), *map(detached, args), **{k: detached(v) for k, v in kwargs.items()})
        out = [_by_identity(bound, by_name, t) for t in diff]
        return [s if s is None or s.shape == t.shape else None for s, t in zip(out, diff)]
    except Exception:  # noqa: BLE001 - the absolute computation refuses the call: no terms, the stricter rule
        return [None] * len(diff)


def _by_identity(bound: dict, by_name: dict, t):
    """The terms of the argument that is ``t``: a bound argument, or an element of a list of them
    (mlp's weights)."""
    for name, v in bound.items():
        if v is t:
            return by_name.get(name)
        if isinstance(v, (list, tuple)) and isinstance(by_name.get(name), list):
            for i, e in enumerate(v):
                if e is t:
                    return by_name[name][i]
    return None


SCALED_LOWP_RULE = "|ours − truth| ≤ |reference − truth| + ulps·eps·scale, element by element"


def scaled_lowp_excess(ours: torch.Tensor, reference: torch.Tensor, truth: torch.Tensor, ulps: float,
                       scale: torch.Tensor) -> torch.Tensor:
    """``SCALED_LOWP_RULE``: by how much ``ours`` (in its low-precision dtype, whose eps is used)
    misses the rule at each element (≤ 0 everywhere passes). Stricter than ``LOWP_RULE``: the
    reference's own error at the same element, not its worst, plus ``ulps`` roundings at ``scale``,
    the size of the terms the element is computed from (a row's sum, not its nearly cancelled
    result), which the caller derives for its op."""
    eps = torch.finfo(ours.dtype).eps
    truth = truth.double()
    return (ours.double() - truth).abs() - (reference.double() - truth).abs() - ulps * eps * scale
