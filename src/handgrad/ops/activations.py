"""Elementwise activations y = f(z), one spec each, one Function for all.
Derivation: docs/derivation.md#activations.

An ``Activation`` is the math of one f: the forward, and f'(z) written from whichever of z or
y it is cheapest in (STYLE.md §3: sigmoid, tanh, relu from the output). ``ElementwiseFn`` is
the one autograd Function that runs any of them; fused ops (``ops.fused``) reuse the same
specs, so each derivative is written once. ``ElementwiseInplaceFn`` is its in-place twin
(``inplace=True`` in torch.nn.functional), for the specs whose f' is read from y.

The spec table (f, f', what is saved):

    sigmoid      σ(z)                                 y(1 − y)                          y
    tanh         tanh(z)                              1 − y² = (1 − y)(1 + y)           y
    relu         max(z, 0)                            [y > 0]                           y
    leaky_relu   z if z > 0 else s·z                  1 if z > 0 else s                 z  (in place: from y, s > 0)
    elu          z if z > 0 else α(e^z − 1)           1 if z > 0 else α e^z             z  (in place: y + α, from y)
    gelu         z Φ(z)                               Φ(z) + z φ(z)                     z
    gelu[tanh]   ½ z (1 + tanh u) = z σ(2u)           σ(2u)(1 + 2z σ(−2u) c(1 + 3κz²))   z
                 (u = c(z + κz³), c = √(2/π), κ = 0.044715)
    silu         z σ(z)                               σ(z)(1 + z(1 − σ(z)))             z
    softplus     z if βz > t else log(1 + e^{βz})/β   1 if βz > t else σ(βz)            z

At the kinks the derivative is torch's: relu'(0) = 0, leaky_relu'(0) = s, elu'(0) = α,
softplus' = 1 strictly above the threshold. A nan input gets torch's gradient too (its kernels
test ``y <= 0`` / ``z <= 0`` / ``z > 0``, and so do these), but for elu, whose f'(nan) is nan
(torch's depends on where the element falls in its vectorised loop).

elu's f' is α e^z from the saved z, not y + α from y: for very negative z, y rounds to −α and
y + α cancels to 0 (z = −17, float32: 0 instead of 4.1e-8), where α e^z is exact to a rounding.
Only the in-place twin, whose z is overwritten, reads y + α (``df_from_output``), as torch's
in-place ``elu_`` does (its ``is_result`` backward).

Each spec may carry a fast path (``fast_f``, ``kernel``, ``fast_df``): the same f and G ⊙ f' in
fewer passes, taken where nothing records the computation (``fast``): the forward is torch's own
forward kernel where it has one (one pass, as native); the backward (``ops._fast_vjp.fast_vjp``) is
a compiled one-pass kernel (handgrad.kernels.activations) on CPU float32/float64, else f' block by
block into a cache-sized scratch times G (``fast_df``, torch ops), one buffer either way, as
torch's one-pass backward kernel allocates. The formulas above stay the differentiable path that
double backward, forward AD, vmap and compile use, and the registry's reference check and
tests/test_fast_paths.py (kernels on and off) compare them.

The numeric options are parsed as torch's bindings parse a Scalar (``scalar``): a Python number
or a one-element tensor, else a TypeError naming the argument; the fused ops get the same check.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as TF

from .. import catalogue, kernels
from .._compat import forward_ad_active, functorch_transforms_active
from ._fast_vjp import _BLOCK, _LOG2E, _all_finite, _blocks, const, exp, exp_, fast, fast_vjp  # noqa: F401 (exp, exp_, _BLOCK: re-exported, ops.softmax and tests)
from ._function import HandFunction, opmath


@dataclass(frozen=True)
class Activation:
    name: str
    f: Callable[[torch.Tensor], torch.Tensor]                       # y = f(z)
    df: Callable[[torch.Tensor | None, torch.Tensor | None], torch.Tensor]  # f'(z), from (z, y)
    saves: str                                                      # "output" (y) or "input" (z)
    # f'(z) from y alone where ``df`` reads z but y determines f' too (less accurately): what the
    # in-place twin uses once z is overwritten. None: only ``df`` (from y if saves == "output").
    df_from_output: Callable[[None, torch.Tensor], torch.Tensor] | None = None
    # The fast path (``fast``): the same math with fewer passes, for float32/float64 where
    # nothing records the computation. ``fast_f(z)``: Y = f(Z) in a buffer it allocates (torch's
    # own forward kernel where it has one). ``fast_df(z, y, out)``: f'(Z) written into ``out``, a
    # block of at most ``_BLOCK`` elements (z or y the matching block of the saved tensor, the
    # other None); ``fast_vjp`` runs it block by block and multiplies by G. None: the formula.
    fast_f: Callable[[torch.Tensor], torch.Tensor] | None = None
    fast_df: Callable[[torch.Tensor | None, torch.Tensor | None, torch.Tensor], None] | None = None
    # Where torch's backward selects G rather than multiplying it (relu: 0 for y ≤ 0, G else),
    # an infinite or nan G (or saved value) needs the selection itself: ``select(g, z, y)``,
    # taken when the fast product's operands are not all finite.
    select: Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None], torch.Tensor] | None = None
    # Y = f(Z) written into Z (torch's in-place kernel), for a caller that owns Z and, f' being
    # read from y, no longer needs it (a fused stack's Z_l): one buffer fewer. None: ``fast_f``.
    fast_f_: Callable[[torch.Tensor], torch.Tensor] | None = None
    # ``fast_df`` needs no temporaries (one pass into ``out``): into a fresh result it then runs
    # on the whole tensor, unblocked, and G multiplies in place (two passes, one buffer).
    one_pass: bool = False
    # ``kernel(g, saved, out)``: G ⊙ f'(Z) into ``out`` by a compiled kernel
    # (handgrad.kernels.activations), on contiguous CPU float32/float64 tensors of one shape and dtype
    # (``fast_vjp`` asks ``kernels.usable``), ``saved`` the saved Y or Z; before ``fast_df``.
    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] | None = None
    # Elements below which ``fast_df`` runs instead of ``kernel``: where f' is one torch op
    # (sigmoid, tanh, leaky_relu), its two ops cost less than the kernel's fixed price (the checks
    # and three numpy views: +7 µs a call at 8×64) until the passes they save outweigh it.
    kernel_min: int = 0

    def output_df(self) -> Callable[[None, torch.Tensor], torch.Tensor] | None:
        """f' as a function (None, y) → f'(z), or None where y does not determine it."""
        return self.df if self.saves == "output" else self.df_from_output


def scalar(value, name: str, fn: str) -> float:
    """A Scalar argument as torch's binding takes it: a Python number or a one-element tensor;
    torch's TypeError otherwise (``float()`` would give a ValueError for a string)."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return float(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(f"{fn}(): argument '{name}' must be Number, not {type(value).__name__}")


