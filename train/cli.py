"""``python -m train {fit,validate,test,predict} --config configs/<name>.yaml``: LightningCLI.

On top of Lightning's CLI:
  * the model's input/output sizes and task come from the data module (argument links), so a
    config names the data once;
  * top-level ``optimizer:`` / ``lr_scheduler:`` (``--optimizer Adam``, ``--lr_scheduler StepLR``)
    are handed to the model, which builds one parameter group per layer; the learning rate α is
    ``model.lr`` (per layer: ``model.layer_lr``); the default optimizer is plain SGD;
  * ``dp:`` (absent unless a config has it; configs/digits_dp.yaml) adds ``handgrad.dp.DPSGDCallback``:
    every step a DP-SGD step, ε logged per epoch, training stopped at a target ε;
  * ``checkpoint:`` configures the checkpoints (``train.callbacks.Checkpoint``: best, and last
    at the end of every epoch);
  * ``--ckpt_path last`` finds the newest ``last.ckpt`` of the run name; a checkpoint whose
    network, optimizer or data differ from the config is refused before anything is written;
  * ``fit`` ends with a test of the best checkpoint (``test_after_fit``) and prints a summary
    counting the epochs this run trained;
  * when stdout is not a terminal, one plain line per epoch replaces the progress bar;
  * configuration and data errors stop with one line, not a traceback.
"""
from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeTuple, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_only

from handgrad.dp import DPSGDCallback

from .callbacks import Checkpoint, Curves, PredictionWriter, Progress
from .data import TabularData
from .errors import ConfigError
from .model import Model

__all__ = ["TrainCLI", "main", "find_last_checkpoint"]


