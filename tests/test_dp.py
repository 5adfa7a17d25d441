"""DP-SGD (``handgrad.dp``): the clip bounds each sample, the noise has the stated std, ε is
Opacus's, a step equals a torch.func reference (and Opacus's DPOptimizer), the Lightning
callback, Poisson sampling, and the app's configs/digits_dp.yaml."""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

import handgrad
from handgrad import dp, per_sample

opacus = pytest.importorskip("opacus")  # the dp extra (accountants) and the dev extra's reference

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def torch_mlp(dropout: float = 0.0) -> nn.Module:
    layers = [nn.Linear(6, 9), nn.Tanh()] + ([nn.Dropout(dropout)] if dropout else []) + [nn.Linear(9, 4)]
    return nn.Sequential(*layers).double()


def batch(n: int = 10, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(n, 6, generator=g, dtype=torch.float64)  # large enough that some samples get clipped
    return x, torch.randint(0, 4, (n,), generator=g)


def dp_step(model, x, y, mode: str, reduction: str, **kw) -> dp.DPOptimizer:
    """One DPOptimizer step (SGD, lr 1) of ``model`` on (x, y), fed by ``mode``."""
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, loss_reduction=reduction, **kw)
    dp_backward(opt, model, x, y, mode, reduction)
    opt.step()
    return opt


def dp_backward(opt, model, x, y, mode: str, reduction: str) -> None:
    """The cross-entropy backward ``opt`` clips: ghost (per-sample losses) or inside a capture."""
    if mode == "ghost":
        opt.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
    else:
        with per_sample.capture(model):
            F.cross_entropy(model(x), y, reduction=reduction).backward()