_SMALL = 1 << 14   # ``kernel_min`` of the specs whose f' is one torch op (64 KiB of float32: a pass of ~2 µs)


def _kernel(name: str, *options: float):
    """``Activation.kernel``: handgrad.kernels.activations.<name>(g, saved, out, *options) on the
    tensors' flat numpy views (the kernel module, and numba, imported at the first call)."""
    def run(g, saved, out):
        g, saved, out = kernels.arrays(g, saved, out)
        getattr(kernels.load("activations"), name)(g.ravel(), saved.ravel(), out.ravel(), *options)   # (numpy's ravel: 0.2 µs, torch's view 1 µs)
    return run


def sigmoid_spec() -> Activation:
    # f(z) = σ(z) = 1 / (1 + e^{−z});  f'(z) = σ(z)(1 − σ(z)) = y(1 − y)
    def fast_df(z, y, out):
        # y(1 − y) = lerp(y, 0, y) in one pass over y: torch's lerp takes the form
        # end − (end − start)(1 − w) for w ≥ ½, so 1 − y is exact where it is small, and
        # start + w(end − start) = y − y·y below, where y² ≤ y/2 cannot cancel
        torch.lerp(y, const(0.0, y), y, out=out)

    return Activation("sigmoid", torch.sigmoid, lambda z, y: y * (1 - y), "output", fast_df=fast_df, one_pass=True,
                      fast_f_=torch.sigmoid_, kernel=_kernel("sigmoid_vjp"), kernel_min=_SMALL)


