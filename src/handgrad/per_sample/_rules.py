r"""One rule per layer kind: which per-sample formula (``_formulas``) each parameter of a
handgrad module takes, given the module's saved input ``x`` and ``G = ∂L/∂Y`` at its output.

A rule lays ``x`` and ``G`` out with the sample first, (N, T, ·) where a layer maps T rows of a
sample alike (sequence positions, conv patches), and returns one ``Part`` per parameter. The
normalised x̂ of the norm layers is recomputed by the function handgrad's own op computes it with
(``ops.normalize`` / ``ops.norms``; RMS and eval batch norm through the functional), so the
normalisation is not written again here; on the fast path, group and layer norm's terms and the
embedding's pairwise norm come from the compiled kernels of ``kernels/per_sample.py`` instead (the
same sums in one or two passes; tests/test_per_sample.py compares both). ``RULES`` is the table;
``refusal`` names the modules capture cannot take, and why.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as TF

from .. import functional as F
from .. import kernels
from .. import nn as hnn
from ..ops._function import fast_path, opmath
from ..ops.normalize import Norm
from ..ops.normalize import _xhat as norm_xhat
from ..ops.norms import normalize as layer_norm_xhat
from ._formulas import affine, conv_cols, conv_weight, rows, scaled, sq, summed

__all__ = ["Part", "RULES", "rule_for", "refusal", "projection_parts"]


class Part(NamedTuple):               # (several per layer per backward: ~4× cheaper than a dataclass)
    param: torch.nn.Parameter
    grad: torch.Tensor | None        # (N, *rows' shape) ∂Cⁿ/∂θ, or None (grads=False and not formed)
    sq_norm: torch.Tensor | None     # (N,) ‖∂Cⁿ/∂θ‖²_F (None: grads=True, not computed)
    rows: slice | None = None        # the rows of param's first dim this part covers (None: all)


def _wanted(p) -> bool:
    return p is not None and p.requires_grad


def _sample_first(fn: str, x: torch.Tensor, ndim: int) -> int:
    """N, refusing inputs with no sample dimension (unbatched, or too few dims)."""
    if x.dim() < ndim:
        raise RuntimeError(f"per_sample.capture: {fn} got an input of shape {list(x.shape)}; per-sample "
                           f"gradients need the sample dimension first (at least {ndim}-D)")
    return x.shape[0]


def _affine_parts(weight, bias, X, D, grads, rows_=None, gram=None) -> list[Part]:
    """Y = X Wᵀ + b over (N, T, ·) rows: W by ``affine``, b by ``summed``; one row per sample
    without ``grads``: ‖δₙ‖² once for both."""
    parts = []
    d_sq = sq(D) if not grads and D.shape[1] == 1 and _wanted(weight) and _wanted(bias) else None
    if _wanted(weight):
        g, s = affine(X, D, grads, gram, d_sq)
        parts.append(Part(weight, g, s, rows_))
    if _wanted(bias):
        g, s = (None, d_sq) if d_sq is not None else summed(D, grads)
        parts.append(Part(bias, g, s, rows_))
    return parts


def _linear(m, x, G, grads):
    N = _sample_first("Linear", x, 2)
    T = x.shape[1:-1].numel()                                                       # rows per sample
    return _affine_parts(m.weight, m.bias, x.reshape(N, T, x.shape[-1]),            # (N, T, D_in)
                         G.reshape(N, T, G.shape[-1]), grads)                       # (N, T, D_out)


def _conv(m, x, G, grads):
    r"""Yₙ = W_col Xₙ,col + b: the affine rule over the L output positions, one affine map per
    group, on the patches Xₙ,col (``conv_cols``, a chunk of samples at a time). ∂Cⁿ/∂W is formed by
    ``conv_weight`` (with ``grads=False`` only its norm is kept), or its norm takes the Gram form of
    ``affine`` when L² ≤ (C_in/g·|k|)·(C_out/g), the smaller intermediate (Opacus's "mixed ghost"
    choice)."""
    d = len(m.kernel_size)
    N = _sample_first(type(m).__name__, x, d + 2)
    if x.dim() != d + 2:
        raise RuntimeError(f"per_sample.capture: {type(m).__name__} got an input of shape {list(x.shape)}; "
                           f"expected (N, C, *{d} spatial dims)")
    pad = tuple(m.padding) if not isinstance(m.padding, str) else (0,) * d
    if isinstance(m.padding, str) or m.padding_mode != "zeros":   # 'same'/'valid' or a padding mode: pad first
        if any(m._reversed_padding_repeated_twice):
            x = TF.pad(x, m._reversed_padding_repeated_twice,
                       mode="constant" if m.padding_mode == "zeros" else m.padding_mode)
        pad = (0,) * d
    g, C_out = m.groups, m.out_channels
    L, K = G.shape[2:].numel(), m.weight.shape[1:].numel()            # positions; C_in/g · |k|
    conv = (tuple(m.kernel_size), tuple(m.stride), pad, tuple(m.dilation))
    parts = []
    if _wanted(m.weight):
        if grads or L * L > K * (C_out // g):
            gw, sq_w = conv_weight(x, G, *conv, g, grads)                       # (N, C_out, C_in/g, *k) or (N,)
            parts.append(Part(m.weight, gw, sq_w))
        else:
            sq_w = G.new_empty(N, dtype=torch.promote_types(x.dtype, G.dtype))
            Dg = G.reshape(N, g, C_out // g, L)                                 # (N, g, C_out/g, L)
            for a, b, cols in conv_cols(x.to(sq_w.dtype), *conv, tuple(G.shape[2:])):
                X = cols.view((b - a) * g, K, L).mT                             # (n·g, L, C_in/g · k)
                D = Dg[a:b].reshape((b - a) * g, C_out // g, L).mT.to(X.dtype)  # (n·g, L, C_out/g)
                sq_w[a:b] = affine(X, D, False)[1].view(b - a, g).sum(1)        # per (sample, group), summed
            parts.append(Part(m.weight, None, sq_w))
    if _wanted(m.bias):
        gb, sq_b = summed(G.reshape(N, C_out, L).mT, grads)                     # Δ (N, L, C_out)
        parts.append(Part(m.bias, gb, sq_b))
    return parts


def _norm_parts(m, weight, bias, xhat, G, dims):
    return [Part(p, *scaled(xh, G, dims)) for p, xh in ((weight, xhat), (bias, None)) if _wanted(p)]


def _kernel_norm_parts(family_fn, weight, bias, x3, G3, shape, *args):
    """The norm layers' Parts from a kernel of kernels/per_sample.py (the same ∂Cⁿ/∂w = Σ (G ⊙ x̂)ₙ,
    ∂Cⁿ/∂b = Σ Gₙ as ``scaled``, in two passes), or None where the kernel cannot take x3, G3
    (not on the fast path, or not contiguous float32/float64 CPU tensors of one dtype)."""
    if not (fast_path() and kernels.usable(x3, G3)):
        return None
    N = x3.shape[0]
    gw = x3.new_empty((N, x3.shape[1] if family_fn == "group_norm_terms" else x3.shape[2]), dtype=torch.float64)
    gb = torch.empty_like(gw)
    getattr(kernels.load("per_sample"), family_fn)(*kernels.arrays(x3, G3), *args, *kernels.arrays(gw, gb))
    parts = []
    for p, g in ((weight, gw), (bias, gb)):
        if _wanted(p):
            parts.append(Part(p, g.to(x3.dtype).view(N, *shape), sq(g).to(x3.dtype)))   # ‖gₙ‖² of the float64 sums
    return parts


def _layer_norm(m, x, G, grads):
    K = len(m.normalized_shape)
    _sample_first("LayerNorm", x, K + 1)
    if x.dtype == G.dtype and (_wanted(m.weight) or _wanted(m.bias)):
        N, T, D = x.shape[0], math.prod(x.shape[1:x.dim() - K]), math.prod(m.normalized_shape)
        parts = _kernel_norm_parts("layer_norm_terms", m.weight, m.bias, x.reshape(N, T, D),        # (N, T, D)
                                   G.reshape(N, T, D), tuple(m.normalized_shape), float(m.eps))
        if parts is not None:
            return parts
    xhat = layer_norm_xhat(opmath(x), K, m.eps, fast=True)[0]           # x̂ over the last K dims (LayerNormFn's)
    return _norm_parts(m, m.weight, m.bias, xhat, G, tuple(range(1, x.dim() - K)))


def _rms_norm(m, x, G, grads):
    K = len(m.normalized_shape)
    _sample_first("RMSNorm", x, K + 1)
    xhat = F.rms_norm(x, m.normalized_shape, None, m.eps)
    return _norm_parts(m, m.weight, None, xhat, G, tuple(range(1, x.dim() - K)))


def _group_norm(m, x, G, grads):
    _sample_first("GroupNorm", x, 2)
    if x.dtype == G.dtype and (_wanted(m.weight) or _wanted(m.bias)):
        N, C, L = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        parts = _kernel_norm_parts("group_norm_terms", m.weight, m.bias, x.reshape(N, C, L),         # (N, C, L)
                                   G.reshape(N, C, L), (C,), m.num_groups, float(m.eps))
        if parts is not None:
            return parts
    xhat = F.group_norm(x, m.num_groups, None, None, m.eps)             # x (N, C, *): weight per channel
    return _norm_parts(m, m.weight, m.bias, xhat, G, tuple(range(2, x.dim())))


def _batch_norm_eval(m, x, G, grads):
    _sample_first(type(m).__name__, x, 2)
    xhat = F.batch_norm(x, m.running_mean, m.running_var, None, None, False, 0.0, m.eps)   # running statistics
    return _norm_parts(m, m.weight, m.bias, xhat, G, tuple(range(2, x.dim())))


def _embedding(m, x, G, grads):
    if not _wanted(m.weight):
        return []
    N = _sample_first("Embedding", x, 1)
    T = x.shape[1:].numel()
    index = x.reshape(N, T)                                             # (N, T)
    D = G.reshape(N, T, m.embedding_dim)                                # (N, T, E)
    if m.padding_idx is not None:                                       # torch's gradient skips that row
        D = D * (index != m.padding_idx).unsqueeze(-1)
    if not grads and T * T <= m.num_embeddings * m.embedding_dim and fast_path() and kernels.usable(D):
        out = D.new_empty(N, dtype=torch.float64)                       # the pairwise form, equal pairs only
        kernels.load("per_sample").embedding_pair_sq(index.contiguous().numpy(), *kernels.arrays(D, out))
        return [Part(m.weight, None, out.to(D.dtype))]
    return [Part(m.weight, *rows(index, D, m.num_embeddings, grads))]


#: handgrad.nn class → rule(module, input, G, grads) → [Part]. MultiheadAttention's rule is
#: ``projection_parts``, run per projection from inside its forward (its G are inner tensors).
RULES: dict[type, Callable] = {
    hnn.Linear: _linear,
    hnn.Conv1d: _conv,
    hnn.Conv2d: _conv,
    hnn.LayerNorm: _layer_norm,
    hnn.RMSNorm: _rms_norm,
    hnn.GroupNorm: _group_norm,
    hnn.BatchNorm1d: _batch_norm_eval,
    hnn.BatchNorm2d: _batch_norm_eval,
    hnn.Embedding: _embedding,
}


def rule_for(m: torch.nn.Module) -> Callable | None:
    """The rule of ``m``'s handgrad class, or None. A subclass that brings its own math (its own
    ``forward``, or a conv's ``_conv_forward``) has none."""
    for cls in type(m).__mro__:
        if cls in RULES:
            if type(m).forward is not cls.forward or (
                    hasattr(cls, "_conv_forward") and type(m)._conv_forward is not cls._conv_forward):
                return None
            return RULES[cls]
    return None