def reference_gradient(model, x, y, C, sigma, B, generator):
    """ĝ = (Σₙ cₙ gₙ + ξ) / B with gₙ from torch.func's vmap(grad) and ξ drawn per parameter in order."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_n(p, xn, yn):  # Cⁿ
        return F.cross_entropy(functional_call(model, p, (xn[None],)), yn[None])

    g = vmap(grad(loss_n), in_dims=(None, 0, 0))(params, x, y)  # {name: (N, *shape)} gₙ
    norms = torch.stack([v.reshape(len(x), -1).norm(dim=1) for v in g.values()], 1).norm(dim=1)  # ‖gₙ‖
    c = (C / (norms + 1e-6)).clamp(max=1.0)  # cₙ
    return {k: (torch.einsum("n,n...->...", c, v) + torch.normal(0.0, sigma * C, v.shape[1:], generator=generator,
                                                                 dtype=v.dtype)) / B for k, v in g.items()}


# --- the clip: every sample's contribution has norm ≤ C ------------------------------------------
@pytest.mark.parametrize("mode", ["ghost", "grads"])
def test_clipping_bounds_every_per_sample_norm(mode):
    model = handgrad.convert(torch_mlp())
    x, y = batch(12)
    C = 0.5
    contributions = []
    for n in range(len(x)):  # S of a one-sample batch is that sample's clipped gradient cₙ gₙ
        before = copy.deepcopy(model)
        opt = dp_step(model, x[n:n + 1], y[n:n + 1], mode, "sum", noise_multiplier=0.0, max_grad_norm=C)
        contributions.append(torch.cat([(b - a).flatten() for a, b in zip(model.parameters(), before.parameters())]))
        assert opt.last_norms.shape == (1,)
        model = before
    norms = torch.stack(contributions).norm(dim=1)
    assert (norms <= C * (1 + 1e-12)).all(), norms  # float64 rounding of c·‖g‖ with c = C/(‖g‖ + 1e-6)
    assert (norms > 0.99 * C).sum() >= 3, "the batch must hold clipped samples for the bound to be tested"
    # and the batch's S is the sum of those contributions (clipping is per sample, not per batch)
    before = copy.deepcopy(model)
    dp_step(model, x, y, mode, "sum", noise_multiplier=0.0, max_grad_norm=C)
    together = torch.cat([(b - a).flatten() for a, b in zip(model.parameters(), before.parameters())])
    torch.testing.assert_close(together, torch.stack(contributions).sum(0), rtol=1e-10, atol=1e-12)


# --- the noise: std σC, mean 0 --------------------------------------------------------------------
def test_noise_empirical_std():
    sigma, C, steps = 1.3, 0.7, 4
    model = handgrad.convert(nn.Sequential(nn.Linear(100, 100)).double())
    x, y = torch.randn(8, 100, dtype=torch.float64), torch.randint(0, 100, (8,))
    gen = torch.Generator().manual_seed(123)
    kw = dict(max_grad_norm=C, expected_batch_size=8, loss_reduction="sum")
    noisy = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, noise_multiplier=sigma, generator=gen, **kw)
    exact = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.0), model, noise_multiplier=0.0, **kw)
    xi = []
    for _ in range(steps):
        for opt in (noisy, exact):
            opt.zero_grad()
            opt.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
        xi += [a - b for a, b in zip(noisy.noised_gradient(), exact.noised_gradient())]  # ξ ('sum': B = 1)
    xi = torch.cat([t.flatten() for t in xi])
    m = xi.numel()  # 4 · 10100
    # the sample std of m normals has relative standard error 1/√(2m) ≈ 0.35 %: 2 % is ~6 of them
    assert abs(xi.std().item() / (sigma * C) - 1) < 0.02, xi.std()
    assert abs(xi.mean().item()) < 5 * sigma * C / math.sqrt(m)  # 5 standard errors of the mean


# --- ε: Opacus's accountant, for the same steps -----------------------------------------------------
@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant(mechanism):
    from opacus.accountants import PRVAccountant, RDPAccountant

    sigma, q, delta, steps = 1.1, 0.05, 1e-5, 30
    model = handgrad.convert(torch_mlp())
    x, y = batch(8)
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, noise_multiplier=sigma, max_grad_norm=1.0,
                         expected_batch_size=8, accountant=mechanism, sample_rate=q)
    for _ in range(steps):
        opt.zero_grad()
        opt.backward(lambda: F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
    reference = (RDPAccountant if mechanism == "rdp" else PRVAccountant)()
    for _ in range(steps):
        reference.step(noise_multiplier=sigma, sample_rate=q)
    assert opt.epsilon(delta) == pytest.approx(reference.get_epsilon(delta), rel=1e-9)
    # epsilon_after looks ahead without stepping the accountant
    ahead = dp.epsilon_after(opt.accountant, 10, sigma, q, delta)
    reference.history = [(sigma, q, steps + 10)]
    assert ahead == pytest.approx(reference.get_epsilon(delta), rel=1e-9) and ahead > opt.epsilon(delta)
    assert opt.accountant.history == [(sigma, q, steps)]


# --- a step: the torch.func reference, and Opacus's DPOptimizer -------------------------------------
@pytest.mark.parametrize("mode", ["ghost", "grads"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_equals_torch_func_reference(mode, reduction):
    ref = torch_mlp()
    model = handgrad.convert(copy.deepcopy(ref))
    x, y = batch(10)
    C, sigma, B = 0.8, 0.9, 12.5
    expected = reference_gradient(ref, x, y, C, sigma, B if reduction == "mean" else 1.0, torch.Generator().manual_seed(7))
    dp_step(model, x, y, mode, reduction, noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B,
            generator=torch.Generator().manual_seed(7))
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters()):
        # float64: the two paths differ by rounding only (≤ 1e-10 relative, the bar)
        torch.testing.assert_close(p0.detach() - p.detach(), expected[name], rtol=1e-10, atol=1e-12)


def test_ghost_step_with_an_in_place_activation():
    """Ghost clipping's pass 1 backpropagates to the layers' output edges as they were when each
    layer ran: a ReLU(inplace=True) after a Linear moves the tensor's own edge past the layer."""
    ref = nn.Sequential(nn.Linear(6, 9), nn.ReLU(inplace=True), nn.Linear(9, 4)).double()
    model = handgrad.convert(copy.deepcopy(ref))
    x, y = batch(10)
    C, sigma, B = 0.8, 0.9, 10.0
    expected = reference_gradient(ref, x, y, C, sigma, B, torch.Generator().manual_seed(7))
    dp_step(model, x, y, "ghost", "mean", noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B,
            generator=torch.Generator().manual_seed(7))
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p0.detach() - p.detach(), expected[name], rtol=1e-10, atol=1e-12)  # rounding only