def tanh_spec() -> Activation:
    # f(z) = tanh(z);  f'(z) = 1 − tanh²(z) = 1 − y² = (1 − y)(1 + y): near |y| = 1, 1 − y is exact
    # and 1 + y one rounding, where 1 − y·y would round y² first and cancel (torch's kernel is as exact).
    def fast_df(z, y, out):
        # (1 + y)(1 − y): 1 + y, then lerp(a, 0, y) = a(1 − y) (as sigmoid's)
        torch.add(y, 1, out=out).lerp_(const(0.0, y), y)

    return Activation("tanh", torch.tanh, lambda z, y: (1 - y) * (1 + y), "output", fast_df=fast_df, one_pass=True,
                      fast_f_=torch.tanh_, kernel=_kernel("tanh_vjp"), kernel_min=_SMALL)


def relu_spec() -> Activation:
    # f(z) = max(z, 0);  f'(z) = [z > 0] = [y > 0]; written as "not y ≤ 0", torch's
    # threshold_backward test, so f'(0) = 0 and a nan passes the gradient through as torch's does.
    def fast_df(z, y, out):
        # y = relu(z) is ≥ 0 or nan, so [y ≠ 0] = [not y ≤ 0] (0 at y = 0, 1 at a nan y, as
        # torch's test), one pass; an infinite or nan G makes G · 0 nan where torch's
        # threshold_backward selects 0: ``select`` takes that case
        torch.ne(y, 0, out=out)

    def select(g, z, y):
        return g.masked_fill(y <= 0, 0)                              # torch's threshold_backward: 0 for y ≤ 0, else G

    return Activation("relu", lambda z: z.clamp_min(0), lambda z, y: (y <= 0).logical_not().to(y.dtype), "output",
                      fast_df=fast_df, select=select, one_pass=True, fast_f_=torch.relu_, kernel=_kernel("relu_vjp"))


def leaky_relu_spec(negative_slope: float = 0.01) -> Activation:
    s = scalar(negative_slope, "negative_slope", "leaky_relu")

    def f(z):
        return torch.where(z > 0, z, z * s)                          # z if z > 0 else s·z

    def fast_f(z):
        return TF.leaky_relu(z, s)                                   # torch's own forward kernel: one pass

    fast_df = None
    if 0 <= s <= 1:
        def fast_df(z, y, out):
            # max([z > 0], s): 1 or s exactly (a nan z gives s, as z > 0 is false)
            torch.gt(z, 0, out=out).clamp_(min=s)

    # f' = 1 if z > 0 else s (f'(0) = s), read from the input as torch does: it saves z, not y,
    # so an in-place op on the output (nn.ReLU(inplace=True) style) before backward works.
    # In place z is gone: for s ≥ 0, z > 0 ⇔ y > 0 (z ≤ 0 gives y = s·z ≤ 0), so y tells the branch;
    # for s < 0 it does not (z < 0 gives y > 0), and the in-place backward is refused, as torch's.
    from_y = (lambda z, y: torch.where(y > 0, 1.0, torch.full_like(y, s))) if s >= 0 else None
    return Activation("leaky_relu", f, lambda z, y: torch.where(z > 0, 1.0, torch.full_like(z, s)), "input",
                      df_from_output=from_y, fast_f=fast_f, fast_df=fast_df,
                      one_pass=True, kernel=_kernel("leaky_relu_vjp", s), kernel_min=_SMALL)


