"""handgrad._compat: each private torch API's fallback, ``import handgrad`` with them all gone,
``HandFunction.call`` taking every argument form ``Function.apply`` takes, and the canary that
says when Dynamo accepts a ``jvp`` (so the jvp-less twin in ops/_function.py can go)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as TF
from torch import nn

import handgrad
import handgrad.functional as F
from handgrad import _compat
from handgrad.ops._function import HandFunction
from handgrad.ops.linear import LinearFn
from handgrad.testing.tolerances import EXACT_ATOL, EXACT_RTOL

D64 = torch.float64


def _out_and_grads(fn, *leaves):
    out = fn(*leaves)
    grads = torch.autograd.grad(out.sum(), leaves, allow_unused=True, materialize_grads=True)
    return [out.detach(), *grads]


def _assert_same(a, b):
    # the same ops in the same order on the same inputs: bitwise equal, not just close
    assert len(a) == len(b)
    for s, t in zip(a, b):
        torch.testing.assert_close(s, t, rtol=0, atol=0)


def _leaves(*shapes):
    return [torch.randn(*s, dtype=D64, requires_grad=True) for s in shapes]


# ---- each fallback, in process: compat's handle on the private attribute removed ---------------

def test_transforms_active_reads_torch(monkeypatch):
    seen = []
    torch.func.vmap(lambda x: seen.append(_compat.functorch_transforms_active()) or x)(torch.ones(2))
    assert (_compat.functorch_transforms_active(), seen) == (False, [True])


def test_transforms_active_fallback_keeps_the_ops_right(monkeypatch):
    """Unknown → True: the ops take the paths that are right under a transform (Function.apply,
    no in-place gradient buffer, no gradients precomputed in forward), with the same results."""
    x, w1, b1, w2 = _leaves((6, 4), (5, 4), (5,), (3, 5))
    t = torch.tensor([0, 2, 1, 1, 0, 2])
    ops = [lambda x, w1, b1, w2: F.mlp(x, [w1, w2], [b1, None], activation="tanh"),
           lambda x, w1, b1, w2: F.linear_cross_entropy(F.linear(x, w1, b1), w2, t),
           lambda x, w1, b1, w2: F.linear(x, w1, b1)]
    before = [_out_and_grads(op, x, w1, b1, w2) for op in ops]
    monkeypatch.setattr(_compat, "_transforms_active", None)
    assert _compat.functorch_transforms_active() is True
    for i, (op, ref) in enumerate(zip(ops, before)):
        if i == 1:   # linear_cross_entropy's fast path (ops.losses.ce_chunk_fast; cross_entropy's torch
            # forward kernel for small logits) is the same math in another order: equal to rounding
            for s, t in zip(_out_and_grads(op, x, w1, b1, w2), ref):
                torch.testing.assert_close(s, t, rtol=EXACT_RTOL, atol=EXACT_ATOL)
            continue
        _assert_same(_out_and_grads(op, x, w1, b1, w2), ref)


def test_forward_ad_level_and_its_fallback(monkeypatch):
    assert not _compat.forward_ad_active()
    with fwAD.dual_level():
        assert _compat.forward_ad_active()
    x, w1, w2 = _leaves((6, 4), (5, 4), (3, 5))
    op = lambda x, w1, w2: F.mlp(x, [w1, w2], [None, None], activation="gelu")  # noqa: E731
    before = _out_and_grads(op, x, w1, w2)
    monkeypatch.delattr(fwAD, "_current_level")
    assert _compat.forward_ad_active() is True           # unknown → save what a jvp would read
    _assert_same(_out_and_grads(op, x, w1, w2), before)


def test_is_batched_tensor_and_its_fallback(monkeypatch):
    seen = []
    torch.func.vmap(lambda x: seen.append(_compat.is_batched_tensor(x)) or x)(torch.ones(2, 3))
    assert (_compat.is_batched_tensor(torch.ones(2)), seen) == (False, [True])
    monkeypatch.setattr(_compat, "_is_batched", None)
    assert _compat.is_batched_tensor(torch.ones(2)) is True
    # unknown → the in-place activation takes its vmap path (out of place, then copied in)
    (x,) = _leaves((4, 3))
    for name in ("relu", "silu", "elu"):
        ours = _out_and_grads(lambda x: getattr(F, name)(x * 1, inplace=True), x)
        ref = _out_and_grads(lambda x: getattr(TF, name)(x * 1), x)
        torch.testing.assert_close(ours, ref)            # float64, default tolerance: same math


def test_is_functorch_wrapped_and_its_fallback(monkeypatch):
    seen = []
    torch.func.grad(lambda x: seen.append(_compat.is_functorch_wrapped(x)) or x.sum())(torch.ones(2))
    assert (_compat.is_functorch_wrapped(torch.ones(2)), seen) == (False, [True])
    x = torch.randn(5, 4, dtype=D64, requires_grad=True)
    t = torch.tensor([0, 3, 1, 2, 3])
    before = _out_and_grads(lambda x: F.cross_entropy(x, t), x)
    monkeypatch.setattr(_compat, "_is_wrapped", None)
    assert _compat.is_functorch_wrapped(torch.ones(2)) is True
    _assert_same(_out_and_grads(lambda x: F.cross_entropy(x, t), x), before)   # range check skipped


def test_any_autocast_enabled_and_its_fallback(monkeypatch):
    """One C call says whether any autocast is on; without it every device is asked: the same
    dtypes either way (a linear runs in bfloat16 under CPU autocast, in float32 outside)."""
    x, w = torch.randn(3, 4), torch.randn(5, 4)
    dtypes = []
    for private in (_compat._any_autocast, None):
        monkeypatch.setattr(_compat, "_any_autocast", private)
        assert _compat.any_autocast_enabled() is (private is None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert _compat.any_autocast_enabled()
            dtypes.append(F.linear(x, w).dtype)
        dtypes.append(F.linear(x, w).dtype)
    assert dtypes == [torch.bfloat16, torch.float32] * 2


def test_unwrap_dead_wrappers_fallback_goes_through_apply(monkeypatch):
    """Without torch's unwrap_dead_wrappers the fast path cannot be taken: call is apply."""
    monkeypatch.setattr(_compat, "unwrap_dead_wrappers", None)

    class Twice(HandFunction):        # defined now, so it sees the fallback
        @staticmethod
        def forward(x, k=2.0):
            return x * k

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.k = inputs[1]

        @staticmethod
        def backward(ctx, g):
            return g * ctx.k, None

        @staticmethod
        def jvp(ctx, dx, _):
            return dx * ctx.k

    applied = []
    real = Twice.apply.__func__
    monkeypatch.setattr(Twice, "apply", classmethod(lambda cls, *a, **k: applied.append(a) or real(cls, *a, **k)))
    (x,) = _leaves((3,))
    y = Twice.call(x, k=3.0)
    (g,) = torch.autograd.grad(y.sum(), x)
    assert len(applied) == 1 and torch.equal(y, x * 3) and torch.equal(g, torch.full_like(x, 3.0))