@pytest.mark.parametrize("mode", ["ghost", "grads"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_step_equals_opacus_dp_optimizer(mode, reduction):
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer as OpacusDPOptimizer

    if tuple(int(v) for v in opacus.__version__.split(".")[:2]) < (1, 6):
        pytest.skip(f"opacus {opacus.__version__} draws the noise in float32 whatever the dtype (1.6 on: the parameters')")
    ref = torch_mlp(dropout=0.3)  # dropout: ghost mode's second pass must draw the same masks
    model, theirs = handgrad.convert(copy.deepcopy(ref)), GradSampleModule(copy.deepcopy(ref), loss_reduction=reduction)
    x, y = batch(10)
    kw = dict(noise_multiplier=0.7, max_grad_norm=0.6, expected_batch_size=10, loss_reduction=reduction)
    their_opt = OpacusDPOptimizer(torch.optim.SGD(theirs.parameters(), lr=0.5, momentum=0.9),
                                  generator=torch.Generator().manual_seed(3), **kw)
    ours = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), model,
                          generator=torch.Generator().manual_seed(3), **kw)
    for step in range(3):
        torch.manual_seed(step)
        their_opt.zero_grad()
        F.cross_entropy(theirs(x), y, reduction=reduction).backward()
        their_opt.step()
        torch.manual_seed(step)
        ours.zero_grad()
        dp_backward(ours, model, x, y, mode, reduction)
        ours.step()
    for a, b in zip(model.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)  # float64, rounding only


@pytest.mark.parametrize("mode", ["ghost", "grads"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_gradient_accumulation_clips_each_batch(mode, reduction):
    """Two batches before one step: S sums each batch's clipped per-sample gradients, so the
    step is the reference over their concatenation, with B counting both (Opacus's
    accumulated_iterations: B·2 for 'mean')."""
    ref = torch_mlp()
    model = handgrad.convert(copy.deepcopy(ref))
    (x1, y1), (x2, y2) = batch(6, seed=1), batch(4, seed=2)
    C, sigma, B = 0.8, 0.9, 5.0
    expected = reference_gradient(ref, torch.cat([x1, x2]), torch.cat([y1, y2]), C, sigma,
                                  2 * B if reduction == "mean" else 1.0, torch.Generator().manual_seed(7))
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, loss_reduction=reduction,
                         noise_multiplier=sigma, max_grad_norm=C, expected_batch_size=B,
                         generator=torch.Generator().manual_seed(7))
    dp_backward(opt, model, x1, y1, mode, reduction)
    if mode == "grads":
        assert opt.clip_and_accumulate().shape == (6,)                 # the first batch's norms
    dp_backward(opt, model, x2, y2, mode, reduction)
    opt.step()                                                         # takes the second batch itself
    for (name, p), p0 in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p0.detach() - p.detach(), expected[name], rtol=1e-10, atol=1e-12)  # rounding only


def test_gradient_accumulation_refuses_a_batch_it_would_lose():
    model = handgrad.convert(torch_mlp())
    opt = dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=1.0), model, noise_multiplier=1.0,
                         max_grad_norm=1.0, expected_batch_size=5)
    (x1, y1), (x2, y2) = batch(5, seed=1), batch(5, seed=2)
    for x, y in ((x1, y1), (x2, y2)):                                  # no clip_and_accumulate between
        dp_backward(opt, model, x, y, "grads", "mean")
    with pytest.raises(RuntimeError, match="2 captures of the model since its last batch"):
        opt.step()
    opt.zero_grad()
    with per_sample.capture(model):                                    # two batches in one capture
        for x, y in ((x1, y1), (x2, y2)):
            F.cross_entropy(model(x), y).backward()
    with pytest.raises(RuntimeError, match="the capture saw 2 forwards of the model"):
        opt.step()


