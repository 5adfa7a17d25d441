"""Registry entries for the fused ops (ops.fused): each against the torch.nn.functional
composition it must equal. ``shape`` is the input's shape (*, D_in)."""
from __future__ import annotations

import torch
import torch.nn.functional as TF

from ... import catalogue
from ... import functional as F
from ..references import mlp as mlp_reference
from ..references import torch_reference
from ..tolerances import DEEP_MLP_ULPS, FUSED_ULPS, TERM_SCALES
from ..types import BadInput, Inputs, OpCase, randn

# Every activation of the catalogue, with the options its fused case passes: a non-default where
# the default would leave an option's code path unchecked.
_OPTIONS = {"leaky_relu": {"negative_slope": 0.2}, "gelu": {"approximate": "tanh"}}
FUSED_ACTIVATIONS = {name: _OPTIONS.get(name, {}) for name in catalogue.activations()}


def _linear_act_case(name: str, bias: bool = True, bad=()) -> OpCase:
    options, torch_f = FUSED_ACTIVATIONS[name], torch_reference(name)

    def make(shape, dtype, device):
        D_in, D_out = shape[-1], 4
        b = randn((D_out,), dtype, device) if bias else None
        return Inputs((randn(shape, dtype, device), randn((D_out, D_in), dtype, device, scale=D_in**-0.5), b))

    def ours(x, w, b):
        return F.linear_act(x, w, b, name, **options)

    def reference(x, w, b):
        return torch_f(TF.linear(x, w, b), **options)

    return OpCase(f"linear_act[{name}{'' if bias else ',no-bias'}]", ours, reference, make, bad_inputs=bad,
                  lowp_ulps=FUSED_ULPS)


def _mlp_case(activation: str, last: str | None, bias: bool, widths=(5, 3), bad=(), ulps=None) -> OpCase:
    """x → widths[0] → … → widths[-1]; the parameters are flat arguments w1, b1, w2, b2, …
    (the registry checks positional tensors), regrouped into the lists ``mlp`` takes."""
    # mlp takes activation names with their default options: torch's functions with theirs
    def make(shape, dtype, device):
        args, d_in = [randn(shape, dtype, device)], shape[-1]
        for d_out in widths:
            args += [randn((d_out, d_in), dtype, device, scale=d_in**-0.5),
                     randn((d_out,), dtype, device) if bias else None]
            d_in = d_out
        return Inputs(tuple(args))

    def ours(x, *params):
        return F.mlp(x, params[0::2], params[1::2], activation=activation, last_activation=last)

    def reference(x, *params):
        return mlp_reference(x, params[0::2], params[1::2], activation, last)

    def terms(G, x, *params):                      # tolerances.TERM_SCALES["mlp"], flat as the arguments
        t = TERM_SCALES["mlp"](G, x, params[0::2], params[1::2], activation, last)
        return {"x": t["input"], "params": [p for pair in zip(t["weights"], t["biases"]) for p in pair]}

    L = len(widths)
    name = f"mlp[{activation},last={last}{'' if bias else ',no-bias'}{',' + str(L) + '-layer' if L != 2 else ''}]"
    return OpCase(name, ours, reference, make, bad_inputs=bad, lowp_ulps=ulps or FUSED_ULPS, lowp_terms=terms)


def _lce_case(reduction: str, label_smoothing: float = 0.0, bias: bool = True, shapes=None) -> OpCase:
    C, ignore = 6, -100

    def make(shape, dtype, device):
        D = shape[-1]
        target = torch.randint(0, C, shape[:-1], device=device)
        target[(torch.arange(target.numel(), device=device) % 3 == 1).reshape(target.shape)] = ignore  # every third row ignored
        kwargs = {"linear_bias": randn((C,), dtype, device) if bias else None, "reduction": reduction,
                  "label_smoothing": label_smoothing, "chunk_size": 3}   # 3 rows a chunk: several chunks, a ragged last one
        return Inputs((randn(shape, dtype, device), randn((C, D), dtype, device, scale=D**-0.5), target), kwargs)

    def reference(x, w, target, *, chunk_size=None, **kwargs):   # torch's function (chunk_size: handgrad's)
        return torch_reference("linear_cross_entropy")(x, w, target, **kwargs)

    name = f"linear_cross_entropy[{reduction}{f',smoothing={label_smoothing}' if label_smoothing else ''}{'' if bias else ',no-bias'}]"
    # 'mean' of an empty batch is 0/0 = nan in torch too; its finite-difference check is meaningless
    # input (N, D) or unbatched (D,), as torch's linear_cross_entropy
    default = ((2, 3), (7, 13), (13,)) if reduction == "mean" else ((2, 3), (7, 13), (0, 13), (13,))
    return OpCase(name, F.linear_cross_entropy, reference, make, shapes=shapes or default,
                  bad_inputs=_LCE_BAD if reduction == "mean" else (), lowp_ulps=FUSED_ULPS)


_LCE_BAD = (
    BadInput("target batch mismatch", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.zeros(3, dtype=torch.long))),
             ("target", "[3]", "[4, 5]")),
    BadInput("target out of range", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.tensor([1, 2, 9, 3]))),
             ("Target 9",)),
    BadInput("float target", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4))), ("target", "Float")),
    BadInput("features mismatch", lambda: Inputs((torch.randn(4, 6), torch.randn(7, 5), torch.zeros(4, dtype=torch.long))),
             ("weight", "[7, 5]", "6")),
    BadInput("bad reduction", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4, dtype=torch.long)),
                                             {"reduction": "avg"}), ("avg", "reduction")),
    BadInput("label_smoothing above 1", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4, dtype=torch.long)),
                                                       {"label_smoothing": 1.5}), ("label_smoothing",)),
)