def test_nn_reduction_fallback_is_torchs_rule():
    from torch.nn import _reduction as torch_rule

    fallback = _compat._REDUCTION_FALLBACK
    assert _compat.nn_reduction is torch_rule
    for size_average in (None, True, False):
        for reduce in (None, True, False):
            with warnings.catch_warnings(record=True) as ours:
                warnings.simplefilter("always")
                got = fallback.legacy_get_string(size_average, reduce)
            with warnings.catch_warnings(record=True) as theirs:
                warnings.simplefilter("always")
                want = torch_rule.legacy_get_string(size_average, reduce)
            assert got == want, (size_average, reduce)
            assert [str(w.message) for w in ours] == [str(w.message) for w in theirs]
    for r in ("none", "mean", "sum", "elementwise_mean"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert fallback.get_enum(r) == torch_rule.get_enum(r)
    with pytest.raises(ValueError, match="bogus is not a valid value for reduction"):
        fallback.get_enum("bogus")


def test_mha_mask_helpers_and_their_fallbacks():
    import torch.nn.functional as TF

    assert _compat.canonical_mask is TF._canonical_mask and _compat.none_or_dtype is TF._none_or_dtype
    assert _compat.mha_shape_check is TF._mha_shape_check
    m = torch.tensor([[True, False], [False, False]])
    for mask in (m, torch.randn(2, 2), None):
        args = dict(mask=mask, mask_name="attn_mask", other_type=None, other_name="", target_type=torch.float32)
        ours, theirs = _compat._canonical_mask_fallback(**args), TF._canonical_mask(**args)
        assert (ours is None and theirs is None) or torch.equal(ours, theirs)
    with pytest.raises(AssertionError, match="only bool and floating types of attn_mask"):
        _compat._canonical_mask_fallback(torch.ones(2, dtype=torch.int64), "attn_mask", None, "", torch.float32)
    for t in (None, torch.ones(2, dtype=torch.float16)):
        assert _compat._none_or_dtype_fallback(t) == TF._none_or_dtype(t)
    q3, q2 = torch.randn(4, 2, 6), torch.randn(4, 6)
    assert _compat._mha_shape_check_fallback(q3, q3, q3, None, None, 2) == TF._mha_shape_check(q3, q3, q3, None, None, 2)
    assert _compat._mha_shape_check_fallback(q2, q2, q2, None, None, 2) == TF._mha_shape_check(q2, q2, q2, None, None, 2)


def test_dynamo_unsupported_and_its_fallback(monkeypatch):
    import torch._dynamo.exc

    assert _compat.dynamo_unsupported() is torch._dynamo.exc.Unsupported
    monkeypatch.delattr(torch._dynamo.exc, "Unsupported")
    stand_in = _compat.dynamo_unsupported()
    # catches nothing torch raises: a fullgraph refusal then surfaces as the error it is
    assert not any(issubclass(e, stand_in) for e in (RuntimeError, torch._dynamo.exc.TorchDynamoException))


def _encoder():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True),
                                 num_layers=1, enable_nested_tensor=False).eval()


