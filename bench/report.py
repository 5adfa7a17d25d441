"""The markdown report: one table per suite, then the targets of issue 11, each with its
measured value and whether it is met.

Every ratio is handgrad / native (lower is better). Targets are judged on the CPU-time ratio
(medians of this process's CPU time, interleaved rounds): on a shared machine the wall clock
also counts the time other processes held the core; both are shown.
"""
from __future__ import annotations

import platform
import re
import statistics
import time

import torch

from handgrad import catalogue

from .suites import suite_of

GEMM_KINDS = ("linear", "convolution", "fused")      # the "GEMM-bound ops"


def _mib(b) -> str:
    return "n/a" if b is None else f"{b / 2**20:.1f} MiB"


def _time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def cpu_ratio(r, ref="native"):
    t = r["timing"]
    return t["handgrad"].cpu_median_s / t[ref].cpu_median_s


def wall_ratio(r, ref="native"):
    t = r["timing"]
    return t["handgrad"].median_s / t[ref].median_s


def spread(r, ref="native") -> str:
    """p25–p75 of the per-round CPU-time ratios (round r's handgrad sample / its native one)."""
    t = r["timing"]
    ratios = sorted(h / n for h, n in zip(t["handgrad"].cpu_samples, t[ref].cpu_samples))
    if len(ratios) < 4:
        return f"{ratios[0]:.2f}–{ratios[-1]:.2f}"
    q = statistics.quantiles(ratios, n=4)
    return f"{q[0]:.2f}–{q[2]:.2f}"


def mem_ratio(r, ref="native"):
    m = r.get("memory", {})
    h, n = m.get("handgrad"), m.get(ref)
    return None if h is None or not n else h / n


def extra_us(r) -> float:
    t = r["timing"]
    return (t["handgrad"].cpu_median_s - t["native"].cpu_median_s) * 1e6


def _header(run: dict, argv: str) -> list[str]:
    device, quick = run["device"], run["quick"]
    return [
        f"# handgrad benchmarks: {device}{' (--quick: tiny sizes, not a measurement)' if quick else ''}",
        "",
        f"`python -m bench{' ' + argv if argv else ''}` · torch {torch.__version__} · Python {platform.python_version()} · "
        f"{platform.machine()} · {_device_name(device)} · {run['threads']} thread(s) · "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} · {run['elapsed']:.0f} s",
        "",
        "Float32, forward + backward. Times: median over interleaved rounds in one process (a round runs "
        "one sample of each implementation, in rotated order; a sample is the mean of k calls lasting "
        "~50 ms). Ratio = handgrad / native, lower is better; targets are judged on the CPU-time ratio "
        "(this process's CPU time, undisturbed by other processes holding the core), the wall-clock "
        "ratio is shown beside it; spread = p25–p75 of the per-round CPU-time ratios. Peak memory: one "
        "step in a fresh process, above what was held before it (CPU: peak resident set with glibc's "
        "MALLOC_MMAP_THRESHOLD_=65536, so freed blocks leave it; CUDA: max_memory_allocated).",
        "",
        f"Load: {run['load']}.",
    ]


def _ops_table(results) -> list[str]:
    by = {}
    for r in results:
        _, label, size = r["name"].split(":")
        by.setdefault(label, {})[size] = r
    lines = ["", "## Every catalogue op (`python -m bench ops`)", "",
             "Large: time ratio and peak memory ratio; small: the extra CPU time per forward + backward call.",
             "", "| op | large: native | ratio (CPU) | ratio (wall) | spread | peak memory: native | ratio "
             "| small: native | extra per call |", "|---|---|---|---|---|---|---|---|---|"]
    for label, sizes in by.items():
        cells = []
        large, small = sizes.get("large"), sizes.get("small")
        if large is None or large.get("error"):
            cells += [large["error"] if large else "—", "", "", "", "", ""]
        else:
            m = mem_ratio(large)
            cells += [_time(large["timing"]["native"].cpu_median_s), f"{cpu_ratio(large):.2f}",
                      f"{wall_ratio(large):.2f}", spread(large), _mib(large["memory"].get("native")),
                      "—" if m is None else f"{m:.2f}"]
        if small is None or small.get("error"):
            cells += [small["error"] if small else "—", ""]
        else:
            cells += [_time(small["timing"]["native"].cpu_median_s), f"{extra_us(small):+.1f} µs"]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Shapes:", ""]
    for label, sizes in by.items():
        whats = [f"{s} {r['case'].what.split(': ', 1)[1]}" for s, r in sizes.items() if r.get("case")]
        lines.append(f"- `{label}`: " + "; ".join(whats))
    return lines


