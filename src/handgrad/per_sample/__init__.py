r"""Per-sample gradients ∂Cⁿ/∂θ of the seed's L(θ) = Σₙ Cⁿ(θ), and their norms.

    with handgrad.per_sample.capture(model):          # grads=False: norms only
        loss = loss_fn(model(x), y)
        loss.backward()
    model[0].weight.grad_sample                       # (N, *weight.shape), sums to .grad
    handgrad.per_sample.norms(model)                  # (N,) ‖∂Cⁿ/∂θ‖₂

The formulas: ``_formulas`` (derived in docs/derivation.md#per-sample-gradients); which layer
takes which: ``_rules``; the hooks and the record: ``_capture``.
"""
from ._capture import capture, norms

__all__ = ["capture", "norms"]
