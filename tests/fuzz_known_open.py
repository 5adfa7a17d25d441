"""KNOWN_OPEN: the fuzzer's disagreements with torch still open (issue 13 §1), read by
tests/test_fuzz.py. Each entry is a class: the ops, the mismatch kinds, a predicate on the call
(``handgrad.testing.fuzz.call.Call``, tensors as ``Spec``s) and a reproducer."""
from __future__ import annotations

import math

import torch

from handgrad.testing.differences import Difference
from handgrad.testing.fuzz.call import Spec

# --- KNOWN_OPEN: disagreements still open (issue 13 §1), each a class: a predicate on the call and a
# reproducer. The loss / linear / fused classes were written before their fixes merged; those a
# 12000-call run (seeds 1-3) no longer needs are gone. The layer ops' classes are as the fuzzer found
# them when their domains were added (fuzz/layers.py). Fix a class in the op, then delete its entry:
# the fuzzer holds the op to torch again. ------------------------------------------------------------

def _specs(call):
    return [s for s in call.specs()]


def _kw(name, value):
    return lambda call: call.kwargs.get(name) == value


def _nonfloat_tensor(call):
    """a tensor argument that is integer, bool or complex (an invalid-domain call)"""
    return any(not s.dtype.is_floating_point for s in _specs(call) if s is not _target(call))


def _target(call):
    return call.args[1] if call.op in ("cross_entropy", "nll_loss") and len(call.args) > 1 else None


def _mixed_float_dtypes(call):
    return len({s.dtype for s in _specs(call) if s.dtype.is_floating_point and s is not _target(call)}) > 1


def _zero_features(call):
    """a 0-size feature / class dim: the input's last dim (linear, fused) or its class dim"""
    x = call.first()
    if x is None or not x.shape:
        return False
    if call.op in ("cross_entropy", "nll_loss"):
        return (x.shape[1] if len(x.shape) > 1 else x.shape[0]) == 0
    shapes = [s.shape for s in _specs(call)]
    return any(0 in s for s in shapes)


def _nonfinite_or_huge(call):
    return any(not (v := s.base.to(s.dtype).double()).isfinite().all() or bool((v.abs() > 1e15).any())
               for s in _specs(call) if s.dtype.is_floating_point)


def _uint8_target(call):
    t = _target(call)
    return isinstance(t, Spec) and t.dtype == torch.uint8


def _unbatched_bad_target(call):
    x, t = call.first(), _target(call)
    return x is not None and len(x.shape) == 1 and isinstance(t, Spec) and len(t.shape) >= 1 and t.shape != (1,)


def _class_weight_2d_or_signed(call):
    w = call.kwargs.get("weight")
    return isinstance(w, Spec) and (len(w.shape) != 1 or bool((w.base.to(w.dtype) <= 0).any()) or w.requires_grad)


def _odd_linear_shapes(call):
    """a 1-D input or weight, or a bias that is not (D_out,): shapes F.linear broadcasts"""
    x, w = call.args[0], call.args[1]
    if call.op == "mlp":
        return False
    b = call.args[2] if len(call.args) > 2 else call.kwargs.get("bias")
    if not (isinstance(x, Spec) and isinstance(w, Spec)):
        return False
    return len(x.shape) == 1 or len(w.shape) != 2 or (isinstance(b, Spec) and b.shape != w.shape[:1])


def _any(*preds):
    return lambda call: any(p(call) for p in preds)


def _open(name, ops, kinds, when, repro):
    return tuple(Difference(name, op, kinds, when, "", "", "open: being fixed on another branch", repro) for op in ops)


def _bad_embedding_dtypes(call):
    x, w = call.args[0], call.args[1]
    return (isinstance(x, Spec) and x.dtype not in (torch.int64, torch.int32)) or (
        isinstance(w, Spec) and not w.dtype.is_floating_point)


def _zero_size(call):
    return any(0 in s.shape for s in _specs(call)) or 0 in (call.args[1:2] if call.op == "adaptive_avg_pool2d"
                                                           else ()) or (call.op == "adaptive_avg_pool2d" and
                                                                        isinstance(call.args[1], tuple) and
                                                                        0 in call.args[1])


_LAYERS = ("conv1d", "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_norm", "group_norm",
           "rms_norm", "embedding", "dropout")
_ALL_KINDS = ("exception", "output", "dtype", "shape", "value", "requires_grad", "backward", "grad")
_LOSSES = ("mse_loss", "half_squared_error", "cross_entropy", "nll_loss", "binary_cross_entropy_with_logits")
_LINEAR = ("linear", "linear_act", "mlp")