def elu_spec(alpha: float = 1.0) -> Activation:
    a = scalar(alpha, "alpha", "elu")

    def f(z):
        # z if z > 0 else α(e^z − 1); expm1 keeps small |z| exact, and exp sees min(z, 0) only,
        # so the unselected branch never overflows.
        return torch.where(z > 0, z, a * torch.expm1(z.clamp_max(0)))

    def df(z, y):
        # f'(z) = 1 for z > 0, α e^z otherwise (α at 0); exp sees min(z, 0) only. Tested as
        # "z > 0", so a nan z gives a nan gradient (torch's: nan in its vectorised loop, 1 in
        # its scalar tail; docs/differences.md).
        return torch.where(z > 0, 1.0, a * torch.exp(z.clamp_max(0)))

    from_y = None
    if a >= 0:
        # α ≥ 0: z ≤ 0 ⇔ y ≤ 0, and there f'(z) = α e^z = α(e^z − 1) + α = y + α (cancels for
        # very negative z: only for the in-place twin, whose z is gone). α < 0: z < 0 gives
        # y > 0, so y does not tell the branch, and the in-place backward is refused.
        def from_y(z, y):
            return torch.where(y <= 0, y + a, 1.0)

    def fast_f(z):
        return TF.elu(z, a)                                          # torch's own forward kernel: one pass

    fast_df = None
    if a == 1:
        def fast_df(z, y, out):
            # α = 1: f'(z) = e^{min(z, 0)} on both branches (1 for z ≥ 0). e^t for t ≤ 0 as
            # σ(t)/(1 − σ(t)): torch's sigmoid kernel is vectorised where its exp is not (CPU,
            # AVX-512: 0.5 against 2.1 ms for 2²¹ float32), and neither σ(t) nor 1 − σ(t) ≥ ½
            # cancels, so e^t is exact to a few roundings (e^{−17} = 4.1e-8, not the y + α of 0)
            torch.clamp_max(z, 0, out=out).sigmoid_()                # σ = σ(min(z, 0))
            out.div_(torch.sub(const(1.0, z), out))                  # σ/(1 − σ) = e^{min(z, 0)}

    return Activation("elu", f, df, "input", from_y, fast_f=fast_f, fast_df=fast_df, kernel=_kernel("elu_vjp", a))


_SQRT1_2 = math.sqrt(0.5)               # 1/√2
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)   # 1/√(2π)
_C = math.sqrt(2 / math.pi)             # c = √(2/π)
_KAPPA = 0.044715                       # κ
# |z| beyond which σ(2u) and σ(−2u) are exactly 0 and 1 in every float dtype (|u| ≈ 3.6e10), so
# the derivative's z(1 + 3κz²) factor, multiplied by 0 there, can be evaluated at the clamped z
# without changing the result: the clamp only keeps z² from overflowing (float32 past 1.8e19)
# into 0·∞ = nan, which torch's own float32 kernel returns there.
_GELU_TANH_FLAT = 1e4


def _phi_cdf(z):
    # Φ(z) = ½ erfc(−z/√2): exact in the left tail, where ½(1 + erf(z/√2)) cancels to 0.
    return 0.5 * torch.special.erfc(-z * _SQRT1_2)