def _steps_table(title, results) -> list[str]:
    lines = ["", title, "", "| case | implementation | median CPU time | ratio (CPU) | ratio (wall) | spread | "
             "peak memory | ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r.get("error"):
            lines.append(f"| {r['name']} | error: {r['error']} | | | | | | |")
            continue
        t, mem = r["timing"], r["memory"]
        for name, timing in t.items():
            base = name == "handgrad"
            m = mem_ratio(r, name) if not base and name in mem else None
            lines.append(f"| {r['name']} | {name} | {_time(timing.cpu_median_s)} | "
                         f"{'' if base else f'{cpu_ratio(r, name):.3f}'} | {'' if base else f'{wall_ratio(r, name):.3f}'} | "
                         f"{'' if base else spread(r, name)} | {_mib(mem[name]) if name in mem else '—'} | "
                         f"{'' if m is None else f'{m:.3f}'} |")
    lines += ["", "Cases:", ""]
    lines += [f"- `{r['name']}`: {r['case'].what}." + (f" {r['case'].note}." if r['case'].note else "")
              for r in results if r.get("case")]
    return lines


# ---- targets ----------------------------------------------------------------------------------

def _op_of(r):
    return catalogue.get(r["name"].split(":")[1].split("[")[0])


def _group_row(target, rows, value, limit, fmt, stretch=None):
    """One target over many ops: the worst value, how many meet it (and the stretch), which do not."""
    if not rows:
        return None
    vals = [(value(r), r["name"].split(":")[1]) for r in rows]
    worst = max(vals)
    miss = [f"{label} {fmt(v)}" for v, label in sorted(vals, reverse=True) if v > limit]
    met = len(vals) - len(miss)
    measured = f"worst {worst[1]} {fmt(worst[0])}; {met}/{len(vals)} met"
    if stretch is not None:
        measured += f", {sum(v <= stretch for v, _ in vals)}/{len(vals)} meet the stretch ({fmt(stretch)})"
    return target, measured, "yes" if not miss else "no: " + ", ".join(miss)


def _row(target, r, value, limit, fmt=lambda v: f"{v:.2f}×"):
    if r is None or r.get("error"):
        return None if r is None else (target, f"error: {r['error']}", "no")
    v = value(r)
    if v is None:
        return target, "not measured", "—"
    return target, fmt(v), "yes" if v <= limit else f"no (+{(v / limit - 1) * 100:.0f}%)"


def targets(results) -> list[tuple[str, str, str]]:
    ok = {r["name"]: r for r in results if not r.get("error")}
    get = {r["name"]: r for r in results}.get
    large = [r for n, r in ok.items() if n.startswith("op:") and n.endswith(":large")]
    small = [r for n, r in ok.items() if n.startswith("op:") and n.endswith(":small")]
    x = lambda v: f"{v:.2f}×"   # noqa: E731
    us = lambda v: f"{v:+.1f} µs"   # noqa: E731
    rows = [
        _group_row("every op, large size: GEMM-bound (linear, conv, fused) ≤ 1.05× native time",
                   [r for r in large if _op_of(r).kind in GEMM_KINDS], cpu_ratio, 1.05, x),
        _group_row("every op, large size: every other op ≤ 1.5× native time (stretch 1.2×)",
                   [r for r in large if _op_of(r).kind not in GEMM_KINDS], cpu_ratio, 1.5, x, stretch=1.2),
        _group_row("every op, small size: ≤ 20 µs more than native per call (stretch 10 µs)", small, extra_us, 20.0, us,
                   stretch=10.0),
    ]
    for n in (n for n in ok if n.startswith("model:")):
        rows.append(_row(f"converted model {n[6:]}: ≤ 1.10× native step time (eager)", ok[n], cpu_ratio, 1.10))
        rows.append(_row(f"converted model {n[6:]}: ≤ 1.0× native peak memory (eager)", ok[n], mem_ratio, 1.0))
    for n in (n for n in (r["name"] for r in results) if n.startswith("model-compiled:")):
        rows.append(_row(f"torch.compile of converted {n.split(':')[1]} ≤ 1.02× compile of native", get(n), cpu_ratio, 1.02))
    rows += [
        _row("seed network, batch-1 SGD step (seed-sgd) ≤ 1.0× native", get("seed-sgd"), cpu_ratio, 1.0),
        _row("seed network, batch-64 step (mlp-64) ≤ 1.0× native", get("mlp-64"), cpu_ratio, 1.0),
        _row("fused mlp peak memory ≤ 1.0× native (mlp-256)", get("mlp-256"), mem_ratio, 1.0),
        _row("fused mlp peak memory ≤ 1.0× native (mlp-big)", get("mlp-big"), mem_ratio, 1.0),
        _row("fused mlp peak memory ≤ 1.0× native (op mlp, large)", get("op:mlp:large"), mem_ratio, 1.0),
        _row("linear_cross_entropy ≤ 0.9× native time (lce)", get("lce"), cpu_ratio, 0.9),
        _row("linear_cross_entropy ≤ 5% of native memory (lce)", get("lce"), mem_ratio, 0.05, lambda v: f"{v * 100:.1f}%"),
        _row("scaled_dot_product_attention, causal, ≤ 1.0× native", get("op:scaled_dot_product_attention[causal]:large"),
             cpu_ratio, 1.0),
        _row("fused linear + activation (linear_act, large) ≤ 0.9× native", get("op:linear_act:large"), cpu_ratio, 0.9),
    ]
    return [r for r in rows if r is not None]


def render(run: dict, argv: str) -> str:
    results = run["results"]
    lines = _header(run, argv)
    rows = targets(results)
    lines += ["", "## Targets (issue 11)", "", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {t} | {m} | {met} |" for t, m, met in rows]
    groups = {"seed": [], "ops": [], "models": []}
    for r in results:
        groups[suite_of(r["name"])].append(r)
    if groups["ops"]:
        lines += _ops_table(groups["ops"])
    if groups["models"]:
        lines += _steps_table("## Converted models (`python -m bench models`)", groups["models"])
    if groups["seed"]:
        lines += _steps_table("## The seed's network and the first fused ops (`python -m bench seed`)", groups["seed"])
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
