"""handgrad.convert / revert: real models keep working (outputs and every parameter's gradient
equal the unconverted model's), hooks and modes survive, what was swapped is reported."""
from __future__ import annotations

import copy
import json
import logging
import pickle

import pytest
import torch
from torch import nn

import handgrad.functional as HF
import handgrad.nn as hnn
from handgrad import convert, revert
from test_nn import handgrad_nodes

# float64 models on both sides: converted and native differ only in summation order
# (~1e-16 relative per op); through a few layers and a softmax attention, 1e-9 leaves ample room.
TOL = dict(rtol=1e-9, atol=1e-10)


def assert_same_training_step(model, converted, *inputs, loss_fn=None, target=None):
    """Outputs, loss and every parameter's gradient equal, parameter by parameter (by name)."""
    out_ref, out = model(*inputs), converted(*inputs)
    torch.testing.assert_close(out, out_ref, **TOL)
    if loss_fn is not None:
        loss_ref, loss = loss_fn[0](out_ref, target), loss_fn[1](out, target)
    else:
        loss_ref, loss = out_ref.square().sum(), out.square().sum()
    torch.testing.assert_close(loss, loss_ref, **TOL)
    loss_ref.backward()
    loss.backward()
    params_ref, params = dict(model.named_parameters()), dict(converted.named_parameters())
    assert list(params) == list(params_ref)
    for name, p in params.items():
        assert p is not params_ref[name]
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, params_ref[name].grad, **TOL, msg=name)
    return out, loss