def gelu_spec(approximate: str = "none") -> Activation:
    if not isinstance(approximate, str):
        raise TypeError(f"gelu(): argument 'approximate' must be str, not {type(approximate).__name__}")
    if approximate == "none":
        # f(z) = z Φ(z);  f'(z) = Φ(z) + z φ(z),  φ(z) = e^{−z²/2}/√(2π)
        # The fast path's forward is torch's own gelu kernel (Φ(z) = ½(1 + erf(z/√2)), its form);
        # its backward reads Φ(z) = gelu(z)/z off that kernel too: on CPU it evaluates erf with
        # a vectorised polynomial, where torch.erf is not vectorised on AVX-512 (0.7 against
        # 2.5 ms for 2²¹ float32). In the left tail Φ then has torch's absolute error (eps),
        # where the formula's erfc keeps it relative. A block with z = 0 (0/0), ±inf or nan takes
        # Φ's erf form instead, whose edge values are the formula's.
        def phi_cdf(z):
            return torch.mul(z, _SQRT1_2).erf_().add_(1).mul_(0.5)          # Φ(z)

        def fast_f(z):
            return TF.gelu(z)                                                # z Φ(z), one pass

        def fast_df(z, y, out):
            e = torch.addcmul(const(0.0, z), z, z, value=-0.5 * _LOG2E).exp2_()   # e^{−z²/2} (exp2: see exp_)
            if z.device.type == "cpu":                                       # (elsewhere erf is fast, and a check syncs)
                torch.ops.aten.gelu.out(z, out=out).div_(z)                  # Φ(z) = gelu(z)/z (0/0 at z = 0)
                torch.addcmul(out, e, z, value=_INV_SQRT_2PI, out=out)       # Φ(z) + z φ(z)
                if _all_finite(out):
                    return
            torch.addcmul(phi_cdf(z), e, z, value=_INV_SQRT_2PI, out=out)    # the erf form: z = 0, ±inf, nan

        def kernel(g, z, out):
            if z.dtype == torch.float32:                                     # one pass, erfc in the kernel
                _kernel("gelu_vjp_f32")(g, z, out)
                return
            # float64, per block: y = gelu(z) by torch's vectorised kernel into a block scratch,
            # then G ⊙ (y/z + z φ(z)) in one pass (handgrad.kernels.activations.gelu_vjp)
            vjp = kernels.load("activations").gelu_vjp
            for ob, gb, zb, yb in _blocks(out, g, z, scratch=1):
                torch.ops.aten.gelu.out(zb, out=yb)                          # y = z Φ(z)
                vjp(*(a.ravel() for a in kernels.arrays(gb, zb, yb, ob)))       # G ⊙ (Φ(z) + z φ(z))

        return Activation(
            "gelu",
            lambda z: z * _phi_cdf(z),
            lambda z, y: _phi_cdf(z) + z * torch.exp(-0.5 * z * z) * _INV_SQRT_2PI,
            "input",
            fast_f=fast_f, fast_df=fast_df, kernel=kernel,
        )
    if approximate == "tanh":
        # f(z) = ½ z (1 + tanh u), u = c(z + κz³). With 1 + tanh u = 2σ(2u) and 1 − tanh u = 2σ(−2u):
        #   f(z)  = z σ(2u)
        #   f'(z) = ½(1 + tanh u) + ½ z (1 − tanh²u) c (1 + 3κz²)
        #         = σ(2u) (1 + 2 z σ(−2u) c (1 + 3κz²))
        # σ(±2u) has no cancellation where tanh u → ∓1, which 1 ± tanh u would have.
        def u(z):
            return _C * (z + _KAPPA * z * z * z)

        def df(z, y):
            two_u = 2 * u(z)
            zc = z.clamp(-_GELU_TANH_FLAT, _GELU_TANH_FLAT)         # = z wherever σ(−2u)σ(2u) ≠ 0
            return torch.sigmoid(two_u) * (1 + 2 * zc * torch.sigmoid(-two_u) * _C * (1 + 3 * _KAPPA * zc * zc))

        def fast_f(z):
            return TF.gelu(z, approximate="tanh")                            # z σ(2u): torch's kernel, one pass

        def fast_df(z, y, out):
            # f'(z) = σ(2u) + z'·σ(2u)σ(−2u), z' = d(2u)/dz = 2c(z + 3κz³) (the formula's
            # 2zσ(−2u)c(1 + 3κz²)·σ(2u)); σ(−2u) drawn itself, not as 1 − σ(2u), which cancels where
            # σ(2u) → 1 (z = 3.3: 7 ulps of f'). From the clamped z, which changes neither where
            # |z| > 1e4 (σ is 0 or 1 there).
            zc = torch.clamp(z, -_GELU_TANH_FLAT, _GELU_TANH_FLAT)           # = z wherever σσ ≠ 0
            d = torch.mul(zc, zc)                                            # z²
            torch.addcmul(zc, d, zc, value=_KAPPA, out=out).mul_(2 * _C)     # 2u = 2c(z + κz³)
            torch.addcmul(zc, d, zc, value=3 * _KAPPA, out=d).mul_(2 * _C)   # z' = 2c(z + 3κz³)
            d.mul_(torch.neg(out).sigmoid_())                                # z' σ(−2u)   (a block's temporary)
            d.mul_(out.sigmoid_())                                           # z' σ(−2u) σ(2u)
            out.add_(d)                                                      # σ(2u) + z' σ(2u) σ(−2u)

        return Activation("gelu", lambda z: z * torch.sigmoid(2 * u(z)), df, "input", fast_f=fast_f, fast_df=fast_df,
                          kernel=_kernel("gelu_tanh_vjp"))
    # torch's own message (aten/src/ATen/native/Activation.cpp), with the value given
    raise RuntimeError(f"approximate argument must be either none or tanh. (got approximate={approximate!r})")


