"""The Lightning training app (``python -m train``): configs, CLI, resume, DDP, parity, data errors.

Runs on CPU in well under a minute; the full digits run belongs to the README, not here.
"""
from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lightning")
pytest.importorskip("sklearn")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # `train` is a top-level package run from the repo root
    sys.path.insert(0, str(REPO))

import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from train.callbacks import read_history  # noqa: E402
from train.cli import TrainCLI, main  # noqa: E402
from train.data import DataError, Digits, FileData, Moons  # noqa: E402
from train.model import Model  # noqa: E402

CONFIGS = REPO / "configs"


@pytest.fixture(autouse=True)
def _plain_argv_in_tmp(monkeypatch, tmp_path):
    # LightningCLI(args=...) warns when sys.argv also holds arguments (pytest's own)
    monkeypatch.setattr(sys, "argv", ["train"])
    # runs without a logger put checkpoints under ./checkpoints: keep them out of the repository
    monkeypatch.chdir(tmp_path)
QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def cli(*args: str, run: bool = True) -> TrainCLI:
    return TrainCLI(args=[str(a) for a in args], run=run)


def fast_dev_run(*args: str) -> TrainCLI:
    return cli("fit", *args, "--trainer.fast_dev_run", "true", "--trainer.logger", "false", *QUIET)


# --- every config: a fast_dev_run (one train/val batch) ------------------------------------------
@pytest.mark.parametrize("name", ["digits", "digits_cnn", "seed_sgd", "seed_batch", "moons"])
def test_fast_dev_run_config(name):
    c = fast_dev_run("--config", CONFIGS / f"{name}.yaml")
    assert c.trainer.state.finished
    assert c.trainer.global_step == 1


def test_fast_dev_run_seed_regression():
    c = fast_dev_run("--config", CONFIGS / "seed_sgd.yaml", "--data", "train.data.SeedRegression",
                     "--data.batch_size", "8", "--checkpoint.monitor", "val/loss", "--checkpoint.mode", "min")
    assert c.model.hparams.task == "regression" and c.model.hparams.out_features == 1
    assert c.trainer.state.finished


def test_fast_dev_run_ddp_cpu_config():
    # configs/ddp_cpu.yaml says strategy: ddp (Lightning relaunches the script); inside pytest
    # the processes are forked instead
    c = fast_dev_run("--config", CONFIGS / "moons.yaml", "--config", CONFIGS / "ddp_cpu.yaml",
                     "--trainer.strategy", "ddp_fork")
    assert c.trainer.world_size == 2 and c.trainer.state.finished


def test_gpu_config(capsys):
    if torch.cuda.is_available():
        c = fast_dev_run("--config", CONFIGS / "digits.yaml", "--config", CONFIGS / "gpu.yaml")
        assert c.trainer.state.finished
        return
    with pytest.raises(SystemExit) as e:  # no CUDA here: check that it parses and resolves
        cli("fit", "--config", CONFIGS / "digits.yaml", "--config", CONFIGS / "gpu.yaml", "--print_config")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "accelerator: gpu" in out and "precision: bf16-mixed" in out
    # and running it says why in one line, before anything is written
    assert_one_line_error(capsys, ["fit", "--config", CONFIGS / "digits.yaml", "--config", CONFIGS / "gpu.yaml"],
                          "error: trainer.accelerator is 'gpu' but this torch")