def test_encoder_fast_path_switch_is_where_compat_says():
    layer = _encoder().layers[0]
    assert _compat.has_encoder_fast_path_flag(layer), (
        f"torch {torch.__version__} moved TransformerEncoderLayer.{_compat.ENCODER_FAST_PATH_FLAG}: "
        "update handgrad._compat so that convert can turn the native fast path off")
    converted = handgrad.convert(_encoder())
    assert getattr(converted.layers[0], _compat.ENCODER_FAST_PATH_FLAG) == 0


def test_encoder_without_the_switch_warns_and_still_converts():
    model = _encoder()
    del model.layers[0].activation_relu_or_gelu       # as if torch had moved it
    with pytest.warns(UserWarning, match="native fast path instead of the handgrad ops"):
        converted = handgrad.convert(model)
    assert converted.layers[0].linear1.__class__.__module__.startswith("handgrad")
    converted.train()                                  # training mode never reads the switch
    x = torch.randn(2, 3, 8)
    assert converted(x).shape == (2, 3, 8)


# ---- import handgrad with every private API gone ------------------------------------------------

_HIDE_AND_IMPORT = textwrap.dedent("""
    import importlib, sys, warnings
    import torch, torch.nn.functional, torch.autograd.forward_ad as fwAD, torch._dynamo.exc

    MODULES = ["torch._functorch.utils", "torch.nn._reduction", "torch._dynamo.exc"]
    ATTRS = [(torch._C, "_are_functorch_transforms_active"), (torch._C._functorch, "is_batchedtensor"),
             (torch._C._functorch, "is_functorch_wrapped_tensor"), (fwAD, "_current_level")]

    class Hide:                                          # a meta-path hook: these modules "moved"
        def find_spec(self, name, path=None, target=None):
            if name in MODULES:
                raise ImportError(f"hidden: {name}")

    saved_mods = {m: sys.modules.pop(m) for m in MODULES}
    parents = {m: (importlib.import_module(m.rpartition(".")[0]), m.rpartition(".")[2]) for m in MODULES}
    for m, (parent, leaf) in parents.items():
        delattr(parent, leaf)
    saved_attrs = [(o, a, getattr(o, a)) for o, a in ATTRS]
    for o, a, _ in saved_attrs:
        delattr(o, a)
    sys.meta_path.insert(0, Hide())

    import handgrad, handgrad.functional as F, handgrad.nn
    from handgrad import _compat
    chosen = [_compat._transforms_active, _compat._is_batched, _compat._is_wrapped, _compat.unwrap_dead_wrappers]
    assert chosen == [None] * 4, chosen
    assert _compat.nn_reduction is _compat._REDUCTION_FALLBACK
    assert _compat.dynamo_unsupported() is _compat._NeverRaised
    assert _compat.forward_ad_active() and _compat.functorch_transforms_active()
    # the fallbacks at work (torch's own Function.apply needs its privates back to run at all)
    sys.meta_path.pop(0)
    for o, a, v in saved_attrs:
        setattr(o, a, v)
    for m, (parent, leaf) in parents.items():
        sys.modules[m] = saved_mods[m]
        setattr(parent, leaf, saved_mods[m])
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randn(4, 2, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = F.mse_loss(F.linear(x, w), y, size_average=False)     # the fallback legacy rule
    ref = torch.nn.functional.mse_loss(torch.nn.functional.linear(x, w), y, reduction="sum")
    assert "reduction='sum'" in str(caught[0].message)
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(torch.autograd.grad(ours, (x, w)), torch.autograd.grad(ref, (x, w)))
    print("ok")
""")


