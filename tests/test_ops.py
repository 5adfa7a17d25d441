"""Every op in the registry (handgrad.testing.registry) through handgrad.testing, the engine
``handgrad-check`` runs: one test per check per case (and shape), and a failure prints the
check's report, as ``handgrad-check`` does.

The cheap checks run on every shape of a case (tiny, odd, batched, empty); the costly ones
(gradgradcheck: the full Jacobian of the backward; vmap: a batch and a loop; compile: a Dynamo
trace) on the case's representative shape, the one ``handgrad-check`` uses. ``bad_inputs`` does
not depend on the shape: once per case that has some; ``lowp`` for the cases checked in a low
precision. What each check asserts is in ``handgrad.testing.checks``."""
from __future__ import annotations


import pytest

from conftest import DEVICES
from handgrad.testing.checks import ALL, applies, check_case, representative_shape
from handgrad.testing.registry import all_cases

COSTLY = ("gradgradcheck", "vmap", "compile")
SHAPELESS = ("bad_inputs",)
CHEAP = tuple(c for c in ALL if c not in COSTLY + SHAPELESS)


def _params():
    for case in all_cases():
        for check in ALL:
            if applies(case, check):
                for shape in case.shapes if check in CHEAP else (representative_shape(case),):
                    yield pytest.param(case, shape, check, id=f"{check}-{case.id(shape)}")


# Low precision where a gradient cancels (batch_norm[train]'s near-zero truths once open here) is
# held to the terms' rule (tolerances.TERM_SCALES), with G drawn apart from the inputs (checks.problem.G_STREAM).
PARAMS = list(_params())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,shape,check", PARAMS)
def test_op(case, shape, check, device):
    report = check_case(case, shape, device=device, checks=(check,))
    if not report.ok:
        pytest.fail(str(report), pytrace=False)  # handgrad-check's report, whole
    if report[check].status == "skip":  # e.g. torch has no kernel for the dtype on this device
        pytest.skip(f"{report.name}: {report[check].message}")