def silu_spec() -> Activation:
    def df(z, y):
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))                                 # σ(z)(1 + z(1 − σ(z)))

    def fast_f(z):
        return TF.silu(z)                                                # z σ(z): torch's kernel, one pass

    def fast_df(z, y, out):
        # f'(z) = σ + zσ(1 − σ) = y + σ(1 − y) = lerp(y, 1, σ), y = zσ: torch's lerp takes
        # 1 − (1 − y)(1 − σ) for σ ≥ ½, where 1 − σ is exact, so nothing cancels
        torch.sigmoid(z, out=out)                                        # σ
        torch.lerp(torch.mul(z, out), const(1.0, z), out, out=out)       # y + σ(1 − y)

    # f(z) = z σ(z)
    return Activation("silu", lambda z: z * torch.sigmoid(z), df, "input", fast_f=fast_f, fast_df=fast_df,
                      kernel=_kernel("silu_vjp"))


# x above which σ(x) = 1/(1 + e^{−x}) rounds to exactly 1 (e^{−x} below half an ulp of 1)
_SIGMOID_ONE = {torch.float32: 17.0, torch.float64: 37.0}
# x below which e^x is finite
_EXP_MAX = {torch.float32: 88.0, torch.float64: 709.0}


def softplus_spec(beta: float = 1.0, threshold: float = 20.0) -> Activation:
    b, t = scalar(beta, "beta", "softplus"), scalar(threshold, "threshold", "softplus")

    def f(z):
        bz = b * z
        # log(1 + e^{βz}) = max(βz, 0) + log(1 + e^{−|βz|}): never overflows, whatever the threshold
        soft = (bz.clamp_min(0) + torch.log1p(torch.exp(-bz.abs()))) / b
        return torch.where(bz > t, z, soft)                          # linear strictly above t

    def df(z, y):
        # f'(z) = e^{βz}/(1 + e^{βz}) = σ(βz) below the threshold, 1 above (torch's softplus_backward).
        # σ(βz) as e^{−|βz|}/(1 + e^{−|βz|}) for βz < 0: torch.sigmoid's 1/(1 + e^{−βz}) flushes to 0
        # where e^{βz} is subnormal (float32 βz < −87), and torch's e^{βz}/(e^{βz} + 1) does not.
        bz = b * z
        e = torch.exp(-bz.abs())                                     # e^{−|βz|} ≤ 1: never overflows
        sig = torch.where(bz < 0, e, 1.0) / (1 + e)                  # σ(βz)
        return torch.where(bz > t, 1.0, sig)

    def fast_f(z):
        # torch's own forward kernel, one pass, where its log1p(e^{βz}) below the threshold
        # cannot overflow (t under log max); above that, the formula's stable form
        return TF.softplus(z, b, t) if t < _EXP_MAX[z.dtype] else f(z)

    def fast_df(z, y, out):
        # σ(βz), then max(σ, [βz > t]): 1 strictly above the threshold (σ is exactly 1 there
        # already for β = 1 and t above ``_SIGMOID_ONE``). torch.sigmoid's 1/(1 + e^{−βz}) flushes
        # to 0 where e^{−βz} overflows (βz below −log max) and e^{βz} is still subnormal: there,
        # found by one read-only pass (min βz), the formula's σ takes over.
        bz = z if b == 1 else torch.mul(z, b)                            # βz
        if z.numel() and bz.amin() < -_EXP_MAX[z.dtype]:
            out.copy_(df(z, None))
        elif b == 1 and t >= _SIGMOID_ONE[z.dtype]:
            torch.sigmoid(z, out=out)                                    # σ(z)
        else:
            torch.maximum(torch.sigmoid(bz, out=out), torch.gt(bz, t), out=out)   # max(σ(βz), [βz > t])

    return Activation("softplus", f, df, "input", fast_f=fast_f, fast_df=fast_df, kernel=_kernel("softplus_vjp", b, t))


