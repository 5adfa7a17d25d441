"""Callbacks the CLI adds to every run: the checkpoints (best and last), per-epoch curves (csv +
png), the console's per-epoch lines, and prediction files."""
from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["Checkpoint", "Curves", "Progress", "PredictionWriter", "CURVE_KEYS", "plot_runs", "figure"]

CURVE_KEYS = ["train/loss", "train/acc", "val/loss", "val/acc"]


def _run_dir(trainer: pl.Trainer) -> Path | None:
    if trainer.logger is None or trainer.fast_dev_run or trainer.log_dir is None:
        return None
    return Path(trainer.log_dir)


class Checkpoint(ModelCheckpoint):
    """Lightning's ModelCheckpoint, with ``last.ckpt`` written at the end of every training epoch.

    Lightning 2.6 writes ``last.ckpt`` only at a step where it also writes a top-k checkpoint, so
    with ``save_top_k: 1`` it is a copy of ``best.ckpt``: a run whose monitored metric stops
    improving resumes from its best epoch, not its last. Here ``save_last`` means what the
    config says: the end of the latest epoch, written after the best checkpoint (so it holds
    this epoch's best-so-far) and after ``Curves`` has recorded the epoch.

    A checkpoint of another directory (a resumed fit writes a new ``version_N``; test, validate
    and predict save nothing) keeps its best/last bookkeeping to itself: a resumed run's
    ``best.ckpt`` is the best of the epochs it trained.
    """

    def __init__(self, *args: Any, save_last: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, save_last=False, **kwargs)  # last.ckpt is written below instead
        self.keep_last = bool(save_last)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if not self.keep_last or trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING:
            return
        self.last_model_path = str(Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}")
        trainer.save_checkpoint(self.last_model_path, self.save_weights_only)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("dirpath", self.dirpath) == self.dirpath:
            super().load_state_dict(state_dict)


class Progress(Callback):
    """Where this fit started (a resumed run starts after the checkpoint's epoch), for the CLI's
    summary; with ``lines=True``, one plain line per epoch on stdout instead of a progress bar
    (what the CLI uses when stdout is not a terminal: a redirected log gets a line per epoch, not
    the bar's redraws)."""

    def __init__(self, lines: bool = False) -> None:
        self.lines = lines
        self.first_epoch = self.first_step = 0
        self._t = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.first_epoch, self.first_step = trainer.current_epoch, trainer.global_step

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._t = time.perf_counter()

    @rank_zero_only
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.lines:
            return
        m = trainer.callback_metrics
        values = "  ".join(f"{k} {float(m[k]):.4f}" for k in CURVE_KEYS + ["dp/epsilon"] if k in m)  # ε: DP-SGD runs
        span = f" (0..{trainer.max_epochs - 1})" if trainer.max_epochs is not None and trainer.max_epochs > 0 else ""
        print(f"epoch {trainer.current_epoch}{span}  {values}  ({time.perf_counter() - self._t:.1f} s)", flush=True)


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

    Epochs are numbered from 0, as on the console and in ``curves.csv``, with integer ticks.
    ``logx=None``: a log epoch axis when the runs' lengths differ tenfold or more (SGD's 5 epochs
    against batch gradient descent's 500); it is symmetric-log, linear from 0 to 1, so epoch 0
    has a place on it."""
    fig = figure(runs, title, logx)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(runs: dict[str, list[dict[str, float]]], title: str = "", logx: bool | None = None):
    """The matplotlib figure ``plot_runs`` saves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    has_acc = any("val/acc" in r or "train/acc" in r for h in runs.values() for r in h)
    fig, axes = plt.subplots(1, 2 if has_acc else 1, figsize=(11 if has_acc else 6, 4), squeeze=False)
    for i, (label, history) in enumerate(runs.items()):
        color = f"C{i}"
        for j, metric in enumerate(["loss", "acc"] if has_acc else ["loss"]):
            ax = axes[0, j]
            for stage, style in (("train", "--"), ("val", "-")):
                pts = [(r["epoch"], r[f"{stage}/{metric}"]) for r in history if f"{stage}/{metric}" in r]
                if pts:
                    ax.plot(*zip(*pts), style, color=color, label=f"{label} {stage}")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylabel("loss per sample" if metric == "loss" else "accuracy")
            ax.grid(alpha=0.3)
    axes[0, 0].set_yscale("log")
    lengths = [max((r["epoch"] for r in h), default=0) + 1 for h in runs.values()]
    if logx or (logx is None and max(lengths) >= 10 * min(lengths)):
        for ax in axes[0]:
            ax.set_xscale("symlog", linthresh=1)  # its ticks 0, 1, 10, 100: integers already
    axes[0, -1].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


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
