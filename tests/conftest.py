"""Shared pytest setup: the `cuda` marker skips without a GPU; `device` runs a test on every device here."""
import pytest
import torch


def _devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        # The GPU case carries the cuda marker, so that `pytest -m cuda` runs it too.
        metafunc.parametrize("device", [pytest.param(d, marks=pytest.mark.cuda) if d == "cuda" else d
                                        for d in _devices()])


@pytest.fixture
def gpu_device():
    """The GPU of a cuda-marked test (such tests are skipped when none is visible)."""
    return torch.device("cuda", torch.cuda.current_device())
