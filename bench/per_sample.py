"""``python -m bench per-sample [--quick] [--no-memory]``: per-sample norms, gradients and DP-SGD steps.

On one model, float32, each step a forward and backward from gradients set to None:

* ``plain``: the handgrad model's ordinary training step (the baseline of ``norms``);
* ``norms``: the same inside ``per_sample.capture(grads=False)``, then ``norms(model)``;
* ``grads``: inside ``capture(grads=True)``: ``p.grad_sample`` (N, *p.shape) for every parameter;
* ``torch.func``: ``vmap(grad(Cⁿ))`` over the torch model (``functional_call``): the same gradients;
* ``opacus``: Opacus's ``GradSampleModule`` hooks on the torch model: ``p.grad_sample`` too;
* ``dp-grads`` / ``dp-ghost`` / ``opacus-dp``: one whole DP-SGD step (clip, noise, SGD) by
  ``handgrad.dp.DPOptimizer`` fed by ``grads=True``, by ghost clipping, and Opacus's DPOptimizer.

Times are interleaved in one process (``bench.run.time_case``); peak memory is one step in a
fresh process (``bench.run``'s method). Writes ``bench/results/per-sample-<device>[-quick].md``.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as TF
from torch import nn

from .run import Case, _status_kib, _sync, load_note, time_case

# the targets: (row, reference row, measure, max ratio row / reference)
TARGETS = [("norms", "plain", "time", 1.15), ("grads", "torch.func", "time", 1.0), ("grads", "opacus", "time", 1.0),
           ("grads", "torch.func", "peak memory", 1.0), ("grads", "opacus", "peak memory", 1.0)]


def _mlp(quick: bool):
    d, h, n = (32, 64, 16) if quick else (784, 256, 128)
    model = nn.Sequential(nn.Linear(d, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    return f"MLP {d}-{h}-{h}-10 (tanh), cross-entropy, batch {n}", model, (torch.randn(n, d), torch.randint(0, 10, (n,)))


def _cnn(quick: bool):
    c, n = (4, 8) if quick else (16, 64)
    model = nn.Sequential(nn.Conv2d(1, c, 3, padding=1), nn.GroupNorm(4, c), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Conv2d(c, 2 * c, 3, padding=1), nn.GroupNorm(4, 2 * c), nn.ReLU(), nn.AvgPool2d(2),
                          nn.Flatten(), nn.Linear(2 * c * 7 * 7, 10))
    return (f"CNN 1×28×28 → conv3×3 {c} → GroupNorm → ReLU → pool → conv3×3 {2 * c} → GroupNorm → ReLU → pool → "
            f"linear 10, cross-entropy, batch {n}", model, (torch.randn(n, 1, 28, 28), torch.randint(0, 10, (n,))))


class _Tokens(nn.Module):
    """Embedding → LayerNorm → Linear-GELU-Linear per token → mean over T → Linear: (N, T) ids → (N, 10)."""

    def __init__(self, vocab: int, d: int):
        super().__init__()
        self.emb, self.norm = nn.Embedding(vocab, d), nn.LayerNorm(d)
        self.up, self.down, self.head = nn.Linear(d, 4 * d), nn.Linear(4 * d, d), nn.Linear(d, 10)

    def forward(self, ids):
        h = self.norm(self.emb(ids))                          # (N, T, D)
        h = h + self.down(TF.gelu(self.up(h)))                # (N, T, D)
        return self.head(h.mean(1))                           # (N, 10)


def _tokens(quick: bool):
    v, d, t, n = (50, 16, 8, 4) if quick else (1000, 64, 32, 32)
    return (f"tokens: embedding {v}×{d} → LayerNorm → MLP {d}-{4 * d}-{d} per token (T={t}) → mean → linear 10, "
            f"batch {n}", _Tokens(v, d), (torch.randint(0, v, (n, t)), torch.randint(0, 10, (n,))))


MODELS = {"mlp": _mlp, "cnn": _cnn, "tokens": _tokens}


def build(name: str, quick: bool) -> Case:
    """The rows of one model, every one on the same initial weights and batch."""
    import handgrad
    from handgrad import dp, per_sample
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer as OpacusDPOptimizer
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    what, native, (x, y) = MODELS[name](quick)
    ours = handgrad.convert(native)  # a copy, as each model below: the same weights
    reference = copy.deepcopy(native)  # torch.func's, free of Opacus's hooks
    theirs = GradSampleModule(copy.deepcopy(native), loss_reduction="mean")

    def cleared(model: nn.Module, fn: Callable[[], None]) -> Callable[[], None]:
        params = list(model.parameters())

        def step():
            for p in params:
                p.grad = None
                p.grad_sample = None
            fn()
        return step

    def plain():
        TF.cross_entropy(ours(x), y).backward()

    def captured(grads: bool):
        def step():
            with per_sample.capture(ours, grads=grads):
                TF.cross_entropy(ours(x), y).backward()
            if not grads:
                per_sample.norms(ours)
        return step

    params = {k: v.detach() for k, v in reference.named_parameters()}

    def loss_n(p, xn, yn):  # Cⁿ / N, as the mean's share
        return TF.cross_entropy(functional_call(reference, p, (xn[None],)), yn[None]) / len(x)

    per_sample_grads = vmap(grad(loss_n), in_dims=(None, 0, 0))

    def opacus_grads():
        TF.cross_entropy(theirs(x), y).backward()

    kw = dict(noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=len(x), loss_reduction="mean")
    ours_dp = dp.DPOptimizer(torch.optim.SGD(ours.parameters(), lr=0.01), ours, **kw)
    theirs_dp = OpacusDPOptimizer(torch.optim.SGD(theirs.parameters(), lr=0.01), **kw)

    def dp_grads():
        ours_dp.zero_grad()  # a training loop's (the other rows' captures of the same model are no batch of its)
        with per_sample.capture(ours):
            TF.cross_entropy(ours(x), y).backward()
        ours_dp.step()

    def dp_ghost():
        ours_dp.zero_grad()
        ours_dp.backward(lambda: TF.cross_entropy(ours(x), y, reduction="none"))
        ours_dp.step()

    def opacus_dp():
        TF.cross_entropy(theirs(x), y).backward()
        theirs_dp.step()
        theirs_dp.zero_grad()

    steps = {"plain": cleared(ours, plain), "norms": cleared(ours, captured(False)),
             "grads": cleared(ours, captured(True)), "torch.func": lambda: per_sample_grads(params, x, y),
             "opacus": cleared(theirs, opacus_grads), "dp-grads": cleared(ours, dp_grads),
             "dp-ghost": cleared(ours, dp_ghost), "opacus-dp": cleared(theirs, opacus_dp)}
    case = Case(name, what, steps)
    case.params = [p for m in (ours, theirs, reference) for p in m.parameters()]  # what peak_here clears
    return case


def peak_here(name: str, row: str, quick: bool) -> int:
    """Bytes of peak resident set one step of ``row`` adds (after a warm-up step), as ``bench.run``
    measures it: VmHWM reset to VmRSS through /proc/self/clear_refs, then one step."""
    case = build(name, quick)
    step = case.steps[row]
    step()
    for p in case.params:  # the warm-up's gradients would otherwise be counted in the base, not the peak
        p.grad = p.grad_sample = None
    gc.collect()
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    step()
    return (_status_kib("VmHWM") - base) * 1024


def peaks(name: str, rows: list[str], quick: bool) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}  # bench.run's reason
    for row in rows:
        cmd = [sys.executable, "-m", "bench", "per-sample", "--_memory", name, row] + (["--quick"] if quick else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900,
                              cwd=Path(__file__).resolve().parents[1])
        if proc.returncode != 0:
            print(f"memory of {name}/{row} failed:\n{proc.stderr[-1500:]}", file=sys.stderr)
            out[row] = None
            continue
        out[row] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def report(results: list[tuple[Case, dict, dict]], quick: bool, seconds: float) -> str:
    mib = lambda b: "n/a" if b is None else f"{b / 2**20:.1f} MiB"  # noqa: E731
    lines = [f"# per-sample gradients and DP-SGD: cpu{' (--quick: tiny sizes, not a measurement)' if quick else ''}", "",
             f"`python -m bench per-sample{' --quick' if quick else ''}` · torch {torch.__version__} · Python "
             f"{platform.python_version()} · {platform.machine()} · 1 thread · "
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {seconds:.0f} s", "",
             "Float32, one forward and backward per step from gradients set to None (rows: bench/per_sample.py's "
             "docstring). Times: median of interleaved samples in one process, wall and CPU time; peak memory: "
             "one step in a fresh process above what it held before (peak resident set).", "",
             f"Load: {load_note()}", "",
             "| model | row | median time | CPU time | peak memory |", "|---|---|---|---|---|"]
    for case, t, mem in results:
        for row, timing in t.items():
            lines.append(f"| {case.name} | {row} | {timing.median_s * 1e3:.3f} ms | {timing.cpu_median_s * 1e3:.3f} ms | "
                         f"{mib(mem.get(row)) if mem else '—'} |")
    lines += ["", "Models:", ""] + [f"- `{c.name}`: {c.what}." for c, _, _ in results]
    lines += ["", "## Ratios and targets", "", "| model | ratio | wall | CPU | target | met (wall) |", "|---|---|---|---|---|---|"]
    for case, t, mem in results:
        for row, ref, what, limit in TARGETS:
            if what == "time":
                r, rc = t[row].median_s / t[ref].median_s, t[row].cpu_median_s / t[ref].cpu_median_s
                cells = f"{r:.3f} | {rc:.3f}"
            elif mem and mem.get(row) and mem.get(ref):
                r = mem[row] / mem[ref]
                cells = f"{r:.3f} | —"
            else:
                continue
            lines.append(f"| {case.name} | {row} / {ref} ({what}) | {cells} | ≤ {limit} | "
                         f"{'yes' if r <= limit else f'no (+{(r / limit - 1) * 100:.0f}%)'} |")
        for row, ref in (("dp-ghost", "dp-grads"), ("dp-grads", "opacus-dp"), ("dp-ghost", "opacus-dp")):
            mr = f"{mem[row] / mem[ref]:.3f}" if mem and mem.get(row) and mem.get(ref) else "—"
            lines.append(f"| {case.name} | {row} / {ref} (time; memory {mr}) | {t[row].median_s / t[ref].median_s:.3f} | "
                         f"{t[row].cpu_median_s / t[ref].cpu_median_s:.3f} | (measured) | |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench per-sample", description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", help=f"models (default: all): {' '.join(MODELS)}")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--_memory", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args._memory:
        print(json.dumps(peak_here(*args._memory, args.quick)))
        return 0
    t0 = time.perf_counter()
    results = []
    for name in args.models or list(MODELS):
        case = build(name, args.quick)
        timing = time_case(case, "cpu", args.quick)
        _sync("cpu")
        mem = {} if args.no_memory else peaks(name, list(case.steps), args.quick)
        results.append((case, timing, mem))
    text = report(results, args.quick, time.perf_counter() - t0)
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"per-sample-cpu{'-quick' if args.quick else ''}.md"
    out.write_text(text)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0
