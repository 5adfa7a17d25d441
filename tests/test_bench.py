"""`python -m bench --quick` as a smoke test: every case runs, both sides, and the report is
written. No timing assertions: timings on a shared CI machine are not a test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_runs_every_case(tmp_path):
    out = tmp_path / "cpu-quick.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout   # the same table on stdout
    for case in ("seed-sgd", "mlp-64", "mlp-256", "mlp-big", "lce", "compiled"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {case} |")]
        impls = {line.split("|")[2].strip() for line in rows}
        assert {"native", "handgrad"} <= impls, (case, impls)
        for line in rows:
            assert "n/a" not in line, f"a peak-memory measurement failed: {line}"
    assert "| mlp-big | gemm-floor |" in text
    assert "## Targets" in text


def test_bench_rejects_an_unknown_case(capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["no-such-case", "--quick", "--no-memory"])
    assert exit_.value.code != 0 and "no-such-case" in capsys.readouterr().err
