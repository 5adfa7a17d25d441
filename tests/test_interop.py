"""handgrad with the rest of the PyTorch toolbox, each on a converted model and on the
functional ops: torch.compile, torch.func, autocast, activation checkpointing, DDP,
persistence, frozen parameters."""
from __future__ import annotations

import copy
import os
import pickle
import shutil
import socket
import traceback

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.utils.checkpoint import checkpoint

import handgrad.functional as HF
import handgrad.nn as hnn
from handgrad import convert
from handgrad.ops.fused import StackFn
from handgrad.ops.linear import LinearFn
from test_nn import handgrad_nodes

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def native_model(dtype=torch.float64):
    """A model with a covered module of each kind it is likely to hold, plus a native Dropout."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.LayerNorm(16), nn.Linear(16, 8), nn.GELU(),
                         nn.Dropout(0.0), nn.Linear(8, 3)).to(dtype)


def models(dtype=torch.float64):
    """(native, converted) with equal weights; the converted one holds its own copies."""
    model = native_model(dtype)
    return model, convert(model)


def batch(n=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, dtype=dtype, generator=g), torch.randint(0, 3, (n,), generator=g)


# The functional ops: the same kind of network written with handgrad.functional (incl. the fused
# mlp); ``torch_net`` is the same network in torch.nn.functional, the reference.
def net_params(dtype=torch.float64):
    g = torch.Generator().manual_seed(2)
    shapes = dict(w1=(16, 6), b1=(16,), g=(16,), beta=(16,), w2=(8, 16), b2=(8,), w3=(3, 8), b3=(3,))
    return {k: (0.3 * torch.randn(s, generator=g, dtype=dtype)).requires_grad_() for k, s in shapes.items()}


def handgrad_logits(p, x):
    h = HF.silu(HF.linear(x, p["w1"], p["b1"]))
    h = HF.layer_norm(h, (16,), p["g"], p["beta"])
    return HF.mlp(h, [p["w2"], p["w3"]], [p["b2"], p["b3"]], activation="tanh")


def handgrad_net(p, x, y):
    return HF.cross_entropy(handgrad_logits(p, x), y)


def torch_net(p, x, y):
    h = TF.silu(TF.linear(x, p["w1"], p["b1"]))
    h = TF.layer_norm(h, (16,), p["g"], p["beta"])
    h = TF.linear(torch.tanh(TF.linear(h, p["w2"], p["b2"])), p["w3"], p["b3"])
    return TF.cross_entropy(h, y)


def grads_of(loss, params):
    return torch.autograd.grad(loss, list(params))


def backward_grads(loss, params):
    """``.backward()`` then the ``.grad`` of each (reentrant checkpointing refuses autograd.grad)."""
    params = list(params)
    for p in params:
        p.grad = None
    loss.backward()
    return [p.grad for p in params]


# float64 on both sides, the same ops in the same order up to summation order: 1e-10 is ~1e6 ulps
# of room, far below any real error.
TOL64 = dict(rtol=1e-10, atol=1e-12)
# float32 compiled vs eager: the compiled graph may reorder and fuse reductions (a few ulps per op,
# float32 eps ≈ 1.2e-7) across a handful of ops, and eager takes the compiled kernels (float64 sums)
# where compile takes the formula: a few ulps of the gradients' terms (~0.5) near a zero element.
TOL32 = dict(rtol=1e-5, atol=4e-6)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- torch.compile ----------------------------------------------------------------------------

def test_compile_converted_model_fullgraph(fresh_dynamo):
    """fullgraph=True raises on any graph break; compiled and eager gradients equal."""
    _, model = models(torch.float32)
    x, y = batch(dtype=torch.float32)

    def step(x, y):
        return HF.cross_entropy(model(x), y)

    eager = step(x, y)
    g_eager = grads_of(eager, model.parameters())
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    loss = compiled(x, y)
    torch.testing.assert_close(loss, eager, **TOL32)
    for a, b in zip(grads_of(loss, model.parameters()), g_eager):
        torch.testing.assert_close(a, b, **TOL32)


def test_compile_converted_transformer_fullgraph(fresh_dynamo):
    """A converted TransformerEncoder (MultiheadAttention native, the rest handgrad) in one graph."""
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    model = convert(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    x = torch.randn(2, 5, 8)

    def step(x):
        return model(x).square().sum()

    eager = step(x)
    g_eager = grads_of(eager, model.parameters())
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(loss, eager, **TOL32)
    for a, b in zip(grads_of(loss, model.parameters()), g_eager):
        torch.testing.assert_close(a, b, **TOL32)


def test_compile_functional_ops_fullgraph(fresh_dynamo):
    p = net_params(torch.float32)
    x, y = batch(dtype=torch.float32)
    eager = handgrad_net(p, x, y)
    g_eager = grads_of(eager, p.values())
    compiled = torch.compile(handgrad_net, backend="aot_eager", fullgraph=True)
    loss = compiled(p, x, y)
    torch.testing.assert_close(loss, eager, **TOL32)
    for a, b in zip(grads_of(loss, p.values()), g_eager):
        torch.testing.assert_close(a, b, **TOL32)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on CPU compiles C++: needs a C++ compiler")
def test_compile_inductor_mlp(fresh_dynamo):
    """One inductor case (the slow compiler): the seed's network, fused MLP + its loss."""
    torch.manual_seed(0)
    model = hnn.MLP((4, 8, 3), activation="sigmoid")
    x, y = torch.randn(6, 4), torch.randn(6, 3)

    def step(x, y):
        return HF.half_squared_error(model(x), y)

    eager = step(x, y)
    g_eager = grads_of(eager, model.parameters())
    loss = torch.compile(step, fullgraph=True)(x, y)  # default backend: inductor
    torch.testing.assert_close(loss, eager, **TOL32)
    for a, b in zip(grads_of(loss, model.parameters()), g_eager):
        torch.testing.assert_close(a, b, **TOL32)