def assert_one_line_error(capsys, args, message):
    """``python -m train ARGS`` stops with status 2 and one ``error:`` line holding ``message``,
    no traceback, and writes no run directory (the tests run in an empty tmp_path)."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in err and not Path("runs").exists()
    return errors[0]


def test_print_config_and_overrides(capsys):
    with pytest.raises(SystemExit):
        cli("fit", "--config", CONFIGS / "digits.yaml", "--model.lr", "0.05", "--trainer.max_epochs", "3",
            "--optimizer.momentum", "0.5", "--print_config")
    out = capsys.readouterr().out
    assert "lr: 0.05" in out and "max_epochs: 3" in out and "momentum: 0.5" in out


def test_optimizer_param_groups_per_layer_lr():
    c = cli("--config", CONFIGS / "seed_sgd.yaml", "--model.layer_lr", "[1.0, null, 0.25]",
            "--optimizer", "Adam", "--optimizer.betas", "[0.8, 0.99]", run=False)
    opt = c.model.configure_optimizers()
    assert isinstance(opt, torch.optim.Adam) and tuple(opt.defaults["betas"]) == (0.8, 0.99)  # torch 2.4's Adam keeps the list given
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.5, 0.25]  # null falls back to model.lr
    assert [len(g["params"]) for g in opt.param_groups] == [2, 2, 2]  # W_l and b_l per layer
    c = cli("--config", CONFIGS / "digits.yaml", run=False)  # SGD + cosine schedule
    conf = c.model.configure_optimizers()
    assert type(conf["optimizer"]) is torch.optim.SGD and conf["optimizer"].defaults["momentum"] == 0.9
    assert isinstance(conf["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.CosineAnnealingLR)
    assert Model().configure_optimizers().defaults["momentum"] == 0  # no config: plain SGD
    # the README's example for digits.yaml (64 → 256 → 10: two affine layers)
    c = cli("--config", CONFIGS / "digits.yaml", "--model.layer_lr", "[0.4, null]", run=False)
    assert [g["lr"] for g in c.model.configure_optimizers()["optimizer"].param_groups] == [0.4, 0.2]


def test_layer_lr_of_the_wrong_length_is_one_line(capsys):
    line = assert_one_line_error(capsys, ["fit", "--config", CONFIGS / "digits.yaml", "--model.layer_lr", "[0.5, null, 0.1]"],
                                 "model.layer_lr has 3 entries [0.5, null, 0.1] but the network 64 → 256 → 10 has 2")
    assert "one per layer" in line


# --- the CLI end to end in subprocesses: fit, killed mid-epoch, resumed, then test ----------------
class KillAt(Callback):
    """SIGKILLs its own process in the middle of epoch 2 (used by the resume test's subprocess)."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 3:
            os.kill(os.getpid(), signal.SIGKILL)


def run_cli(*args, cwd=REPO):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO), str(REPO / "tests")])}
    return subprocess.run([sys.executable, "-m", "train", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def moons_args(save_dir, epochs=4, quiet=QUIET):
    return ["--config", CONFIGS / "moons.yaml", "--trainer.max_epochs", epochs, "--trainer.logger.init_args.save_dir",
            save_dir, "--data.n_samples", "400", *quiet]


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    killed = run_cli("fit", *moons_args(runs), "--trainer.callbacks+=test_train.KillAt")
    # the progress bar left on, as a user would: stdout is a pipe here, not a terminal
    resumed = run_cli("fit", *moons_args(runs, quiet=[]), "--ckpt_path", "last")
    return runs, killed, resumed


def test_a_log_file_gets_a_line_per_epoch_and_no_noise(killed_and_resumed):
    _, _, resumed = killed_and_resumed
    out = resumed.stdout
    epochs = [line.split()[1] for line in out.splitlines() if line.startswith("epoch ")]
    assert epochs == ["2", "3"], out  # one plain line per epoch this run trained
    assert "epoch 2 (0..3)  train/loss " in out
    assert "\r" not in out and "it/s" not in out and len(out) < 2000, out  # no progress bar redraws
    # nothing a user cannot act on: Lightning's cloud-logger tip, its use of torch's deprecated
    # pytree API, or a warning that the checkpoint's directory is another run's
    for noise in ("litlogger", "LeafSpec", "dirpath has changed"):
        assert noise not in resumed.stderr, noise


def test_resume_after_kill(killed_and_resumed):
    runs, killed, resumed = killed_and_resumed
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "version_0/checkpoints/last.ckpt" in resumed.stdout
    # epochs 0 and 1 completed before the kill; the resumed run did epochs 2 and 3 only
    assert "fit: 2 epochs (epochs 2..3), " in resumed.stdout and "resumed after epoch 1" in resumed.stdout
    history = read_history(runs / "moons" / "version_1" / "curves.csv")
    assert [int(r["epoch"]) for r in history] == [0, 1, 2, 3]
    # the same run without the interruption gives the same curve: same weights and optimizer state
    # at the end of epoch 1, same batches afterwards (shuffling depends only on seed and epoch)
    c = cli("fit", *moons_args(runs / "straight"), "--trainer.logger", "false", "--test_after_fit", "false")
    straight = next(cb for cb in c.trainer.callbacks if type(cb).__name__ == "Curves").history
    for a, b in zip(history, straight, strict=True):
        for k in ("train/loss", "val/loss", "val/acc"):
            # separate processes, same single thread, same kernels: equal up to float32 rounding
            assert a[k] == pytest.approx(b[k], rel=1e-5), (a["epoch"], k)


def test_cli_test_and_predict_from_checkpoint(killed_and_resumed):
    runs, _, resumed = killed_and_resumed
    run_dir = runs / "moons" / "version_1"
    for f in ("config.yaml", "metrics.csv", "curves.csv", "curves.png", "checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        assert (run_dir / f).is_file(), f
    assert "test: test/acc" in resumed.stdout
    done = run_cli("test", "--config", run_dir / "config.yaml", "--ckpt_path", run_dir / "checkpoints" / "best.ckpt")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dirpath has changed" not in done.stderr and "litlogger" not in done.stderr, done.stderr
    line = next(ln for ln in done.stdout.splitlines() if "test/acc" in ln)
    assert float(line.replace("│", " ").split()[-1]) > 0.85  # moons, 4 epochs: about 0.97
    # predict (in this process): predictions.csv in a new version directory
    c = cli("predict", "--config", run_dir / "config.yaml", "--ckpt_path", run_dir / "checkpoints" / "best.ckpt", *QUIET)
    with open(Path(c.trainer.log_dir) / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 80  # the test split: 20% of 400 points
    assert np.mean([r["pred"] == r["target"] for r in rows]) > 0.85
    # compare: both runs' curves on one figure
    main(["compare", str(runs / "moons" / "version_1"), str(runs / "moons"), "--out", str(runs / "cmp.png")])
    assert (runs / "cmp.png").stat().st_size > 1000


# --- resume when the monitored metric never improves; checkpoints that do not fit --------------
def flat_args(save_dir, *extra):
    """moons with α = 0: val/acc is the same every epoch, so best.ckpt stays at epoch 0."""
    return ["fit", *moons_args(save_dir, epochs=2), "--data.n_samples", "200", "--model.lr", "0",
            "--trainer.log_every_n_steps", "5", *extra]


@pytest.fixture(scope="module")
def flat_run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("flat")
    with pytest.MonkeyPatch.context() as m:  # what the function-scoped autouse fixture does
        m.setattr(sys, "argv", ["train"])
        c = cli(*flat_args(runs), "--test_after_fit", "false")
    assert c.trainer.state.finished
    return runs


def test_last_ckpt_is_the_latest_epoch_when_the_metric_is_flat(flat_run, capsys):
    ckpts = flat_run / "moons" / "version_0" / "checkpoints"
    assert torch.load(ckpts / "best.ckpt", weights_only=False)["epoch"] == 0  # never improved after epoch 0
    last = torch.load(ckpts / "last.ckpt", weights_only=False)
    assert (last["epoch"], last["global_step"]) == (1, 10)  # the end of epoch 1: 2 epochs × 5 steps
    capsys.readouterr()
    main([str(a) for a in flat_args(flat_run, "--ckpt_path", "last", "--trainer.max_epochs", "3", "--test_after_fit", "false")])
    out = capsys.readouterr().out
    assert "version_0/checkpoints/last.ckpt" in out
    # it trained epoch 2 only, and says so
    assert "fit: 1 epoch (epoch 2), 5 steps in " in out and "resumed after epoch 1" in out, out


@pytest.mark.parametrize("extra,differs", [
    (["--optimizer", "Adam"], "optimizer: torch.optim.SGD → torch.optim.Adam"),
    (["--model.hidden", "[8]"], "model.hidden: [16, 16] → [8]"),
    (["--data.noise", "0.3"], "data.noise: 0.2 → 0.3"),
    (["--data", "train.data.Digits"], "model.in_features: 2 → 64"),
])
def test_a_checkpoint_that_does_not_fit_the_config_is_refused(flat_run, capsys, extra, differs):
    before = sorted(p.name for p in (flat_run / "moons").iterdir())
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in flat_args(flat_run, "--ckpt_path", "last", *extra)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert "does not fit the config" in line and differs in line, err
    assert "Traceback" not in err
    assert sorted(p.name for p in (flat_run / "moons").iterdir()) == before  # no new version_N left behind


@pytest.mark.parametrize("command,extra,differs", [
    ("fit", ["--optimizer", "Adam"], "optimizer: torch.optim.SGD → torch.optim.Adam"),
    ("validate", ["--model.hidden", "[8]"], "model.hidden: [16, 16] → [8]"),
])
def test_a_checkpoint_named_by_its_path_is_checked_too(flat_run, capsys, command, extra, differs):
    # Lightning would replace the config's model settings by the checkpoint's without a word
    last = flat_run / "moons" / "version_0" / "checkpoints" / "last.ckpt"
    args = [command, *flat_args(flat_run)[1:], "--ckpt_path", last, *extra]
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: checkpoint {last} does not fit the config" in err and differs in err, err


def test_curves_number_epochs_from_0_with_integer_ticks():
    from train.callbacks import figure

    history = [{"epoch": e, "train/loss": 1.0 / (e + 1), "val/loss": 1.2 / (e + 1), "val/acc": 0.5 + 0.1 * e}
               for e in range(3)]
    for runs in ({"a": history}, {"a": history, "b": history[:1] + [{"epoch": 40, "val/acc": 0.9}]}):  # linear, log axis
        fig = figure(runs)
        for ax in fig.axes:
            assert [list(line.get_xdata()) for line in ax.get_lines()][0] == [0, 1, 2]  # as on the console and in curves.csv
            ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks


# --- DDP: 2 forked CPU processes train like one ------------------------------------------------
def test_ddp_fork_two_processes_match_one(tmp_path):  # runs in tmp_path (the autouse fixture)
    args = ["fit", "--config", CONFIGS / "moons.yaml", "--trainer.max_epochs", "3", "--trainer.logger", "false",
            "--test_after_fit", "false", "--checkpoint.dirpath", tmp_path / "ckpt", *QUIET]
    one = cli(*args)
    two = cli(*args, "--config", CONFIGS / "ddp_cpu.yaml", "--trainer.strategy", "ddp_fork")
    assert two.trainer.world_size == 2
    m1, m2 = one.trainer.callback_metrics, two.trainer.callback_metrics
    # each process takes half of every batch and DDP averages the two half-batch means: the same
    # updates as one process; only float32 summation order differs (measured: ~1e-6 relative)
    assert float(m2["val/acc"]) == float(m1["val/acc"])
    assert float(m2["val/loss"]) == pytest.approx(float(m1["val/loss"]), rel=1e-4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # only the checkpoints asked for


# --- determinism and backend parity -----------------------------------------------------------
class StepLosses(Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def train_one_epoch(seed=0, **model_kwargs):
    pl.seed_everything(seed)
    data = Digits(batch_size=32)
    model = Model(in_features=data.num_features, out_features=data.num_outputs, **model_kwargs)
    rec = StepLosses()
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[rec], deterministic=True, limit_val_batches=0)
    trainer.fit(model, data)
    return np.array(rec.losses)


@pytest.mark.parametrize("loss,reduction,last", [("cross_entropy", "mean", None), ("half_squared_error", "sum", "sigmoid")])
def test_backend_parity_first_epoch(loss, reduction, last):
    kw = dict(hidden=[32], loss=loss, reduction=reduction, last_activation=last, lr=0.5 if reduction == "mean" else 0.02)
    hand, ref = train_one_epoch(backend="handgrad", **kw), train_one_epoch(backend="torch", **kw)
    assert len(hand) == len(ref) == 40
    rel = np.abs(hand - ref) / np.abs(ref)
    # the bound: float32, same initial weights and batches, over the first epoch
    assert rel.max() < 1e-4, rel.max()
    assert ref[-1] < 0.7 * ref[0]  # and it did learn


def test_cnn_backend_parity_first_epoch():
    # configs/digits_cnn.yaml's network, narrower: conv → batch norm (batch statistics) → ReLU → max pool ×2, linear
    kw = dict(network="cnn", channels=[8, 16], hidden=[], activation="relu", image_shape=[1, 8, 8], lr=0.1,
              optimizer={"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}})
    hand, ref = train_one_epoch(backend="handgrad", **kw), train_one_epoch(backend="torch", **kw)
    assert len(hand) == len(ref) == 40
    rel = np.abs(hand - ref) / np.abs(ref)
    # the bound: float32, same initial weights and batches; only summation order differs (measured: 3e-6)
    assert rel.max() < 1e-4, rel.max()
    assert ref[-1] < 0.3 * ref[0]  # and it did learn


# the backward nodes of torch's own layers (what the torch backend's CNN graph is made of)
NATIVE_LAYER_NODES = {"ConvolutionBackward0", "NativeBatchNormBackward0", "MaxPool2DWithIndicesBackward0",
                      "AvgPool2DBackward0", "AddmmBackward0", "MmBackward0", "ReluBackward0", "LogSoftmaxBackward0",
                      "NllLossBackward0"}


def backward_nodes(loss: torch.Tensor) -> list:
    """Every node of the graph behind ``loss``."""
    seen, stack = {}, [loss.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = node
            stack += [fn for fn, _ in node.next_functions]
    return list(seen.values())


@pytest.mark.parametrize("pool", ["max", "avg"])
def test_cnn_config_is_all_handgrad(pool):
    c = cli("--config", CONFIGS / "digits_cnn.yaml", "--model.pool", pool, run=False)
    model = c.model
    layers = model._layers()  # the modules holding parameters: each is one optimizer parameter group
    assert [type(m).__name__ for m in layers.values()] == ["Conv2d", "BatchNorm2d"] * 2 + ["Linear"]
    kinds = {type(m).__name__ for m in model.net.modules()}
    assert {"Conv2d", "BatchNorm2d", "ReLU", "Linear", {"max": "MaxPool2d", "avg": "AvgPool2d"}[pool]} <= kinds
    for name, m in layers.items():  # every module with parameters is handgrad's
        assert type(m).__module__.startswith("handgrad.nn"), (name, type(m))
    for m in model.net.modules():  # and every one that computes: the rest are the flatten/unflatten views
        assert type(m).__module__.startswith("handgrad.nn") or isinstance(m, (torch.nn.Sequential, torch.nn.Flatten,
                                                                               torch.nn.Unflatten)), type(m)
    ref = cli("--config", CONFIGS / "digits_cnn.yaml", "--model.pool", pool, "--model.backend", "torch", run=False).model
    for (k, a), b in zip(model.net.state_dict().items(), ref.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), k  # same initial weights on both backends
    x, y = next(iter(c.datamodule.train_dataloader()))  # (64, 64) flat images, (64,) labels
    loss = model.loss_fn(model(x), y)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    nodes = backward_nodes(loss)
    names = {type(n).__name__ for n in nodes}
    assert not names & NATIVE_LAYER_NODES, names & NATIVE_LAYER_NODES
    # every node is a handgrad Function's backward, a view (the flatten/unflatten) or a leaf's gradient
    for n in nodes:
        forward_cls = getattr(n, "_forward_cls", None)
        assert (forward_cls is not None and forward_cls.__module__.startswith("handgrad.")) or \
            type(n).__name__ in ("ViewBackward0", "AccumulateGrad"), type(n).__name__
    # the check can fail: the torch backend's graph holds those native nodes
    ref_names = {type(n).__name__ for n in backward_nodes(ref.loss_fn(ref(x), y))}
    pool_node = {"max": "MaxPool2DWithIndicesBackward0", "avg": "AvgPool2DBackward0"}[pool]
    assert {"ConvolutionBackward0", "NativeBatchNormBackward0", pool_node, "AddmmBackward0"} <= ref_names, ref_names


@pytest.mark.parametrize("args,message", [
    (["--config", CONFIGS / "moons.yaml", "--model.network", "cnn"], "model.network 'cnn' needs image data"),
    (["--config", CONFIGS / "digits_cnn.yaml", "--model.channels", "[4, 4, 4, 4]"],
     "model.channels [4, 4, 4, 4]: 4 blocks halve the 8×8 image 4 times, below 1×1"),
    (["--config", CONFIGS / "digits_cnn.yaml", "--model.layer_lr", "[0.1, null]"],
     "but the network has 5 layers with parameters (Conv2d, BatchNorm2d, Conv2d, BatchNorm2d, Linear)"),
])
def test_a_cnn_that_cannot_be_built_is_one_line(capsys, args, message):
    assert_one_line_error(capsys, ["fit", *args], message)


def test_same_seed_same_metrics():
    a, b = train_one_epoch(seed=3), train_one_epoch(seed=3)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, train_one_epoch(seed=4))  # the seed matters: different initial weights


def test_short_digits_run_above_90_percent():
    pl.seed_everything(0)
    data = Digits(batch_size=32)
    model = Model(hidden=[128], in_features=64, out_features=10, lr=0.1,
                  optimizer={"class_path": "torch.optim.SGD", "init_args": {"momentum": 0.9}})
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(model, data)
    acc = trainer.test(model, data, verbose=False)[0]["test/acc"]
    assert acc > 0.90, acc


# --- your own data: good files train, bad files stop with the file and the problem -------------
def write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def write_file(path, content):
    path.write_bytes(content) if isinstance(content, bytes) else path.write_text(content)
    return path


def write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_file_data_csv_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 3))
    names = np.where(x[:, 0] > 0, "pos", "neg")
    p = write_csv(tmp_path / "d.csv", ["a", "b", "c", "kind"], [[*r, n] for r, n in zip(x, names)])
    d = FileData(str(p), label="kind", features=["a", "c"], batch_size=8)
    assert d.num_features == 2 and d.num_outputs == 2 and d.class_names == ["neg", "pos"]
    np.savez(tmp_path / "d.npz", X=x, y=(x[:, 0] > 0).astype(int), w=x[:, 1])
    d = FileData(str(tmp_path / "d.npz"), label="y", features=["X", "w"])
    assert d.num_features == 4
    c = fast_dev_run("--config", CONFIGS / "moons.yaml", "--data", "train.data.FileData", "--data.path", str(p),
                     "--data.label", "kind", "--data.batch_size", "8")
    assert c.model.hparams.in_features == 3 and c.trainer.state.finished


BAD = {
    "missing file": (lambda d: d / "nope.csv", {}, "no such file"),
    "no label column": (lambda d: write_csv(d / "f.csv", ["a", "b"], [[1, 2], [3, 4]]), {"label": "y"},
                        "has no label column 'y'; its columns are: a, b"),
    "nan feature": (lambda d: write_csv(d / "f.csv", ["a", "label"], [[1, 0], ["nan", 1], [2, 0], [3, 1]]), {},
                    "feature 'a' has a NaN or infinite value in row 2"),
    "empty cell": (lambda d: write_csv(d / "f.csv", ["a", "label"], [[1, 0], ["", 1], [2, 0], [3, 1]]), {},
                   "feature 'a' has a NaN or infinite value in row 2"),
    "text feature": (lambda d: write_csv(d / "f.csv", ["a", "label"], [[1, 0], ["x", 1]]), {},
                     "feature 'a' has a non-numeric value 'x' in row 2"),
    "ragged row": (lambda d: write_csv(d / "f.csv", ["a", "label"], [[1, 0], [1, 2, 3]]), {},
                   "row 2 has 3 values but the header has 2 columns"),
    "missing label": (lambda d: write_csv(d / "f.csv", ["a", "label"], [[1, 0], [2, ""], [3, 1]]), {},
                      "label 'label' is missing (empty or NaN) in row 2"),
    "empty csv": (lambda d: write_file(d / "f.csv", ""), {}, "is empty"),
    "npz lengths": (lambda d: write_npz(d / "f.npz", x=np.zeros((5, 2)), label=np.arange(4)), {},
                    "feature array 'x' has 5 rows but label array 'label' has 4"),
    "npz no label": (lambda d: write_npz(d / "f.npz", x=np.zeros((5, 2))), {},
                     "has no label array 'label'; its arrays are: x"),
    "not an npz": (lambda d: write_file(d / "f.npz", b"garbage"), {}, "is not a readable .npz"),
    "wrong suffix": (lambda d: write_file(d / "f.txt", "a"), {}, "unsupported file type '.txt'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_data_message(tmp_path, case):
    make, kwargs, message = BAD[case]
    path = make(tmp_path)
    with pytest.raises(DataError) as e:
        FileData(str(path), **kwargs)
    assert f"data file '{path}'" in str(e.value) and message in str(e.value), str(e.value)


def test_bad_data_stops_cli_before_training(tmp_path, capsys):
    path = write_csv(tmp_path / "f.csv", ["a", "b"], [[1, 2], [3, 4]])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(CONFIGS / "moons.yaml"), "--data", "train.data.FileData", "--data.path", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: data file '{path}': has no label column 'label'" in err
    assert "Traceback" not in err and not (tmp_path / "runs").exists()


def test_moons_is_seeded():
    a, b = Moons(seed=1), Moons(seed=1)
    assert torch.equal(a.splits["train"].tensors[0], b.splits["train"].tensors[0])
    assert len(a.splits["train"]) == 700 and len(a.splits["test"]) == 200


@pytest.mark.parametrize("n,batch,world", [(700, 32, 1), (700, 32, 2), (33, 32, 2), (1257, 1257, 2), (10, 3, 3)])
def test_epoch_batches_shard_a_batch_over_processes(n, batch, world):
    from train.data import EpochBatches

    shards = [EpochBatches(n, batch, seed=0, rank=r, world=world) for r in range(world)]
    for s in shards:
        s.set_epoch(5)
    per_rank = [list(s) for s in shards]
    assert len({len(b) for b in per_rank}) == 1  # every process makes the same number of steps
    assert all(len(s) == len(b) for s, b in zip(shards, per_rank))
    single = EpochBatches(n, batch, seed=0)
    single.set_epoch(5)
    for step, whole in enumerate(single):  # the processes of one step share the single-process batch
        if step < len(per_rank[0]):
            assert torch.equal(torch.cat([b[step] for b in per_rank]), whole)
    evals = [torch.cat(list(EpochBatches(n, 4096, None, rank=r, world=world))) for r in range(world)]
    assert torch.equal(torch.cat(evals), torch.arange(n))  # evaluation: every sample exactly once
