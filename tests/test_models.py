"""Whole models built from torch.nn parts, as users train them: a ResNet-style CNN, a ViT-style
encoder, a GPT-style decoder and a LLaMA-style block, each written as third-party code would be
(``import torch.nn.functional as F``, functions called inside ``forward``, the loss included).

For each model, ``handgrad.convert`` plus ``handgrad.enable()``:
- (a) the coverage report: every parameter's gradient and every layer-level node is handgrad's;
- (b) float64 loss and every parameter gradient equal the native model's (a copy, same inputs);
- (c) five float64 SGD steps give the native model's parameters (and batch-norm running stats);
- (d) float32 training through Lightning lowers the loss.

Small sizes, float64 on CPU: the whole file runs in a few seconds.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import handgrad
from handgrad.testing import record_coverage

# ---------------------------------------------------------------------------------------------
# The models. Each forward takes (inputs, targets) and returns the scalar loss, so the loss
# function is part of the code enable() has to reach.


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus the (projected, when the shape changes) input, then relu."""

    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.down = None
        if stride != 1 or c_in != c_out:
            self.down = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        skip = x if self.down is None else self.down(x)
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + skip)


class ResNet(nn.Module):
    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.layer1 = BasicBlock(8, 8)
        self.layer2 = BasicBlock(8, 12, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(12, classes)

    def forward(self, x, y):
        logits = self.fc(self.flatten(self.pool(self.layer2(self.layer1(self.stem(x))))))
        return F.cross_entropy(logits, y)


class ViTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self, d=16, heads=2, patch=4, image=8, classes=5):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2, d))
        self.blocks = nn.Sequential(ViTBlock(d, heads), ViTBlock(d, heads))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x, y):
        tokens = self.patch(x).flatten(2).transpose(1, 2) + self.pos  # (B, T, d)
        h = self.norm(self.blocks(tokens)).mean(dim=1)                 # mean-pool the tokens
        return F.cross_entropy(self.head(h), y)


class CausalSelfAttention(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, T, self.heads, D // self.heads).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).contiguous().view(B, T, D))


class GPTMLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class GPTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = CausalSelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = GPTMLP(d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab=16, context=8, d=16, heads=2, layers=2):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.blocks = nn.ModuleList(GPTBlock(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.wte.weight  # tied: one Parameter, gradients from both uses

    def forward(self, idx, targets):
        T = idx.shape[1]
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))


class GQAttention(nn.Module):
    """Grouped-query attention: ``heads`` query heads share ``kv_heads`` key/value heads."""

    def __init__(self, d, heads, kv_heads):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, d // heads
        self.wq = nn.Linear(d, heads * self.hd, bias=False)
        self.wk = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wv = nn.Linear(d, kv_heads * self.hd, bias=False)
        self.wo = nn.Linear(heads * self.hd, d, bias=False)

    def forward(self, x):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.heads, self.hd).transpose(1, 2)
        k = self.wk(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        v = self.wv(x).view(B, T, self.kv_heads, self.hd).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d, hidden):
        super().__init__()
        self.w1 = nn.Linear(d, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d, bias=False)
        self.w3 = nn.Linear(d, hidden, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class LlamaBlock(nn.Module):
    def __init__(self, d, heads, kv_heads, hidden):
        super().__init__()
        self.attention_norm = nn.RMSNorm(d, eps=1e-6)
        self.attention = GQAttention(d, heads, kv_heads)
        self.ffn_norm = nn.RMSNorm(d, eps=1e-6)
        self.feed_forward = SwiGLU(d, hidden)

    def forward(self, x):
        x = x + self.attention(self.attention_norm(x))
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(nn.Module):
    def __init__(self, vocab=16, d=16, heads=4, kv_heads=2, hidden=24):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layer = LlamaBlock(d, heads, kv_heads, hidden)
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        logits = self.output(self.norm(self.layer(self.tok_embeddings(idx))))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def _images(n, classes=5):
    return torch.randn(n, 3, 8, 8), torch.randint(0, classes, (n,))


def _tokens(n, vocab=16, context=8):
    seq = torch.randint(0, vocab, (n, context + 1))
    return seq[:, :-1], seq[:, 1:]


# name → (model factory, data factory(n))
MODELS = {"resnet": (ResNet, _images), "vit": (ViT, _images), "gpt": (GPT, _tokens), "llama": (Llama, _tokens)}


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
