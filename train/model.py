"""The LightningModule: the seed's network (or a CNN) trained by gradient descent, on handgrad or on torch.

Network ``mlp`` (the seed's, ``handgrad.nn.MLP``): ``x_l = f(W_l x_{l-1} + b_l)`` for the hidden
layers, ``x_L = W_L x_{L-1} + b_L`` (then ``last_activation`` when given, the seed's sigmoid).
Network ``cnn`` (``build_cnn``), on image data: blocks ``X' = pool₂(f(BN(W ⋆ X)))``, then that MLP
on the flattened output of the last block.

Loss, per sample n with output x_L^n and target y^n:
    cross_entropy:       C^n = −log softmax(x_L^n)[y^n]
    half_squared_error:  C^n = ½‖x_L^n − onehot(y^n)‖²   (the seed's cost; regression: ½‖x_L^n − y^n‖²)
    reduction 'sum' gives L = Σ_n C^n (the seed's), 'mean' gives L = (1/N) Σ_n C^n.

Update: the optimizer from the config, plain SGD ``w ← w − α_w ∂L/∂w`` by default, with one
parameter group per layer with parameters (affine layers; cnn: convs and batch norms too) so
each layer can have its own learning rate α_w.

``backend: torch`` builds the same network from ``torch.nn`` modules and copies the same
initial weights into it, so one config trains both for a side-by-side comparison.
"""
from __future__ import annotations

import math
from typing import Any, Literal, Optional

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch.cli import instantiate_class
from torch import nn

from handgrad import catalogue

from .errors import ConfigError

__all__ = ["Model", "build_network", "build_cnn", "TorchHalfSquaredErrorLoss"]

# the activation names jsonargparse offers and checks: the catalogue's, in its order
ACTIVATIONS = Literal[catalogue.activations()]
DEFAULT_OPTIMIZER = {"class_path": "torch.optim.SGD", "init_args": {}}


class TorchHalfSquaredErrorLoss(nn.Module):
    """The torch-backend twin of ``handgrad.nn.HalfSquaredErrorLoss``: C^n = ½‖x^n − y^n‖².

    'sum' → Σ_n C^n, 'mean' → (1/N) Σ_n C^n (divides by the batch size N, not by N·D),
    'none' → (C^1 … C^N).
    """

    def __init__(self, reduction: str = "sum"):
        super().__init__()
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        per_sample = 0.5 * (input - target).pow(2).reshape(input.shape[0], -1).sum(1)  # (N,)
        if self.reduction == "sum":
            return per_sample.sum()
        if self.reduction == "mean":
            return per_sample.mean()
        return per_sample


