"""``python -m train compare RUN [RUN ...] [--out FILE]``: several runs' curves on one figure.

Each RUN is a version directory (``runs/seed_sgd/version_0``) or a run name directory
(``runs/seed_sgd``, whose newest version with a ``curves.csv`` is taken). Loss and accuracy per
epoch: one colour per run, train dashed, val solid. Prints each run's last-epoch values.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from .callbacks import CURVE_KEYS, plot_runs, read_history

__all__ = ["main", "resolve_run"]


def resolve_run(path: str | Path) -> Path:
    """The ``curves.csv`` of a version directory, or of the newest version under a run directory."""
    path = Path(path)
    if (path / "curves.csv").is_file():
        return path / "curves.csv"
    versions = sorted(path.glob("version_*/curves.csv"), key=lambda p: int(p.parent.name.split("_")[-1]))
    if versions:
        return versions[-1]
    raise SystemExit(f"error: {path}: no curves.csv here or in {path}/version_*/ (it is written when fit ends)")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m train compare", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="version or run directories, e.g. runs/seed_sgd runs/seed_batch")
    p.add_argument("--out", default="runs/compare.png", help="figure to write (default: runs/compare.png)")
    p.add_argument("--labels", nargs="*", help="legend labels, one per run (default: the run's name/version)")
    a = p.parse_args(argv)
    if a.labels and len(a.labels) != len(a.runs):
        p.error(f"--labels got {len(a.labels)} labels for {len(a.runs)} runs")
    files = [resolve_run(r) for r in a.runs]
    labels = a.labels or [f"{f.parent.parent.name}/{f.parent.name}" for f in files]
    if len(set(labels)) < len(labels):
        labels = [f"{lab} ({i})" for i, lab in enumerate(labels)]
    runs = {lab: read_history(f) for lab, f in zip(labels, files)}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    plot_runs(runs, out, title=" vs ".join(labels))
    width = max(len(lab) for lab in labels)
    print(f"{'run':<{width}}  epochs  " + "  ".join(f"{k:>10}" for k in CURVE_KEYS))
    for lab, hist in runs.items():
        last = hist[-1] if hist else {}
        vals = "  ".join(f"{last[k]:>10.4f}" if k in last else f"{'-':>10}" for k in CURVE_KEYS)
        print(f"{lab:<{width}}  {len(hist):>6}  {vals}")
    print(f"figure: {out}")
