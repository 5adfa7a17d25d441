"""Fused ops: argument handling for ``linear_act``, ``mlp`` and ``linear_cross_entropy``.
The math lives in ``handgrad.ops.fused``."""
from __future__ import annotations

from typing import Sequence

import torch

from .._compat import functorch_transforms_active
from ..ops.fused import LCEOptions, LinearCrossEntropyFn, StackFn, StackSpec, activation_spec, default_chunk_size
from ._common import autocast, check_reduction, check_tensor, shape_str

__all__ = ["linear_act", "mlp", "linear_cross_entropy"]


def _check_layer(fn: str, l: int | None, X_features: int, weight, bias, dtype) -> None:
    """torch's RuntimeError for what ``linear`` would refuse, naming the argument and shapes."""
    def names():
        return ("weight", "bias") if l is None else (f"weights[{l}]", f"biases[{l}]")

    if not isinstance(weight, torch.Tensor) or (bias is not None and not isinstance(bias, torch.Tensor)):
        check_tensor(names()[0], weight, fn=fn)
        check_tensor(names()[1], bias, fn=fn)
    if weight.dim() != 2:
        raise RuntimeError(f"{fn}: {names()[0]} must be 2-D (D_out, D_in), but got shape {shape_str(weight)}")
    if weight.shape[1] != X_features:
        what = "input" if l in (None, 0) else f"the output of layer {l - 1}"
        raise RuntimeError(
            f"{fn}: {names()[0]} of shape {shape_str(weight)} expects {weight.shape[1]} features, "
            f"but {what} has {X_features}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise RuntimeError(f"{fn}: {names()[1]} of shape {shape_str(bias)} does not match {names()[0]} "
                           f"{shape_str(weight)}: expected [{weight.shape[0]}]")
    if weight.dtype != dtype or (bias is not None and bias.dtype != dtype):
        name, t = (names()[0], weight) if weight.dtype != dtype else (names()[1], bias)
        raise RuntimeError(f"{fn}: expected input and {name} to have the same dtype, but got {dtype} and {t.dtype}")


def _check_input(fn: str, input) -> None:
    check_tensor("input", input, fn=fn)
    if input.dim() == 0:
        raise RuntimeError(f"{fn}: input must be at least 1-D (*, D_in), but got a 0-D tensor")


_SPECS: dict[tuple, StackSpec] = {}


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
    act = activation_spec(activation, **activation_kwargs)
    input, weight, bias = autocast("linear", input, weight, bias)
    _check_layer("linear_act", None, input.shape[-1], weight, bias, input.dtype)
    return StackFn.call(input, StackSpec((act,)), weight, bias)[0]


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
    if torch.is_autocast_enabled(input.device.type):
        cast = iter(autocast("linear", input, *[p for p in params if p is not None]))
        input, params = next(cast), [None if p is None else next(cast) for p in params]
    features, dtype = input.shape[-1], input.dtype
    for l in range(L):
        w, b = params[2 * l], params[2 * l + 1]
        # one cheap test per layer (this runs every step); the detailed checks only on failure
        if not (isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[1] == features and w.dtype == dtype
                and (b is None or (isinstance(b, torch.Tensor) and b.dim() == 1 and b.shape[0] == w.shape[0]
                                   and b.dtype == dtype))):
            _check_layer("mlp", l, features, w, b, dtype)
        features = w.shape[0]
    return StackFn.call(input, spec, *params)[L - 1]


def linear_cross_entropy(input: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, *,
                         bias: torch.Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         label_smoothing: float = 0.0, chunk_size: int | None = None) -> torch.Tensor:
    """``cross_entropy(linear(input, weight, bias), target, …)`` without materialising the (N, C)
    logits: rows go ``chunk_size`` at a time (default: about 4 MiB of float32 logits per chunk),
    gradients are computed in the forward pass and only scaled in backward
    (ops.fused.LinearCrossEntropyFn). Class-index targets.

    Shapes: input (*, D) with target (*) (leading dims are flattened into rows, as
    ``cross_entropy(linear(x).flatten(0, -2), target.flatten())``; 'none' gives (*)),
    weight (C, D), bias (C,)."""
    fn = "linear_cross_entropy"
    _check_input(fn, input)
    check_tensor("weight", weight, fn=fn)
    check_tensor("target", target, fn=fn)
    if bias is not None:
        check_tensor("bias", bias, fn=fn)
    check_reduction(reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise RuntimeError(f"label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}")  # torch's message
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{fn}: chunk_size must be a positive int or None, got {chunk_size!r}")
    if target.dtype not in (torch.long, torch.uint8):
        scalar = target.new_empty(0).type().split(".")[-1].removesuffix("Tensor")   # torch's name: 'Float'
        raise RuntimeError(f"{fn}: expected target dtype to be Long or Byte, but got {scalar} ({target.dtype})")
    if target.shape != input.shape[:-1]:
        raise ValueError(
            f"{fn}: Expected input batch_size to match target batch_size: input {shape_str(input)} "
            f"needs target of shape {list(input.shape[:-1])}, got target {shape_str(target)}"
        )
    out_dtype = input.dtype
    device = input.device.type
    if device in ("cpu", "cuda") and torch.is_autocast_enabled(device) and out_dtype != torch.float64:
        out_dtype = torch.float32     # autocast runs cross_entropy in float32 (functional._common)
    input, weight, bias = autocast("linear", input, weight, bias)
    _check_layer(fn, None, input.shape[-1], weight, bias, input.dtype)
    C = weight.shape[0]
    T = target.reshape(-1)                                         # (N,)
    if not torch.compiler.is_compiling():   # data-dependent: Dynamo would break the graph
        bad = (T != ignore_index) & ((T < 0) | (T >= C))
        if bad.any():
            raise IndexError(f"Target {T[bad][0].item()} is out of bounds.")   # torch's message
    X = input.reshape(-1, input.shape[-1])                         # (N, D)
    N = X.shape[0]
    chunk = default_chunk_size(N, C) if chunk_size is None else chunk_size
    # Gradients in the forward pass only where one will be asked for, and not for 'none'
    # (its per-row incoming gradient is unknown until backward; see LCEOptions).
    # Not under torch.func transforms or torch.compile either: there the forward's tensors would
    # have to cross transform levels / be traced as ctx state; the backward recomputes instead.
    wanted = (torch.is_grad_enabled() and reduction != "none" and not torch.compiler.is_compiling()
              and not functorch_transforms_active())
    precompute = tuple(bool(wanted and t is not None and t.requires_grad) for t in (X, weight, bias))
    opts = LCEOptions(int(ignore_index), reduction, float(label_smoothing), int(chunk), out_dtype, precompute)
    out = LinearCrossEntropyFn.call(X, weight, bias, T.long(), opts)
    loss = out[0] if isinstance(out, tuple) else out
    return loss.reshape(target.shape) if reduction == "none" else loss