# name → factory(**options) → Activation: the math of each of the catalogue's activations
ACTIVATIONS: dict[str, Callable[..., Activation]] = {
    "sigmoid": sigmoid_spec,
    "tanh": tanh_spec,
    "relu": relu_spec,
    "leaky_relu": leaky_relu_spec,
    "elu": elu_spec,
    "gelu": gelu_spec,
    "silu": silu_spec,
    "softplus": softplus_spec,
}
# The names are the catalogue's (handgrad.catalogue): an activation added there without its math
# here, or here without an entry there, fails at import rather than at its first call.
if tuple(ACTIVATIONS) != catalogue.activations():
    raise ImportError(f"handgrad.ops.activations: the spec table {tuple(ACTIVATIONS)} is not the "
                      f"catalogue's activations {catalogue.activations()} (same names, same order)")


def get_activation(name: str, **options) -> Activation:
    factory = ACTIVATIONS.get(name)
    if factory is None:
        catalogue.activation(name)  # not an activation: raises the ValueError naming them
    key = (name, tuple(sorted(options.items()))) if options else name
    try:
        act = _BUILT.get(key)
    except TypeError:  # an unhashable option value: build it afresh
        return factory(**options)
    if act is None:
        act = _BUILT[key] = factory(**options)
    return act


# One Activation object per (name, options): torch.compile's guards see the same object each call.
_BUILT: dict[tuple, Activation] = {}


def _df(act: Activation, saved: torch.Tensor) -> torch.Tensor:
    """f'(Z) from the saved Y or Z, in opmath (float32 for half types)."""
    z, y = (None, saved) if act.saves == "output" else (saved, None)
    return act.df(opmath(z), opmath(y))


