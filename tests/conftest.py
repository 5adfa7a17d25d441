import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A torch reference the running torch cannot compute (handgrad._compat.TorchLacks, torch
    older than the feature) is a skip naming the version, not a failure."""
    from handgrad._compat import TorchLacks

    report = (yield).get_result()
    if call.excinfo is not None and call.excinfo.errisinstance(TorchLacks):
        report.outcome = "skipped"
        report.longrepr = (str(item.path), item.location[1] or 0, f"Skipped: {call.excinfo.value}")
