"""``python -m bench [cases…] [--device cpu|cuda] [--threads N] [--quick]``.

Runs each case's native and handgrad training steps interleaved in one process, measures each
one's peak memory in a fresh process, prints a markdown table and writes it to
``bench/results/<device>.md`` (``--quick``: tiny sizes, a smoke test; it writes
``bench/results/<device>-quick.md`` so it never overwrites a real run).
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
    parser.add_argument("cases", nargs="*", help="cases to run (default: all): seed-sgd mlp-64 mlp-256 mlp-big lce compiled")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: a smoke test, not a measurement")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--out", type=Path, default=None, help="where to write the markdown (default bench/results/<device>[-quick].md)")
    parser.add_argument("--_memory", nargs=2, action="append", metavar=("CASE", "IMPL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    import torch

    torch.set_num_threads(args.threads)
    from .cases import CASES
    from .run import measure_memory_here, run

    if args._memory:
        peaks = [measure_memory_here(case, impl, args.device, args.quick) for case, impl in args._memory]
        print(json.dumps({"peak_bytes": peaks}))
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    names = args.cases or list(CASES)
    text, _ = run(names, args.device, args.threads, args.quick, memory=not args.no_memory)
    print(text)
    out = args.out or Path(__file__).parent / "results" / f"{args.device}{'-quick' if args.quick else ''}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    print(f"[bench] wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
