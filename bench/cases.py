"""The benchmark cases: each a float32 training step (forward + backward), native PyTorch
against handgrad, built with the same parameters and inputs.

A case builder returns a ``Case``: the step of each implementation (the first is the native
baseline the ratios are taken against), plus time-only reference rows (``floors``, e.g. the
GEMM floor). Every step starts with the gradients set to None, so no step pays for
accumulating into the last one's gradients.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as TF
from torch import nn

import handgrad.nn as hnn
from handgrad import catalogue

# the seed's activation: MLP's default, on every hidden layer of every MLP case
SEED_ACTIVATION = catalogue.get(catalogue.get("mlp").options["activation"])
LCE = catalogue.get("linear_cross_entropy")


@dataclass
class Case:
    name: str
    what: str                                   # one line: sizes, loss, what is compared
    steps: dict[str, Callable[[], None]]        # implementation → one training step; first = baseline
    floors: dict[str, Callable[[], None]] = field(default_factory=dict)   # time-only reference rows
    note: str = ""


def zero_grads(params):
    for p in params:
        p.grad = None


def _sequential(sizes, act: type[nn.Module], last: type[nn.Module] | None, device) -> nn.Sequential:
    layers: list[nn.Module] = []
    for l, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(d_in, d_out, device=device))
        if l < len(sizes) - 2:
            layers.append(act())
        elif last is not None:
            layers.append(last())
    return nn.Sequential(*layers)


def _handgrad_mlp(native: nn.Sequential, sizes, last: str | None, device) -> nn.Module:
    """handgrad.nn.MLP (fused) with the native network's parameters (state_dicts match)."""
    model = hnn.MLP(sizes, activation=SEED_ACTIVATION.name, last_activation=last, device=device)
    model.load_state_dict(native.state_dict())
    return model


def _half_sse_native(out, y):
    """½‖x − y‖² summed over the batch, in torch ops, for both sides of the MLP cases."""
    return 0.5 * TF.mse_loss(out, y, reduction="sum")


def _mlp_pair(sizes, batch, device, *, last: str | None, sgd: bool, seed=0):
    """Native nn.Sequential and handgrad.nn.MLP with equal parameters; each step: forward, the
    seed's loss ½‖x − y‖² (the same torch expression for both: the network is what is compared),
    backward, and (sgd) the same torch.optim.SGD step for both."""
    torch.manual_seed(seed)
    last_module = None if last is None else catalogue.activation(last).torch_module
    native = _sequential(sizes, SEED_ACTIVATION.torch_module, last_module, device)
    ours = _handgrad_mlp(native, sizes, last, device)
    x = torch.randn(batch, sizes[0], device=device)
    y = torch.rand(batch, sizes[-1], device=device)

    def make(model, loss_fn):
        params = list(model.parameters())
        opt = torch.optim.SGD(params, lr=0.01) if sgd else None

        def step():
            zero_grads(params)
            loss_fn(model(x), y).backward()
            if opt is not None:
                opt.step()

        return step

    return native, ours, x, y, make(native, _half_sse_native), make(ours, _half_sse_native)


def seed_sgd(device, quick):
    sizes = (64, 32, 32, 10)
    *_, native, ours = _mlp_pair(sizes, 1, device, last=SEED_ACTIVATION.name, sgd=True)
    return Case("seed-sgd", f"64-32-32-10, {SEED_ACTIVATION.name} on every layer, ½‖x−y‖², batch 1, SGD step; "
                "handgrad.nn.MLP vs nn.Sequential", {"native": native, "handgrad": ours})


def _mlp_case(name, sizes, batch, quick_sizes, quick_batch):
    def build(device, quick):
        s, b = (quick_sizes, quick_batch) if quick else (sizes, batch)
        *_, native, ours = _mlp_pair(s, b, device, last=None, sgd=False)
        return Case(name, f"{'-'.join(map(str, s))}, {SEED_ACTIVATION.name} hidden layers, ½‖x−y‖², batch {b}; "
                    "handgrad.nn.MLP vs nn.Sequential", {"native": native, "handgrad": ours})

    return build


mlp_64 = _mlp_case("mlp-64", (64, 128, 128, 10), 64, (16, 32, 32, 4), 8)
mlp_256 = _mlp_case("mlp-256", (784, 512, 512, 10), 256, (32, 64, 64, 10), 16)


