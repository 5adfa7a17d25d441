"""``python -m bench --quick`` as a smoke test: the suites' cases run, both sides, and the report
(tables and targets) is written. No timing assertions: timings on a shared CI machine are not a
test. A few cases only (one per suite and builder kind that matters), to keep the suite fast."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_path(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))


def _run(*args, tmp_path):
    out = tmp_path / "report.md"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return proc, out


def test_bench_quick_runs_a_case_of_each_suite(tmp_path):
    proc, out = _run("seed-sgd", "mlp-big", "op:relu:*", "op:cross_entropy:large", "model:resnet", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text in proc.stdout   # the same report on stdout
    for case in ("seed-sgd", "mlp-big", "model:resnet"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {case} |")]
        impls = {line.split("|")[2].strip() for line in rows}
        assert {"native", "handgrad"} <= impls, (case, impls)
        for line in rows:
            assert "n/a" not in line, f"a peak-memory measurement failed: {line}"
    assert "| mlp-big | gemm-floor |" in text
    op_rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| relu |")
               or line.startswith("| cross_entropy |")}
    assert set(op_rows) == {"relu", "cross_entropy"}
    assert " µs |" in op_rows["relu"] and "n/a" not in op_rows["relu"]          # the small size's extra per call
    assert "## Targets (issue 11)" in text
    assert "| seed network, batch-1 SGD step (seed-sgd) ≤ 1.0× native |" in text
    assert "| converted model resnet: ≤ 1.10× native step time (eager) |" in text


def test_every_catalogue_op_has_a_bench_builder(bench_path):
    from bench import ops
    from handgrad import catalogue

    assert ops.missing() == []
    labels = {name.split(":")[1].split("[")[0] for name in ops.op_case_names()}
    assert labels == {op.name for op in catalogue.ops()}


def test_a_new_kind_without_builder_is_a_clear_failure(bench_path, monkeypatch):
    from bench import ops
    from handgrad import catalogue

    assert catalogue.get("relu").kind == "activation" and "relu" not in ops.BUILDERS
    monkeypatch.delitem(ops.BUILDERS, "activation")
    assert "relu (kind activation)" in ops.missing()
    with pytest.raises(LookupError, match="no builder for catalogue op 'relu'"):
        ops.build_case("op:relu:small", "cpu", quick=True)


def test_partial_runs_select_less_than_the_full_run(bench_path):
    """A suite or a few cases select less than every case, so __main__ writes <device>-partial.md."""
    from bench import suites

    assert suites.select(["ops"]) != suites.all_names()
    assert suites.select(["op:relu:*"]) == ["op:relu:small", "op:relu:large"]
    assert suites.select([]) == suites.all_names() == suites.select(["all"])


def test_bench_rejects_an_unknown_case(capsys, bench_path):
    from bench.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main(["no-such-case", "--quick", "--no-memory"])
    assert exit_.value.code != 0 and "no-such-case" in capsys.readouterr().err
