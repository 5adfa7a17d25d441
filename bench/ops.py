"""``python -m bench ops``: every catalogue op, one call's forward + backward, handgrad against
native, at a small size (where per-call overhead shows) and a large one (where the arithmetic does).

The cases come from the catalogue: ``BUILDERS`` maps an op's name, or else its kind, to the one
function that makes its arguments at a size, so ops of one signature share a builder and a new
catalogue entry gets a row from its kind's builder, or, if neither its name nor its kind has one,
a clear failure (``missing()``; ``tests/test_bench.py`` asserts there is none).

Sizes: rows × features ``(N, D)`` for the row-wise ops, images ``(N, C, H, W)`` for the
convolutions, pools and batch/group norm, ``(B, H, L, E)`` for attention; each builder's
docstring says how it reads them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as TF

from handgrad import catalogue

from .cases import Case, zero_grads

SIZES = ("small", "large")
ROWS = {"small": (8, 64), "large": (4096, 512)}               # (N, D)
IMAGES = {"small": (2, 4, 8, 8), "large": (32, 64, 32, 32)}   # (N, C, H, W): pools, batch/group norm
CONV = {"small": (2, 4, 8, 8), "large": (8, 64, 32, 32)}      # conv2d: 3×3, C → C, padding 1
CONV1D = {"small": (2, 4, 16), "large": (16, 64, 512)}        # conv1d: kernel 3, C → C, padding 1
HEADS = {"small": (1, 2, 8, 32), "large": (8, 8, 256, 64)}    # (B, H, L, E) per head


@dataclass
class Call:
    """One call of the op: the same arguments for both sides; ``native`` is the torch function
    (default: the catalogue's ``torch_function``) or, for handgrad-only ops, its torch composition."""

    args: tuple
    kwargs: dict = field(default_factory=dict)
    native: Callable | None = None
    what: str = ""


def _randn(*shape, scale=1.0, grad=True):
    return (torch.randn(*shape) * scale).requires_grad_(grad)


def _rows(size, **kw) -> Call:
    """x (N, D): the elementwise activations, dropout (torch's defaults for the options)."""
    N, D = ROWS[size]
    return Call((_randn(N, D, scale=2.0),), dict(kw), what=f"x ({N}, {D})")


def _softmax(size) -> Call:
    N, D = ROWS[size]
    return Call((_randn(N, D, scale=2.0),), {"dim": -1}, what=f"x ({N}, {D}), dim=-1")


def _mean(size) -> Call:
    """x (N, D) averaged over its rows' features (dim=-1), as a model's mean-pool."""
    N, D = ROWS[size]
    return Call((_randn(N, D),), {"dim": -1}, what=f"x ({N}, {D}), dim=-1")


def _product(size) -> Call:
    """a ⊙ b, both (N, D) and both differentiated (LLaMA's gating)."""
    N, D = ROWS[size]
    return Call((_randn(N, D), _randn(N, D)), what=f"a, b ({N}, {D})")


def _linear(size) -> Call:
    """x (N, D), W (D, D), b (D)."""
    N, D = ROWS[size]
    return Call((_randn(N, D), _randn(D, D, scale=D**-0.5), _randn(D)), what=f"x ({N}, {D}), W ({D}, {D}), b")


def _layer_norm(size) -> Call:
    N, D = ROWS[size]
    return Call((_randn(N, D), (D,), _randn(D), _randn(D)), what=f"x ({N}, {D}), over D, weight and bias")


def _rms_norm(size) -> Call:
    N, D = ROWS[size]
    return Call((_randn(N, D), (D,), _randn(D)), what=f"x ({N}, {D}), over D, weight")


def _batch_norm(size) -> Call:
    """Training mode on images (N, C, H, W): batch statistics, running stats updated."""
    N, C, H, W = IMAGES[size]
    stats = (torch.zeros(C), torch.ones(C))
    return Call((_randn(N, C, H, W), *stats, _randn(C), _randn(C)), {"training": True},
                what=f"x ({N}, {C}, {H}, {W}), training, weight and bias")


def _group_norm(size) -> Call:
    N, C, H, W = IMAGES[size]
    G = max(1, C // 8)
    return Call((_randn(N, C, H, W), G, _randn(C), _randn(C)), what=f"x ({N}, {C}, {H}, {W}), {G} groups")


def _pair_loss(native=None, target=lambda N, D: torch.randn(N, D)):
    """(input, target) losses on (N, D), mean reduction (torch's default)."""

    def build(size) -> Call:
        N, D = ROWS[size]
        return Call((_randn(N, D), target(N, D)), native=native, what=f"input ({N}, {D}), target ({N}, {D})")

    return build


def _class_loss(log_probs: bool):
    """(N, C) scores (log-probabilities for nll_loss) against N class indices."""

    def build(size) -> Call:
        N, C = ROWS[size]
        x = torch.randn(N, C)
        x = (x.log_softmax(-1) if log_probs else x).requires_grad_()
        return Call((x, torch.randint(0, C, (N,))), what=f"input ({N}, {C}), {N} class indices")

    return build


def _embedding(size) -> Call:
    """N indices into a (V, D) table, V = 2N."""
    N, D = ROWS[size]
    return Call((torch.randint(0, 2 * N, (N,)), _randn(2 * N, D)), what=f"{N} indices, weight ({2 * N}, {D})")


def _conv(size_table, k) -> Callable[[str], Call]:
    def build(size) -> Call:
        shape = size_table[size]
        C = shape[1]
        w = _randn(C, C, *k, scale=(C * len(k)) ** -0.5)
        return Call((_randn(*shape), w, _randn(C)), {"padding": 1},
                    what=f"x {shape}, kernel {'×'.join(map(str, k))}, {C} → {C} channels, padding 1")

    return build


# the argument each pool is called with (its catalogue entry has no default for it)
_POOL_ARG = {"max_pool2d": 2, "avg_pool2d": 2, "adaptive_avg_pool2d": 1}


def _pool(size, op) -> Call:
    shape = IMAGES[size]
    arg = _POOL_ARG[op.name]
    return Call((_randn(*shape), arg), what=f"x {shape}, {'output_size' if 'adaptive' in op.name else 'kernel'} {arg}")


def _sdpa(size, **kw) -> Call:
    B, H, L, E = HEADS[size]
    q, k, v = (_randn(B, H, L, E) for _ in range(3))
    return Call((q, k, v), dict(kw), what=f"q, k, v ({B}, {H}, {L}, {E})" + "".join(f", {k}={v}" for k, v in kw.items()))


def _mha(size) -> Call:
    """Self-attention (L, N, E) with H heads, packed in-projection and biases, need_weights=False
    (what nn.MultiheadAttention in a model is called with)."""
    B, H, L, E = HEADS[size]
    D = H * E
    x = _randn(L, B, D)
    args = (x, x, x, D, H, _randn(3 * D, D, scale=D**-0.5), _randn(3 * D), None, None, False, 0.0,
            _randn(D, D, scale=D**-0.5), _randn(D))
    return Call(args, {"need_weights": False}, what=f"self-attention x ({L}, {B}, {D}), {H} heads, need_weights=False")


def _half_sse(x, y):
    return 0.5 * TF.mse_loss(x, y, reduction="sum")


def _linear_act(size) -> Call:
    """f(x Wᵀ + b), the catalogue's default f (relu), against torch's f(linear(x, W, b))."""
    c = _linear(size)
    act = catalogue.activation(catalogue.get("linear_act").options["activation"]).torch_function
    return Call(c.args, native=lambda x, w, b: act(TF.linear(x, w, b)), what=c.what + f", {act.__name__}")


def _mlp(size) -> Call:
    """Three D → D layers, the catalogue's default activation on the hidden ones, against the same
    composition of torch's linear and activation."""
    N, D = ROWS[size]
    Ws = [_randn(D, D, scale=D**-0.5) for _ in range(3)]
    bs = [_randn(D) for _ in range(3)]
    act = catalogue.activation(catalogue.get("mlp").options["activation"]).torch_function

    def native(x, weights, biases):
        for l, (w, b) in enumerate(zip(weights, biases)):
            x = TF.linear(x, w, b)
            x = act(x) if l < len(weights) - 1 else x
        return x

    return Call((_randn(N, D), Ws, bs), native=native, what=f"x ({N}, {D}), 3 layers {D} → {D}, {act.__name__}")


def _linear_cross_entropy(size) -> Call:
    """x (N, D), W (C, D) with C = 8 D, no bias; native: the unchunked cross_entropy(linear(x, W), t)."""
    N, D = ROWS[size]
    C = 8 * D
    return Call((_randn(N, D), _randn(C, D, scale=D**-0.5), torch.randint(0, C, (N,))),
                native=lambda x, w, t: TF.cross_entropy(TF.linear(x, w), t),
                what=f"x ({N}, {D}), W ({C}, {D}); native: cross_entropy(linear(x, W), t)")


# op name, or else kind → builder(size, op) → {label: Call}; one builder per signature
def _one(build):
    return lambda size, op: {op.name: build(size)}


BUILDERS: dict[str, Callable[[str, catalogue.Op], dict[str, Call]]] = {
    "activation": _one(_rows),
    "dropout": _one(_rows),
    "softmax": _one(_softmax),
    "linear": _one(_linear),
    "reduction": _one(_mean),
    "elementwise": _one(_product),
    "layer_norm": _one(_layer_norm),
    "rms_norm": _one(_rms_norm),
    "batch_norm": _one(_batch_norm),
    "group_norm": _one(_group_norm),
    "mse_loss": _one(_pair_loss()),
    "half_squared_error": _one(_pair_loss(native=_half_sse)),
    "binary_cross_entropy_with_logits": _one(_pair_loss(target=lambda N, D: torch.rand(N, D))),
    "cross_entropy": _one(_class_loss(log_probs=False)),
    "nll_loss": _one(_class_loss(log_probs=True)),
    "embedding": _one(_embedding),
    "conv1d": _one(_conv(CONV1D, (3,))),
    "conv2d": _one(_conv(CONV, (3, 3))),
    "pooling": lambda size, op: {op.name: _pool(size, op)},
    # the causal mask is a target of its own (issue 11: ≤ 1.0× native)
    "scaled_dot_product_attention": lambda size, op: {op.name: _sdpa(size), f"{op.name}[causal]": _sdpa(size, is_causal=True)},
    "multi_head_attention_forward": _one(_mha),
    "linear_act": _one(_linear_act),
    "mlp": _one(_mlp),
    "linear_cross_entropy": _one(_linear_cross_entropy),
}


def builder(op: catalogue.Op):
    return BUILDERS.get(op.name) or BUILDERS.get(op.kind)


def missing() -> list[str]:
    """Catalogue ops with no builder (neither by name nor by kind)."""
    return [f"{op.name} (kind {op.kind})" for op in catalogue.ops() if builder(op) is None]


def _step(fn: Callable, call: Call, grads: dict) -> Callable[[], None]:
    """One forward + backward of ``fn`` on ``call``'s arguments: the gradients set to None first,
    a scalar output backpropagated from 1, any other from one fixed random G (the same for both
    sides, made at the first call); a tuple output through its first element."""
    leaves = [t for t in (*call.args, *call.kwargs.values()) for t in (t if isinstance(t, list) else [t])
              if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        zero_grads(leaves)
        out = fn(*call.args, **call.kwargs)
        out = out[0] if isinstance(out, tuple) else out
        if out.dim() == 0:
            out.backward()
            return
        G = grads.get(out.shape)
        if G is None:
            G = grads[out.shape] = torch.randn(out.shape, device=out.device)
        out.backward(G)

    return step


def op_case_names() -> list[str]:
    """``op:<label>:<size>`` for every op (and variant) the builders give, in catalogue order."""
    names = []
    for op in catalogue.ops():
        build = builder(op)
        labels = [op.name] if build is None else list(build("small", op))
        names += [f"op:{label}:{size}" for label in labels for size in SIZES]
    return names


def build_case(name: str, device: str, quick: bool) -> Case:
    """The case ``op:<label>:<size>`` (--quick: the small size for both)."""
    _, label, size = name.split(":")
    op = catalogue.get(label.split("[")[0])
    build = builder(op)
    if build is None:
        raise LookupError(f"bench ops: no builder for catalogue op {op.name!r} (kind {op.kind!r}): add one to "
                          "bench/ops.py BUILDERS, by its name or its kind")
    torch.manual_seed(0)
    call = build("small" if quick else size, op)[label]
    if device != "cpu":
        call = Call(*(_to(v, device) for v in (call.args, call.kwargs)), call.native, call.what)
    native = call.native or op.torch_function
    grads: dict = {}
    return Case(name, f"{label} ({size}): {call.what}",
                {"native": _step(native, call, grads), "handgrad": _step(op.functional, call, grads)})


def _to(v, device):
    if isinstance(v, torch.Tensor):
        return v.detach().to(device).requires_grad_(v.requires_grad)
    if isinstance(v, (list, tuple)):
        return type(v)(_to(x, device) for x in v)
    if isinstance(v, dict):
        return {k: _to(x, device) for k, x in v.items()}
    return v
