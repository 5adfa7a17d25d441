r"""DP-SGD on handgrad's per-sample norms and gradients (``handgrad.per_sample``).

* ``DPOptimizer(optimizer, model, noise_multiplier=σ, max_grad_norm=C, expected_batch_size=B)``:
  wraps any torch optimizer; ``opt.backward(loss, output)`` (ghost clipping) or a backward inside
  ``per_sample.capture(model)``, then ``opt.step()``.
* ``DPSGDCallback(...)``: the same for a LightningModule, ε logged every epoch, a target ε.
* ``PoissonSampler`` / ``poisson_loader``: Poisson sampling, what the accounting assumes.
* ``make_accountant``, ``epsilon_after``: Opacus's RDP / PRV accountants (the ``dp`` extra).

The step, per sample n (gₙ = ∂Cⁿ/∂θ): cₙ = min(1, C/(‖gₙ‖ + 10⁻⁶)), ĝ = (Σₙ cₙ gₙ + ξ)/B,
ξ ~ N(0, σ²C² I) — Opacus's ``DPOptimizer``; derivation and the two ways to Σₙ cₙ gₙ in
``handgrad.dp._clip``.
"""
from .accounting import epsilon_after, make_accountant
from .optimizer import DPOptimizer
from .sampling import PoissonSampler, poisson_loader

__all__ = ["DPOptimizer", "DPSGDCallback", "PoissonSampler", "poisson_loader", "make_accountant", "epsilon_after"]


def __getattr__(name: str):
    if name == "DPSGDCallback":  # needs lightning (the train extra); the rest does not
        from .callback import DPSGDCallback

        return DPSGDCallback
    raise AttributeError(f"module 'handgrad.dp' has no attribute {name!r}")