def refusal(m: torch.nn.Module) -> str | None:
    """Why capture cannot take ``m`` (a handgrad module whose gradient mixes samples, or a part
    no rule covers), or None."""
    if isinstance(m, (hnn.BatchNorm1d, hnn.BatchNorm2d)) and (
            m.training or m.running_mean is None or m.running_var is None):
        return ("batch normalisation with batch statistics mixes the samples of a batch, so no per-sample "
                "gradient exists; use GroupNorm (or LayerNorm), or put the module in eval mode")
    if isinstance(m, hnn.Embedding) and m.scale_grad_by_freq:
        return "scale_grad_by_freq divides by counts over the whole batch, which mixes samples"
    lce = getattr(hnn, "LinearCrossEntropyLoss", None)
    if lce is not None and isinstance(m, lce) and any(p.requires_grad for p in m.parameters()):
        return ("its linear layer runs inside the fused loss, where no per-sample rule sees it; compute the logits "
                "with a Linear and use CrossEntropyLoss")
    if isinstance(m, hnn.MultiheadAttention) and m.bias_k is not None:
        return "add_bias_kv's bias_k/bias_v have no per-sample rule"
    return None


def projection_parts(m: hnn.MultiheadAttention, role: str, x, y_grad, bsz: int, grads: bool,
                     grams: dict | None = None) -> list[Part]:
    r"""MultiheadAttention's projections (functional/_mha.py taps them): q, k, v = x W_{q,k,v}ᵀ + b
    with rows laid out (T, N, E), and ``out``, the output projection, with rows (T·N, E) in
    (t, n) order. Each is the affine rule; q, k, v use rows [0:E), [E:2E), [2E:3E) of
    ``in_proj_weight`` / ``in_proj_bias`` (or their own ``*_proj_weight``). ``grams``: one
    forward's Xₙ Xₙᵀ by the input tensor, so self-attention's q, k, v form it once."""
    T = x.shape[:-1].numel() // bsz if bsz else 0
    X = x.reshape(T, bsz, x.shape[-1]).transpose(0, 1)                     # (N, T, D_in)
    D = y_grad.reshape(T, bsz, y_grad.shape[-1]).transpose(0, 1)           # (N, T, D_out)

    def gram():
        if grams is None:
            return X @ X.mT
        if id(x) not in grams:
            grams[id(x)] = (x, X @ X.mT)                                    # x held: its id stays its own
        return grams[id(x)][1]
    if role == "out":
        return _affine_parts(m.out_proj.weight, m.out_proj.bias, X, D, grads)
    E = m.embed_dim
    i = "qkv".index(role)
    block = slice(i * E, (i + 1) * E)
    if m._qkv_same_embed_dim:
        parts = _affine_parts(m.in_proj_weight, None, X, D, grads, block, gram)
    else:
        parts = _affine_parts(getattr(m, f"{role}_proj_weight"), None, X, D, grads, gram=gram)
    return parts + _affine_parts(None, m.in_proj_bias, X, D, grads, block)
