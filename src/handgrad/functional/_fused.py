"""Fused ops: argument handling for ``linear_act``, ``mlp`` and ``linear_cross_entropy``.
The math lives in ``handgrad.ops.fused``."""
from __future__ import annotations

from typing import Sequence

import torch

from .._compat import functorch_transforms_active
from ..ops.fused import StackFn, StackSpec, activation_spec
from ..ops.linear_cross_entropy import LCEOptions, LinearCrossEntropyFn, default_chunk_size
from ._common import (autocast, check_ignore_index, check_linear, check_reduction, check_target_range, check_tensor,
                      shape_str)
from . import _activations
from ._linear import linear
from ._losses import _class_options, cross_entropy, _common_class_call, _kernel_checks_range, class_loss
from ..ops.linear import LinearFn
from ..ops.losses import CrossEntropyFn

__all__ = ["linear_act", "mlp", "linear_cross_entropy"]


def _fusable(input, weight, bias) -> bool:
    """The calls one fused layer computes: a floating input, W (D_out, D_in) and b None, (D_out,),
    () or (1,), all of the input's dtype. Anything else (a 1-D W, a bias that broadcasts in other
    shapes or casts) is ``linear``'s business: the composition takes it, so its checks
    (``check_linear``) and results are linear's own."""
    return (isinstance(weight, torch.Tensor) and input.is_floating_point() and weight.dtype == input.dtype
            and weight.dim() == 2 and (bias is None or (isinstance(bias, torch.Tensor) and bias.dtype == input.dtype
                                                       and bias.dim() <= 1 and bias.numel() in (1, weight.shape[0]))))


def _activation(name):
    """handgrad's activation function of that name (None: the identity)."""
    return (lambda y: y) if name is None else getattr(_activations, name)


def _check_input(fn: str, input) -> None:
    check_tensor("input", input, fn=fn)
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: input must be at least 1-D (*, D_in), but got a 0-D tensor")


_SPECS: dict[tuple, StackSpec] = {}
_ONE_LAYER: dict = {}


def _stack_spec(activation, last_activation, L: int) -> StackSpec:
    """The layers' activations, built once per (names, depth): hidden layers ``activation``,
    the last ``last_activation`` (None: identity)."""
    key = (activation, last_activation, L)
    spec = _SPECS.get(key)
    if spec is None:
        if L == 1:
            activation_spec(activation)  # validate the name even when no hidden layer uses it
        spec = StackSpec(tuple(activation_spec(activation if l < L - 1 else last_activation) for l in range(L)))
        _SPECS[key] = spec
    return spec


def linear_act(input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               activation: str = "relu", **activation_kwargs) -> torch.Tensor:
    """f(x Wᵀ + b) as one node (ops.fused.StackFn with one layer): equals
    ``getattr(torch.nn.functional, activation)(linear(input, weight, bias), **activation_kwargs)``,
    saving only X, W and what f' needs (the output for sigmoid, tanh, relu)."""
    _check_input("linear_act", input)
    activation_spec(activation)                     # torch's order: the name, the linear, then f's options
    input, weight, bias = autocast("linear", input, weight, bias)
    if not _fusable(input, weight, bias):
        # a 1-D weight, a bias linear broadcasts in other shapes or casts, a non-floating input:
        # the composition itself, of handgrad's linear and activation, has torch's rules for those
        return _activation(activation)(linear(input, weight, bias), **activation_kwargs)
    bias = check_linear("linear_act", weight, bias, features=input.shape[-1], dtype=input.dtype)
    act = activation_spec(activation, **activation_kwargs)
    if torch.compiler.is_compiling():               # (Dynamo of torch 2.4 takes no object as a dict key)
        spec = StackSpec((act,))
    else:
        spec = _ONE_LAYER.get(act)
        if spec is None:
            spec = _ONE_LAYER[act] = StackSpec((act,))  # one per activation (a spec per call costs µs)
    return StackFn.call(input, spec, weight, bias)[0]


