"""``python -m bench models``: the converted test model families (``handgrad.testing.models``,
the models of tests/test_models.py) at a realistic CPU size, a float32 forward + backward of the
loss: native against ``handgrad.convert`` run under ``handgrad.enable()`` (the models call
``torch.nn.functional`` inside ``forward``); and ``torch.compile`` of both for one model.
"""
from __future__ import annotations

import torch

import handgrad
from handgrad.testing.models import MODELS

from .cases import Case, zero_grads

# family → (model sizes, data sizes, batch): ~1024 tokens a step for the transformers
# (batch 8 × 128 tokens; the ViT 16 images × 64 patches), width 256, 4 layers; a 32×32 CNN.
SIZES = {
    "resnet": (dict(classes=10, widths=(32, 64)), dict(classes=10, image=32), 16),
    "vit": (dict(d=256, heads=4, patch=4, image=32, classes=10, layers=4), dict(classes=10, image=32), 16),
    "gpt": (dict(vocab=1024, context=128, d=256, heads=4, layers=4), dict(vocab=1024, context=128), 8),
    "llama": (dict(vocab=1024, d=256, heads=4, kv_heads=2, hidden=688, layers=4), dict(vocab=1024, context=128), 8),
}
COMPILED = "gpt"           # the model whose torch.compile'd steps are compared: one block (inductor
COMPILED_SIZES = dict(layers=1)   # takes minutes a block on this CPU; the blocks are alike)


def _describe(name, model_sizes, data_sizes, batch):
    sizes = ", ".join(f"{k}={v}" for k, v in {**model_sizes, **data_sizes}.items())
    return f"{name}: batch {batch}" + (f", {sizes}" if sizes else " (the tests' sizes)")


def _models(name: str, device: str, quick: bool, **override):
    make, data = MODELS[name]
    model_sizes, data_sizes, batch = ({}, {}, 4) if quick else SIZES[name]
    model_sizes = {**model_sizes, **override}
    torch.manual_seed(0)
    native = make(**model_sizes).to(device)
    converted = handgrad.convert(native)            # a deep copy: equal values, its own Parameters
    x, y = (t.to(device) for t in data(batch, **data_sizes))
    return native, converted, (x, y), _describe(name, model_sizes, data_sizes, batch)


def _step(model, batch, enable: bool):
    params = list(model.parameters())

    def step():
        zero_grads(params)
        if enable:
            with handgrad.enable():
                loss = model(*batch)
        else:
            loss = model(*batch)
        loss.backward()

    return step


def model_case(name: str, device: str, quick: bool) -> Case:
    native, converted, batch, what = _models(name, device, quick)
    n = sum(p.numel() for p in native.parameters())
    return Case(f"model:{name}", f"{what}; {n / 1e6:.2f} M parameters; forward + backward of the loss, float32, "
                "training mode; handgrad = handgrad.convert(model) under handgrad.enable()",
                {"native": _step(native, batch, False), "handgrad": _step(converted, batch, True)})


def compiled_case(device: str, quick: bool) -> Case:
    """torch.compile of both models (the loss inside ``forward``; enable() around the call, so
    Dynamo traces handgrad's functions); --quick: aot_eager (the same graphs, no code generation)."""
    native, converted, batch, what = _models(COMPILED, device, quick, **COMPILED_SIZES)
    backend = "aot_eager" if quick else "inductor"
    cn, cc = (torch.compile(m, backend=backend) for m in (native, converted))
    steps = {"native": _step(cn, batch, False), "handgrad": _step(cc, batch, True)}
    return Case(f"model-compiled:{COMPILED}", f"torch.compile(backend={backend!r}) of {what}", steps)


def model_case_names() -> list[str]:
    return [f"model:{name}" for name in MODELS] + [f"model-compiled:{COMPILED}"]


def build_case(name: str, device: str, quick: bool) -> Case:
    kind, family = name.split(":")
    if kind == "model-compiled":
        return compiled_case(device, quick)
    return model_case(family, device, quick)
