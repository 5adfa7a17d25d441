"""``python -m bench [suite|case|glob …] [--device cpu|cuda] [--threads N] [--quick]``.

Suites: ``seed`` (the seed's network, the first fused ops), ``ops`` (every catalogue op at a
small and a large size), ``models`` (the converted model families); none or ``all``: every
suite. Cases by name (``op:relu:large``, ``model:gpt``, ``mlp-64``) or glob (``op:*:small``).
Runs each case's native and handgrad steps interleaved in one process, measures peak memory in
fresh processes, prints a markdown report with the targets table, and writes it to
``bench/results/<device>.md`` for a full run (every suite, full size); a partial run (some
suites or cases) writes ``<device>-partial.md`` and ``--quick`` (tiny sizes, a smoke test)
``<device>-quick.md``, so neither overwrites the committed full results. Exit status 1 when a
case failed to build or run (its error is in the report).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["per-sample"]:  # per-sample gradients and DP-SGD: bench/per_sample.py, its own rows
        from .per_sample import main as per_sample_main

        return per_sample_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    parser.add_argument("cases", nargs="*", help="suites (seed, ops, models, all), case names or globs (default: all)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test, not a measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--list", action="store_true", help="print the selected case names and exit")
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write the markdown (default bench/results/<device>[-partial|-quick].md)")
    parser.add_argument("--_memory", nargs=2, action="append", metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from . import suites
    from .report import render
    from .run import measure_memory_here, run

    if args._memory:
        built: dict = {}
        peaks = [measure_memory_here(case, impl, args.device, args.quick, built) for case, impl in args._memory]
        print(json.dumps({"peak_bytes": peaks}))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    try:
        names = suites.select(args.cases)
    except ValueError as e:
        parser.error(str(e))
    if args.list:
        print("\n".join(names))
        return 0
    full = names == suites.all_names() and not args.quick
    result = run(names, args.device, args.threads, args.quick, memory=not args.no_memory)
    shown = [*args.cases, *(["--quick"] if args.quick else []), *([f"--device {args.device}"] if args.device != "cpu" else []),
             *([f"--threads {args.threads}"] if args.threads != 1 else [])]
    text = render(result, " ".join(shown))
    print(text)
    suffix = "-quick" if args.quick else "" if full else "-partial"
    out = args.out or Path(__file__).parent / "results" / f"{args.device}{suffix}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 1 if any(r.get("error") for r in result["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