class ElementwiseFn(HandFunction):
    r"""Y = f(Z), elementwise — equals the torch activation named by ``act.name``.

    Shapes: Z (*) → Y (*), any shape.
    Backward, G = ∂L/∂Y (*):
        ∂L/∂Z = G ⊙ f'(Z)        (*)      (G ⊙ conj f'(Z) for complex Z, torch's convention)
    Forward mode, tangent Ż:
        Ẏ = f'(Z) ⊙ Ż
    f'(Z) is computed from the saved Y or Z (``act.saves``), never both. In float16/bfloat16
    the math runs in float32 and rounds once, as torch's kernels do. Where nothing records it
    (``fast``), the forward and backward run the spec's ``fast_f``/``fast_df``: the same formula in
    fewer passes over one buffer.
    Derivation: docs/derivation.md#activations
    """

    @staticmethod
    def forward(z, act):
        if act.fast_f is not None and fast(z):
            return act.fast_f(z)                                  # Y = f(Z), fewer passes
        return act.f(opmath(z)).to(z.dtype)                       # Y = f(Z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, act = inputs
        ctx.act = act
        saved = output if act.saves == "output" else z
        ctx.save_for_backward(saved)
        if forward_ad_active() or functorch_transforms_active():  # only where a jvp can be asked for
            ctx.save_for_forward(saved)

    @staticmethod
    def _df(ctx):
        saved, = ctx.saved_tensors
        return _df(ctx.act, saved)                                # f'(Z)

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None
        act = ctx.act
        if act.fast_df is not None or act.kernel is not None:
            saved, = ctx.saved_tensors
            if grad_y.dtype == saved.dtype and fast(saved, grad=grad_y):
                z, y = (None, saved) if act.saves == "output" else (saved, None)
                grad_z = fast_vjp(act, grad_y, z, y)                                # G ⊙ f'(Z), fewer passes
                if grad_z is not None:
                    return grad_z, None
        if act.select is not None:
            saved, = ctx.saved_tensors
            z, y = (None, saved) if act.saves == "output" else (saved, None)
            return act.select(grad_y, z, y), None                                   # G ⊙ f'(Z) as torch's selection
        df = ElementwiseFn._df(ctx)
        return (opmath(grad_y) * (df.conj() if df.dtype.is_complex else df)).to(grad_y.dtype), None   # G ⊙ f'(Z)

    @staticmethod
    def jvp(ctx, dz, _):
        return (opmath(dz) * ElementwiseFn._df(ctx)).to(dz.dtype)                        # f'(Z) ⊙ Ż


class ElementwiseInplaceFn(HandFunction):
    r"""Z ← f(Z), in place — equals torch's ``relu_``/``leaky_relu_``/``elu_`` (``inplace=True``).

    Shapes: Z (*) → Z (*), the same tensor, marked dirty.
    Backward, G = ∂L/∂Y (*):
        ∂L/∂Z = G ⊙ f'(Z)        (*)     f'(Z) from the saved Y: Z itself is overwritten
    Forward mode, tangent Ż (updated in place, as autograd requires of an in-place op):
        Ż ← f'(Z) ⊙ Ż
    Only a spec whose f' is read from y can run backward after the input is gone; for the others
    (leaky_relu with a negative slope, elu with a negative α) torch writes the result but refuses
    the backward, and so does this, with torch's message. The public functions refuse a leaf that
    requires grad before anything is written, as torch does.
    Derivation: docs/derivation.md#activations
    """

    @staticmethod
    def forward(z, act):
        z.copy_(act.f(opmath(z)))                                  # Z ← f(Z)
        return z

    @staticmethod
    def setup_context(ctx, inputs, output):
        z, act = inputs
        ctx.act = act
        ctx.mark_dirty(z)
        reads_y = act.output_df() is not None
        ctx.save_for_backward(output if reads_y else None)
        ctx.save_for_forward(output if reads_y else None)

    @staticmethod
    def _df(ctx):
        y, = ctx.saved_tensors
        if y is None:
            # torch's message for its in-place leaky_relu_/elu_ (FunctionsManual.cpp)
            raise RuntimeError(
                f"In-place {ctx.act.name} backward calculation is triggered with a negative slope which is not "
                "supported. This is caused by calling in-place forward function with a negative slope, please "
                "call out-of-place version instead."
            )
        return ctx.act.output_df()(None, opmath(y))                 # f'(Z) from Y

    @staticmethod
    def backward(ctx, grad_y):
        if not ctx.needs_input_grad[0]:
            return None, None
        df = ElementwiseInplaceFn._df(ctx)
        return (opmath(grad_y) * df).to(grad_y.dtype), None                         # G ⊙ f'(Z)

    @staticmethod
    def jvp(ctx, dz, _):
        return dz.copy_(opmath(dz) * ElementwiseInplaceFn._df(ctx))                 # Ż ← f'(Z) ⊙ Ż
