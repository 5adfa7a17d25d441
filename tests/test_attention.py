"""handgrad's attention against torch's, by name: nn.MultiheadAttention option by option (outputs
and the gradients of every parameter and input, float64), the random dropout path on torch's
seed, and two properties of the sdpa Function: no native attention or softmax backward in its
first- and second-derivative graphs, and no (L × S) tensor among its saved tensors."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import handgrad
import handgrad.functional as F
import handgrad.nn as hnn

D = torch.float64
E, H, L, S, N = 8, 2, 5, 4, 3
TOL = dict(atol=1e-12, rtol=1e-12)  # float64, the same formulas summed in another order


def _pair(**kw):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(E, H, dtype=D, **kw)
    with torch.no_grad():  # non-zero biases and bias_k/v, so every parameter matters
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = hnn.MultiheadAttention(E, H, dtype=D, **kw)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _inputs(batch_first, kdim=E, vdim=E, batched=True, self_attention=False):
    def t(T, d):
        shape = ((N, T, d) if batch_first else (T, N, d)) if batched else (T, d)
        return torch.randn(shape, dtype=D, requires_grad=True)
    q = t(L, E)
    if self_attention:
        return q, q, q
    return q, t(S, kdim), t(S, vdim)


def _bool_kpm():
    m = torch.zeros(N, S, dtype=torch.bool)
    m[0, -1] = m[2, 0] = True  # True = ignore
    return m


def _run(m, args, kwargs, grads_of):
    out, w = m(*args, **kwargs)
    loss = (out * torch.linspace(-1, 1, out.numel(), dtype=D).view_as(out)).sum()
    if w is not None:
        loss = loss + (w * torch.linspace(1, 2, w.numel(), dtype=D).view_as(w)).sum()
    leaves = [*m.parameters(), *[a for a in args if a.requires_grad]]
    return out, w, torch.autograd.grad(loss, leaves, allow_unused=True)


OPTIONS = {
    "plain": ({}, {}, {}),
    "batch_first": ({"batch_first": True}, {}, {}),
    "self-attention": ({}, {"self_attention": True}, {}),
    "kdim-vdim": ({"kdim": 3, "vdim": 6}, {"kdim": 3, "vdim": 6}, {}),
    "batch_first-kdim-kpm": ({"batch_first": True, "kdim": 3, "vdim": 6}, {"kdim": 3, "vdim": 6},
                             {"key_padding_mask": "bool"}),
    "no-bias": ({"bias": False}, {}, {}),
    "add_bias_kv": ({"add_bias_kv": True}, {}, {}),
    "add_zero_attn": ({"add_zero_attn": True}, {}, {}),
    "bias_kv+zero_attn+kpm": ({"add_bias_kv": True, "add_zero_attn": True}, {}, {"key_padding_mask": "bool"}),
    "kpm-bool": ({}, {}, {"key_padding_mask": "bool"}),
    "kpm-float": ({}, {}, {"key_padding_mask": "float"}),
    "attn_mask-2d-bool": ({}, {}, {"attn_mask": "2d-bool"}),
    "attn_mask-3d-float": ({}, {}, {"attn_mask": "3d-float"}),
    "attn_mask+kpm": ({}, {}, {"attn_mask": "2d-float", "key_padding_mask": "float"}),
    "causal": ({}, {"self_attention": True}, {"attn_mask": "causal", "is_causal": True}),
    "causal-no-weights": ({}, {"self_attention": True}, {"attn_mask": "causal", "is_causal": True,
                                                          "need_weights": False}),
    "no-weights": ({}, {}, {"need_weights": False}),
    "per-head-weights": ({}, {}, {"average_attn_weights": False}),
    "unbatched": ({}, {"batched": False}, {"attn_mask": "2d-bool"}),
    "eval-dropout": ({"dropout": 0.5}, {}, {}),
}


def _masks(kwargs, Lk):
    out = dict(kwargs)
    kpm = out.get("key_padding_mask")
    if kpm == "bool":
        out["key_padding_mask"] = _bool_kpm()
    elif kpm == "float":
        out["key_padding_mask"] = torch.randn(N, S, dtype=D)
    am = out.get("attn_mask")
    if am == "2d-bool":
        m = torch.zeros(L, Lk, dtype=torch.bool)
        m[1, 0] = m[3, 2] = True  # True = not allowed (nn.MultiheadAttention's convention)
        out["attn_mask"] = m
    elif am == "2d-float":
        out["attn_mask"] = torch.randn(L, Lk, dtype=D)
    elif am == "3d-float":
        out["attn_mask"] = torch.randn(N * H, L, Lk, dtype=D)
    elif am == "causal":
        out["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(L, dtype=D)
    return out


@pytest.mark.parametrize("name", OPTIONS)
def test_multihead_attention_equals_torch(name):
    ctor, inp, call = OPTIONS[name]
    ref, ours = _pair(**ctor)
    if name == "eval-dropout":
        ref.eval(), ours.eval()
    args = _inputs(ctor.get("batch_first", False), **inp)
    Lk = L if inp.get("self_attention") else S
    kwargs = _masks(call, Lk)
    o1, w1, g1 = _run(ref, args, kwargs, None)
    args2 = tuple(a.detach().requires_grad_() for a in args)
    if inp.get("self_attention"):
        args2 = (args2[0],) * 3
    o2, w2, g2 = _run(ours, args2, kwargs, None)
    torch.testing.assert_close(o2, o1, **TOL)
    assert (w1 is None) == (w2 is None)
    if w1 is not None:
        torch.testing.assert_close(w2, w1, **TOL)
    assert len(g1) == len(g2)
    for a, b in zip(g2, g1):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


def test_multihead_attention_dropout_in_training_equals_torch_on_its_seed():
    for need_weights in (True, False):
        ref, ours = _pair(dropout=0.4)
        args = _inputs(False)
        torch.manual_seed(5)
        o1, w1, g1 = _run(ref, args, {"need_weights": need_weights}, None)
        torch.manual_seed(5)
        o2, w2, g2 = _run(ours, tuple(a.detach().requires_grad_() for a in args), {"need_weights": need_weights},
                          None)
        torch.testing.assert_close(o2, o1, **TOL)
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, **TOL)


def test_sdpa_dropout_equals_torch_on_its_seed():
    q, k, v = (torch.randn(2, 2, L, 4, dtype=D, requires_grad=True) for _ in range(3))
    outs = []
    for fn in (TF.scaled_dot_product_attention, F.scaled_dot_product_attention):
        torch.manual_seed(3)
        o = fn(q, k, v, dropout_p=0.3)
        outs.append((o, torch.autograd.grad(o.square().sum(), (q, k, v))))
    torch.testing.assert_close(outs[1][0], outs[0][0], **TOL)
    for a, b in zip(outs[1][1], outs[0][1]):
        torch.testing.assert_close(a, b, **TOL)


def test_sdpa_dropout_p_1_gives_zeros_as_torch():
    q, k, v = (torch.randn(2, 3, 4, dtype=D, requires_grad=True) for _ in range(3))
    o = F.scaled_dot_product_attention(q, k, v, dropout_p=1.0)
    torch.testing.assert_close(o, TF.scaled_dot_product_attention(q, k, v, dropout_p=1.0), **TOL)
    assert o.eq(0).all()
    assert all(g.eq(0).all() for g in torch.autograd.grad(o.sum(), (q, k, v)))


def test_sdpa_fully_masked_rows_give_zero_as_torch():
    q, k, v = (torch.randn(1, 1, 3, 2, dtype=D, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
    torch.testing.assert_close(o, TF.scaled_dot_product_attention(q, k, v, attn_mask=keep), **TOL)
    assert o[0, 0, 1].eq(0).all()
    g, = torch.autograd.grad(o.sum(), q)
    assert torch.isfinite(g).all() and g[0, 0, 1].eq(0).all()


NATIVE = ("Softmax", "Attention", "Bmm", "Baddbmm")


def _node_names(roots) -> set[str]:
    """The type names of the autograd nodes reachable from ``roots``, handgrad's own
    (``…FnBackward``) left out."""
    seen, names, stack = set(), set(), [r for r in roots if r is not None]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        if not type(node).__name__.endswith("FnBackward"):
            names.add(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions if n is not None)
    return names


def test_native_attention_leaves_these_nodes():  # the pattern below would catch native attention
    q = torch.randn(2, 2, L, 4, dtype=D, requires_grad=True)
    o = TF.scaled_dot_product_attention(q, q, q, attn_mask=torch.randn(L, L, dtype=D, requires_grad=True))
    assert any(s in n for n in _node_names([o.grad_fn]) for s in NATIVE)


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"enable_gqa": True}], ids=["plain", "causal", "gqa"])
def test_sdpa_graphs_have_no_native_attention_or_softmax(kw):
    q = torch.randn(2, 2, L, 4, dtype=D, requires_grad=True)
    k, v = (torch.randn(2, 1 if kw.get("enable_gqa") else 2, S, 4, dtype=D, requires_grad=True) for _ in range(2))
    o = F.scaled_dot_product_attention(q, k, v, **kw)
    assert not any(s in n for n in _node_names([o.grad_fn]) for s in NATIVE), _node_names([o.grad_fn])
    grads = torch.autograd.grad(o.square().sum(), (q, k, v), create_graph=True)
    # second derivatives: the backward is torch elementwise ops and matmuls (MmBackward /
    # UnsafeView…), never a softmax or attention backward kernel
    names = _node_names([g.grad_fn for g in grads])
    assert not any(s in n for n in names for s in ("Softmax", "Attention")), names
    assert type(o.grad_fn).__name__ == "AttentionFnBackward"


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"attn_mask": torch.ones(1, 1, 1, S, dtype=torch.bool)}],
                         ids=["plain", "causal", "key-mask"])
def test_sdpa_saves_no_query_by_key_tensor(kw):
    q = torch.randn(2, 2, L, 3, dtype=D, requires_grad=True)  # E = 3: no (L, E) shape reads as (L, S)
    k, v = (torch.randn(2, 2, S, 3, dtype=D, requires_grad=True) for _ in range(2))
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        o = F.scaled_dot_product_attention(q, k, v, **kw)
    assert shapes, "the hook saw nothing: the test is wrong"
    assert not any(s[-2:] == (L, S) for s in shapes), shapes
    o.sum().backward()  # what was saved suffices


def test_sdpa_float_mask_gradient_equals_torch():
    q, k, v = (torch.randn(2, 2, L, 4, dtype=D, requires_grad=True) for _ in range(3))
    m = torch.randn(2, 1, L, L, dtype=D, requires_grad=True)
    g1 = torch.autograd.grad(TF.scaled_dot_product_attention(q, k, v, attn_mask=m).square().sum(), m)
    g2 = torch.autograd.grad(F.scaled_dot_product_attention(q, k, v, attn_mask=m).square().sum(), m)
    torch.testing.assert_close(g2, g1, **TOL)


def test_convert_swaps_multihead_attention_and_back():
    model = nn.Sequential(nn.MultiheadAttention(E, H))
    handgrad.convert(model, inplace=True)
    assert type(model[0]) is hnn.MultiheadAttention
    handgrad.revert(model)
    assert type(model[0]) is nn.MultiheadAttention


@pytest.mark.parametrize("need_weights", [False, True], ids=["output", "output+weights"])
def test_multihead_attention_graph_is_handgrads(need_weights):
    """Every math node of the layer's backward (and double backward: no softmax or attention
    kernel) is a handgrad Function; what remains native is reshaping (views, cat, repeat) and
    the head average of the weights (MeanBackward)."""
    _, ours = _pair(add_bias_kv=True)
    q, k, v = _inputs(False)
    out, w = ours(q, k, v, key_padding_mask=_bool_kpm(), need_weights=need_weights)
    loss = out.square().sum() + (0 if w is None else w.square().sum())
    math_nodes = ("Softmax", "Attention", "Bmm", "Mm", "Addmm", "Mul", "Exp", "Div", "Add", "Sub")
    names = _node_names([out.grad_fn] + ([] if w is None else [w.grad_fn]))
    assert "ViewBackward0" in names  # the walk sees native nodes
    assert not any(s in n for n in names for s in math_nodes), names
    grads = torch.autograd.grad(loss, [q, *ours.parameters()], create_graph=True)
    names = _node_names([g.grad_fn for g in grads if g.grad_fn is not None])
    assert not any(s in n for n in names for s in ("Softmax", "Attention")), names


def test_multi_head_attention_forward_static_kv_equals_torch():
    ref, _ = _pair()
    q, k, v = _inputs(False)
    static_k, static_v = (torch.randn(N * H, S + 1, E // H, dtype=D, requires_grad=True) for _ in range(2))
    leaves = [q, static_k, static_v, ref.in_proj_weight, ref.out_proj.weight]
    results = []
    for fn in (TF.multi_head_attention_forward, F.multi_head_attention_forward):
        out, w = fn(q, k, v, E, H, ref.in_proj_weight, ref.in_proj_bias, None, None, False, 0.0, ref.out_proj.weight,
                    ref.out_proj.bias, static_k=static_k, static_v=static_v)
        results.append((out, w, torch.autograd.grad(out.square().sum() + w.square().sum(), leaves,
                                                    allow_unused=True)))
    (o1, w1, g1), (o2, w2, g2) = results
    torch.testing.assert_close(o2, o1, **TOL)
    torch.testing.assert_close(w2, w1, **TOL)
    for a, b in zip(g2, g1):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, **TOL)


# --- parity with torch's dispatch (issue 13 §1): each failed before its fix --------------------------

def _both(fn):
    """(torch's outcome, handgrad's): the result or the exception type."""
    out = []
    for f in (TF.scaled_dot_product_attention, F.scaled_dot_product_attention):
        try:
            out.append(fn(f))
        except Exception as e:  # noqa: BLE001 — the type is what is compared
            out.append(type(e))
    return out


def test_sdpa_causal_with_a_mask_follows_torchs_kernel():
    """4-D contiguous inputs without dropout (torch's flash kernel): mask and causal mask both
    apply; 3-D inputs (its math kernel): RuntimeError."""
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)
    m = torch.rand(3, 5) > 0.3
    ours, theirs = (F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True),
                    TF.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True))
    torch.testing.assert_close(ours, theirs)
    assert _both(lambda f: f(q[0], k[0], v[0], attn_mask=m, is_causal=True)) == [RuntimeError] * 2


@pytest.mark.parametrize("p, dims, expect", [(1.5, 4, RuntimeError), (-0.1, 4, RuntimeError), (-0.1, 3, None)])
def test_sdpa_dropout_p_range(p, dims, expect):
    q = torch.randn(1, 1, 2, 3)[(0,) * (4 - dims)]
    got = _both(lambda f: f(q, q, q, dropout_p=p))
    if expect is None:
        torch.testing.assert_close(got[1], got[0])
    else:
        assert got == [expect] * 2


def test_sdpa_argument_checks_in_torchs_order():
    q = torch.randn(2, 3)
    assert _both(lambda f: f(q, q, q, scale="a")) == [TypeError] * 2
    assert _both(lambda f: f(q, q, q, enable_gqa=True)) == [IndexError] * 2          # 2-D: no head dim
    c = torch.ones(1, 1, 2, 2, dtype=torch.complex64)
    assert _both(lambda f: f(c, c, c)) == [NotImplementedError] * 2
    x = torch.randn(1, 1, 2, 2)
    assert _both(lambda f: f(x, x, x, attn_mask=torch.ones(2, dtype=torch.bool))) == [IndexError] * 2


def test_sdpa_empty_query_returns_torchs_shape():
    q, k = torch.randn(0, 1, 7, 2), torch.randn(0, 2, 3, 2)
    ours, theirs = _both(lambda f: f(q, k, torch.randn(0, 2, 3, 5)))
    assert ours.shape == theirs.shape == (0, 1, 7, 5)


@pytest.mark.parametrize("seed", [807706331785, 766381185555, 712205330425, 314049800487, 543675925868])
def test_sdpa_float32_gradients_within_the_low_precision_rule(seed):
    """Calls the fuzzer found where handgrad's float32 gradients erred by 2–8× torch's (a rounded
    ℓ scaling whole rows; the row term's own rounding where one weight dominates)."""
    from handgrad.testing.fuzz import check_call
    from handgrad.testing.fuzz.draw import draw_call
    assert check_call(draw_call("scaled_dot_product_attention", seed)) == []


def _fast_and_differentiable(fn, xs):
    """(output and gradients from the fast path: eager, grad mode off inside the Function; the same
    from the differentiable path: torch.func.vjp) of ``fn`` at ``xs`` (float64)."""
    out = fn(*xs)
    G = torch.randn_like(out)
    fast = (out.detach(), *torch.autograd.grad(out, xs, G))
    ref_out, vjp = torch.func.vjp(fn, *xs)
    return fast, (ref_out, *vjp(G))


@pytest.mark.parametrize("tile", [None, 300], ids=["tile-default", "tile-one-head"])
@pytest.mark.parametrize("kw", ["causal", "causal-more-keys", "bool-mask", "float-mask", "gqa", "dropout-mask"])
def test_sdpa_fast_tiles_equal_the_differentiable_path(kw, tile, monkeypatch):
    """The fast path's tiles (several batch tiles with a small TILE; causal blocks of BLOCK rows,
    L > BLOCK, also with more keys than queries) against the differentiable path, float64."""
    from handgrad.ops import attention
    from handgrad.ops.attention import AttentionFn, scale_forms
    if tile is not None:
        monkeypatch.setattr(attention, "TILE", tile)
    torch.manual_seed(0)
    Lq, Sk = 2 * attention.BLOCK + 7, 2 * attention.BLOCK + 7 + (9 if kw == "causal-more-keys" else 0)
    q = torch.randn(2, 3, Lq, 4, dtype=D, requires_grad=True)
    heads = 1 if kw == "gqa" else 3
    k, v = (torch.randn(2, heads, Sk, e, dtype=D, requires_grad=True) for e in (4, 5))
    extra = {}
    if kw.startswith("causal"):
        extra["is_causal"] = True
    elif kw == "bool-mask":
        m = torch.rand(2, 1, Lq, Sk) > 0.3
        m[0, 0, 3] = False                                  # a fully masked row
        extra["attn_mask"] = m
    elif kw == "float-mask":
        extra["attn_mask"] = torch.randn(Lq, Sk, dtype=D)
    elif kw == "gqa":
        extra["enable_gqa"] = True
    if kw == "dropout-mask":
        keep = torch.rand(2, 3, Lq, Sk) > 0.3
        fn = lambda q, k, v: AttentionFn.call(q, k, v, None, keep, 0.3, False, scale_forms(0.5, "split"), 1)[0]
    else:
        fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **extra)
    fast, ref = _fast_and_differentiable(fn, (q, k, v))
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b, **TOL)
    theirs = (TF.scaled_dot_product_attention(q, k, v, **extra) if kw != "dropout-mask" else None)
    if theirs is not None:
        torch.testing.assert_close(fast[0], theirs.detach(), **TOL)


