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
names a wider one below). The named edge-case tests use its element-by-element form at a scale
they derive from where the error lives, ``SCALED_LOWP_RULE`` (``scaled_lowp_excess``).
"""
from __future__ import annotations

import torch

__all__ = ["FD_ATOL", "FD_RTOL", "FD_EPS", "EXACT_ATOL", "EXACT_RTOL", "LOWP_RULE", "allowed_lowp_error",
           "SCALED_LOWP_RULE", "scaled_lowp_excess",
           "DEFAULT_LOWP_ULPS", "ROW_REDUCTION_ULPS", "FUSED_ULPS", "DEEP_MLP_ULPS"]

FD_ATOL, FD_RTOL = 1e-5, 1e-3          # against finite differences: torch.autograd.gradcheck's defaults
FD_EPS = 1e-6                          # central-difference step (torch.autograd.gradcheck's)
EXACT_ATOL, EXACT_RTOL = 1e-7, 1e-7    # two float64 computations of one quantity: assert_close's defaults

LOWP_RULE = "|ours − truth| ≤ 2·max|reference − truth| + ulps·eps·(|truth| + mean|truth|)"

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


def allowed_lowp_error(ref_err: torch.Tensor, truth: torch.Tensor, eps: float, ulps: float) -> torch.Tensor:
    """STYLE.md §7, the one rule every low-precision comparison uses (``LOWP_RULE``): at each
    element, the error allowed to handgrad given the reference's errors ``ref_err`` against the
    float64 ``truth``. The reference's error is its worst over the tensor: rounding in another
    order moves the error between elements (most where a row sum nearly cancels), so an
    element-by-element comparison would fail at random. It is counted twice (another order may
    round as badly, and the two need not cancel), plus ``ulps`` roundings at the element's own
    size or at the tensor's typical size. Non-finite truth elements are the caller's to mask."""
    finite = truth.isfinite()
    worst = ref_err[finite].max() if finite.any() else ref_err.new_zeros(())
    typical = truth[finite].abs().mean() if finite.any() else truth.new_zeros(())
    return 2 * worst + ulps * eps * (truth.abs() + typical)


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