def mlp(input: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None] | None,
        activation: str = "sigmoid", last_activation: str | None = None) -> torch.Tensor:
    """The seed's network as one node (ops.fused.StackFn): x_l = f(x_{l−1} W_lᵀ + b_l) for the
    hidden layers, the last layer followed by ``last_activation`` (None: no activation).
    Equals the ``nn.Sequential`` of ``Linear`` and activation modules with these parameters.
    ``biases``: one per layer, each a tensor or None; ``None`` for no biases at all."""
    _check_input("mlp", input)
    weights = list(weights)
    if not weights:
        raise ValueError("mlp: weights must hold at least one layer's weight, got an empty sequence")
    biases = [None] * len(weights) if biases is None else list(biases)
    if len(biases) != len(weights):
        raise ValueError(f"mlp: got {len(weights)} weights but {len(biases)} biases; give one bias (or None) per layer")
    L = len(weights)
    spec = _stack_spec(activation, last_activation, L)
    params = [t for pair in zip(weights, biases) for t in pair]   # W_1, b_1, W_2, b_2, …
    raw = input
    if torch.is_autocast_enabled(input.device.type):
        cast = iter(autocast("linear", input, *[p for p in params if p is not None]))
        input, params = next(cast), [None if p is None else next(cast) for p in params]
    features, dtype = input.shape[-1], input.dtype
    for l in range(L):
        w, b = params[2 * l], params[2 * l + 1]
        # one cheap test per layer (this runs every step); the detailed checks only on failure
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == features and w.dtype == dtype
                and (b is None or (isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == w.shape[0]
                                   and b.dtype == dtype)) and dtype.is_floating_point):
            if not all(_fusable(raw, w, b) for w, b in zip(weights, biases)):
                # as linear_act's: the composition, layer by layer, for what one fused stack does not take
                h = raw
                for k, (w, b) in enumerate(zip(weights, biases)):
                    h = _activation(activation if k < L - 1 else last_activation)(linear(h, w, b))
                return h
            params[2 * l + 1] = check_linear("mlp", w, b, features=features, dtype=dtype, layer=l)
        features = w.shape[0]
    return StackFn.call(input, spec, *params)[L - 1]