def test_import_handgrad_without_torch_privates():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([sys.executable, "-c", _HIDE_AND_IMPORT], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]


# ---- HandFunction.call: every argument form apply takes --------------------------------------

class Scale(HandFunction):
    """y = α·x + β: a test op with defaults (no handgrad op has any yet)."""

    @staticmethod
    def forward(x, alpha=2.0, beta=0.0):
        return x * alpha + beta

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, ctx.alpha, _ = inputs          # apply hands setup_context the bound arguments, defaults too

    @staticmethod
    def backward(ctx, g):
        return g * ctx.alpha, None, None

    @staticmethod
    def jvp(ctx, dx, *_):
        return dx * ctx.alpha


# name: (arguments of x, the α and β they mean)
FORMS = {
    "positional": (lambda x: ((x, 3.0, 1.0), {}), (3.0, 1.0)),
    "defaults": (lambda x: ((x,), {}), (2.0, 0.0)),
    "one default": (lambda x: ((x, 3.0), {}), (3.0, 0.0)),
    "keyword": (lambda x: ((x,), {"beta": 1.0, "alpha": 3.0}), (3.0, 1.0)),
    "all keywords": (lambda x: ((), {"alpha": 3.0, "x": x}), (3.0, 0.0)),
}
CALL_FORMS = {name: (lambda x, a=arguments: (lambda args, kw: Scale.call(*args, **kw))(*a(x)))
              for name, (arguments, _) in FORMS.items()}
EXPECTED = {name: ab for name, (_, ab) in FORMS.items()}