def _affine_layers(sizes: list[int], activation: str, bias: bool, last_activation: Optional[str]) -> list[nn.Module]:
    """torch.nn's ``x_l = f(W_l x_{l-1} + b_l)``, l = 1 … L (``last_activation`` after layer L)."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, bias=bias))
        act = activation if i < len(sizes) - 2 else last_activation
        if act is not None:
            layers.append(catalogue.activation(act).torch_module())
    return layers


def build_network(
    sizes: list[int],
    activation: str = "sigmoid",
    bias: bool = True,
    last_activation: Optional[str] = None,
    backend: str = "handgrad",
    fused: bool = True,
) -> nn.Module:
    """The MLP with ``sizes = [D_0, …, D_L]`` on either backend, with torch.nn's initialisation.

    The initial weights are drawn once, by the ``torch.nn`` twin (``nn.Sequential`` of
    ``nn.Linear`` and activations, built from the current RNG state); the handgrad network loads
    them, so both backends start from the same weights whatever order either draws them in.
    """
    reference = nn.Sequential(*_affine_layers(sizes, activation, bias, last_activation))
    if backend == "torch":
        return reference
    if backend != "handgrad":
        raise ValueError(f"backend must be 'handgrad' or 'torch', got {backend!r}")
    import handgrad.nn as hnn

    net = hnn.MLP(sizes, activation=activation, bias=bias, last_activation=last_activation, fused=fused)
    net.load_state_dict(reference.state_dict())
    return net


def build_cnn(
    image_shape: list[int],
    channels: list[int],
    sizes: list[int],
    activation: str = "relu",
    bias: bool = True,
    last_activation: Optional[str] = None,
    pool: str = "max",
    backend: str = "handgrad",
) -> nn.Module:
    """The CNN on images ``(C, H, W)`` given flat, ``(N, C·H·W)``, on either backend.

    One block per entry c of ``channels``: ``Z = BN(W ⋆ X)`` (3×3 convolution, padding 1, no bias:
    batch norm's β is the shift), ``X' = pool₂(f(Z))`` (2×2 max or mean: H, W halve); then the MLP
    ``sizes = [c_last·H'·W', *hidden, D_out]`` on the flattened blocks' output.

    The initial weights are drawn once, by the ``torch.nn`` network; ``handgrad.convert`` gives the
    handgrad network (a copy with every conv, batch norm, activation, pool and linear swapped for
    handgrad's), so both backends start from the same weights.
    """
    c, h, w = image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (c, h, w))]  # (N, C·H·W) → (N, C, H, W): a view
    for c_out in channels:
        if h < 2 or w < 2:
            _, height, width = image_shape
            raise ConfigError(f"model.channels {channels}: {len(channels)} blocks halve the {height}×{width} image "
                              f"{len(channels)} times, below 1×1; give fewer blocks")
        layers += [nn.Conv2d(c, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out),
                   catalogue.activation(activation).torch_module(),
                   nn.MaxPool2d(2) if pool == "max" else nn.AvgPool2d(2)]
        c, h, w = c_out, h // 2, w // 2
    layers.append(nn.Flatten())  # (N, C', H', W') → (N, C'·H'·W'): a view
    reference = nn.Sequential(*layers, *_affine_layers([c * h * w, *sizes[1:]], activation, bias, last_activation))
    if backend == "torch":
        return reference
    if backend != "handgrad":
        raise ValueError(f"backend must be 'handgrad' or 'torch', got {backend!r}")
    import handgrad

    return handgrad.convert(reference)  # a copy: same weights, handgrad modules


class Model(pl.LightningModule):
    """Trains the seed's MLP, a CNN (``network: cnn``) or any network you return from the
    ``build_network`` hook on ``(x, y)`` batches.

    Args:
        hidden: widths of the hidden layers, D_1 … D_{L-1} (cnn: of the MLP after the blocks).
        activation: f for the hidden layers.
        last_activation: applied to the output layer (the seed: ``sigmoid``); ``null`` = none
            (logits, what ``cross_entropy`` expects).
        bias: affine layers carry a bias b_l.
        loss: ``cross_entropy`` or ``half_squared_error`` (½‖x_L − y‖², on one-hot targets for
            classification).
        reduction: ``mean`` ((1/N) Σ_n C^n) or ``sum`` (Σ_n C^n, the seed's L).
        backend: ``handgrad`` (hand-derived backward passes) or ``torch`` (torch.nn modules,
            same initial weights).
        fused: handgrad only: run the MLP as one fused op (``handgrad.functional.mlp``).
        lr: α, the learning rate of every layer without its own entry in ``layer_lr``.
        layer_lr: α_w per affine layer (W_l and b_l share it), first layer first; ``null``
            entries fall back to ``lr`` (cnn: one per conv, batch norm and linear layer).
        network: ``mlp`` (the seed's MLP on the flat features) or ``cnn`` (conv blocks on the
            image, then the MLP on their flattened output; needs image data, ``image_shape``).
        channels: cnn only: output channels of each conv → batch norm → f → pool block.
        pool: cnn only: ``max`` or ``avg`` 2×2 pooling at the end of each block.
        in_features, out_features, task, image_shape: set from the data module by the CLI
            (``image_shape`` [C, H, W] of the flat features; ``null`` for tabular data).
        optimizer: set by the CLI from the top-level ``optimizer:`` key (class_path, init_args).
        lr_scheduler: set by the CLI from the top-level ``lr_scheduler:`` key.
    """

    def __init__(
        self,
        hidden: list[int] = [64],  # noqa: B006 - jsonargparse needs a plain default
        activation: ACTIVATIONS = "sigmoid",
        last_activation: Optional[ACTIVATIONS] = None,
        bias: bool = True,
        loss: Literal["cross_entropy", "half_squared_error"] = "cross_entropy",
        reduction: Literal["mean", "sum"] = "mean",
        backend: Literal["handgrad", "torch"] = "handgrad",
        fused: bool = True,
        lr: float = 0.1,
        layer_lr: Optional[list[Optional[float]]] = None,
        network: Literal["mlp", "cnn"] = "mlp",
        channels: list[int] = [16, 32],  # noqa: B006 - jsonargparse needs a plain default
        pool: Literal["max", "avg"] = "max",
        in_features: int = 64,
        out_features: int = 10,
        task: Literal["classification", "regression"] = "classification",
        image_shape: Optional[list[int]] = None,
        optimizer: Optional[dict] = None,
        lr_scheduler: Optional[dict] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        if task == "regression" and loss == "cross_entropy":
            raise ConfigError("model.loss: 'cross_entropy' needs class labels; use 'half_squared_error' for regression data")
        if network == "cnn" and image_shape is None:
            raise ConfigError("model.network 'cnn' needs image data: this data module gives flat features "
                              "with no image_shape (train.data.Digits gives 1×8×8 images)")
        if network == "cnn" and (len(image_shape) != 3 or math.prod(image_shape) != in_features):
            raise ConfigError(f"model.image_shape {image_shape} must be [C, H, W] with C·H·W = {in_features}, the data's "
                              "number of features")
        sizes = [in_features, *hidden, out_features]
        self.net = self.build_network(sizes)
        n_layers = len(self._layers())
        if layer_lr is not None and len(layer_lr) != n_layers:
            given = ", ".join("null" if v is None else str(v) for v in layer_lr)
            kinds = ", ".join(type(m).__name__ for m in self._layers().values())
            layers = (f"{' → '.join(map(str, sizes))} has {n_layers} affine layers" if network == "mlp" else
                      f"has {n_layers} layers with parameters ({kinds})")
            raise ConfigError(f"model.layer_lr has {len(layer_lr)} entries [{given}] but the network {layers}: "
                              "give one per layer (null: that layer uses model.lr)")
        self.loss_fn = self._loss_module()
        if task == "classification":
            # one metric object per stage: each accumulates over its own epoch
            self.train_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)
            self.val_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)
            self.test_acc = torchmetrics.Accuracy(task="multiclass", num_classes=out_features)

    # --- hooks to override for another network ---------------------------------------------
    def build_network(self, sizes: list[int]) -> nn.Module:
        h = self.hparams
        if h.network == "cnn":
            return build_cnn(h.image_shape, h.channels, sizes, h.activation, h.bias, h.last_activation, h.pool, h.backend)
        return build_network(sizes, h.activation, h.bias, h.last_activation, h.backend, h.fused)

    def _loss_module(self) -> nn.Module:
        h = self.hparams
        if h.backend == "handgrad":
            import handgrad.nn as hnn

            return hnn.CrossEntropyLoss(reduction=h.reduction) if h.loss == "cross_entropy" else hnn.HalfSquaredErrorLoss(reduction=h.reduction)
        return nn.CrossEntropyLoss(reduction=h.reduction) if h.loss == "cross_entropy" else TorchHalfSquaredErrorLoss(h.reduction)

    # --- steps ---------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def _step(self, batch, stage: str) -> torch.Tensor:
        x, y = batch  # x (B, D_0); y (B,) class indices or (B, K) targets
        out = self(x)  # (B, D_L)
        target = y
        if self.hparams.task == "classification" and self.hparams.loss == "half_squared_error":
            target = nn.functional.one_hot(y, out.shape[-1]).to(out.dtype)  # (B, C)
        loss = self.loss_fn(out, target)
        n = x.shape[0]
        # logged per sample whatever the reduction, so batch sizes 1 and N plot on one scale
        per_sample = loss / n if self.hparams.reduction == "sum" else loss
        # sync_dist: under DDP the epoch value averages all processes (one all-reduce per epoch)
        self.log(f"{stage}/loss", per_sample.detach(), on_step=False, on_epoch=True, batch_size=n,
                 sync_dist=True, prog_bar=stage != "test")
        if self.hparams.task == "classification":
            acc = getattr(self, f"{stage}_acc")
            acc(out.detach(), y)
            self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, batch_size=n, prog_bar=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        if self.hparams.reduction == "sum" and self._trainer is not None and self.trainer.world_size > 1:
            # DDP averages gradients over the W processes; with L = Σ_n C^n each process holds a
            # 1/W share of the batch, so scaling by W makes the update that of the whole batch.
            loss = loss * self.trainer.world_size
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def predict_step(self, batch, batch_idx: int) -> dict[str, torch.Tensor]:
        x, y = batch
        out = self(x)
        if self.hparams.task == "classification":
            return {"pred": out.argmax(-1), "target": y}
        return {"pred": out, "target": y}

    # --- optimizer: one parameter group per layer ---------------------------------------------
    def _layers(self) -> dict[str, nn.Module]:
        """The modules holding parameters (affine layers; cnn: convs and batch norms too), in forward order."""
        return {name: m for name, m in self.net.named_modules() if any(True for _ in m.parameters(recurse=False))}

    def param_groups(self) -> list[dict[str, Any]]:
        """One group per module holding parameters (each affine layer), in forward order,
        with ``lr`` = α_w from ``layer_lr`` or the default α."""
        h = self.hparams
        groups = {name: list(m.parameters(recurse=False)) for name, m in self._layers().items()}
        out = []
        for i, (name, params) in enumerate(groups.items()):
            lr = h.lr
            if h.layer_lr is not None and i < len(h.layer_lr) and h.layer_lr[i] is not None:
                lr = h.layer_lr[i]
            out.append({"params": params, "lr": lr, "name": f"net.{name}"})
        return out

    def configure_optimizers(self):
        init = dict(self.hparams.optimizer or DEFAULT_OPTIMIZER)
        init["init_args"] = {**(init.get("init_args") or {}), "lr": self.hparams.lr}
        optimizer = instantiate_class(self.param_groups(), init)
        if not self.hparams.lr_scheduler:
            return optimizer
        scheduler = instantiate_class(optimizer, dict(self.hparams.lr_scheduler))
        config = {"scheduler": scheduler, "interval": "epoch"}
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            config["monitor"] = getattr(scheduler, "monitor", "val/loss")
        return {"optimizer": optimizer, "lr_scheduler": config}
