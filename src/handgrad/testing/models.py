"""Whole models built from torch.nn parts, as users train them: a ResNet-style CNN, a ViT-style
encoder, a GPT-style decoder and a LLaMA-style decoder, each written as third-party code would be
(``import torch.nn.functional as F``, functions called inside ``forward``, the loss included).

Each ``forward`` takes (inputs, targets) and returns the scalar loss, so the loss function is part
of the code ``handgrad.enable()`` has to reach. The size keywords default to tiny sizes (what
``tests/test_models.py`` checks in float64); ``bench`` builds the same families at a realistic
size. ``MODELS``: name → (model factory, data factory ``data(n, **sizes)``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MODELS", "ResNet", "ViT", "GPT", "Llama", "images", "tokens"]


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
    """stem (conv, bn, relu, max-pool), a block of ``widths[0]`` channels, a strided block of
    ``widths[1]`` (projected skip), global average pool, linear head."""

    def __init__(self, classes=5, widths=(8, 12)):
        super().__init__()
        w1, w2 = widths
        self.stem = nn.Sequential(nn.Conv2d(3, w1, 3, padding=1, bias=False), nn.BatchNorm2d(w1), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.layer1 = BasicBlock(w1, w1)
        self.layer2 = BasicBlock(w1, w2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(w2, classes)

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
    def __init__(self, d=16, heads=2, patch=4, image=8, classes=5, layers=2):
        super().__init__()
        self.patch = nn.Conv2d(3, d, patch, stride=patch)
        self.pos = nn.Parameter(0.02 * torch.randn(1, (image // patch) ** 2, d))
        self.blocks = nn.Sequential(*(ViTBlock(d, heads) for _ in range(layers)))
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
    def __init__(self, vocab=16, d=16, heads=4, kv_heads=2, hidden=24, layers=1):
        super().__init__()
        self.tok_embeddings = nn.Embedding(vocab, d)
        self.layers = nn.Sequential(*(LlamaBlock(d, heads, kv_heads, hidden) for _ in range(layers)))
        self.norm = nn.RMSNorm(d, eps=1e-6)
        self.output = nn.Linear(d, vocab, bias=False)

    def forward(self, idx, targets):
        logits = self.output(self.norm(self.layers(self.tok_embeddings(idx))))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def images(n, classes=5, image=8):
    """n RGB images (n, 3, image, image) and their class labels (n,)."""
    return torch.randn(n, 3, image, image), torch.randint(0, classes, (n,))


def tokens(n, vocab=16, context=8):
    """n token sequences (n, context) and the next-token targets (n, context)."""
    seq = torch.randint(0, vocab, (n, context + 1))
    return seq[:, :-1], seq[:, 1:]


# name → (model factory, data factory(n)); both take size keywords, their defaults the tests' sizes
MODELS = {"resnet": (ResNet, images), "vit": (ViT, images), "gpt": (GPT, tokens), "llama": (Llama, tokens)}