def test_empty_poisson_batch_steps_with_the_noise_alone():
    model = handgrad.convert(torch_mlp())
    before = copy.deepcopy(model)
    x, y = batch(0)
    opt = dp_step(model, x, y, "ghost", "mean", noise_multiplier=1.0, max_grad_norm=0.5, expected_batch_size=4.0,
                  generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(2)
    for p, p0 in zip(model.parameters(), before.parameters()):  # ĝ = ξ / B: S = 0
        torch.testing.assert_close(p0 - p, torch.normal(0.0, 0.5, p.shape, generator=g, dtype=p.dtype) / 4.0)
    assert opt.last_norms.shape == (0,)


def test_optimizer_refuses_a_parameter_it_does_not_hold():
    model = handgrad.convert(torch_mlp())
    with pytest.raises(ValueError, match="does not hold the model's trained parameter"):
        dp.DPOptimizer(torch.optim.SGD(model[0].parameters(), lr=0.1), model, noise_multiplier=1.0,
                       max_grad_norm=1.0, expected_batch_size=8)
    with pytest.raises(ValueError, match="expected_batch_size"):
        dp.DPOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model, noise_multiplier=1.0, max_grad_norm=1.0)


# --- Poisson sampling --------------------------------------------------------------------------------
def test_poisson_sampler():
    s = dp.PoissonSampler(1000, 0.05, seed=4)
    assert len(s) == 20
    sizes = [len(b) for b in s]
    # batch size ~ Binomial(1000, 0.05): mean 50, std ≈ 6.9; the mean of 20 batches within 4 standard errors
    assert abs(sum(sizes) / 20 - 50) < 4 * math.sqrt(1000 * 0.05 * 0.95 / 20), sizes
    assert len(set(sizes)) > 1  # sizes vary, as Poisson sampling's do
    assert [list(b) for b in s] == [list(b) for b in dp.PoissonSampler(1000, 0.05, seed=4)]  # (seed, epoch) decides
    s.set_epoch(1)
    assert [len(b) for b in s] != sizes
    data = torch.utils.data.TensorDataset(torch.randn(3, 2), torch.arange(3))
    empty = [xb for xb, _ in dp.poisson_loader(data, 1e-9, steps=2)]  # q ≈ 0: empty batches, still shaped
    assert [tuple(e.shape) for e in empty] == [(0, 2), (0, 2)]


# --- the Lightning callback ---------------------------------------------------------------------------
pl = pytest.importorskip("lightning.pytorch")


class Tiny(pl.LightningModule):
    def __init__(self, net: nn.Module, reduction: str = "mean"):
        super().__init__()
        self.net, self.reduction = net, reduction

    def forward(self, x):
        return self.net(x)

    def training_step(self, b, i):
        x, y = b
        return F.cross_entropy(self(x), y, reduction=self.reduction)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1.0)


@pytest.mark.parametrize("mode", ["ghost", "grads"])
def test_callback_fast_dev_run_step_is_the_reference(mode):
    ref = torch_mlp()
    module = Tiny(handgrad.convert(copy.deepcopy(ref)))
    x, y = batch(40)
    loader = dp.poisson_loader(torch.utils.data.TensorDataset(x, y), 0.25, seed=0)
    first = next(iter(loader))  # fast_dev_run trains on the loader's first batch: the same draw
    cb = dp.DPSGDCallback(noise_multiplier=0.8, max_grad_norm=0.5, mode=mode, seed=11, loss_reduction="mean")
    trainer = pl.Trainer(fast_dev_run=True, callbacks=[cb], logger=False, enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(module, loader)
    assert trainer.global_step == 1 and cb.sample_rate == 0.25 and cb.expected_batch_size == 10.0
    expected = reference_gradient(ref, *first, 0.5, 0.8, 10.0, torch.Generator().manual_seed(11))
    for (name, p), p0 in zip(module.net.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p0.detach() - p.detach(), expected[name], rtol=1e-10, atol=1e-12)
    from opacus.accountants import RDPAccountant

    reference = RDPAccountant()
    reference.step(noise_multiplier=0.8, sample_rate=0.25)
    assert cb.epsilon() == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)


