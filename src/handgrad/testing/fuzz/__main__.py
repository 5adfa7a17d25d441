"""``python -m handgrad.testing.fuzz [--seed S] [--calls N] [--seconds T] [--op NAME ...]`` runs
the fuzzer and prints its summary; ``--call OP:SEED`` reruns one call and prints what differs."""
from __future__ import annotations

import argparse
import sys

from . import check_call, run
from .call import describe
from .draw import draw_call


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m handgrad.testing.fuzz")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--seconds", type=float, default=None)
    p.add_argument("--op", action="append", default=None)
    p.add_argument("--call", default=None, help="OP:SEED, one call to redraw and compare")
    a = p.parse_args(argv)
    if a.call:
        op, seed = a.call.rsplit(":", 1)
        call = draw_call(op, int(seed))
        print(describe(call))
        mismatches = check_call(call)
        for m in mismatches:
            print(f"  {m.kind}: {m.detail}")
        print("  agrees" if not mismatches else "")
        return 1 if mismatches else 0
    report = run(a.seed, a.calls, a.seconds, a.op)
    print(report.summary())
    return 1 if report.disagreements else 0


if __name__ == "__main__":
    sys.exit(main())