@pytest.mark.parametrize("form", CALL_FORMS)
def test_call_binds_like_apply(form):
    (x,) = _leaves((4,))
    alpha, beta = EXPECTED[form]
    y, g = _out_and_grads(CALL_FORMS[form], x)
    torch.testing.assert_close(y, x.detach() * alpha + beta)
    torch.testing.assert_close(g, torch.full_like(x, alpha))
    # apply with the arguments bound (torch 2.4's apply itself passes keywords on to the C++
    # apply, which refuses them)
    _assert_same([y, g], _out_and_grads(lambda x: Scale.apply(x, alpha, beta), x))


@pytest.mark.parametrize("form", CALL_FORMS)
def test_call_binds_under_torch_func(form):
    x = torch.randn(3, 4, dtype=D64)
    alpha, beta = EXPECTED[form]
    per_row = torch.func.vmap(torch.func.grad(lambda r: CALL_FORMS[form](r).sum()))(x)
    torch.testing.assert_close(per_row, torch.full_like(x, alpha))
    _, tangent = torch.func.jvp(CALL_FORMS[form], (x,), (torch.ones_like(x),))
    torch.testing.assert_close(tangent, torch.full_like(x, alpha))
    torch.testing.assert_close(torch.func.vmap(CALL_FORMS[form])(x), x * alpha + beta)


@pytest.mark.parametrize("form", ["defaults", "keyword", "all keywords"])
def test_call_binds_under_compile(form):
    torch.compiler.reset()
    (x,) = _leaves((4,))
    compiled = torch.compile(CALL_FORMS[form], fullgraph=True, backend="eager")
    try:
        _assert_same(_out_and_grads(compiled, x), _out_and_grads(CALL_FORMS[form], x))
    finally:
        torch.compiler.reset()


def test_call_with_keywords_on_a_real_op():
    x, w, b = _leaves((5, 3), (2, 3), (2,))
    ref = _out_and_grads(lambda x, w, b: LinearFn.call(x, w, b), x, w, b)
    for form in (lambda x, w, b: LinearFn.call(x, w, bias=b), lambda x, w, b: LinearFn.call(bias=b, weight=w, x=x)):
        _assert_same(_out_and_grads(form, x, w, b), ref)


@pytest.mark.parametrize("call,message", [
    (lambda x: LinearFn.call(x, x, bais=None), "unexpected keyword argument 'bais'"),
    (lambda x: LinearFn.call(x, x), "missing a required argument: 'bias'"),
    (lambda x: LinearFn.call(x, x, None, None), "takes 3 positional arguments but 4 were given"),
    (lambda x: LinearFn.call(x, x, None, weight=x), "got multiple values for argument 'weight'"),
    (lambda x: Scale.call(x, gamma=1.0), "unexpected keyword argument 'gamma'"),
])
def test_call_refuses_what_apply_refuses(call, message):
    with pytest.raises(TypeError, match=r"\.call\(.*\): " + message):
        call(torch.randn(2, 2))


def test_a_keyword_only_forward_is_refused_when_defined():
    with pytest.raises(TypeError, match="positional parameters only"):
        class KeywordOnly(HandFunction):  # noqa: F841
            @staticmethod
            def forward(x, *, k):
                return x * k


# What Function.apply refers to (torch 2.4 … 2.13): binding, the functorch check, unwrapping
# dead wrappers, the C++ apply, custom_function_call. HandFunction.call's fast path does the same.
_APPLY_NAMES = {"RuntimeError", "_C", "_are_functorch_transforms_active", "_functorch", "_is_setup_context_defined",
                "apply", "apply_defaults", "args", "bind", "custom_function_call", "forward", "inspect", "kwargs",
                "setup_context", "signature", "super", "torch", "unwrap_dead_wrappers", "utils"}


def _names(code):
    out = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            out |= _names(c)
    return out


def test_function_apply_does_nothing_call_skips():
    """A canary for what torch adds to Function.apply later: call's fast path would skip it."""
    new = _names(torch.autograd.Function.apply.__func__.__code__) - _APPLY_NAMES
    assert not new, (f"torch {torch.__version__}'s Function.apply now also uses {sorted(new)}: check that "
                     "HandFunction.call's fast path (ops/_function.py) still does everything apply does")


