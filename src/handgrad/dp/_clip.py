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

* ``grads``: one forward and backward inside ``capture(grads=True)``; S = Σₙ (cₙ / r) grad_sampleₙ.
  Memory N·|θ| for the per-sample gradients.
* ``ghost``: pass 1, a forward and backward inside ``capture(grads=False)``, gives the norms,
  hence cₙ, and G = ∂L/∂Y at the network's output Y (N, …), whose row n is r ∂Cⁿ/∂Yₙ (samples do
  not mix). Backward is linear in G, so backpropagating diag(cₙ / r) G gives S itself: pass 2.
  ``DPOptimizer.backward`` keeps pass 1's graph (its backward only reaches the layer outputs, so
  no parameter gradient is accumulated) and runs pass 2 through it once the capture has closed
  (a closed capture's hooks record nothing): one forward, two backwards. The Lightning callback,
  whose pass 1 is Lightning's own backward (the graph freed), replays the forward of its output
  module with pass 1's RNG state (so dropout draws the same masks). Nothing of size N·|θ| is
  formed.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional, Sequence

import torch

from .. import per_sample
from ..per_sample._capture import record_of

__all__ = ["EPS", "reduction_scale", "clip_factors", "weight_rows", "rng_state", "replayed_sum", "clipped_sum_ghost", "clipped_sum_grads", "add_noise"]

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


def weight_rows(grad: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """diag(w) G: row n of ``grad`` (N, …) times wₙ."""
    return grad * weights.to(grad.dtype).reshape(grad.shape[0], *([1] * (grad.dim() - 1)))


def rng_state(device: torch.device) -> tuple:
    """The RNG state a forward on ``device`` draws from: CPU's, and the CUDA device's when it is one."""
    if device.type != "cuda":
        return torch.get_rng_state(), None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.get_rng_state(), (index, torch.cuda.get_rng_state(index))


def replayed_sum(params: Sequence[torch.Tensor], forward: Callable[[], torch.Tensor], state: tuple,
                 grad_out: torch.Tensor, weights: torch.Tensor) -> list[torch.Tensor]:
    """Ghost clipping's pass 2: Y = ``forward()`` drawn from RNG ``state`` (pass 1's), then
    S = Σₙ wₙ (∂Yₙ/∂θ)ᵀ Gₙ, i.e. the backward of diag(w) G; the RNG is left as it was."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[cuda[0]] if cuda is not None else []):
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda[1], cuda[0])
        y = forward()
    sums = torch.autograd.grad(y, params, weight_rows(grad_out, weights), allow_unused=True)  # Σₙ wₙ Jₙᵀ Gₙ
    return [torch.zeros_like(p) if s is None else s for p, s in zip(params, sums)]


def clipped_sum_ghost(model: torch.nn.Module, params: Sequence[torch.Tensor],
                      per_sample_losses: Callable[[], torch.Tensor], max_grad_norm: float
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """S = Σₙ cₙ gₙ by ghost clipping, ``per_sample_losses()`` returning (C¹ … Cᴺ) (N,) (one
    forward of ``model``). Here Y is the losses themselves: G = 1, r = 1. Pass 1 backpropagates
    only to the tapped layer outputs (their hooks give ‖gₙ‖; no AccumulateGrad runs), pass 2
    backpropagates diag(cₙ) through the same graph, after the capture closed (so it is not
    recorded). Returns (S per parameter, the norms ‖gₙ‖ (N,))."""
    with per_sample.capture(model, grads=False):  # pass 1: ‖gₙ‖ without forming any gₙ
        losses = per_sample_losses()  # (N,) Cⁿ
        if losses.dim() != 1:
            raise ValueError(f"per_sample_losses() must return the (N,) losses C¹ … Cᴺ (reduction='none'), "
                             f"got shape {list(losses.shape)}")
        if len(losses) == 0:  # an empty Poisson batch: S = 0 (the step still adds the noise)
            return [torch.zeros_like(p) for p in params], losses.detach()
        taps = record_of(model).taps
        torch.autograd.grad(losses.sum(), taps or params, retain_graph=True, allow_unused=True)
    norms = per_sample.norms(model)  # ‖gₙ‖ (N,)
    c = clip_factors(norms, max_grad_norm).to(losses.dtype)  # cₙ (N,)
    sums = torch.autograd.grad(losses, params, c, allow_unused=True)  # pass 2: Σₙ cₙ ∂Cⁿ/∂θ
    return [torch.zeros_like(p) if s is None else s for p, s in zip(params, sums)], norms


def clipped_sum_grads(model: torch.nn.Module, params: Sequence[torch.Tensor], max_grad_norm: float,
                      loss_reduction: Reduction) -> tuple[list[torch.Tensor], torch.Tensor]:
    """S = Σₙ cₙ gₙ from the ``p.grad_sample`` (N, *p.shape) a ``capture(grads=True)`` left;
    returns (S per parameter, the norms ‖gₙ‖ (N,))."""
    missing = [tuple(p.shape) for p in params if getattr(p, "grad_sample", None) is None]
    if missing:
        raise RuntimeError(f"no grad_sample on {len(missing)} parameter(s) of shapes {missing}: run the "
                           "backward inside handgrad.per_sample.capture(model, grads=True)")
    forwards = getattr(record_of(model), "forwards", 0)
    if forwards > 1:
        raise RuntimeError(f"the capture saw {forwards} forwards of the model, and grad_sample sums their rows "
                           "(sample n of each), which clipping per sample cannot undo; for gradient accumulation "
                           "capture one batch at a time and call opt.clip_and_accumulate() after each backward")
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