_LINEAR_ACT_BAD = (
    BadInput("features mismatch", lambda: Inputs((torch.randn(2, 3), torch.randn(4, 5), None)), ("weight", "[4, 5]", "3")),
    BadInput("bias of wrong size", lambda: Inputs((torch.randn(2, 5), torch.randn(4, 5), torch.randn(3))), ("bias", "[3]")),
)

_MLP_BAD = (
    BadInput("layers that do not chain", lambda: Inputs((torch.randn(2, 3), torch.randn(4, 3), None, torch.randn(2, 5), None)),
             ("weights[1]", "[2, 5]", "4")),
)


CASES = [
    *[_linear_act_case(name, bad=_LINEAR_ACT_BAD if name == "sigmoid" else ()) for name in FUSED_ACTIVATIONS],
    *[_mlp_case(name, None, True, bad=_MLP_BAD if name == "sigmoid" else ()) for name in FUSED_ACTIVATIONS],
    # the seed: every layer sigmoid, 3 layers
    _mlp_case("sigmoid", "sigmoid", True, widths=(5, 4, 3), ulps=DEEP_MLP_ULPS),
    _mlp_case("sigmoid", "sigmoid", False, widths=(4,)),         # one layer, no bias
    _lce_case("mean"),
    _lce_case("sum", label_smoothing=0.2),
    _lce_case("none"),
    _lce_case("mean", label_smoothing=0.1, bias=False),
    _mlp_case("relu", "sigmoid", False),
    _linear_act_case("relu", bias=False),
]



# ---- linear_cross_entropy: torch 2.13's options, each against torch's function ---------------

def _lce_variant(name: str, base: OpCase, change, shapes=((2, 3), (7, 13), (13,)), bad=()) -> OpCase:
    """``base`` with its inputs changed by ``change(inputs, shape, dtype, device) → Inputs``."""
    def make(shape, dtype, device):
        return change(base.make(shape, dtype, device), shape, dtype, device)
    return OpCase(name, base.fn, base.reference, make, shapes=shapes, bad_inputs=bad, lowp_ulps=FUSED_ULPS)


def _with_class_weight(inputs, shape, dtype, device):
    C = inputs.args[1].shape[0]
    w = (torch.rand(C, dtype=torch.float64) + 0.5).to(dtype=dtype, device=device)
    return Inputs(inputs.args, {**inputs.kwargs, "weight": w})


def _with_probs(inputs, shape, dtype, device):
    x, W, t = inputs.args
    T = torch.randn((*shape[:-1], W.shape[0]), dtype=torch.float64).softmax(-1).to(dtype=dtype, device=device)
    return Inputs((x, W, T.requires_grad_()), inputs.kwargs)


def _k_dim(inputs, shape, dtype, device):
    """linear_weight (C, 2, D): the logits (N, C, 2), a K-dim loss over 2 positions per row."""
    x, W, t = inputs.args
    C, D = W.shape
    W2 = randn((C, 2, D), dtype, device, scale=D**-0.5)
    t2 = torch.randint(0, C, (*shape[:-1], 2), device=device)
    kwargs = {**inputs.kwargs, "linear_bias": randn((C, 2), dtype, device)}
    return Inputs((x, W2, t2), kwargs)


_LCE_OPTION_BAD = (
    BadInput("3-D input", lambda: Inputs((torch.randn(2, 4, 5), torch.randn(7, 5), torch.zeros(2, 4, dtype=torch.long))),
             ("input", "3")),
    BadInput("ignore_index with probabilities", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.rand(4, 7)),
                                                               {"ignore_index": -100}), ("ignore_index",)),
    BadInput("class weight of another dtype", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4, dtype=torch.long)),
                                                             {"weight": torch.ones(7, dtype=torch.float64)}), ("weight", "torch.float64")),
    BadInput("linear_bias of wrong shape", lambda: Inputs((torch.randn(4, 5), torch.randn(7, 5), torch.zeros(4, dtype=torch.long)),
                                                          {"linear_bias": torch.randn(1)}), ("linear_bias", "[1]")),
)

CASES += [
    _lce_variant("linear_cross_entropy[mean,smoothing=-0.1]", _lce_case("mean", label_smoothing=-0.1), lambda i, *_: i,
                 bad=_LCE_OPTION_BAD),
    _lce_variant("linear_cross_entropy[mean,class-weight,smoothing=0.2]", _lce_case("mean", label_smoothing=0.2),
                 _with_class_weight),
    _lce_variant("linear_cross_entropy[none,class-weight]", _lce_case("none"), _with_class_weight,
                 shapes=((7, 13), (0, 13))),
    _lce_variant("linear_cross_entropy[probs,class-weight]", _lce_case("mean"),
                 lambda i, *a: _with_class_weight(_with_probs(i, *a), *a), shapes=((2, 3), (7, 13))),
    _lce_variant("linear_cross_entropy[K-dim]", _lce_case("sum"), _k_dim, shapes=((2, 3), (7, 13))),
]