# ---- the canary: the jvp-less twin exists only because Dynamo refuses a jvp -----------------

def test_dynamo_still_refuses_a_function_with_jvp():
    """ops/_function.py dispatches to a jvp-less twin under torch.compile because Dynamo refuses
    an autograd.Function that defines jvp. When this test fails, that is no longer true."""
    x, w, b = [t.float() .detach().requires_grad_() for t in _leaves((3, 4), (2, 4), (2,))]
    torch.compiler.reset()
    compiled = torch.compile(lambda x, w, b: LinearFn.apply(x, w, b), fullgraph=True, backend="eager")
    try:
        compiled(x, w, b)
    except _compat.dynamo_unsupported() as e:
        assert "jvp" in str(e), (
            f"torch {torch.__version__}: Dynamo refuses LinearFn.apply for another reason than its jvp, so this "
            f"canary cannot tell whether the jvp-less twin is still needed: {str(e).splitlines()[0]}")
    else:
        pytest.fail(f"torch {torch.__version__}: Dynamo now traces an autograd.Function with jvp under "
                    "torch.compile(fullgraph=True): retire the twin (HandFunction's jvp-less class in "
                    "ops/_function.py; call Function.apply under compile) and delete this test")
    finally:
        torch.compiler.reset()


# ---- the supported torch range --------------------------------------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_floor_is_said_once_everywhere():
    """pyproject.toml, the README and _compat.TORCH_FLOOR name the same floor (CI installs it)."""
    floor = ".".join(map(str, _compat.TORCH_FLOOR))
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        assert f'"torch>={floor}"' in f.read()
    with open(os.path.join(ROOT, "README.md")) as f:
        assert f"torch ≥ {floor}" in f.read()
    assert _compat.torch_version() >= _compat.TORCH_FLOOR


def test_requires_torch_is_the_function_itself_where_torch_has_it():
    assert _compat.requires_torch(_compat.torch_version(), "x", TF.relu) is TF.relu
    for name in _compat._REFERENCE_NEEDS:
        if _compat.torch_version() >= _compat._REFERENCE_NEEDS[name][0]:
            assert _compat.torch_reference(name) is getattr(TF, name)


def test_requires_torch_on_an_older_torch_raises_torch_lacks_only_where_needed():
    mse = _compat.requires_torch((99, 0), "the weight argument", TF.mse_loss, _compat._mse_weighted)
    x, y = torch.randn(3), torch.randn(3)
    torch.testing.assert_close(mse(x, y), TF.mse_loss(x, y))        # no weight: torch's own
    with pytest.raises(_compat.TorchLacks, match=r"torch < 99\.0 lacks the weight argument"):
        mse(x, y, weight=torch.ones(3))
    with pytest.raises(_compat.TorchLacks):
        mse(x, y, None, None, "mean", torch.ones(3))                 # weight given positionally
    try:                                                             # passes `except Exception`
        mse(x, y, weight=torch.ones(3))
    except Exception:  # noqa: BLE001
        pytest.fail("TorchLacks was caught by except Exception")
    except _compat.TorchLacks:
        pass


def test_torch_lacks_is_reported_as_a_skip(tmp_path):
    """tests/conftest.py turns a TorchLacks raised in a test into a skip carrying its reason."""
    (tmp_path / "test_lacks.py").write_text(textwrap.dedent("""
        from handgrad._compat import TorchLacks
        def test_needs_a_newer_torch():
            raise TorchLacks("torch < 99.0 lacks a thing")
    """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), *sys.path])}
    r = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider", "-o", "addopts=",
                        "-rs", str(tmp_path / "test_lacks.py")], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0 and "1 skipped" in r.stdout and "torch < 99.0 lacks a thing" in r.stdout, r.stdout[-2000:]
