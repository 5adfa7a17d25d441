"""Timing (interleaved, in one process) and peak memory (in fresh processes); the report is
bench.report's."""
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

from . import suites
from .cases import Case


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    median_s: float          # wall clock
    cpu_median_s: float      # CPU time of this process (robust to other processes' load)
    samples: list[float]
    cpu_samples: list[float]  # one per round, in round order (the per-round ratios give the spread)
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
    return {name: Timing(statistics.median(s), statistics.median(cpu[name]), s, cpu[name], k) for name, s in samples.items()}


# ---- peak memory, in a fresh process --------------------------------------------------------

def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{key}:\s+(\d+)", f.read(), re.M).group(1))


def measure_memory_here(case_name: str, impl: str, device: str, quick: bool, built: dict | None = None) -> int:
    """Peak memory of one step of ``impl`` above the memory held before it, in bytes: on CPU
    the peak resident set (VmHWM, reset through /proc/self/clear_refs) above the resident set
    just before the step; on CUDA ``torch.cuda.max_memory_allocated`` above
    ``memory_allocated``. One warm-up step first, so lazy initialisation is not counted."""
    built = {} if built is None else built
    if case_name not in built:
        built.clear()                             # one case alive at a time
        built[case_name] = suites.build(case_name, device, quick)
    case = built[case_name]
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
            if isinstance(v, (list, tuple)) and v and all(isinstance(p, torch.Tensor) for p in v):
                found += list(v)
            elif isinstance(v, torch.Tensor) and v.requires_grad:
                found.append(v)
    return found


def measure_memory(groups: list[list[tuple[str, str]]], device: str, threads: int, quick: bool) -> dict:
    """Peak memory of each (case, implementation), each group in a fresh process (``--quick``:
    all in one process, a smoke test of the same code): {(case, impl): bytes or None}."""
    if quick and len(groups) > 1:
        groups = [[p for g in groups for p in g]]
    out: dict = {}
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
            values = [None] * len(group)
        else:
            values = json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]
        out.update(zip(group, values))
    return out


def load_note() -> str:
    """What else ran on the machine: the load average against the core count."""
    try:
        one, five, _ = os.getloadavg()
        return f"load average {one:.2f} (1 min), {five:.2f} (5 min) on {os.cpu_count()} cores"
    except OSError:
        return "unknown"


def run(names: list[str], device: str, threads: int, quick: bool, memory: bool = True) -> dict:
    """Every case named, timed in turn, then the peak memory of each step; a case that fails to
    build or run is reported with its error rather than ending the run."""
    start = time.perf_counter()
    load_start = load_note()
    results = []
    for i, name in enumerate(names):
        print(f"[bench] {i + 1}/{len(names)} {name} …", file=sys.stderr, flush=True)
        try:
            case = suites.build(name, device, quick)
            timing = time_case(case, device, quick)
        except Exception as e:                    # noqa: BLE001 - reported in the table
            results.append({"name": name, "case": None, "error": f"{type(e).__name__}: {e}".splitlines()[0][:300]})
            print(f"[bench] {name} failed: {results[-1]['error']}", file=sys.stderr, flush=True)
            continue
        results.append({"name": name, "case": case, "timing": timing, "memory": {}, "error": None})
        # the steps hold their tensors; keep only what the report reads
        results[-1]["case"] = Case(case.name, case.what, dict.fromkeys(case.steps), dict.fromkeys(case.floors), case.note)
        del case
        gc.collect()
    if memory:
        groups = suites.memory_groups([r["case"] for r in results if r["case"] is not None])
        print(f"[bench] peak memory: {sum(map(len, groups))} measurements in {len(groups)} processes …",
              file=sys.stderr, flush=True)
        peaks = measure_memory(groups, device, threads, quick)
        for r in results:
            if r["case"] is not None:
                r["memory"] = {impl: peaks[(r["name"], impl)] for impl in r["case"].steps if (r["name"], impl) in peaks}
    return {"results": results, "device": device, "threads": threads, "quick": quick,
            "elapsed": time.perf_counter() - start, "load": f"{load_start} at the start, {load_note()} at the end"}