class _Logits:
    """What the cross entropy's checks read of its input (shape, dim, dtype), for logits that are
    never materialised."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, input, linear_weight):
        self.shape, self.dtype = shape, dtype
        self.requires_grad = input.requires_grad or linear_weight.requires_grad
        self.describe = f"the logits of input {shape_str(input)} and linear_weight {shape_str(linear_weight)}"

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    def is_floating_point(self) -> bool:
        return self.dtype.is_floating_point

    def is_complex(self) -> bool:
        return self.dtype.is_complex


# logits of at most this many values, with no chunk size asked for, are not chunked (see below)
_UNCHUNKED = 1 << 16


def _small_call(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing):
    """The cross entropy's options for the common small call of ``linear_cross_entropy``: input
    (N, D), linear_weight (C, D) and linear_bias None or (C,) of the input's floating dtype, N·C
    at most ``_UNCHUNKED``, and what cross_entropy's own common call is (``_common_class_call``:
    class-index target (N,), no class weight, no smoothing, no autocast). None: anything else."""
    if not (linear_weight.dim() == 2 and type(input) is torch.Tensor and input.dim() == 2
            and linear_weight.shape[1] == input.shape[1] and linear_weight.dtype == input.dtype
            and input.shape[0] * linear_weight.shape[0] <= _UNCHUNKED
            and (linear_bias is None or (isinstance(linear_bias, torch.Tensor) and linear_bias.dim() == 1
                                         and linear_bias.shape[0] == linear_weight.shape[0]
                                         and linear_bias.dtype == input.dtype))):
        return None
    return _common_class_call(input, target, weight, None, None, reduction, -100 if ignore_index is None else ignore_index,
                              label_smoothing)


def linear_cross_entropy(input: torch.Tensor, linear_weight: torch.Tensor, target: torch.Tensor, *,
                         linear_bias: torch.Tensor | None = None, weight: torch.Tensor | None = None,
                         reduction: str = "mean", ignore_index: int | None = None, label_smoothing: float = 0.0,
                         options=None, chunk_size: int | None = None) -> torch.Tensor:
    """``torch.nn.functional.linear_cross_entropy`` (torch ≥ 2.13's signature and semantics):
    ``cross_entropy(linear(input, linear_weight, linear_bias), target, weight=weight, …)`` with
    ``weight`` the class weight and ``ignore_index=None`` meaning −100 (refused with class
    probabilities).

    Class-index targets with a 2-D ``linear_weight`` (C, D) run chunked, without materialising
    the (N, C) logits: rows go ``chunk_size`` at a time (handgrad's extra keyword; default
    ``options.batch_chunk_size`` if given, else about 4 MiB of float32 logits per chunk), and the
    gradients are computed in the forward pass and only scaled in backward
    (ops.linear_cross_entropy.LinearCrossEntropyFn). Class-probability targets and K-dim weights
    (C, d1, …, dK, D) take handgrad's ``cross_entropy(linear(…))``, as torch's reference path.

    Shapes: input (D,) or (N, D); linear_weight (C, D) or (C, d1, …, dK, D); linear_bias (C, d1, …);
    target as ``cross_entropy``'s for logits (N, C, d1, …) (or (C,) unbatched)."""
    fn = "linear_cross_entropy"
    if options is None and chunk_size is None and isinstance(linear_weight, torch.Tensor):   # (a Parameter too)
        # The common small call, in one cheap test (it runs every step): logits (N, C) of at most
        # _UNCHUNKED values, nothing to chunk, so torch's reference path as below (linear, then
        # cross_entropy) with every check passed: (8, 64) into 512 classes, 150 → 60 µs a call
        common = _small_call(input, linear_weight, target, linear_bias, weight, reduction, ignore_index, label_smoothing)
        if common is not None:
            logits = LinearFn.call(input, linear_weight, linear_bias)                 # (N, C)
            if not _kernel_checks_range(logits):
                check_target_range(fn, target, logits.shape[1], common.ignore_index, logits)
            return CrossEntropyFn.call(logits, target, None, common)[0]
    check_tensor("input", input, fn=fn)
    check_tensor("linear_weight", linear_weight, fn=fn)
    check_tensor("target", target, fn=fn)
    for name, t in (("linear_bias", linear_bias), ("weight", weight)):
        if t is not None:
            check_tensor(name, t, fn=fn)
    # torch's own checks, in its order (torch.nn.functional.linear_cross_entropy)
    if not 1 <= input.dim() <= 2:
        raise RuntimeError(f"{fn}: expected input with dimensionality 1 or 2, got {input.dim()} "
                           f"(input of shape {shape_str(input)})")
    if linear_weight.dim() < 2:
        raise RuntimeError(f"{fn}: expected linear_weight with dimensionality at least 2, got {linear_weight.dim()} "
                           f"(linear_weight of shape {shape_str(linear_weight)})")
    D, C, out_features = input.shape[-1], linear_weight.shape[0], linear_weight.shape[1:-1]
    if linear_weight.shape[-1] != D:
        raise RuntimeError(f"{fn}: expected equal input and linear_weight last dimensions (in_features), got {D} and "
                           f"{linear_weight.shape[-1]}: input {shape_str(input)}, linear_weight {shape_str(linear_weight)}")
    if linear_bias is not None and linear_bias.shape != linear_weight.shape[:-1]:
        raise RuntimeError(f"{fn}: expected linear_bias shape {list(linear_weight.shape[:-1])}, got "
                           f"{shape_str(linear_bias)} (linear_weight of shape {shape_str(linear_weight)})")
    if out_features and input.dim() == 1:
        raise RuntimeError(f"{fn}: K-dimensional loss defined by linear_weight shape {shape_str(linear_weight)} "
                           f"requires batched input (N, {D}), got unbatched input of shape {shape_str(input)}")
    logits_shape = torch.Size((*input.shape[:-1], C, *out_features))
    if ignore_index is not None and target.shape == logits_shape:   # torch's Python check, before its linear
        check_ignore_index(fn, ignore_index, target, probs=True, none_is_default=True)
    if chunk_size is None and options is not None:
        chunk_size = getattr(options, "batch_chunk_size", None)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    out_dtype = input.dtype
    device = input.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and out_dtype != torch.float64:
        out_dtype = torch.float32     # autocast runs cross_entropy in float32 (functional._common)
    input, linear_weight, linear_bias = autocast("linear", input, linear_weight, linear_bias)
    W2 = linear_weight.reshape(linear_weight.shape[:-1].numel(), D)   # (C·d1·…, D) (D may be 0)
    b2 = None if linear_bias is None else linear_bias.reshape(-1)
    check_linear(fn, W2, b2, features=D, dtype=input.dtype, names=("linear_weight", "linear_bias"))
    if not input.is_floating_point():
        # torch's reference path as it runs: its linear (a bool product only where D = 0 without a
        # bias), then cross_entropy's checks (label_smoothing first) refusing integer logits
        logits = linear(input, W2, b2).reshape(logits_shape)
        return cross_entropy(logits, target, weight, reduction=reduction, label_smoothing=label_smoothing,
                             ignore_index=-100 if ignore_index is None else ignore_index)
    reduction = check_reduction(reduction)    # torch's order: its linear, then cross_entropy's Python, then C++
    # the cross entropy's checks on the logits' shape and dtype (no tensor: nothing allocated)
    logits = _Logits(logits_shape, out_dtype, input, linear_weight)
    _, weight, ce = _class_options(fn, logits, target, weight, ignore_index, reduction, label_smoothing,
                                   allow_probs=True, none_is_default=True)
    # (logits of at most 2¹⁶ values, with no chunk size asked for: one chunk would hold them all, so
    # chunking saves no memory, and the fused op's ~80 small torch calls cost more than the two ops)
    small = chunk_size is None and logits_shape.numel() <= _UNCHUNKED
    if ce.probs or out_features or small:
        # torch's reference path, in handgrad's ops: linear, then cross_entropy on the logits
        logits = linear(input, W2, b2).reshape(logits_shape)
        logits, target, weight = autocast("cross_entropy", logits, target, weight)
        return class_loss(fn, logits, target, weight, ce, C)
    X = input.reshape(input.shape[:-1].numel(), D)                 # (N, D) (D may be 0)
    T = target.reshape(-1).long()                                  # (N,)
    check_target_range(fn, T, C, ce.ignore_index, logits)
    N = X.shape[0]
    chunk = default_chunk_size(N, C) if chunk_size is None else chunk_size
    # Gradients in the forward pass only where one will be asked for, and not for 'none'
    # (its per-row incoming gradient is unknown until backward; see LCEOptions).
    # Not under torch.func transforms or torch.compile either: there the forward's tensors would
    # have to cross transform levels / be traced as ctx state; the backward recomputes instead.
    wanted = (torch.is_grad_enabled() and reduction != "none" and not torch.compiler.is_compiling()
              and not functorch_transforms_active())
    precompute = tuple(bool(wanted and t is not None and t.requires_grad) for t in (X, linear_weight, linear_bias))
    opts = LCEOptions(ce, int(chunk), out_dtype, precompute)
    out = LinearCrossEntropyFn.call(X, linear_weight, linear_bias, T, weight, opts)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.reshape(()) if reduction == "none" and input.dim() == 1 else loss
