r"""DP-SGD's per-sample clipping and Gaussian noise, the math only (Abadi et al. 2016, as Opacus's
``DPOptimizer`` computes it).

Per sample n of a batch of N, with gₙ = ∂Cⁿ/∂θ over every trained parameter θ:

    cₙ = min(1, C / (‖gₙ‖₂ + 10⁻⁶))        clip factor; C = max_grad_norm, 10⁻⁶ as in Opacus
    S  = Σₙ cₙ gₙ                          the clipped sum: every ‖cₙ gₙ‖₂ ≤ C
    ĝ  = (S + ξ) / B,  ξ ~ N(0, σ²C² I)    σ = noise_multiplier; B = expected_batch_size for
                                           reduction 'mean', B = 1 for 'sum'

``handgrad.per_sample`` scales what it records as the loss's reduction scales the gradient,
r gₙ with r = 1/N ('mean', N this batch's size) or r = 1 ('sum'): gₙ = grad_sample / r and
‖gₙ‖ = norms / r.

Two ways to S (``mode``):

* ``grads``: one backward inside ``capture(grads=True)``; S = Σₙ (cₙ / r) grad_sampleₙ.
  One backward pass; memory N·|θ| for the per-sample gradients.
* ``ghost``: backward is linear in ∂L/∂Y, the gradient at the network's output Y (N, …), and
  row n of ∂L/∂Y is r ∂Cⁿ/∂Yₙ (samples do not mix). Pass 1 backpropagates ∂L/∂Y inside
  ``capture(grads=False)``: the norms, hence cₙ. Pass 2 backpropagates diag(cₙ / r) ∂L/∂Y, whose
  parameter gradient is S itself. Two backward passes; nothing of size N·|θ| is formed.
"""
from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch

from .. import per_sample

__all__ = ["EPS", "reduction_scale", "clip_factors", "ghost_weights", "weight_rows", "clipped_sum_ghost", "clipped_sum_grads", "add_noise"]

EPS = 1e-6  # Opacus's: cₙ = C / (‖gₙ‖ + EPS), so a zero gradient gets a finite factor
Reduction = Literal["mean", "sum"]


def reduction_scale(loss_reduction: Reduction, n: int) -> float:
    """r: the factor the loss's reduction puts on each ∂Cⁿ/∂θ (1/N for 'mean', 1 for 'sum')."""
    if loss_reduction == "mean":
        return 1.0 / max(n, 1)  # an empty batch (Poisson sampling) has nothing to scale
    if loss_reduction == "sum":
        return 1.0
    raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")


def clip_factors(norms: torch.Tensor, max_grad_norm: float) -> torch.Tensor:
    """cₙ = min(1, C / (‖gₙ‖ + EPS)), (N,) from the per-sample norms ‖gₙ‖ (N,)."""
    return (max_grad_norm / (norms + EPS)).clamp(max=1.0)


def ghost_weights(model: torch.nn.Module, params: Sequence[torch.Tensor], loss: torch.Tensor, output: torch.Tensor,
                  max_grad_norm: float, loss_reduction: Reduction) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Ghost clipping's pass 1 from ``output`` Y (N, …): returns (∂L/∂Y, the row weights cₙ / r (N,),
    the norms ‖gₙ‖ (N,)). ``loss`` is L(Y): it must hold no parameter. The graph is kept for pass 2."""
    n = output.shape[0]
    r = reduction_scale(loss_reduction, n)
    (grad_out,) = torch.autograd.grad(loss, output, retain_graph=True)  # ∂L/∂Y (N, …), row n: r ∂Cⁿ/∂Yₙ
    with per_sample.capture(model, grads=False):  # r ‖gₙ‖ without forming any gₙ
        torch.autograd.grad(output, params, grad_out, retain_graph=True, allow_unused=True)
    norms = per_sample.norms(model) / r  # ‖gₙ‖ (N,)
    return grad_out, (clip_factors(norms, max_grad_norm) / r).to(grad_out.dtype), norms


def weight_rows(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """diag(w) G: row n of ``grad`` (N, …) times wₙ."""
    return grad * weights.reshape(grad.shape[0], *([1] * (grad.dim() - 1)))


def clipped_sum_ghost(model: torch.nn.Module, params: Sequence[torch.Tensor], loss: torch.Tensor,
                      output: torch.Tensor, max_grad_norm: float, loss_reduction: Reduction
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """S = Σₙ cₙ gₙ for ``params`` by two backward passes from ``output`` Y (N, …); returns
    (S per parameter, the norms ‖gₙ‖ (N,))."""
    grad_out, weights, norms = ghost_weights(model, params, loss, output, max_grad_norm, loss_reduction)
    sums = torch.autograd.grad(output, params, weight_rows(grad_out, weights), allow_unused=True)  # pass 2: S
    return [torch.zeros_like(p) if s is None else s for p, s in zip(params, sums)], norms


def clipped_sum_grads(model: torch.nn.Module, params: Sequence[torch.Tensor], max_grad_norm: float,
                      loss_reduction: Reduction) -> tuple[list[torch.Tensor], torch.Tensor]:
    """S = Σₙ cₙ gₙ from the ``p.grad_sample`` (N, *p.shape) a ``capture(grads=True)`` left;
    returns (S per parameter, the norms ‖gₙ‖ (N,))."""
    missing = [tuple(p.shape) for p in params if getattr(p, "grad_sample", None) is None]
    if missing:
        raise RuntimeError(f"no grad_sample on {len(missing)} parameter(s) of shapes {missing}: run the "
                           "backward inside handgrad.per_sample.capture(model, grads=True)")
    n = params[0].grad_sample.shape[0]
    r = reduction_scale(loss_reduction, n)
    norms = per_sample.norms(model) / r  # ‖gₙ‖ (N,)
    weights = clip_factors(norms, max_grad_norm) / r  # cₙ / r (N,)
    sums = [torch.einsum("n,n...->...", weights.to(p.grad_sample.dtype), p.grad_sample) for p in params]  # Σₙ cₙ gₙ
    return sums, norms


def add_noise(sums: Sequence[torch.Tensor], std: float, generator: Optional[torch.Generator] = None
              ) -> list[torch.Tensor]:
    """S + ξ, ξ ~ N(0, std² I) drawn per parameter in order, as Opacus's ``_generate_noise`` draws
    it (so a generator seeded alike gives Opacus's noise); std 0 draws nothing."""
    if std == 0:
        return list(sums)
    return [s + torch.normal(0.0, std, size=s.shape, generator=generator, dtype=s.dtype, device=s.device)
            for s in sums]