def test_callback_refuses_torch_layers_and_ghost_without_output():
    module = Tiny(torch_mlp())  # torch.nn.Linear: no per-sample rule
    loader = dp.poisson_loader(torch.utils.data.TensorDataset(*batch(20)), 0.5, seed=0)
    kw = dict(fast_dev_run=True, logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(TypeError, match="not a handgrad layer"):
        pl.Trainer(callbacks=[dp.DPSGDCallback()], **kw).fit(module, loader)
    module = Tiny(handgrad.convert(torch_mlp()))
    with pytest.raises(AttributeError):  # output names no submodule
        pl.Trainer(callbacks=[dp.DPSGDCallback(mode="ghost", output="nope")], **kw).fit(module, loader)


# --- the app: configs/digits_dp.yaml ---------------------------------------------------------------
@pytest.fixture
def in_tmp(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "argv", ["train"])
    monkeypatch.chdir(tmp_path)
    return tmp_path


QUIET = ["--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false"]


def test_digits_dp_config_fast_dev_run(in_tmp):
    from train.cli import TrainCLI

    c = TrainCLI(args=["fit", "--config", str(REPO / "configs/digits_dp.yaml"), "--trainer.fast_dev_run", "true",
                       "--trainer.logger", "false", *QUIET])
    assert c.trainer.global_step == 1
    (cb,) = [cb for cb in c.trainer.callbacks if isinstance(cb, dp.DPSGDCallback)]
    assert cb.accountant.history == [(1.0, 64 / 1257, 1)]  # q = batch_size / n from the Poisson sampler


def test_digits_dp_config_trains_logs_epsilon_and_stops_at_the_target(in_tmp):
    import csv

    from opacus.accountants import RDPAccountant
    from train.cli import TrainCLI

    c = TrainCLI(args=["fit", "--config", str(REPO / "configs/digits_dp.yaml"), "--trainer.max_epochs", "5",
                       "--dp.target_epsilon", "3.2", "--dp.mode", "ghost", "--test_after_fit", "false", *QUIET])
    (cb,) = [cb for cb in c.trainer.callbacks if isinstance(cb, dp.DPSGDCallback)]
    steps = c.trainer.global_step
    assert 0 < steps < 5 * 20  # stopped before the 5 epochs: one more would pass ε = 3.2 (ε 2.5, 3.0, 3.4 after epochs 1-3)
    rows = list(csv.DictReader(open(Path(c.trainer.log_dir) / "metrics.csv")))
    eps = [float(r["dp/epsilon"]) for r in rows if r.get("dp/epsilon")]
    assert len(eps) == c.trainer.current_epoch and eps == sorted(eps)  # one per epoch, growing
    reference = RDPAccountant()
    reference.history = [(1.0, 64 / 1257, steps)]
    assert eps[-1] == pytest.approx(reference.get_epsilon(1e-5), rel=1e-6) and eps[-1] <= 3.2
    assert float(c.trainer.callback_metrics["train/acc"]) > 0.5  # it learns (10 classes: chance is 0.1)
    # resumed from last.ckpt, ε counts on from the checkpoint's steps (the accountant's history is in it)
    last = Path(c.trainer.log_dir) / "checkpoints" / "last.ckpt"
    r = TrainCLI(args=["fit", "--config", str(REPO / "configs/digits_dp.yaml"), "--trainer.max_epochs", "3",
                       "--dp.target_epsilon", "null", "--ckpt_path", str(last), "--test_after_fit", "false", *QUIET])
    (cb,) = [cb for cb in r.trainer.callbacks if isinstance(cb, dp.DPSGDCallback)]
    assert sum(n for _, _, n in cb.accountant.history) == r.trainer.global_step == steps + 20


# --- the bench: python -m bench per-sample, a smoke test ----------------------------------------------
def test_bench_per_sample_quick(tmp_path):
    from bench.per_sample import main as bench_main

    out = tmp_path / "per-sample.md"
    assert bench_main(["mlp", "--quick", "--no-memory", "--out", str(out)]) == 0
    text = out.read_text()
    for row in ("| mlp | norms |", "| mlp | torch.func |", "| mlp | opacus-dp |", "norms / plain (time)"):
        assert row in text, row