# --- torch.func: per-sample gradients ---------------------------------------------------------

def _per_sample_check(loss_one, params, x, y):
    per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for i in range(x.shape[0]):
        p = {k: v.detach().requires_grad_() for k, v in params.items()}
        loop = dict(zip(p, grads_of(loss_one(p, x[i], y[i]), p.values())))
        for k in params:
            torch.testing.assert_close(per_sample[k][i], loop[k], **TOL64, msg=k)


def test_per_sample_gradients_converted_model():
    native, model = models()
    x, y = batch()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss_one(params, x, y):
        return HF.cross_entropy(functional_call(model, params, (x[None],)), y[None])

    _per_sample_check(loss_one, params, x, y)
    # and equal to the native model's per-sample gradients
    ref = vmap(grad(lambda p, x, y: TF.cross_entropy(functional_call(native, p, (x[None],)), y[None])),
               in_dims=(None, 0, 0))(params, x, y)
    ours = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, x, y)
    for k in params:
        torch.testing.assert_close(ours[k], ref[k], **TOL64, msg=k)


def test_per_sample_gradients_functional_ops():
    params = {k: v.detach() for k, v in net_params().items()}
    x, y = batch()
    _per_sample_check(lambda p, x, y: handgrad_net(p, x[None], y[None]), params, x, y)


# --- autocast ---------------------------------------------------------------------------------

AUTOCAST = [pytest.param("cpu", torch.bfloat16, id="cpu-bf16"),
            pytest.param("cuda", torch.float16, id="cuda-fp16", marks=CUDA),
            pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=CUDA)]
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def assert_lowp_close(ours, theirs, truth, dtype, what):
    """Both ran the same casts, so their errors against the float32 truth are of one size: allow
    twice torch's own error plus 4 units of roundoff of the result's norm (summation order)."""
    err, err_torch = (ours.float() - truth).norm(), (theirs.float() - truth).norm()
    assert err <= 2 * err_torch + 4 * EPS[dtype] * truth.norm(), f"{what}: {err} vs torch's {err_torch}"