class SmallCNN(nn.Module):
    """Convolutions, batch norm, pooling and an MLP head: all converted but the flatten."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(4, 6, 3), nn.GELU(), nn.Flatten(),
        )
        self.head = nn.Sequential(nn.Linear(6 * 2 * 2, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 8),
                                  nn.SiLU(), nn.Dropout(0.0), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.features(x))


def test_cnn_with_mlp_head():
    model = SmallCNN().double()
    converted = convert(model)
    report = converted.handgrad_report
    # everything with a twin is swapped; only the flatten stays native
    assert type(converted.features[0]) is hnn.Conv2d and type(converted.features[1]) is hnn.BatchNorm2d
    assert type(converted.features[3]) is hnn.MaxPool2d and type(converted.head[5]) is hnn.Dropout
    assert dict(report.native) == {"Flatten": 1}
    assert sorted(s.name for s in report.swapped) == sorted(
        ["features.0", "features.1", "features.2", "features.3", "features.4", "features.5",
         "head.0", "head.1", "head.2", "head.3", "head.4", "head.5", "head.6"])
    assert type(converted.head[0]) is hnn.Linear and type(converted.features[5]) is hnn.GELU
    # the original is untouched (inplace=False): its own classes, its own parameters
    assert type(model.head[0]) is nn.Linear and not hasattr(model, "handgrad_report")
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    target = torch.tensor([0, 4, 2])
    out, loss = assert_same_training_step(model, converted, x, loss_fn=(nn.CrossEntropyLoss(), hnn.CrossEntropyLoss()),
                                          target=target)
    assert "LinearFn" in handgrad_nodes(out) and handgrad_nodes(loss)


def _encoder(activation, norm_first=False):
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True,
                                       norm_first=norm_first, dtype=torch.float64)
    return nn.TransformerEncoder(layer, 2, enable_nested_tensor=not norm_first)


@pytest.mark.parametrize("activation", ["relu", "gelu", "module"])
def test_transformer_encoder_train(activation):
    model = _encoder(nn.GELU() if activation == "module" else activation)
    converted = convert(model)
    report = converted.handgrad_report
    layer = converted.layers[0]
    if activation == "module":
        assert type(layer.activation) is hnn.GELU
    else:
        # the activation is passed as a function (F.relu / F.gelu), held as an attribute
        assert layer.activation is getattr(HF, activation)
        assert [s.name for s in report.attributes] == ["layers.0.activation", "layers.1.activation"]
    assert type(layer.linear1) is hnn.Linear and type(layer.norm1) is hnn.LayerNorm
    # MultiheadAttention reads out_proj.weight directly: out_proj keeps its type and its weight
    assert isinstance(layer.self_attn.out_proj, nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert isinstance(layer.self_attn.out_proj, hnn.Linear)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2, [False] * 4 + [True]])
    assert_same_training_step(model, converted, x, None, mask)


def test_transformer_encoder_eval_fast_path(monkeypatch):
    """In eval mode without grad, TransformerEncoderLayer takes torch's fused kernel, which never
    calls its submodules; convert turns that path off so the handgrad ops run, with equal output."""
    model = _encoder("relu").eval()
    converted = convert(model)
    assert [s.name for s in converted.handgrad_report.patched] == ["layers.0", "layers.1", ""]
    calls = []
    real = HF.linear
    monkeypatch.setattr(HF, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    fused = []
    real_fused = torch._transformer_encoder_layer_fwd
    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", lambda *a: fused.append(1) or real_fused(*a))
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        ref = model(x)          # native fast path
        assert len(fused) == 2 and not calls
        out = converted(x)      # handgrad modules, one by one
    assert len(fused) == 2      # the converted model did not take it
    assert len(calls) == 4  # linear1 and linear2 of both layers (handgrad's MHA imports its linear directly)
    torch.testing.assert_close(out, ref, **TOL)
    revert(converted)
    assert converted.layers[0].activation_relu_or_gelu == 1 and converted.use_nested_tensor
    with torch.no_grad():
        calls.clear()
        torch.testing.assert_close(converted(x), ref, **TOL)
    assert not calls and len(fused) == 4  # reverted: the fast path is back (2 more layer calls)


def test_transformer_full():
    model = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                           dropout=0.0, batch_first=True, dtype=torch.float64)
    converted = convert(model)
    kinds = {s.before for s in converted.handgrad_report.swapped}
    assert kinds == {"torch.nn.Linear", "torch.nn.LayerNorm", "torch.nn.Dropout", "torch.nn.MultiheadAttention",
                     "torch.nn.modules.linear.NonDynamicallyQuantizableLinear"}
    src, tgt = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    tgt_mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=torch.float64)
    assert_same_training_step(model, converted, src, tgt, None, tgt_mask)


def test_multihead_attention_out_proj():
    mha = nn.MultiheadAttention(8, 2, batch_first=True, dtype=torch.float64)
    converted = convert(mha)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(converted(x, x, x)[0], mha(x, x, x)[0], **TOL)
    assert type(converted) is hnn.MultiheadAttention  # its attention is handgrad's
    assert [s.name for s in converted.handgrad_report.swapped] == ["", "out_proj"]
    assert "reads its weight directly" in converted.handgrad_report.swapped[1].note
    # the converted out_proj still works on its own, through handgrad
    y = converted.out_proj(x)
    assert "LinearFn" in handgrad_nodes(y)


def test_inplace_shares_parameters_copy_does_not():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    params = list(model.parameters())
    copied = convert(model)
    assert copied is not model and type(model[0]) is nn.Linear
    assert all(p is not q and torch.equal(p, q) for p, q in zip(copied.parameters(), params))
    same = convert(model, inplace=True)
    assert same is model and type(model[0]) is hnn.Linear
    assert all(p is q for p, q in zip(model.parameters(), params))
    # an optimizer built before an in-place convert keeps training the converted model
    opt = torch.optim.SGD(params, lr=0.1)
    before = params[0].detach().clone()
    model(torch.randn(5, 3)).sum().backward()
    opt.step()
    assert not torch.equal(params[0], before)


def test_hooks_and_training_mode_survive():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    model[2].eval()  # a mixed-mode model
    seen = []
    model[0].register_forward_pre_hook(lambda m, args: seen.append("pre"))
    model[0].register_forward_hook(lambda m, args, out: seen.append("fwd"))
    model[1].register_full_backward_hook(lambda m, gin, gout: seen.append("bwd"))
    model[0].register_forward_hook(lambda m, args, out: out * 2)  # a hook that changes the output
    converted = convert(model)
    assert converted.training and converted[0].training and not converted[2].training
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    ref = model(x)
    seen.clear()
    out = converted(x)
    assert seen == ["pre", "fwd"]
    torch.testing.assert_close(out, ref, **TOL)
    out.sum().backward()
    assert seen == ["pre", "fwd", "bwd"]


def test_include_exclude():
    model = _encoder("relu")
    by_type = convert(model, exclude=nn.LayerNorm)
    assert type(by_type.layers[0].norm1) is nn.LayerNorm and type(by_type.layers[0].linear1) is hnn.Linear
    assert {s.name for s in by_type.handgrad_report.skipped} == {f"layers.{i}.norm{j}" for i in (0, 1) for j in (1, 2)}
    by_name = convert(model, include=["layers.0"])  # a pattern matches everything under it
    assert type(by_name.layers[0].linear1) is hnn.Linear and by_name.layers[0].activation is HF.relu
    assert type(by_name.layers[1].linear1) is nn.Linear and by_name.layers[1].activation is torch.nn.functional.relu
    # layer 1 kept its fast path, layer 0 lost it (its parts are handgrad); the encoder's nested path is off
    assert by_name.layers[1].activation_relu_or_gelu == 1 and by_name.layers[0].activation_relu_or_gelu == 0
    glob = convert(model, include="*.linear?", exclude=[nn.ReLU, "layers.1"])
    swapped = {s.name for s in glob.handgrad_report.swapped}
    assert swapped == {"layers.0.linear1", "layers.0.linear2"} and not glob.handgrad_report.attributes
    with pytest.raises(TypeError, match="include/exclude"):
        convert(model, include=[3])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        convert(lambda x: x)


class MyLinear(nn.Linear):
    """A subclass that keeps nn.Linear.forward: converted, keeping its type."""

    def extra(self):
        return self.weight.sum()


class ScaledLinear(nn.Linear):
    """A subclass with its own forward: left alone."""

    def forward(self, x):
        return 2 * super().forward(x)


def test_subclasses():
    model = nn.Sequential(MyLinear(3, 4), ScaledLinear(4, 2)).double()
    converted = convert(model)
    first, second = converted
    assert isinstance(first, MyLinear) and isinstance(first, hnn.Linear) and type(first).__name__ == "MyLinear"
    assert type(second) is ScaledLinear
    assert [s.name for s in converted.handgrad_report.skipped] == ["1"]
    assert "overrides Linear.forward" in converted.handgrad_report.skipped[0].after
    x = torch.randn(2, 3, dtype=torch.float64)
    assert "LinearFn" in handgrad_nodes(first(x))
    torch.testing.assert_close(converted(x), model(x), **TOL)
    # the made-up class survives deepcopy and pickle, and reverts to the subclass
    for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        assert type(twin[0]) is type(first)
        torch.testing.assert_close(twin(x), model(x), **TOL)
    revert(converted)
    assert type(converted[0]) is MyLinear


def test_lazy_modules_wait_for_their_first_forward():
    model = nn.Sequential(nn.LazyLinear(4), nn.ReLU())
    converted = convert(model)
    assert type(converted[0]) is nn.LazyLinear and "lazy" in converted.handgrad_report.skipped[0].after
    converted(torch.randn(2, 3))  # initialises: becomes an nn.Linear
    again = convert(converted)
    assert type(again[0]) is hnn.Linear and [s.name for s in again.handgrad_report.swapped] == ["0"]


def test_revert_round_trip():
    model = _encoder("relu")
    converted = convert(model)
    revert(converted)
    assert not hasattr(converted, "handgrad_report")
    for (name, a), b in zip(converted.named_modules(), model.modules()):
        assert type(a) is type(b), name
        assert vars(a).keys() == vars(b).keys(), name  # no leftover patches
        for k, v in vars(b).items():
            if not isinstance(v, (dict, torch.Tensor)):
                assert vars(a)[k] == v, f"{name}.{k}"  # flags and functions restored
    assert converted.layers[0].activation is torch.nn.functional.relu
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), **TOL)
    assert not handgrad_nodes(converted(x))


def test_convert_twice_and_handgrad_models():
    model = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), hnn.MLP((4, 3, 2)))
    once = convert(model)
    twice = convert(once)
    assert twice.handgrad_report.already == len(list(once.modules())) - 1  # all but the container
    assert not twice.handgrad_report.swapped
    assert type(once[2]) is hnn.MLP  # handgrad modules are left as they are


def test_report_prints_and_logs(caplog):
    model = nn.Sequential(nn.Conv1d(2, 2, 1), nn.Flatten(), nn.Linear(4, 3), nn.ReLU(), nn.MSELoss())
    with caplog.at_level(logging.INFO, logger="handgrad.convert"):
        converted = convert(model)
    report = converted.handgrad_report
    summary = report.summary()
    assert summary in caplog.text
    assert "swapped 4 module(s) (Conv1d x1, Linear x1, MSELoss x1, ReLU x1)" in summary
    assert "left native: Flatten x1" in summary
    text = str(report)
    assert "2  torch.nn.Linear -> handgrad.nn.Linear" in text
    json.dumps(report.as_dict())  # plain data


# ---------------------------------------------------------------------------------------------
# mapping: third-party classes handgrad does not know, replaced by a factory's module


class TransposedLinear(nn.Module):
    """A model library's linear that stores its weight as (in, out) (GPT-2's Conv1D)."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class LlamaRMSNorm(nn.Module):
    """A model library's own RMSNorm (LLaMA's): weight and variance_epsilon."""

    def __init__(self, hidden, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(hidden) + 0.5)
        self.variance_epsilon = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon) * self.weight