@pytest.mark.parametrize("call", ["multi_head_attention_forward:312154373794", "scaled_dot_product_attention:815879711071",
                                  "multi_head_attention_forward:627394441488"])
def test_attention_rounds_the_scale_as_torchs_kernel(call):
    """Calls the fuzzer found where handgrad's float32 gradients erred by 3–4× torch's: the scale
    applied to Q or K before the products (torch's flash kernel scales the summed product, its math
    kernel √scale on each), and dS as P ⊙ dP − P c (torch's D = dP − c is exact where dP ≈ c)."""
    from handgrad.testing.fuzz import check_call
    from handgrad.testing.fuzz.draw import draw_call
    op, seed = call.rsplit(":", 1)
    assert check_call(draw_call(op, int(seed))) == []


@pytest.mark.parametrize("kw", ["plain", "causal", "causal-more-keys", "bool-mask", "float-mask", "dropout-mask",
                                "unbatched"])
def test_sdpa_kernel_equals_the_torch_op_path(kw):
    """At a small size the fast path is the compiled kernel (kernels/attention.py): its output and
    gradients against the torch-op fast path (kernels off) and the differentiable path, float64,
    with a fully masked row (P = 0, O = 0) and the dropout's keep mask."""
    from handgrad import kernels
    from handgrad.ops import _attention_kernel
    from handgrad.ops.attention import AttentionFn, scale_forms
    if not kernels.enabled():
        pytest.skip("numba does not import here")
    torch.manual_seed(0)
    batch = () if kw == "unbatched" else (2, 3)
    Lq, Sk = 5, 5 + (3 if kw == "causal-more-keys" else 0)
    q = torch.randn(*batch, Lq, 4, dtype=D, requires_grad=True)
    k, v = (torch.randn(*batch, Sk, e, dtype=D, requires_grad=True) for e in (4, 6))
    mask, drop, causal = None, None, kw.startswith("causal")
    if kw == "bool-mask":
        mask = torch.rand(2, 1, Lq, Sk) > 0.3
        mask[1, 0, 2] = False                                   # a fully masked row
    elif kw == "float-mask":
        mask = torch.randn(Lq, Sk, dtype=D)
        mask[3] = -torch.inf                                    # a fully masked row
    elif kw == "dropout-mask":
        drop = torch.rand(*batch, Lq, Sk) > 0.3
    assert _attention_kernel.kernel_ready(q, k, v, mask, drop, 1, causal)
    fn = lambda q, k, v: AttentionFn.call(q, k, v, mask, drop, 0.3 if drop is not None else 0.0, causal,
                                          scale_forms(0.5, "gemm"), 1)[0]
    torch.manual_seed(1)                                        # (the same G for both)
    fast, ref = _fast_and_differentiable(fn, (q, k, v))
    torch.manual_seed(1)
    with kernels.disabled():
        torch_ops, _ = _fast_and_differentiable(fn, (q, k, v))
    for a, b, c in zip(fast, torch_ops, ref):
        torch.testing.assert_close(a, b, **TOL)
        torch.testing.assert_close(a, c, **TOL)


def test_sdpa_mask_that_requires_grad_keeps_the_torch_op_forward():
    """The fuzzer's call (seed 3) where the kernel's forward met the differentiable backward (a mask
    that requires grad): that backward recomputes P = exp(S − m)·exp(m − ℓ) from ℓ, which the kernel
    rounds from its float64 S, so with one key P ≠ 1 and dS ≠ 0 where torch's is exactly 0."""
    from handgrad.testing.fuzz import check_call
    from handgrad.testing.fuzz.draw import draw_call
    assert check_call(draw_call("scaled_dot_product_attention", 334047605903)) == []