def _dtypes_seen(model):
    seen = []
    for name, m in model.named_modules():
        if name:
            m.register_forward_hook(lambda m, a, out, name=name: seen.append((name, out.dtype)))
    return seen


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_converted_model(device, dtype):
    native, model = models(torch.float32)
    native, model = native.to(device), model.to(device)
    x, y = (t.to(device) for t in batch(dtype=torch.float32))
    truth = grads_of(TF.cross_entropy(native(x), y), native.parameters())
    seen_native, seen = _dtypes_seen(native), _dtypes_seen(model)
    with torch.autocast(device, dtype=dtype):
        loss_native = TF.cross_entropy(native(x), y)
        loss = HF.cross_entropy(model(x), y)
    assert seen == seen_native  # every module's output dtype is the native module's
    assert dtype in {d for _, d in seen}  # and autocast did lower some of them
    assert loss.dtype == loss_native.dtype == torch.float32
    g_native, g = grads_of(loss_native, native.parameters()), grads_of(loss, model.parameters())
    for (name, p), a, b, t in zip(model.named_parameters(), g, g_native, truth):
        assert a.dtype == p.dtype == torch.float32, name
        assert_lowp_close(a, b, t, dtype, name)


@pytest.mark.parametrize("device,dtype", AUTOCAST)
def test_autocast_functional_ops(device, dtype):
    p = {k: v.detach().to(device).requires_grad_() for k, v in net_params(torch.float32).items()}
    x, y = (t.to(device) for t in batch(dtype=torch.float32))
    truth = grads_of(torch_net(p, x, y), p.values())
    with torch.autocast(device, dtype=dtype):
        assert HF.linear(x, p["w1"]).dtype == TF.linear(x, p["w1"]).dtype == dtype
        loss, loss_native = handgrad_net(p, x, y), torch_net(p, x, y)
    assert loss.dtype == loss_native.dtype == torch.float32
    for (k, v), a, b, t in zip(p.items(), grads_of(loss, p.values()), grads_of(loss_native, p.values()), truth):
        assert a.dtype == v.dtype == torch.float32, k
        assert_lowp_close(a, b, t, dtype, k)


# --- activation checkpointing -----------------------------------------------------------------

@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_converted_model(use_reentrant, monkeypatch):
    _, model = models()
    x, y = batch()
    x.requires_grad_()  # the reentrant variant only differentiates through inputs that need it
    plain = grads_of(HF.cross_entropy(model(x), y), [x, *model.parameters()])
    calls = []
    real = HF.linear
    monkeypatch.setattr(HF, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    loss = HF.cross_entropy(checkpoint(model, x, use_reentrant=use_reentrant), y)
    assert len(calls) == 3
    ckpt = backward_grads(loss, [x, *model.parameters()])
    assert len(calls) == 6  # the backward recomputed the forward, through handgrad again
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)  # the same ops on the same inputs, on CPU: bit for bit


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_checkpoint_functional_ops(use_reentrant):
    """linear, silu, layer_norm and the fused mlp recomputed inside the checkpoint."""
    p = net_params()
    x, y = batch()
    plain = grads_of(handgrad_net(p, x, y), p.values())
    names = list(p)
    logits = checkpoint(lambda x, *ps: handgrad_logits(dict(zip(names, ps)), x), x, *p.values(),
                        use_reentrant=use_reentrant)
    for a, b in zip(backward_grads(HF.cross_entropy(logits, y), p.values()), plain):
        assert torch.equal(a, b)  # recomputed with the same ops: bit for bit


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("target", ["index", "probs"])
def test_checkpoint_cross_entropy(use_reentrant, target):
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 1, 2, 0]) if target == "index" else torch.rand(5, 4, dtype=torch.float64)
    plain = grads_of(HF.cross_entropy(x, y), [x])
    loss = checkpoint(lambda x: HF.cross_entropy(x, y), x, use_reentrant=use_reentrant)
    assert torch.equal(backward_grads(loss, [x])[0], plain[0])  # recomputed with the same ops: bit for bit