class HandgradTransposedLinear(nn.Module):
    """The same function through handgrad's linear, holding the same Parameters."""

    def __init__(self, m: TransposedLinear):
        super().__init__()
        self.weight, self.bias = m.weight, m.bias

    def forward(self, x):
        return HF.linear(x, self.weight.t(), self.bias)


class HandgradRMSNorm(nn.Module):
    def __init__(self, m: LlamaRMSNorm):
        super().__init__()
        self.weight, self.eps = m.weight, m.variance_epsilon

    def forward(self, x):
        return HF.rms_norm(x, self.weight.shape, self.weight, self.eps)


MAPPING = {TransposedLinear: HandgradTransposedLinear, LlamaRMSNorm: HandgradRMSNorm}


class ThirdPartyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = LlamaRMSNorm(6)
        self.up = TransposedLinear(6, 10)
        self.act = nn.SiLU()
        self.down = nn.Sequential(TransposedLinear(10, 6), LlamaRMSNorm(6))
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(x + self.down(self.act(self.up(self.norm(x)))))


def test_mapping_third_party_classes():
    model = ThirdPartyBlock().double()
    native = copy.deepcopy(model)
    keys, params = list(model.state_dict()), list(model.parameters())
    modules = {name: m for name, m in model.named_modules()}
    converted = convert(model, mapping=MAPPING, inplace=True)
    assert converted is model
    # the state_dict keys and the Parameter objects are the original's
    assert list(model.state_dict()) == keys
    assert all(p is q for p, q in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert type(model.norm) is HandgradRMSNorm and type(model.down[0]) is HandgradTransposedLinear
    assert type(model.head) is hnn.Linear and type(model.act) is hnn.SiLU
    report = model.handgrad_report
    mapped = {s.name: s.after for s in report.swapped if s.note == "mapping"}
    assert mapped == {"norm": f"{__name__}.HandgradRMSNorm", "up": f"{__name__}.HandgradTransposedLinear",
                      "down.0": f"{__name__}.HandgradTransposedLinear", "down.1": f"{__name__}.HandgradRMSNorm"}
    assert not report.native and "HandgradRMSNorm" not in str(dict(report.native))
    assert "LlamaRMSNorm x2" in report.summary() and "TransposedLinear x2" in report.summary()
    x = torch.randn(4, 6, dtype=torch.float64)
    out, ref = model(x), native(x)
    torch.testing.assert_close(out, ref, **TOL)
    assert {"LinearFn", "NormFn"} <= set(handgrad_nodes(out)), handgrad_nodes(out)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), native.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    # revert puts the very same module objects back
    assert revert(model) is model
    assert {name: m for name, m in model.named_modules()} == modules
    assert all(model.get_submodule(n) is m for n, m in modules.items())
    assert type(model.head) is nn.Linear and not hasattr(model.norm, "_handgrad_original_module")
    assert not handgrad_nodes(model(x))


