"""Callbacks the CLI adds to every run: per-epoch curves (csv + png) and prediction files."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback

__all__ = ["Curves", "PredictionWriter", "CURVE_KEYS", "plot_runs"]

CURVE_KEYS = ["train/loss", "train/acc", "val/loss", "val/acc"]


def _run_dir(trainer: pl.Trainer) -> Path | None:
    if trainer.logger is None or trainer.fast_dev_run or trainer.log_dir is None:
        return None
    return Path(trainer.log_dir)


class Curves(Callback):
    """Records train and val loss/accuracy after every epoch; at the end of fit writes
    ``curves.csv`` and ``curves.png`` into the run's directory.

    The history is part of the checkpoint, so a run resumed with ``--ckpt_path last`` draws
    every epoch, including those before the interruption. It is recorded at train-epoch end,
    which Lightning runs before the checkpoint callbacks, so the checkpoint includes the epoch.
    """

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []
        self._validated_epoch = -1

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validated_epoch = trainer.current_epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        m = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, "step": trainer.global_step}
        # val values only for epochs that ran validation (check_val_every_n_epoch > 1 skips some)
        keys = [k for k in CURVE_KEYS if k.startswith("train/") or self._validated_epoch == trainer.current_epoch]
        row.update({k: float(m[k]) for k in keys if k in m})
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        out = _run_dir(trainer)
        if out is None or not trainer.is_global_zero or not self.history:
            return
        out.mkdir(parents=True, exist_ok=True)
        write_history(self.history, out / "curves.csv")
        plot_runs({out.parent.name: self.history}, out / "curves.png", title=str(out))

    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))


def write_history(history: list[dict[str, float]], path: Path) -> None:
    keys = ["epoch", "step"] + [k for k in CURVE_KEYS if any(k in r for r in history)]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


def read_history(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def plot_runs(runs: dict[str, list[dict[str, float]]], path: Path, title: str = "", logx: bool | None = None) -> None:
    """Loss (left) and accuracy (right) per epoch; train dashed, val solid; one colour per run.

    ``logx=None``: a log epoch axis when the runs' lengths differ tenfold or more (SGD's 5 epochs
    against batch gradient descent's 500)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    has_acc = any("val/acc" in r or "train/acc" in r for h in runs.values() for r in h)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    for i, (label, history) in enumerate(runs.items()):
        color = f"C{i}"
        for j, metric in enumerate(["loss", "acc"] if has_acc else ["loss"]):
            ax = axes[0, j]
            for stage, style in (("train", "--"), ("val", "-")):
                pts = [(r["epoch"] + 1, r[f"{stage}/{metric}"]) for r in history if f"{stage}/{metric}" in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{label} {stage}")
            ax.set_xlabel("epoch")
            ax.set_ylabel("loss per sample" if metric == "loss" else "accuracy")
            ax.grid(alpha=0.3)
    axes[0, 0].set_yscale("log")
    lengths = [max((r["epoch"] for r in h), default=0) + 1 for h in runs.values()]
    if logx or (logx is None and max(lengths) >= 10 * min(lengths)):
        for ax in axes[0]:
            ax.set_xscale("log")
    axes[0, -1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class PredictionWriter(BasePredictionWriter):
    """``predict`` writes ``predictions.csv`` (row, prediction, target) into the run's directory."""

    def __init__(self) -> None:
        super().__init__(write_interval="epoch")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        out = _run_dir(trainer)
        if out is None or not predictions:
            return
        pred = torch.cat([p["pred"] for p in predictions]).cpu()
        target = torch.cat([p["target"] for p in predictions]).cpu()
        pred = pred.reshape(len(pred), -1)
        target = target.reshape(len(target), -1)
        out.mkdir(parents=True, exist_ok=True)
        name = "predictions.csv" if trainer.world_size == 1 else f"predictions_rank{trainer.global_rank}.csv"
        with open(out / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["row"] + [f"pred{j}" if pred.shape[1] > 1 else "pred" for j in range(pred.shape[1])]
                       + [f"target{j}" if target.shape[1] > 1 else "target" for j in range(target.shape[1])])
            for i in range(len(pred)):
                w.writerow([i, *pred[i].tolist(), *target[i].tolist()])
        print(f"predictions: {out / name} ({len(pred)} rows)")
