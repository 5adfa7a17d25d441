"""``DPSGDCallback``: DP-SGD for a LightningModule trained by ``Trainer.fit`` (automatic
optimization, one optimizer), with the privacy spent logged as ``dp/epsilon`` every epoch and a
target ε that stops (or warns) before an epoch would pass it. The math is ``handgrad.dp._clip``'s."""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info

from .. import per_sample
from . import _clip
from .accounting import Mechanism, epsilon_after, make_accountant
from .optimizer import check_covers, trained_parameters
from .sampling import PoissonSampler

__all__ = ["DPSGDCallback"]


class DPSGDCallback(Callback):
    r"""Each optimizer step becomes a DP-SGD step: ĝ = (Σₙ cₙ gₙ + ξ) / B (``handgrad.dp.DPOptimizer``'s).

    Args:
        noise_multiplier: σ; the noise ξ ~ N(0, σ²C² I).
        max_grad_norm: C, the bound on every per-sample gradient's norm.
        delta: δ of the (ε, δ) guarantee; below 1/n for n training samples.
        target_epsilon: the ε not to pass; ``None``: none (ε is still logged).
        on_target: ``stop`` ends training before an epoch that would pass ``target_epsilon``
            (so the final ε stays ≤ it); ``warn`` warns once and trains on.
        accountant: Opacus's ``rdp`` or ``prv`` (tighter, slower) accountant.
        mode: ``grads`` (per-sample gradients, clipped and summed) or ``ghost`` (per-sample
            norms in Lightning's backward, then the forward of ``output`` replayed and its
            backward reweighted per sample: no per-sample gradient formed).
        loss_reduction: how ``training_step``'s loss reduces over the batch: ``mean``
            (L = (1/N) Σₙ Cⁿ) or ``sum``; ``None``: the LightningModule's ``hparams.reduction``
            if it has one, else ``mean``.
        output: ghost mode: the submodule (``get_submodule`` name) whose output Y is the
            network's output, of which the loss is a function without parameters, and whose
            forward is replayed; ``None``: the LightningModule's own ``forward`` (``self(x)``).
        seed: seeds the noise generator (``None``: torch's global RNG).

    The sampling rate q is the loader's ``PoissonSampler``'s; for any other loader it is
    1/len(loader) (as Opacus takes it) and ε assumes Poisson sampling, which the loader does
    not do (a warning says so). B = q·n for n training samples. The accountant's history is
    part of the checkpoint, so a resumed run keeps counting ε.
    """

    def __init__(self, noise_multiplier: float = 1.0, max_grad_norm: float = 1.0, delta: float = 1e-5,
                 target_epsilon: Optional[float] = None, on_target: Literal["stop", "warn"] = "stop",
                 accountant: Mechanism = "rdp", mode: Literal["grads", "ghost"] = "grads",
                 loss_reduction: Optional[Literal["mean", "sum"]] = None, output: Optional[str] = None,
                 seed: Optional[int] = None):
        if noise_multiplier < 0 or max_grad_norm <= 0 or not 0 < delta < 1:
            raise ValueError(f"need noise_multiplier ≥ 0, max_grad_norm > 0 and 0 < delta < 1, got {noise_multiplier}, "
                             f"{max_grad_norm} and {delta}")
        if mode not in ("ghost", "grads"):
            raise ValueError(f"mode must be 'ghost' or 'grads', got {mode!r}")
        if loss_reduction is not None:
            _clip.reduction_scale(loss_reduction, 1)  # validates the name
        self.noise_multiplier, self.max_grad_norm, self.delta = noise_multiplier, max_grad_norm, delta
        self.target_epsilon, self.on_target, self.mode = target_epsilon, on_target, mode
        self.loss_reduction, self.output, self.seed = loss_reduction, output, seed
        self.accountant = make_accountant(accountant)
        self.generator: Optional[torch.Generator] = None
        self.sample_rate = self.expected_batch_size = None
        self._call = None  # ghost: this training batch's (args, kwargs, RNG state) of the output module
        self._grad_out: Optional[torch.Tensor] = None  # ghost: G = ∂L/∂Y of that call
        self._capture = contextlib.ExitStack()
        self._hooks: list = []
        self._warned = False
        self._empty = False

    # --- set up: one process, automatic optimization, q and B from the loader ---------------------
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.world_size > 1:
            raise ValueError("DPSGDCallback runs in one process: DDP averages the processes' gradients, each "
                             "noised on its own, which this accounting does not cover")
        if not pl_module.automatic_optimization or trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
            raise ValueError("DPSGDCallback needs automatic optimization with accumulate_grad_batches 1 and no "
                             "gradient_clip_val (it clips per sample itself)")
        if self.loss_reduction is None:
            self.loss_reduction = pl_module.hparams.get("reduction", "mean")
            _clip.reduction_scale(self.loss_reduction, 1)
        module = pl_module.get_submodule(self.output) if self.output else pl_module
        self._module = module
        if self.mode == "ghost":
            self._hooks = [module.register_forward_pre_hook(self._keep_call, with_kwargs=True),
                           module.register_forward_hook(self._watch_output)]
        if self.seed is not None and self.generator is None:
            self.generator = torch.Generator(pl_module.device).manual_seed(self.seed)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._capture.close()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        loader = trainer.train_dataloader
        n = len(loader.dataset)
        poisson = [s for s in (loader.batch_sampler, loader.sampler) if isinstance(s, PoissonSampler)]
        if poisson:
            self.sample_rate = poisson[0].sample_rate
        else:
            self.sample_rate = 1.0 / len(loader)
            warnings.warn("DPSGDCallback: the training loader does not sample by Poisson sampling "
                          "(handgrad.dp.PoissonSampler); ε below assumes it, with q = 1/len(loader)", stacklevel=2)
        self.expected_batch_size = self.sample_rate * n  # B = q·n
        check_covers(pl_module, trained_parameters(trainer.optimizers[0]))
        self._check_target(trainer)

    # --- the target: checked before each epoch, for the epoch to come -----------------------------
    def _check_target(self, trainer: pl.Trainer) -> None:
        """Stop (or warn) now when one more epoch would take ε past ``target_epsilon``."""
        if self.target_epsilon is None or trainer.should_stop:
            return
        ahead = epsilon_after(self.accountant, trainer.num_training_batches, self.noise_multiplier,
                              self.sample_rate, self.delta)
        if ahead <= self.target_epsilon:
            return
        msg = (f"DP-SGD: one more epoch would bring ε from {self.epsilon():.3f} to {ahead:.3f} > target_epsilon "
               f"{self.target_epsilon} (δ = {self.delta})")
        if self.on_target == "stop":
            rank_zero_info(f"{msg}: training stops here")
            trainer.should_stop = True
        elif not self._warned:
            warnings.warn(f"{msg}; training goes on (on_target: warn)", stacklevel=2)
            self._warned = True

    # --- each step: the clipped sum S into p.grad, then ĝ = (S + ξ) / B ---------------------------
    def _keep_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            self._call = (args, kwargs, _clip.rng_state(self._params[0].device))

    def _watch_output(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        if module.training and torch.is_grad_enabled() and isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(self._keep_grad)

    def _keep_grad(self, grad: torch.Tensor) -> None:
        self._grad_out = grad.detach()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._call = self._grad_out = None
        self._empty = _rows(batch) == 0  # an empty Poisson batch: S = 0, the step still adds the noise
        self._params = trained_parameters(trainer.optimizers[0])
        self._capture.enter_context(per_sample.capture(pl_module, grads=self.mode == "grads"))

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self._capture.close()
        params = self._params
        if self._empty:
            sums = [torch.zeros_like(p) for p in params]
        elif self.mode == "grads":
            sums, _ = _clip.clipped_sum_grads(pl_module, params, self.max_grad_norm, self.loss_reduction)
            for p in params:
                p.grad_sample = None
        else:
            sums = self._ghost_sum(pl_module, params)
        noised = _clip.add_noise(sums, self.noise_multiplier * self.max_grad_norm, self.generator)  # S + ξ
        b = self.expected_batch_size if self.loss_reduction == "mean" else 1.0
        for p, g in zip(params, noised):
            p.grad = g / b  # ĝ = (S + ξ) / B
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        self._call = self._grad_out = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._capture.close()  # a step that skipped the optimizer (training_step returned None) leaves none open

    def _ghost_sum(self, pl_module: pl.LightningModule, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """S by ghost clipping: Lightning's backward was pass 1 (norms, G); pass 2 replays the call."""
        if self._call is None or self._grad_out is None:
            where = f"submodule {self.output!r}" if self.output else "the LightningModule's forward (self(x))"
            raise RuntimeError(f"DPSGDCallback(mode='ghost') saw no call of {where} whose output the loss "
                               "depends on in this training step; name the network with output=... or use mode='grads'")
        args, kwargs, state = self._call
        r = _clip.reduction_scale(self.loss_reduction, self._grad_out.shape[0])
        weights = _clip.clip_factors(per_sample.norms(pl_module) / r, self.max_grad_norm) / r  # cₙ / r
        return _clip.replayed_sum(params, lambda: self._module(*args, **kwargs), state, self._grad_out, weights)

    # --- ε every epoch ------------------------------------------------------------------------
    def epsilon(self) -> float:
        """ε at ``delta`` of the steps taken so far (0 before the first)."""
        return self.accountant.get_epsilon(delta=self.delta) if self.accountant.history else 0.0

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.log("dp/epsilon", self.epsilon(), on_step=False, on_epoch=True, prog_bar=True)
        self._check_target(trainer)

    def state_dict(self) -> dict[str, Any]:
        state = {"history": list(self.accountant.history)}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.accountant.history = list(state_dict.get("history", []))
        if "generator" in state_dict and self.generator is not None:
            self.generator.set_state(state_dict["generator"])


def _rows(batch: Any) -> Optional[int]:
    """The sample count of a batch: the first dimension of its first tensor (None: no tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for item in items:
        n = _rows(item)
        if n is not None:
            return n
    return None