def test_mapping_copy_shared_and_root():
    model = ThirdPartyBlock().double()
    model.shared = model.up  # one module under two names: replaced once, restored once
    converted = convert(model, mapping=MAPPING)
    assert type(model.up) is TransposedLinear  # inplace=False: the original is untouched
    assert converted.up is converted.shared and type(converted.up) is HandgradTransposedLinear
    assert [s.name for s in converted.handgrad_report.swapped].count("shared") == 0
    x = torch.randn(2, 6, dtype=torch.float64)
    torch.testing.assert_close(converted(x), model(x), **TOL)
    # deepcopy and pickle keep the replaced module, and revert still finds it
    for twin in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        torch.testing.assert_close(twin(x), model(x), **TOL)
        up = twin.up._handgrad_original_module
        revert(twin)
        assert twin.up is up and twin.shared is up and type(up) is TransposedLinear
    # a mapped model itself: convert returns the replacement, revert the original
    norm = LlamaRMSNorm(6).double()
    replaced = convert(norm, mapping=MAPPING, inplace=True)
    assert type(replaced) is HandgradRMSNorm and replaced.weight is norm.weight
    assert revert(replaced) is norm


def test_mapping_comes_before_the_twins_and_is_checked():
    made = []

    def factory(m):
        made.append(m)
        return hnn.Linear(m.in_features, m.out_features, dtype=m.weight.dtype)  # new Parameters: refused

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh())
    with pytest.raises(ValueError, match="share the original's Parameter"):
        convert(model, mapping={nn.Linear: factory})
    assert made and type(model[0]) is nn.Linear

    class Shared(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.weight, self.bias = m.weight, m.bias

        def forward(self, x):
            return HF.linear(x, self.weight, self.bias)

    converted = convert(model, mapping={nn.Linear: Shared})
    assert type(converted[0]) is Shared and type(converted[1]) is hnn.Tanh  # the mapping won over the twin
    with pytest.raises(ValueError, match="state_dict keys"):
        convert(model, mapping={nn.Linear: lambda m: nn.Identity()})
    with pytest.raises(TypeError, match="not a torch.nn.Module"):
        convert(model, mapping={nn.Linear: lambda m: (lambda x: x)})
    with pytest.raises(TypeError, match="mapping keys"):
        convert(model, mapping={"Linear": Shared})
    with pytest.raises(TypeError, match="callable"):
        convert(model, mapping={nn.Linear: 3})
    # include/exclude select mapped modules as they do twins
    kept = convert(nn.Sequential(TransposedLinear(3, 3), TransposedLinear(3, 3)), mapping=MAPPING, exclude="1")
    assert type(kept[0]) is HandgradTransposedLinear and type(kept[1]) is TransposedLinear
    assert [s.name for s in kept.handgrad_report.skipped] == ["1"]
