"""handgrad.testing.coverage / record_coverage: which parameters' gradients and which
layer-level backward nodes of a loss are handgrad's, named by module."""
from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import handgrad
import handgrad.functional as HF
import handgrad.nn as hnn
from handgrad.testing import CoverageReport, coverage, record_coverage
from handgrad.testing.coverage import OUTSIDE, STRUCTURAL, UNNAMED


def _mlp():
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


X, Y = torch.randn(5, 4), torch.tensor([0, 1, 2, 0, 1])


def test_native_model_is_zero_percent():
    model = _mlp()
    with record_coverage(model) as cov:
        loss = F.cross_entropy(model(X), Y)
    report = cov.report(loss)
    assert isinstance(report, CoverageReport) and report.percent == 0.0 and not report.fully_handgrad
    assert report.parameters == {n: "native" for n, _ in model.named_parameters()}
    native = {(n.module, n.node) for n in report.native_nodes}
    assert native == {("0", "AddmmBackward0"), ("1", "TanhBackward0"), ("2", "AddmmBackward0"),
                      ("3", "ReluBackward0"), ("4", "AddmmBackward0"),
                      (OUTSIDE, "LogSoftmaxBackward0"), (OUTSIDE, "NllLossBackward0")}
    text = str(report)
    assert "0/6 parameters (0.0%" in text and "(outside the model)  NllLossBackward0" in text
    # without recording, the nodes that feed a parameter are named by its module, the rest not
    plain = coverage(loss, model)
    assert {n.module for n in plain.native_nodes} == {"0", "2", "4", UNNAMED}


def test_converted_mlp_is_fully_handgrad():
    model = handgrad.convert(_mlp())
    with record_coverage(model) as cov:
        loss = HF.cross_entropy(model(X), Y)
    report = cov.report(loss)
    assert report.fully_handgrad and report.percent == 100.0 and not report.native_nodes
    assert report.summary() == ("handgrad coverage: 6/6 parameters (100.0%; 139/139 elements) get a hand-derived "
                                "gradient; layer-level backward nodes: 6 handgrad, 0 native")
    assert {n.module for n in report.nodes} == {"0", "1", "2", "3", "4", OUTSIDE}
    assert json.loads(json.dumps(report.as_dict()))["fully_handgrad"] is True
    # the fused MLP: one node for the whole network
    net = hnn.MLP((4, 8, 3))
    report = coverage(hnn.HalfSquaredErrorLoss()(net(X), torch.randn(5, 3)), net)
    assert report.fully_handgrad and len(report.nodes) == 2


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.norm = nn.BatchNorm2d(2)
        self.flatten = nn.Flatten()
        self.head = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x):
        return self.head(self.flatten(x + F.relu(self.norm(self.conv(x)))))


def test_half_converted_names_the_native_modules():
    model = handgrad.convert(Residual(), exclude=["norm", "head"])
    x = torch.randn(3, 2, 4, 4)
    with record_coverage(model) as cov:
        loss = HF.cross_entropy(model(x), Y[:3])
    report = cov.report(loss)
    assert report.parameters == {"conv.weight": "handgrad", "conv.bias": "handgrad", "norm.weight": "native",
                                 "norm.bias": "native", "head.weight": "native", "head.bias": "native"}
    assert report.percent == pytest.approx(100 / 3)
    assert {(n.module, n.node) for n in report.native_nodes} == {
        ("norm", "NativeBatchNormBackward0"), ("", "ReluBackward0"), ("head", "AddmmBackward0")}
    text = str(report)
    assert re.search(r"norm +NativeBatchNormBackward0", text) and re.search(r"<model> +ReluBackward0", text)


def test_residual_adds_and_flatten_are_not_layer_nodes():
    model = handgrad.convert(Residual())
    x = torch.randn(3, 2, 4, 4)
    with record_coverage(model) as cov, handgrad.enable():  # the F.relu in forward too
        loss = HF.cross_entropy(model(x), Y[:3])
    report = cov.report(loss)
    assert report.fully_handgrad, report
    assert report.ignored["Add"] == 1 and report.ignored["View"] == 1
    assert [n.node for n in report.nodes].count("ElementwiseFnBackward") == 1


def test_structural_kinds_are_what_torch_names():
    """Layout and plumbing around a handgrad op: every kind met is in STRUCTURAL, none counted."""
    w = nn.Parameter(torch.randn(6, 4))
    y = HF.linear(X, w)                                            # (5, 6)
    parts = [y.view(30), y.reshape(3, 10).t().reshape(30), y.transpose(0, 1).contiguous().flatten(),
             y.permute(1, 0).flatten(), y[0].unsqueeze(0).expand(5, 6).flatten(), y[1:3].squeeze().flatten(),
             y[torch.tensor([0, 4])].flatten(), torch.cat(y.split(3, 1), 0).flatten(),
             torch.stack(y.unbind(0)).flatten(), y.clone().double().float().flatten(),
             F.pad(y, (1, 1)).flatten(), y.repeat(2, 1).flatten(), (y - y.chunk(2, 1)[0].repeat(1, 2)).flatten()]
    loss = HF.mse_loss(torch.cat(parts), torch.zeros(sum(p.numel() for p in parts)))
    model = nn.Module()
    model.w = w
    report = coverage(loss, model)
    assert report.fully_handgrad and len(report.nodes) == 2, report  # the linear and the loss
    assert set(report.ignored) <= set(STRUCTURAL) and len(report.ignored) >= 15, report.ignored


def test_mixed_unused_shared_and_errors():
    model = nn.Module()
    model.lin = nn.Linear(3, 3)
    model.spare = nn.Linear(3, 3)
    h = HF.linear(torch.randn(2, 3), model.lin.weight, model.lin.bias)
    loss = HF.mse_loss(h @ model.lin.weight, torch.zeros(2, 3))   # the weight also feeds a native matmul
    report = coverage(loss, model)
    assert report.parameters == {"lin.weight": "mixed", "lin.bias": "handgrad"}
    assert report.native_parameters == ["lin.weight"] and report.unused == ["spare.weight", "spare.bias"]
    assert "lin.weight  (mixed)" in str(report) and "does not depend on: spare.weight, spare.bias" in str(report)
    # a module called twice: each call's nodes are its own
    shared = handgrad.convert(nn.Linear(3, 3))
    outer = nn.Sequential(shared, nn.Tanh(), shared)
    with record_coverage(outer) as cov:
        loss = outer(torch.randn(2, 3)).sum()
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in outer.modules())
    assert hooks == 0  # removed on exit
    report = cov.report(loss)
    assert [n.module for n in report.nodes if n.node == "LinearFnBackward"] == ["0", "0"]
    assert report.parameters == {"0.weight": "handgrad", "0.bias": "handgrad"}
    assert [(n.module, n.node) for n in report.native_nodes] == [("1", "TanhBackward0"), (OUTSIDE, "SumBackward0")]
    with pytest.raises(ValueError, match="no autograd graph"):
        coverage(torch.ones(()), model)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        coverage(loss, lambda x: x)
    with pytest.raises(TypeError, match="loss must be a tensor"):
        coverage(1.0, model)
