"""Whole models built from torch.nn parts, as users train them: a ResNet-style CNN, a ViT-style
encoder, a GPT-style decoder and a LLaMA-style block (handgrad.testing.models, which the bench
builds at a realistic size too), each written as third-party code would be (``import
torch.nn.functional as F``, functions called inside ``forward``, the loss included).

For each model, ``handgrad.convert`` plus ``handgrad.enable()``:
- (a) the coverage report: every parameter's gradient and every layer-level node is handgrad's;
- (b) float64 loss and every parameter gradient equal the native model's (a copy, same inputs);
- (c) five float64 SGD steps give the native model's parameters (and batch-norm running stats);
- (d) float32 training through Lightning lowers the loss.

Small sizes, float64 on CPU: the whole file runs in a few seconds.
"""
from __future__ import annotations

import math

import pytest
import torch

import handgrad
from handgrad.testing import record_coverage
from handgrad.testing.models import MODELS


def _pair(name):
    """The native model (float64, training mode) and its converted copy, and one batch."""
    make, data = MODELS[name]
    native = make().double()
    converted = handgrad.convert(native)  # a converted deep copy: equal values, separate Parameters
    x, y = data(6)
    return native, converted, (x.double() if x.is_floating_point() else x, y)


def _loss(model, batch):
    with handgrad.enable():
        return model(*batch)


# ---------------------------------------------------------------------------------------------
# (a) coverage

def _report(model, batch):
    with record_coverage(model) as cov, handgrad.enable():
        loss = model(*batch)
    return cov.report(loss)


@pytest.mark.parametrize("name", MODELS)
def test_every_parameter_gradient_is_handgrad(name):
    _, converted, batch = _pair(name)
    report = _report(converted, batch)
    assert report.percent == 100.0 and not report.unused, str(report)
    assert set(report.parameters) == {n for n, _ in converted.named_parameters()}, str(report)
    assert sum(n.handgrad for n in report.nodes) >= 5, str(report)  # the layers were really seen


@pytest.mark.parametrize("name", MODELS)
def test_fully_handgrad(name):
    """Every layer-level node is handgrad's: ViT's mean-pool ``.mean(dim=1)`` and LLaMA's gating
    ``F.silu(a) * b`` too (enable() routes Tensor.mean and the product)."""
    _, converted, batch = _pair(name)
    report = _report(converted, batch)
    assert report.fully_handgrad, str(report)


@pytest.mark.parametrize("name", MODELS)
def test_native_model_is_native(name):
    """The same report on the unconverted model outside enable(): nothing handgrad, so (a)
    measures the conversion and cannot pass by itself."""
    native, _, batch = _pair(name)
    with record_coverage(native) as cov:
        loss = native(*batch)
    report = cov.report(loss)
    assert report.percent == 0.0 and not any(n.handgrad for n in report.nodes), str(report)


# ---------------------------------------------------------------------------------------------
# (b) float64 parity, (c) five SGD steps

# Same math, different kernels (hand-written matmuls and reductions vs torch's fused ones): each
# value differs by a few float64 ulps of the tensor's magnitude. Relative 1e-12 is ~5000 ulps;
# atol is 1e-12 of the tensor's largest entry, since entries that cancel to near zero carry the
# rounding of the large terms they were summed from, not of their own size.
RTOL = 1e-12


def _close(actual, expected, rtol, what):
    scale = expected.abs().max().item() or 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


def _max_rel(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize("name", MODELS)
def test_float64_loss_and_gradients_equal_native(name):
    native, converted, batch = _pair(name)
    loss_n, loss_c = native(*batch), _loss(converted, batch)
    loss_n.backward()
    loss_c.backward()
    _close(loss_c, loss_n, RTOL, "loss")
    grads_n = dict(native.named_parameters())
    for pname, p in converted.named_parameters():
        assert p.grad is not None and grads_n[pname].grad is not None, pname
        _close(p.grad, grads_n[pname].grad, RTOL, f"{name} grad {pname}")
    for bname, b in converted.named_buffers():  # batch norm's running stats after one training forward
        _close(b, dict(native.named_buffers())[bname], RTOL, f"{name} buffer {bname}")


# Five steps: each step's ~1e-15 gradient difference moves the parameters by lr times it, and
# later steps differentiate at parameters that already differ, so the differences compound
# through the loss's curvature (and batch norm's division by the batch std): a few orders of
# magnitude over one step's, kept far below the size of one step's update (~1e-2).
STEPS_RTOL = 1e-10


@pytest.mark.parametrize("name", MODELS)
def test_five_sgd_steps_equal_native(name):
    native, converted, batch = _pair(name)
    start = {n: p.detach().clone() for n, p in native.named_parameters()}
    for model, forward in ((native, lambda m: m(*batch)), (converted, lambda m: _loss(m, batch))):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(5):
            opt.zero_grad()
            forward(model).backward()
            opt.step()
    params_n = dict(native.named_parameters())
    for pname, p in converted.named_parameters():
        assert not torch.equal(params_n[pname], start[pname]), f"{pname} did not move"
        _close(p.detach(), params_n[pname].detach(), STEPS_RTOL, f"{name} param {pname}")
    buffers_n = dict(native.named_buffers())
    for bname, b in converted.named_buffers():  # running mean / var / num_batches_tracked
        _close(b, buffers_n[bname], STEPS_RTOL, f"{name} buffer {bname}")
    if name == "resnet":
        assert int(buffers_n["stem.1.num_batches_tracked"]) == 5


# ---------------------------------------------------------------------------------------------
# (d) float32 training through Lightning


@pytest.mark.parametrize("name", MODELS)
def test_lightning_float32_training_lowers_the_loss(name):
    pl = pytest.importorskip("lightning.pytorch")
    make, data = MODELS[name]
    model = handgrad.convert(make())  # float32
    x, y = data(32)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            return _loss(self.model, batch)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    def full_loss():
        model.eval()  # batch norm: running stats; the same evaluation before and after
        with torch.no_grad():
            value = _loss(model, (x, y)).item()
        model.train()
        return value

    before = full_loss()
    trainer = pl.Trainer(max_epochs=8, logger=False, enable_progress_bar=False, enable_checkpointing=False,
                         enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.fit(Module(), loader)
    after = full_loss()
    assert math.isfinite(after) and after < before, (before, after)
    assert next(model.parameters()).dtype == torch.float32