# --- DDP --------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, x, y, out_dir):
    try:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel as DDP

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        _, model = models()
        ddp = DDP(model)
        shard = slice(rank * len(x) // world, (rank + 1) * len(x) // world)
        HF.cross_entropy(ddp(x[shard]), y[shard]).backward()  # mean over the shard; DDP averages
        torch.save({k: p.grad for k, p in model.named_parameters()}, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.destroy_process_group()
        code = 0
    except BaseException:
        traceback.print_exc()
        code = 1
    os._exit(code)  # a forked child: never run pytest's exit handlers


def test_ddp_two_cpu_processes(tmp_path):
    """Two forked processes (gloo) on halves of the batch give the one-process full-batch gradients."""
    _, model = models()
    x, y = batch(n=8)
    HF.cross_entropy(model(x), y).backward()
    ctx = torch.multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker, args=(r, 2, port, x, y, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        grads = torch.load(tmp_path / f"rank{r}.pt", weights_only=True)
        for k, p in model.named_parameters():
            torch.testing.assert_close(grads[k], p.grad, **TOL64, msg=f"rank {r}: {k}")


# --- persistence ------------------------------------------------------------------------------

def test_state_dict_save_load_weights_only(tmp_path):
    native, model = models()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)  # trained: differs from a fresh model
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    sd = torch.load(tmp_path / "sd.pt", weights_only=True)
    x, _ = batch()
    expected = model(x)
    into_native = native_model()
    into_native.load_state_dict(sd)  # strict
    into_handgrad = convert(native_model())
    into_handgrad.load_state_dict(sd)
    torch.testing.assert_close(into_native(x), expected, **TOL64)
    torch.testing.assert_close(into_handgrad(x), expected, **TOL64)
    assert handgrad_nodes(into_handgrad(x)) and not handgrad_nodes(into_native(x))


def test_deepcopy_and_pickle_converted_models():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, dtype=torch.float64)
    model = convert(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False))
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    expected = model(x)
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        l0 = twin.layers[0]
        assert type(l0.linear1) is hnn.Linear and l0.activation is HF.relu and l0.activation_relu_or_gelu == 0
        assert isinstance(l0.self_attn.out_proj, hnn.Linear)
        assert twin.handgrad_report.summary() == model.handgrad_report.summary()
        torch.testing.assert_close(twin(x), expected, **TOL64)
        assert all(a.data_ptr() != b.data_ptr() for a, b in zip(twin.parameters(), model.parameters()))


# --- frozen parameters ------------------------------------------------------------------------

@pytest.fixture
def backward_spy(monkeypatch):
    """Wraps a HandFunction's backward: records ``ctx.needs_input_grad`` and which gradients
    the backward returned (None: not computed)."""
    records = []

    def install(fn_cls):
        real = fn_cls.backward

        def spy(ctx, *grads):
            out = real(ctx, *grads)
            records.append((fn_cls.__name__, tuple(ctx.needs_input_grad), tuple(g is not None for g in out)))
            return out

        monkeypatch.setattr(fn_cls, "backward", staticmethod(spy))
        return records

    return install


def test_frozen_parameters_converted_model(backward_spy):
    native, model = models()
    for m in (native, model):
        m[0].weight.requires_grad_(False)   # one frozen weight
        m[6].requires_grad_(False)          # one frozen layer
    records = backward_spy(LinearFn)
    x, y = batch()
    HF.cross_entropy(model(x), y).backward()
    TF.cross_entropy(native(x), y).backward()
    # Linear layers run in order 0, 3, 6; backward visits them in reverse
    assert [r[1] for r in records] == [(True, False, False), (True, True, True), (False, False, True)]
    assert [r[2] for r in records] == [(True, False, False), (True, True, True), (False, False, True)]
    for (name, p), q in zip(model.named_parameters(), native.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, **TOL64, msg=name)
        else:
            assert p.grad is None and q.grad is None, name


def test_frozen_parameters_functional_ops(backward_spy):
    records = backward_spy(StackFn)
    backward_spy(LinearFn)
    p = net_params()
    for k in ("w1", "w3", "b2"):
        p[k].requires_grad_(False)
    x, y = batch()
    free = [k for k, v in p.items() if v.requires_grad]
    ours = dict(zip(free, grads_of(handgrad_net(p, x, y), [p[k] for k in free])))
    ref = dict(zip(free, grads_of(torch_net(p, x, y), [p[k] for k in free])))
    for k in free:
        torch.testing.assert_close(ours[k], ref[k], **TOL64, msg=k)
    by_op = {name: (needs, got) for name, needs, got in records}
    # StackFn(x, spec, W2, b2, W3, b3): the frozen b2 and W3 are neither asked for nor computed
    assert by_op["StackFn"][0] == (True, False, True, False, False, True)
    assert by_op["StackFn"][1][3] is False and by_op["StackFn"][1][4] is False
    # LinearFn(x, W1, b1) with W1 frozen and x a constant: only b1
    assert by_op["LinearFn"] == ((False, False, True), (False, False, True))