def find_last_checkpoint(save_dir: str | Path, name: str) -> Optional[Path]:
    """The newest ``<save_dir>/<name>/version_*/checkpoints/last*.ckpt``, or None."""
    found = sorted(Path(save_dir, name).glob("version_*/checkpoints/last*.ckpt"), key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


class SaveConfig(SaveConfigCallback):
    """Writes the resolved config.yaml into the run's directory; nothing when there is no logger
    (Lightning would otherwise write it into the current directory)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is None:
            return
        super().setup(trainer, pl_module, stage)


def _no_litlogger_tip(record: logging.LogRecord) -> bool:
    return "litlogger" not in record.getMessage()


def _quiet_lightning() -> None:
    """Silence what a user of the app cannot act on: Lightning's advertisement for its cloud
    logger, Lightning 2.6's own use of a torch pytree API that torch 2.13 deprecates, and a
    predict-time warning about batch indices nothing here uses."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):  # rank_zero_info's
        logging.getLogger(name).addFilter(_no_litlogger_tip)
    warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
    # predict: our loaders yield whole batches (batch_size=None), and PredictionWriter writes the
    # rows in order without the indices Lightning says it cannot infer
    warnings.filterwarnings("ignore", message=r"Couldn't infer the batch indices", category=UserWarning)


# what a checkpoint must share with the config to be loaded into it (the model's hparams); the
# optimizer, the scheduler and the data matter only when fit resumes training from it
NETWORK_KEYS = ("task", "network", "image_shape", "in_features", "channels", "pool", "hidden", "out_features", "bias",
                "activation", "last_activation")


def checkpoint_mismatch(ckpt: dict[str, Any], model_hparams: dict[str, Any], data_hparams: dict[str, Any],
                        resume: bool) -> list[str]:
    """What differs between a checkpoint and the model/data built from the config, one
    ``name: checkpoint → config`` phrase each; empty when it fits."""
    saved = ckpt.get("hyper_parameters", {})
    diffs = [f"model.{k}: {saved[k]!r} → {model_hparams.get(k)!r}" for k in NETWORK_KEYS
             if k in saved and saved[k] != model_hparams.get(k)]
    if not resume:
        return diffs

    def class_of(section: Optional[dict]) -> Optional[str]:
        return (section or {}).get("class_path")

    for key in ("optimizer", "lr_scheduler"):
        if key in saved and class_of(saved[key]) != class_of(model_hparams.get(key)):
            diffs.append(f"{key}: {class_of(saved[key])} → {class_of(model_hparams.get(key))}")
    saved_data = ckpt.get("datamodule_hyper_parameters")
    if saved_data is not None:  # num_workers changes how the data is loaded, not what it is
        def show(d: dict, k: str) -> str:
            return repr(d[k]) if k in d else "(not set)"

        keys = sorted((set(saved_data) | set(data_hparams)) - {"num_workers", "_instantiator"})
        diffs += [f"data.{k.lstrip('_')}: {show(saved_data, k)} → {show(data_hparams, k)}" for k in keys
                  if show(saved_data, k) != show(data_hparams, k)]
    return diffs


class TrainCLI(LightningCLI):
    def __init__(self, args=None, run: bool = True, **kwargs):
        _quiet_lightning()
        self.progress = Progress()
        kwargs.setdefault("trainer_defaults", {})
        kwargs["trainer_defaults"] = {
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs", "name": "run"}},
            "callbacks": [Curves(), PredictionWriter(), self.progress],
            # the data modules shard batches over DDP processes themselves (train.data.EpochBatches)
            "use_distributed_sampler": False,
            **kwargs["trainer_defaults"],
        }
        super().__init__(
            Model,
            TabularData,
            subclass_mode_data=True,
            save_config_callback=SaveConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args,
            run=run,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # the optimizer: any torch.optim class; `params` and `lr` come from the model (param groups, α)
        parser.add_subclass_arguments(
            (torch.optim.Optimizer,), "optimizer", instantiate=False, fail_untyped=False, skip={"params", "lr"},
            required=False,
        )
        parser.set_defaults({"optimizer": {"class_path": "torch.optim.SGD"}})
        parser.link_arguments("optimizer", "model.optimizer")
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple, link_to="model.lr_scheduler")
        # the network's sizes and task come from the data
        parser.link_arguments("data", "model.in_features", compute_fn=lambda d: d.num_features, apply_on="instantiate")
        parser.link_arguments("data", "model.out_features", compute_fn=lambda d: d.num_outputs, apply_on="instantiate")
        parser.link_arguments("data", "model.task", compute_fn=lambda d: d.task, apply_on="instantiate")
        parser.link_arguments("data", "model.image_shape", compute_fn=lambda d: d.image_shape, apply_on="instantiate")
        # checkpoints: best (by `monitor`) and last, saved at the end of every epoch
        parser.add_lightning_class_args(Checkpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/loss", "checkpoint.mode": "min", "checkpoint.filename": "best",
            "checkpoint.save_last": True, "checkpoint.save_top_k": 1, "checkpoint.save_on_train_epoch_end": True,
        })
        # DP-SGD (configs/digits_dp.yaml): absent unless the config has a dp: section
        parser.add_lightning_class_args(DPSGDCallback, "dp", subclass_mode=True, required=False)
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit: test the best checkpoint on the test split when training ends")
        parser.add_argument("--num_threads", type=Optional[int], default=1,
                            help="torch CPU threads per process (null: torch's default, one per core). 1 is "
                                 "fastest for small networks: digits.yaml took 4× the CPU time with 2")

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        # a config without a dp: section leaves that callback None: there is none to add
        return super()._instantiate_trainer(config, [c for c in callbacks if c is not None])

    # --- before anything is built: threads, CUDA, the console, `--ckpt_path last` -----------------
    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        if config.get("num_threads"):
            torch.set_num_threads(config.num_threads)
        trainer = config.get("trainer", {})
        if str(trainer.get("accelerator")) in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"trainer.accelerator is {trainer.accelerator!r} but this torch ({torch.__version__}) "
                              "sees no CUDA device; leave out configs/gpu.yaml or set --trainer.accelerator cpu")
        if trainer.get("enable_progress_bar") in (True, None) and not sys.stdout.isatty():
            trainer["enable_progress_bar"] = False  # a log file gets one line per epoch, not the bar's redraws
            self.progress.lines = True
        if not self.subcommand:
            return
        if config.get("ckpt_path") != "last":
            return
        save_dir, name = self._logger_location(config)
        last = find_last_checkpoint(save_dir, name) if save_dir else None
        if last is None:
            raise ConfigError(f"--ckpt_path last: no last.ckpt under {save_dir}/{name}/version_*/checkpoints/")
        config["ckpt_path"] = str(last)
        self._print(f"resuming from {last}")

    @staticmethod
    def _logger_location(config) -> tuple[Optional[str], Optional[str]]:
        logger = config.get("trainer", {}).get("logger")
        init = getattr(logger, "init_args", None) if logger not in (None, False, True) else None
        if init is None:
            return None, None
        return init.get("save_dir", "runs"), init.get("name", "lightning_logs")

    @staticmethod
    @rank_zero_only
    def _print(msg: str) -> None:
        print(msg, flush=True)

    # --- a checkpoint must fit the config: refused before the trainer writes anything -----------
    def _parse_ckpt_path(self) -> None:
        """Lightning (2.3 on) overwrites the model's settings in the config with the checkpoint's
        when ``--ckpt_path`` names a file, so ``--model.hidden [8]`` or ``--optimizer SGD`` would
        be dropped without a word. Here the config stays what the user wrote, and a checkpoint
        that does not fit it is refused with what differs (``_check_checkpoint``)."""

    def _check_checkpoint(self) -> None:
        path = self.config[self.subcommand].get("ckpt_path")
        if not path or not Path(path).is_file():
            return  # none, or one of Lightning's names ("best", "hpc"), which it resolves itself
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        data_hparams = dict(getattr(self.datamodule, "hparams", {}) or {})
        diffs = checkpoint_mismatch(ckpt, dict(self.model.hparams), data_hparams, resume=self.subcommand == "fit")
        if diffs:
            raise ConfigError(f"checkpoint {path} does not fit the config (checkpoint → config): {'; '.join(diffs)}")

    def before_validate(self) -> None:
        self._check_checkpoint()

    def before_test(self) -> None:
        self._check_checkpoint()

    def before_predict(self) -> None:
        self._check_checkpoint()

    # --- fit: time it, test the best checkpoint, print what was written --------------------------
    def before_fit(self) -> None:
        self._check_checkpoint()
        self._t0 = time.perf_counter()

    def after_fit(self) -> None:
        trainer = self.trainer
        seconds = time.perf_counter() - self._t0
        if trainer.fast_dev_run or trainer.interrupted:
            return
        test_line = ""
        if self.config.fit.get("test_after_fit", True):
            ckpt = trainer.checkpoint_callback
            best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
            results = trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best, verbose=False)
            metrics = results[0] if results else {}
            which = f"best checkpoint {Path(best).name}" if best else "final weights"
            test_line = ", ".join(f"{k} {v:.4f}" for k, v in sorted(metrics.items())) + f" ({which})"
        lines = [self._fit_line(seconds)]
        if test_line:
            lines.append(f"test: {test_line}")
        if trainer.logger is not None and trainer.log_dir:
            out = Path(trainer.log_dir)
            files = [f for f in ("config.yaml", "metrics.csv", "checkpoints/best.ckpt", "checkpoints/last.ckpt",
                                 "curves.csv", "curves.png") if (out / f).is_file()]  # no best.ckpt without validation
            lines.append(f"outputs: {out}/ ({', '.join(files)})")
        self._print("\n".join(lines))

    def _fit_line(self, seconds: float) -> str:
        """What this run trained: a resumed run counts from the epoch after its checkpoint's."""
        first, end = self.progress.first_epoch, self.trainer.current_epoch
        resumed = f", resumed after epoch {first - 1}" if first else ""
        if end <= first:
            return f"fit: no epoch left to train (trainer.max_epochs {self.trainer.max_epochs}){resumed}"
        span = f"epochs {first}..{end - 1}" if end - first > 1 else f"epoch {first}"
        steps = self.trainer.global_step - self.progress.first_step
        return f"fit: {end - first} epoch{'s' if end - first > 1 else ''} ({span}), {steps} steps in {seconds:.1f} s{resumed}"


def main(args: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if args is None else args
    if argv and argv[0] == "compare":
        from .compare import main as compare_main

        compare_main(argv[1:])
        return
    try:
        TrainCLI(args=args)
    except Exception as e:
        cause = _user_error(e)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None


def _user_error(e: BaseException | None) -> Exception | None:
    """The ConfigError (or DataError) behind ``e`` (jsonargparse wraps errors raised while
    building the model and the data), or Lightning's own MisconfigurationException."""
    seen = set()
    while e is not None and id(e) not in seen:
        if isinstance(e, (ConfigError, MisconfigurationException)):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None
