"""Loading resaspp_ops._C: under a torch other than the one it was built against, the cuda backend says so,
naming both versions, and never imports the extension (which would fail with undefined symbols, or worse)."""
import builtins

import pytest
import torch

from resaspp_ops.backend import cuda as cuda_backend


@pytest.fixture
def fresh_load(monkeypatch):
    cuda_backend._load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    cuda_backend._load.cache_clear()


def _record(torch_version: str, cuda: str) -> dict:
    return {"torch": torch_version, "torch_cuda": cuda, "arch_list": "9.0a", "cuda_home": "/usr/local/cuda",
            "sm90": {"built": True, "reason": "test"}}


@pytest.mark.parametrize("built,cuda", [("2.9.1+cu128", "12.8"), ("3.0.0", None), ("{same}", "11.8")])
def test_another_torch_is_named_and_the_extension_never_imported(built, cuda, fresh_load):
    here_cuda = torch.version.cuda
    built = built.replace("{same}", torch.__version__)
    if built == torch.__version__ and (here_cuda or "").split(".")[0] == "11":
        pytest.skip("this torch is the CUDA 11 build the case names")
    fresh_load.setattr(cuda_backend, "build_record", lambda: _record(built, cuda))
    real_import = builtins.__import__

    def no_extension_import(name, globals=None, locals=None, fromlist=(), level=0):
        if name == "resaspp_ops._C" or (name == "resaspp_ops" and fromlist and "_C" in fromlist):
            raise AssertionError("the mismatched extension must not be imported")
        return real_import(name, globals, locals, fromlist, level)

    fresh_load.setattr(builtins, "__import__", no_extension_import)
    assert cuda_backend.extension() is None
    ok, why = cuda_backend.availability(torch.device("cuda"), torch.bfloat16)
    assert not ok
    assert f"built against torch {built}" in why and f"this is torch {torch.__version__}" in why
    with pytest.raises(RuntimeError, match="built against torch"):
        from resaspp_ops import backend as backend_registry
        backend_registry.resolve("cuda", torch.device("cuda"), torch.bfloat16)


def test_the_same_torch_release_loads(fresh_load):
    """A record naming this torch release (another patch or local tag) and CUDA major is no mismatch."""
    base = torch.__version__.split("+")[0]
    patch_bumped = ".".join(base.split(".")[:2] + ["99"]) + "+local"
    assert cuda_backend.torch_mismatch(_record(patch_bumped, torch.version.cuda)) is None
    assert cuda_backend.torch_mismatch(None) is None