KNOWN_OPEN: tuple[Difference, ...] = (
    *_open("0 features / 0 classes crash", ("linear_act", "mlp", "cross_entropy", "nll_loss"), _ALL_KINDS,
           _zero_features,
           "F.linear_act(torch.randn(2, 0), torch.randn(3, 0)) (torch: shape [2, 3]); "
           "F.cross_entropy(torch.randn(2, 0), torch.zeros(2)) (torch: a value)"),
    *_open("integer/bool/complex inputs: another exception or a result", _LOSSES + _LINEAR, _ALL_KINDS,
           _nonfloat_tensor,
           "F.mse_loss(torch.ones(3, dtype=torch.uint8), torch.ones(3, dtype=torch.uint8)) "
           "(torch: NotImplementedError)"),
    *_open("mixed float dtypes: accepted/refused or promoted differently", _LOSSES + _LINEAR, _ALL_KINDS,
           _mixed_float_dtypes,
           "F.binary_cross_entropy_with_logits(torch.randn(2), torch.rand(2, dtype=torch.half)) (torch: "
           "float16); F.linear(torch.randn(3, dtype=torch.double), torch.randn(5, 3, dtype=torch.double), "
           "torch.randn(5)) (torch: accepted)"),
    *_open("uint8 targets", ("cross_entropy", "nll_loss"), _ALL_KINDS, _uint8_target,
           "F.cross_entropy(torch.randn(1, 3, 2), torch.zeros(1, 2, dtype=torch.uint8)) (torch: RuntimeError)"),
    *_open("unbatched input with a target of another size", ("cross_entropy", "nll_loss"), ("exception",),
           _unbatched_bad_target, "F.nll_loss(torch.randn(3), torch.tensor([0, 1])) (torch: ValueError)"),
    *_open("class weight: (1, C), non-positive or requiring grad", ("cross_entropy", "nll_loss"), _ALL_KINDS,
           _class_weight_2d_or_signed,
           "F.cross_entropy(torch.randn(3, 2), torch.tensor([0, 1, -100]), weight=torch.tensor([-.5, -.3]))"),
    *_open("non-finite or huge values in the losses and fused ops", _LOSSES + ("linear_act", "mlp"),
           ("value", "grad"), _nonfinite_or_huge,
           "F.binary_cross_entropy_with_logits(torch.tensor([-1e30]).half(), torch.tensor([0.76]).half()) "
           "(torch: nan)"),
    *_open("a bias of the output's shape (or 2-D), or a 1-D weight with one: linear's other paths", _LINEAR, _ALL_KINDS,
           lambda call: _odd_linear_shapes(call),
           "F.linear_act(torch.randn(2, 7), torch.randn(7), torch.tensor(1.0)) (torch: accepted); "
           "F.linear(torch.randn(2, 1).t(), torch.randn(1), torch.tensor(0.2)) (torch: RuntimeError)"),
    # the layer ops (merged after this table was written; their classes, as the fuzzer found them)
    *_open("integer/bool/complex inputs: another exception (torch's rms_norm takes complex)",
           _LAYERS + ("linear_cross_entropy",), ("exception", "dtype", "output", "value", "grad"),
           lambda call: _nonfloat_tensor(call) if call.op != "embedding" else _bad_embedding_dtypes(call),
           "F.avg_pool2d(torch.ones(1, 2, 3, 3, dtype=torch.int32), 1) (torch: NotImplementedError); "
           "F.rms_norm(torch.randn(2, 3, dtype=torch.complex64), (3,)) (torch: a result)"),
    *_open("pooling as matrix products: an inf or overflow spreads nan to other windows",
           ("avg_pool2d", "adaptive_avg_pool2d"), ("value", "grad"), _nonfinite_or_huge,
           "F.avg_pool2d(torch.tensor([[[[1.0, float('inf'), 2.0, 3.0]]]]), (1, 2)) (torch: 2.5 in the last window)"),
    *_open("non-finite norm parameters: inf where torch gives nan", ("group_norm", "batch_norm", "rms_norm"),
           ("value", "grad"), _nonfinite_or_huge,
           "python -m handgrad.testing.fuzz --call group_norm:978404557724"),
    *_open("empty dims: torch skips (or makes) checks handgrad makes (or skips)", _LAYERS, _ALL_KINDS,
           lambda call: _zero_size(call),
           "F.conv1d(torch.randn(0, 2, 2), torch.randn(2, 2, 1), dilation=0) (torch: accepted); "
           "F.adaptive_avg_pool2d(torch.randn(1, 7, 5, 3, requires_grad=True), 0) then backward (torch: RuntimeError)"),
    *_open("checks in another order: one running stat None, bad indices, output_size forms, num_groups 0", _LAYERS,
           ("exception",), lambda call: call.op in ("batch_norm", "embedding", "adaptive_avg_pool2d", "group_norm"),
           "F.batch_norm(torch.randn(3, 2, 5), torch.zeros(2), None, training=True) (torch: ValueError); "
           "F.adaptive_avg_pool2d(torch.randn(2, 7, 1), (1, 2, 3)) (torch: ValueError)"),
    *_open("rms_norm: the gradient cancels where |x̂| ≈ 1 (rows of one element)", ("rms_norm",), ("grad",),
           lambda call: isinstance(call.args[1], (list, tuple)) and math.prod(call.args[1]) == 1
           or call.args[1] == 1, "python -m handgrad.testing.fuzz --call rms_norm:662020048260"),
    *_open("embedding sparse=True: handgrad's gradient is dense (refused)", ("embedding",), _ALL_KINDS,
           _kw("sparse", True), "F.embedding(torch.tensor([0]), torch.randn(2, 3), sparse=True)"),
)
