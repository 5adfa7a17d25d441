"""Timing (interleaved, in one process) and peak memory (one fresh process per case and
implementation), and the markdown report."""
from __future__ import annotations

import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

from .cases import CASES, Case

# Targets of the issue (ratios handgrad/reference, lower is better): case → [(what, reference row, max)]
TIME_TARGETS = {
    "seed-sgd": [("time", "native", 0.9)],
    "mlp-64": [("time", "native", 1.0)],
    "mlp-256": [("time", "native", 1.0)],
    "mlp-big": [("time", "native", 1.0), ("time", "gemm-floor", 1.15)],
    "lce": [("time", "native", 1.0)],
    "compiled": [("time", "native", 1.05)],
}
MEMORY_TARGETS = {
    "mlp-256": [("peak memory", "native", 1.0)],
    "mlp-big": [("peak memory", "native", 1.0)],
    "lce": [("peak memory", "torch-chunked", 1.0), ("peak memory", "native", 0.10)],
}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_s: float          # wall clock
    cpu_median_s: float      # CPU time of this process (robust to other processes' load)
    samples: list[float]
    steps_per_sample: int


def time_case(case: Case, device: str, quick: bool) -> dict[str, Timing]:
    """Every implementation (and floor) of ``case``, interleaved: round r runs one sample of
    each, in an order rotated every round, so drift (turbo, other load) hits all alike.
    A sample is the mean of k consecutive steps, k chosen so a sample lasts ~50 ms (10 ms with
    --quick), 15 rounds (7 rounds of single steps where a step takes over 0.2 s); the report
    gives the median sample."""
    fns = {**case.steps, **case.floors}
    for fn in fns.values():                       # warm up: lazy init, allocator, compile
        fn()
    _sync(device)
    first = next(iter(fns.values()))
    t0 = time.perf_counter()
    first()
    _sync(device)
    step_s = time.perf_counter() - t0
    slow = step_s > 0.2                           # mlp-big, lce: seconds a step
    if not quick and not slow:
        for fn in fns.values():
            for _ in range(2):
                fn()
    rounds, sample_s = (3, 0.01) if quick else ((11, 0.0) if slow else (15, 0.05))
    k = max(1, int(sample_s / max(step_s, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    cpu: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            fn = fns[name]
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(k):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - t0) / k)
            cpu[name].append((time.process_time() - c0) / k)
    return {name: Timing(statistics.median(s), statistics.median(cpu[name]), s, k) for name, s in samples.items()}


# ---- peak memory, in a fresh process --------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def measure_memory_here(case_name: str, impl: str, device: str, quick: bool) -> int:
    """Peak memory of one step of ``impl`` above the memory held before it, in bytes: on CPU
    the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set
    just before the step; on CUDA ``torch.cuda.max_memory_allocated`` above
    ``memory_allocated``. One warm-up step first, so lazy initialisation is not counted."""
    case = CASES[case_name](device, quick)
    step = case.steps[impl]
    step()                                        # warm-up (lazy init, thread pools)
    for p in _leaves(case):
        p.grad = None
    gc.collect()
    _sync(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated() - base
    base = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # VmHWM := VmRSS
    step()
    return (_status_kib("VmHWM") - base) * 1024


def _leaves(case: Case):
    """The tensors whose .grad a warm-up step filled (found through the steps' closures)."""
    found = []
    for fn in case.steps.values():
        for cell in fn.__closure__ or ():
            v = cell.cell_contents
            if isinstance(v, list) and v and all(isinstance(p, torch.Tensor) for p in v):
                found += v
            elif isinstance(v, tuple) and v and all(isinstance(p, torch.Tensor) for p in v):
                found += list(v)
            elif isinstance(v, torch.Tensor) and v.requires_grad:
                found.append(v)
    return found


def measure_memory(pairs: list[tuple[str, str]], device: str, threads: int, quick: bool) -> list[int | None]:
    """Peak memory of each (case, implementation), each in a fresh process (``--quick``: all in
    one process, a smoke test of the same code)."""
    if quick and len(pairs) > 1:
        groups = [pairs]
    else:
        groups = [[p] for p in pairs]
    out: list[int | None] = []
    for group in groups:
        cmd = [sys.executable, "-m", "bench", "--device", device, "--threads", str(threads)]
        for case_name, impl in group:
            cmd += ["--_memory", case_name, impl]
        if quick:
            cmd.append("--quick")
        # glibc keeps freed blocks below its (self-raising) mmap threshold in the heap, so a
        # step could reuse the warm-up's freed memory unseen by the resident set; a fixed
        # threshold maps every block of 64 KiB or more on its own and unmaps it when freed.
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MALLOC_MMAP_THRESHOLD_": "65536"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if proc.returncode != 0:
            print(f"memory measurement of {group} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            out += [None] * len(group)
            continue
        values = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
        out += values
    return out


# ---- report -----------------------------------------------------------------------------------

def _fmt_time(s: float) -> str:
    return f"{s * 1e3:.3f} ms" if s < 1 else f"{s:.3f} s"


def _fmt_mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def report(results: list[dict], device: str, threads: int, quick: bool, elapsed: float, load: str) -> str:
    lines = [
        f"# handgrad benchmarks: {device}{' (--quick: tiny sizes, not a measurement)' if quick else ''}",
        "",
        f"`python -m bench --device {device} --threads {threads}{' --quick' if quick else ''}` · torch {torch.__version__} · "
        f"Python {platform.python_version()} · {platform.machine()} · {_device_name(device)} · "
        f"{threads} thread(s) · {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {elapsed:.0f} s",
        "",
        "Float32 training steps (forward + backward). Times: median over interleaved samples in one "
        "process (each sample the mean of k steps); ratio = handgrad / the row named; the targets are "
        "judged on wall time, the CPU-time ratio (medians of this process's CPU time) is shown beside "
        "it because it is less disturbed by other processes on a shared machine. Peak memory: "
        "one step in a fresh process, above what was held before it (CPU: peak resident set, with "
        "glibc's MALLOC_MMAP_THRESHOLD_=65536 so freed blocks leave it; CUDA: max_memory_allocated). "
        "Lower ratios are better.",
        "",
        f"Load: {load}",
        "",
        "| case | implementation | median time | handgrad / this | CPU time: handgrad / this | peak memory | handgrad / this |",
        "|---|---|---|---|---|---|---|",
    ]
    for res in results:
        t, mem = res["timing"], res["memory"]
        ht, hm = t["handgrad"].median_s, mem.get("handgrad")
        for name, timing in t.items():
            tr = "" if name == "handgrad" else f"{ht / timing.median_s:.3f}"
            cr = "" if name == "handgrad" else f"{t['handgrad'].cpu_median_s / timing.cpu_median_s:.3f}"
            m = mem.get(name)
            mr = "" if name == "handgrad" or m in (None, 0) or hm is None else f"{hm / m:.3f}"
            lines.append(f"| {res['case'].name} | {name} | {_fmt_time(timing.median_s)} | {tr} | {cr} | "
                         f"{_fmt_mib(m) if name in mem else '—'} | {mr} |")
    lines += ["", "Cases:", ""]
    for res in results:
        c = res["case"]
        lines.append(f"- `{c.name}`: {c.what}." + (f" {c.note}." if c.note else ""))
    lines += ["", "## Targets", "", "| case | target | measured | met |", "|---|---|---|---|"]
    for res in results:
        name, t, mem = res["case"].name, res["timing"], res["memory"]
        for what, ref, limit in TIME_TARGETS.get(name, []):
            if ref in t:
                r = t["handgrad"].median_s / t[ref].median_s
                lines.append(f"| {name} | {what} ≤ {limit} × {ref} | {r:.3f} | {'yes' if r <= limit else f'no (+{(r / limit - 1) * 100:.0f}%)'} |")
        for what, ref, limit in MEMORY_TARGETS.get(name, []):
            if mem.get(ref) and mem.get("handgrad") is not None:
                r = mem["handgrad"] / mem[ref]
                lines.append(f"| {name} | {what} ≤ {limit} × {ref} | {r:.3f} | {'yes' if r <= limit else f'no (+{(r / limit - 1) * 100:.0f}%)'} |")
    return "\n".join(lines) + "\n"


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
        return m.group(1).strip() if m else platform.processor()
    except OSError:
        return platform.processor() or "cpu"


def load_note() -> str:
    """What else ran on the machine: the load average against the core count."""
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores at the end of the run"
    except OSError:
        return "unknown"


def run(names: list[str], device: str, threads: int, quick: bool, memory: bool = True) -> tuple[str, list[dict]]:
    start = time.perf_counter()
    results = []
    for name in names:
        case = CASES[name](device, quick)
        print(f"[bench] {name} …", file=sys.stderr, flush=True)
        timing = time_case(case, device, quick)
        results.append({"case": case, "timing": timing, "memory": {}})
        gc.collect()
    if memory:
        # not for `compiled` (no memory target; each fresh process would compile again)
        pairs = [(res["case"].name, impl) for res in results for impl in res["case"].steps if res["case"].name != "compiled"]
        print(f"[bench] peak memory: {len(pairs)} measurements …", file=sys.stderr, flush=True)
        for (name, impl), peak in zip(pairs, measure_memory(pairs, device, threads, quick)):
            next(r for r in results if r["case"].name == name)["memory"][impl] = peak
    return report(results, device, threads, quick, time.perf_counter() - start, load_note()), results
