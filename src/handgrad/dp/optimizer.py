"""``DPOptimizer``: DP-SGD around any torch optimizer (per-sample clipping, Gaussian noise,
the reduction's scaling; the math in ``handgrad.dp._clip``), Opacus's ``DPOptimizer`` semantics."""
from __future__ import annotations

from typing import Any, Callable, Literal, Optional

import torch

from ..per_sample._capture import record_of
from . import _clip
from .accounting import Accountant, make_accountant

__all__ = ["DPOptimizer", "trained_parameters"]


def trained_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters the optimizer updates, in its order (Opacus's ``DPOptimizer.params``)."""
    return [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]


def check_covers(model: torch.nn.Module, params: list[torch.Tensor]) -> None:
    """θ of the clip is every trained parameter of ``model``: one the optimizer does not hold
    would count in the per-sample norms of ``capture`` yet never be updated."""
    held = {id(p) for p in params}
    left = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in held]
    if left:
        raise ValueError(f"the optimizer does not hold the model's trained parameter(s) {left}; give it all "
                         "of them (or set requires_grad=False on those to freeze)")


class DPOptimizer(torch.optim.Optimizer):
    r"""DP-SGD around ``optimizer``: ĝ = (Σₙ cₙ gₙ + ξ) / B, then ``optimizer.step()``.

    gₙ = ∂Cⁿ/∂θ, cₙ = min(1, C / (‖gₙ‖ + 10⁻⁶)) with C = ``max_grad_norm``, ξ ~ N(0, σ²C² I) with
    σ = ``noise_multiplier``, B = ``expected_batch_size`` for ``loss_reduction='mean'``
    (L = (1/N) Σₙ Cⁿ), 1 for ``'sum'``; Opacus's ``DPOptimizer`` computes the same, and draws ξ
    from ``generator`` in the same order.

    Two ways to feed it (see ``handgrad.dp._clip``):

    * ``with handgrad.per_sample.capture(model):`` the forward and ``loss.backward()``: the
      per-sample gradients ``p.grad_sample``, clipped and summed in ``step``.
    * ``opt.backward(per_sample_losses)``: ghost clipping, where ``per_sample_losses()`` runs the
      forward and returns (C¹ … Cᴺ) (N,), e.g. ``lambda: F.cross_entropy(model(x), y,
      reduction="none")``; it is run twice (norms, then the clipped sum), no per-sample gradient
      is formed. Call it instead of the forward and ``loss.backward()``.

    Several batches before one ``step`` accumulate, each clipped per sample (B counts each
    batch, as Opacus's ``accumulated_iterations``): ``opt.backward`` calls, or one capture per
    batch with ``opt.clip_and_accumulate()`` after each backward (a capture clears the last one's
    ``grad_sample``: ``step`` refuses when a capture's batch was not taken). With ``accountant`` ('rdp', 'prv', or an Opacus
    accountant) and ``sample_rate`` q, each step is recorded and ``epsilon(delta)`` reads ε.
    The model's layers must be handgrad's (``handgrad.convert``) and mix no samples (no
    training-mode batch norm: ``capture`` refuses it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, noise_multiplier: float,
                 max_grad_norm: float, expected_batch_size: Optional[float] = None,
                 loss_reduction: Literal["mean", "sum"] = "mean", generator: Optional[torch.Generator] = None,
                 accountant: Accountant | str | None = None, sample_rate: Optional[float] = None):
        if noise_multiplier < 0 or max_grad_norm <= 0:
            raise ValueError(f"need noise_multiplier ≥ 0 and max_grad_norm > 0, got {noise_multiplier} and {max_grad_norm}")
        _clip.reduction_scale(loss_reduction, 1)  # validates the name
        if loss_reduction == "mean" and expected_batch_size is None:
            raise ValueError("loss_reduction='mean' needs expected_batch_size (B: the gradient is (S + ξ) / B)")
        if accountant is not None and sample_rate is None:
            raise ValueError("an accountant needs sample_rate q (batch size / dataset size) to record each step")
        self.original_optimizer = optimizer
        self.model = model
        self.noise_multiplier, self.max_grad_norm = noise_multiplier, max_grad_norm
        self.expected_batch_size, self.loss_reduction = expected_batch_size, loss_reduction
        self.generator, self.sample_rate = generator, sample_rate
        self.accountant = make_accountant(accountant) if isinstance(accountant, str) else accountant
        self._summed: Optional[list[torch.Tensor]] = None  # Σ over the backward calls of S
        self._accumulated = 0  # backward calls since the last step
        self.last_norms: Optional[torch.Tensor] = None  # ‖gₙ‖ (N,) of the latest batch, unclipped
        self._taken = self._captures()  # the model's capture count when S last took a batch
        check_covers(model, self.params)

    # --- torch.optim.Optimizer's state is the wrapped optimizer's (lr schedulers, state_dict) ---
    param_groups = property(lambda self: self.original_optimizer.param_groups,
                            lambda self, v: setattr(self.original_optimizer, "param_groups", v))
    state = property(lambda self: self.original_optimizer.state,
                     lambda self, v: setattr(self.original_optimizer, "state", v))
    defaults = property(lambda self: self.original_optimizer.defaults,
                        lambda self, v: setattr(self.original_optimizer, "defaults", v))

    def state_dict(self) -> dict[str, Any]:
        return self.original_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.original_optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (f"DPOptimizer(noise_multiplier={self.noise_multiplier}, max_grad_norm={self.max_grad_norm}, "
                f"loss_reduction={self.loss_reduction!r}, {self.original_optimizer!r})")

    @property
    def params(self) -> list[torch.Tensor]:
        return trained_parameters(self.original_optimizer)

    # --- the clipped sum S ----------------------------------------------------------------------
    def backward(self, per_sample_losses: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Ghost clipping: adds S = Σₙ cₙ gₙ of this batch, ``per_sample_losses()`` giving (C¹ … Cᴺ);
        returns the unclipped norms ‖gₙ‖ (N,)."""
        return self._accumulate(*_clip.clipped_sum_ghost(self.model, self.params, per_sample_losses,
                                                         self.max_grad_norm))

    def clip_and_accumulate(self) -> torch.Tensor:
        """Adds S = Σₙ cₙ gₙ of the batch the latest ``capture(model, grads=True)`` recorded
        (its ``grad_sample``, then cleared); returns the unclipped norms ‖gₙ‖ (N,). ``step`` calls
        it for the last batch; call it after each backward when accumulating several."""
        if self._captures() - self._taken > 1:
            raise RuntimeError(f"{self._captures() - self._taken} captures of the model since its last batch was "
                               "taken, and each clears the one before: only the latest batch's grad_sample is left. "
                               "For gradient accumulation call opt.clip_and_accumulate() after each backward")
        norms = self._accumulate(*_clip.clipped_sum_grads(self.model, self.params, self.max_grad_norm,
                                                          self.loss_reduction))
        for p in self.params:
            p.grad_sample = None
        return norms

    def _captures(self) -> int:
        return getattr(record_of(self.model), "index", 0)

    def _accumulate(self, sums: list[torch.Tensor], norms: torch.Tensor) -> torch.Tensor:
        self._summed = sums if self._summed is None else [a + s for a, s in zip(self._summed, sums)]
        self._accumulated += 1
        self.last_norms = norms
        self._taken = self._captures()
        return norms

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad_sample = None
        self._summed, self._accumulated, self._taken = None, 0, self._captures()
        self.original_optimizer.zero_grad(set_to_none)

    # --- ĝ = (S + ξ) / B, then the wrapped step -------------------------------------------------
    def noised_gradient(self) -> list[torch.Tensor]:
        """ĝ per parameter from this step's S (from ``backward``, else the captured grad_sample)."""
        if self._summed is None or any(getattr(p, "grad_sample", None) is not None for p in self.params):
            self.clip_and_accumulate()              # the last batch's grad_sample (captured, not yet taken)
        noised = _clip.add_noise(self._summed, self.noise_multiplier * self.max_grad_norm, self.generator)  # S + ξ
        b = self.expected_batch_size * self._accumulated if self.loss_reduction == "mean" else 1.0  # B
        return [g / b for g in noised]

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        if closure is not None:
            with torch.enable_grad():
                closure()
        for p, g in zip(self.params, self.noised_gradient()):
            p.grad = g.view_as(p)
        if self.accountant is not None:
            self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate * self._accumulated)
        for p in self.params:
            p.grad_sample = None
        self._summed, self._accumulated, self._taken = None, 0, self._captures()
        return self.original_optimizer.step()

    def epsilon(self, delta: float) -> float:
        """ε at δ of the steps taken so far, by the accountant."""
        if self.accountant is None:
            raise RuntimeError("no accountant: construct DPOptimizer(..., accountant='rdp', sample_rate=q)")
        return self.accountant.get_epsilon(delta=delta)
