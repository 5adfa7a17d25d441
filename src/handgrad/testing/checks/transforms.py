"""The checks of torch's transforms: vmap (``torch.func.vmap`` of the forward, batched gradients,
per-sample gradients, each against a loop) and compile (``torch.compile`` against eager)."""
from __future__ import annotations

import warnings

import torch

from ..._compat import OLD_DYNAMO_LIMITS, TorchLacks, dynamo_unsupported, torch_version
from ..report import CheckResult
from .jacobians import outputs, outputs_and_grads
from .measure import first_lines, locate, short
from .problem import VMAP_UNSUPPORTED, Ctx, Unsupported


def check_vmap(c: Ctx) -> CheckResult:
    B = 3
    w = c.worst("exact")
    n = len(c.diff)
    try:
        # (a) vmap of the forward over a batch of inputs, vs a loop.
        scales = (1.0, 0.5, 1.5)  # positive scalings keep every input in its domain
        stacked = [torch.stack([x * s for s in scales]) for x in c.diff]
        batched = outputs(torch.func.vmap(c.f, in_dims=(0,) * n)(*stacked))
        for b in range(B):
            with torch.no_grad():
                looped = outputs(c.f(*[s[b] for s in stacked]))
            for o, (bo, lo) in enumerate(zip(batched, looped)):
                w.add(bo[b], lo, f"vmap(fn)'s {c.out_label(o)}", locate(lo.shape, f"batch {b}: {c.out_label(o)}"))
        # (b) batched gradients: B output gradients in one backward (is_grads_batched).
        vb = c.grad_outputs(batch=B)
        xs = c.leaves()
        outs = outputs(c.f(*xs))
        pairs = [(o, v) for o, v in zip(outs, vb) if o.requires_grad]
        got = torch.autograd.grad([p[0] for p in pairs], xs, [p[1] for p in pairs], retain_graph=True,
                                  allow_unused=True, is_grads_batched=True)
        for b in range(B):
            one = torch.autograd.grad([p[0] for p in pairs], xs, [p[1][b] for p in pairs], retain_graph=True,
                                      allow_unused=True)
            for i, (gb, g1) in enumerate(zip(got, one)):
                if (gb is None) != (g1 is None):
                    w.add(torch.ones(1), torch.zeros(1), f"the batched gradient of {c.labels[i]}", locate((), "None vs a tensor"))
                elif gb is not None:
                    w.add(gb[b], g1, f"the batched gradient of {c.labels[i]}",
                          locate(g1.shape, f"batch {b}: {short(c.labels[i])}"))
        # (c) per-sample gradients: vmap over torch.func.vjp, vs a loop.
        v = c.grad_outputs()

        def vjp(*xs):
            outs, pull = torch.func.vjp(lambda *a: tuple(c.flat(c.f)(*a)), *xs)
            return pull(tuple(v))

        per_sample = torch.func.vmap(vjp, in_dims=(0,) * n)(*stacked)
        for b in range(B):
            _, ref = outputs_and_grads(c.f, [s[b].clone().requires_grad_(True) for s in stacked], v)
            for i, (ps, r) in enumerate(zip(per_sample, ref)):
                w.add(ps[b], torch.zeros_like(ps[b]) if r is None else r, f"the per-sample gradient of {c.labels[i]}",
                      locate(ps[b].shape, f"batch {b}: {short(c.labels[i])}"))
    except RuntimeError as e:
        if any(s in str(e) for s in VMAP_UNSUPPORTED):
            raise Unsupported(first_lines(e)) from e
        raise
    return w.result("vmap", "vmap vs a loop")


def check_compile(c: Ctx) -> CheckResult:
    v = c.grad_outputs()
    eager_out, eager_grads = outputs_and_grads(c.f, c.leaves(), v)
    notes = []
    torch.compiler.reset()
    with warnings.catch_warnings():
        # torch's own internals warn while tracing (torch.jit.script deprecation): not about fn
        warnings.simplefilter("ignore", DeprecationWarning)
        outs, grads = compile_and_run(c, v, notes)
    w = c.worst("exact")
    c.compare(w, outs, grads, eager_out, eager_grads)
    return w.result("compile", f"torch.compile(backend={c.options.compile_backend!r}) vs eager", notes)


def compile_and_run(c: Ctx, v: list[torch.Tensor], notes: list[str]):
    """Compiled outputs and gradients: in one graph (``fullgraph=True``), or, when Dynamo cannot
    (``_compat.dynamo_unsupported()``) and the check is not strict, with graph breaks."""
    try:
        try:
            compiled = torch.compile(c.f, backend=c.options.compile_backend, fullgraph=True)
            outs, grads = outputs_and_grads(compiled, c.leaves(), v)
        except dynamo_unsupported() as e:
            version, limits = OLD_DYNAMO_LIMITS
            if torch_version() < version and any(m in str(e) for m in limits):
                raise TorchLacks(f"torch {torch.__version__}'s Dynamo cannot trace this in one graph "
                                 f"(it can from torch {'.'.join(map(str, version))}): {first_lines(e, 1)}") from e
            if c.strict:
                raise Unsupported(f"Dynamo cannot trace fn in one graph (fullgraph=True): {first_lines(e)}") from e
            notes.append(f"Dynamo cannot trace fn in one graph, compared with fullgraph=False: {first_lines(e, 1)}")
            torch.compiler.reset()
            compiled = torch.compile(c.f, backend=c.options.compile_backend)
            outs, grads = outputs_and_grads(compiled, c.leaves(), v)
    finally:
        torch.compiler.reset()  # the next check compiles a new closure of the same code: no stale guards
    return outs, grads


