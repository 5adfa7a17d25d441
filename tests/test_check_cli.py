"""The ``handgrad-check`` command, run as users run it: in a subprocess (``python -m handgrad.check``)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from handgrad.check import main, representative_shape
from handgrad.testing import ALL
from handgrad.testing.registry import all_cases, get_case


def _run(*args: str, script: bool = False) -> subprocess.CompletedProcess:
    """``python -m handgrad.check ARGS``, or the installed console script ``handgrad-check ARGS``."""
    command = [shutil.which("handgrad-check")] if script else [sys.executable, "-m", "handgrad.check"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)


def test_only_linear_passes_and_writes_json(tmp_path):
    out = tmp_path / "report.json"
    proc = _run("--only", "linear", "--jobs", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    doc = json.loads(out.read_text())
    names = [r["name"] for r in doc["reports"]]
    # ``--only linear`` is the op and its registry variants, nothing else
    expected = [c for c in all_cases() if c.name.split("[")[0] == "linear"]
    assert names == [c.id(representative_shape(c)) for c in expected]
    assert doc["ok"] is True and doc["checks"] == list(ALL)
    for r in doc["reports"]:
        statuses = {c["name"]: c["status"] for c in r["checks"]}
        assert set(statuses.values()) == {"pass"}, (r["name"], statuses)
    # the table: one row per op, a column per check, and the summary line
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:3] == ["op", "grad", "gradgrad"]
    assert any(line.startswith(names[0]) for line in lines)
    assert lines[-1].startswith(f"OK: {len(names)} ops × {len(ALL)} checks on cpu: {len(ALL) * len(names)} passed, 0 failed")


def test_broken_user_factory_fails_with_a_precise_message(tmp_path):
    out = tmp_path / "r.json"
    proc = _run("handgrad.testing.examples:transposed_weight_grad", "--checks", "gradcheck,needs_grad", "--json", str(out),
                script=shutil.which("handgrad-check") is not None)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAIL gradcheck: backward vs finite differences: the gradient of weight (argument 1) is wrong" in proc.stdout
    assert proc.stdout.splitlines()[-1].startswith("FAILED: 1 function × 2 checks on cpu: 1 passed, 1 failed")
    doc = json.loads(out.read_text())
    (report,) = doc["reports"]
    assert report["ok"] is False
    gradcheck = report["checks"][0]
    assert gradcheck["status"] == "fail" and gradcheck["subject"] == "the gradient of weight (argument 1)"
    assert abs(gradcheck["got"] - gradcheck["expected"]) > 0.1  # O(1) weights: off by O(1), not by rounding


USER_MODULE = '''
import torch


class Cube(torch.autograd.Function):
    """y = x³, ∂L/∂x = 3x² G."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x ** 3

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.save_for_forward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return {scale} * x * x * g

    @staticmethod
    def jvp(ctx, dx):
        (x,) = ctx.saved_tensors
        return 3 * x * x * dx


def factory():
    return Cube, (torch.randn(4, 3),), lambda x: x ** 3


def two():
    return Cube.apply, [torch.randn(2, 2)]
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """Writes a user's module into an empty working directory; yields a function making one."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    written = []

    def write(name: str, scale: str = "3") -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(USER_MODULE).replace("{scale}", scale))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("scale,status", [("3", 0), ("2", 1)])
def test_user_factory_from_the_working_directory(user_module, capsys, scale, status):
    """In-process (``main(argv)``), as the console script calls it; the module is found in the cwd."""
    name = user_module(f"my_cube_{scale}", scale)
    rc = main([f"{name}:factory", "--checks", "gradcheck,gradgradcheck,forward_ad,vmap,reference,needs_grad"])
    out = capsys.readouterr().out
    assert rc == status, out
    if status:  # 2x²G instead of 3x²G: off by a third of the truth, everywhere
        assert "the gradient of x (argument 0) is wrong" in out and "off by" in out and "relative 0.333" in out, out


def test_factory_returning_two_values_and_a_list(user_module, capsys):
    name = user_module("my_cube_two")
    assert main([f"{name}:two", "--checks", "gradcheck,reference"]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(f"{name}:two"))
    assert row.split()[1:3] == ["ok", "skip"]  # gradcheck passes; no reference to compare with


@pytest.mark.parametrize("args,message", [
    (("--checks", "gradcheck,nope"), "unknown checks"),
    (("--only", "no_such_op"), "no op matches"),
    (("not_a_spec",), "expected MODULE:FACTORY"),
    (("no_such_module_xyz:f",), "cannot load"),
    (("handgrad.testing.examples:MyLinear",), "is the class MyLinear; it must be a function of no arguments returning"),
    # torch's decorator, imported in that module: it takes a function, a factory takes nothing
    (("handgrad.testing.examples:once_differentiable",), "takes arguments (fn); it must be a function of no arguments"),
    (("torch.nn.functional:linear",), "cannot be called without arguments"),  # a builtin: no signature to read
    (("handgrad.testing.examples:__all__",), "is a list; it must be a function of no arguments"),
    (("handgrad.testing.examples:_inputs",), "returned (Tensor, Tensor, Tensor); fn must be"),
])
def test_bad_arguments(capsys, args, message):
    try:
        rc = main(list(args))
    except SystemExit as e:
        rc = e.code
    assert rc == 2
    assert message in capsys.readouterr().err


def test_registry_run_prints_no_warnings_and_counts_no_skips():
    """What a user sees of handgrad's own ops: no warnings they cannot act on (the vmap check of
    the fused cross-entropy used an in-place scatter that vmap cannot batch; the broadcast-target
    mse_loss case warns as torch does, on purpose), and no skip in the strict run: the
    ``dtype=float64`` softmax variants have no lower precision, so ``lowp`` does not apply."""
    proc = _run("--only", "linear_cross_entropy,mse_loss,softmax[dtype=float64]", "--jobs", "1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("softmax[dtype=float64]"))
    assert row.split()[1:10] == ["ok", "ok", "ok", "ok", "ok", "ok", "-", "ok", "ok"]  # lowp: not applicable
    assert ", 0 failed, 0 skipped, " in proc.stdout.splitlines()[-1]


def test_representative_shape_is_small_and_batched():
    case = get_case("linear")
    assert representative_shape(case) == (2, 3)
    for c in all_cases():
        shape = representative_shape(c)
        assert shape in c.shapes and all(d > 0 for d in shape)