def mlp_big(device, quick):
    sizes, batch = ((64, 128, 128, 64), 64) if quick else ((1024, 2048, 2048, 1024), 1024)
    native_model, _, x, _, native, ours = _mlp_pair(sizes, batch, device, last=None, sgd=False)
    # The GEMM floor: the step's matrix products alone, on preallocated operands: forward
    # Z_l = X_{l−1} W_lᵀ + b_l (3 addmm), backward ∂L/∂W_l = Δ_lᵀ X_{l−1} (3) and
    # ∂L/∂X_{l−1} = Δ_l W_l for l = 2, 3 (2; x needs no gradient).
    Ws = [m.weight.detach() for m in native_model if isinstance(m, nn.Linear)]
    bs = [m.bias.detach() for m in native_model if isinstance(m, nn.Linear)]
    Xs = [x] + [torch.rand(batch, W.shape[0], device=device) for W in Ws]
    Ds = [torch.randn(batch, W.shape[0], device=device) for W in Ws]

    def floor():
        with torch.no_grad():
            for l in range(3):
                torch.addmm(bs[l], Xs[l], Ws[l].mT)
            for l in reversed(range(3)):
                Ds[l].mT @ Xs[l]
                if l > 0:
                    Ds[l] @ Ws[l]

    return Case("mlp-big", f"{'-'.join(map(str, sizes))}, {SEED_ACTIVATION.name} hidden layers, ½‖x−y‖², batch {batch}; "
                "handgrad.nn.MLP vs nn.Sequential; gemm-floor: the 8 GEMMs alone",
                {"native": native, "handgrad": ours}, floors={"gemm-floor": floor})


def lce(device, quick):
    N, D, C = (256, 32, 1024) if quick else (4096, 256, 16384)
    torch.manual_seed(0)
    x = torch.randn(N, D, device=device, requires_grad=True)
    W = (torch.randn(C, D, device=device) * D**-0.5).requires_grad_()
    t = torch.randint(0, C, (N,), device=device)

    def make(loss_fn):
        def step():
            zero_grads((x, W))
            loss_fn().backward()

        return step

    ours = LCE.functional
    steps = {
        "native": make(lambda: TF.cross_entropy(TF.linear(x, W), t)),
        "handgrad": make(lambda: ours(x, W, t)),
    }
    note = ""
    if LCE.torch_function is not None and hasattr(nn, "LinearCrossEntropyOptions"):
        options = nn.LinearCrossEntropyOptions()

        def torch_chunked():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return LCE.torch_function(x, W, t, options=options)

        steps["torch-chunked"] = make(torch_chunked)
    else:
        note = "this torch has no torch.nn.functional.linear_cross_entropy: no torch-chunked row"
    return Case("lce", f"linear + cross-entropy, N={N}, D={D}, C={C}, no bias; native = "
                "cross_entropy(linear(x, W), t); torch-chunked = F.linear_cross_entropy(…, "
                "options=LinearCrossEntropyOptions())", steps, note=note)


def compiled(device, quick):
    sizes, batch = ((16, 32, 32, 4), 8) if quick else ((64, 128, 128, 10), 64)
    native_model, ours_model, x, y, _, _ = _mlp_pair(sizes, batch, device, last=None, sgd=False)
    # --quick is a smoke test: aot_eager traces the same graphs (Dynamo + AOTAutograd, handgrad's
    # Functions included) without inductor's code generation, which takes minutes.
    backend = "aot_eager" if quick else "inductor"
    cn = torch.compile(native_model, fullgraph=True, backend=backend)
    co = torch.compile(ours_model, fullgraph=True, backend=backend)

    def make(model, params, loss_fn):
        def step():
            zero_grads(params)
            loss_fn(model(x), y).backward()

        return step

    return Case("compiled", f"torch.compile(fullgraph=True, backend={backend!r}) of the mlp-64 step "
                f"({'-'.join(map(str, sizes))}, batch {batch}); loss outside the compiled module",
                {"native": make(cn, list(native_model.parameters()), _half_sse_native),
                 "handgrad": make(co, list(ours_model.parameters()), _half_sse_native)})


# ``python -m bench seed``: the seed's network and the first fused ops
CASES: dict[str, Callable[[str, bool], Case]] = {
    "seed-sgd": seed_sgd,
    "mlp-64": mlp_64,
    "mlp-256": mlp_256,
    "mlp-big": mlp_big,
    "lce": lce,
    "compiled": compiled,
}
