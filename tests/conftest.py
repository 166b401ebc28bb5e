"""Shared pytest setup: the `cuda` marker skips without a GPU; `device` runs a test on every device here;
`triton_interpreter` runs a test module's Triton kernels through Triton's interpreter on the CPU."""
import os

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


@pytest.fixture(scope="module")
def triton_interpreter():
    """TRITON_INTERPRET=1 for a module's tests, set before the Triton kernels are first imported (Triton fixes
    compiled-or-interpreted then; they stay so for the process) and restored after. Steps aside where a GPU is
    visible: the compiled kernels are tested there, and a process holds only one kind; and where this Triton's
    interpreter cannot run with this NumPy (triton-lang/triton#9171), with that reason."""
    pytest.importorskip("triton")
    from resaspp_ops.backend import triton as triton_backend

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the compiled kernels are tested there")
    conflict = triton_backend._interpreter_numpy_conflict()
    if conflict:  # this Triton's interpreter cannot run here at all (availability() says the same)
        pytest.skip(conflict)
    if triton_backend.kernels_mode() == "compiled":
        pytest.skip("the Triton kernels were already loaded compiled in this process")
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = previous
