"""What a backend="auto" decision is for: the problem key of one op call and direction, and the software
environment the decisions on disk hold for."""
from __future__ import annotations

import functools
import platform
import os
from dataclasses import dataclass

import torch

DIRECTIONS = ("forward", "input_grad", "weight_grad")


@functools.lru_cache(maxsize=None)
def _cuda_label(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def device_label(device: torch.device) -> str:
    """The device's name and capability, e.g. "NVIDIA H200 (sm_90)", or "cpu (x86_64)"."""
    if device.type == "cuda":
        return _cuda_label(device.index if device.index is not None else torch.cuda.current_device())
    if device.type == "cpu":
        return f"cpu ({platform.machine() or 'unknown'})"
    return device.type


def layout(x: torch.Tensor) -> str:
    """x's memory format, which changes what a backend copies: "nchw", "nhwc" or "strided"."""
    if x.is_contiguous():
        return "nchw"
    if x.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return "strided"


@dataclass(frozen=True)
class ProblemKey:
    """One op call's problem in one direction (forward, input_grad, weight_grad).

    flags: what else changes the computation: the forward's epilogue (scale, shift, relu), the separable op's
    mid stage (mid_scale, mid_shift, mid_relu), which grads a weight-grad call computes, x's layout, and for
    float32 on CUDA whether PyTorch allows TF32 ("tf32" or "ieee"). The backward directions leave out the
    forward's epilogue: a backend's backward takes the grad before it."""

    device: str
    family: str
    direction: str
    dtype: str
    n: int
    c: int
    h: int
    w: int
    co: int
    b: int
    rates: tuple
    flags: tuple

    def text(self) -> str:
        """One line, also the key of the decision in the cache file."""
        flags = f" [{','.join(self.flags)}]" if self.flags else ""
        return (f"{self.family} {self.direction} {self.dtype} N{self.n} C{self.c} {self.h}x{self.w} Co{self.co} "
                f"B{self.b} rates {','.join(map(str, self.rates))}{flags} on {self.device}")

    def as_dict(self) -> dict:
        return {"device": self.device, "family": self.family, "direction": self.direction, "dtype": self.dtype,
                "n": self.n, "c": self.c, "h": self.h, "w": self.w, "co": self.co, "b": self.b,
                "rates": list(self.rates), "flags": list(self.flags)}

    @classmethod
    def from_dict(cls, d: dict) -> "ProblemKey":
        """KeyError / TypeError / ValueError for a malformed record."""
        key = cls(str(d["device"]), str(d["family"]), str(d["direction"]), str(d["dtype"]), int(d["n"]),
                  int(d["c"]), int(d["h"]), int(d["w"]), int(d["co"]), int(d["b"]),
                  tuple(int(r) for r in d["rates"]), tuple(str(f) for f in d["flags"]))
        if key.direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {key.direction!r}")
        return key


def _version_of(distribution: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "none"


def kernels_fingerprint(package=None) -> str:
    """A digest of the kernels as installed in `package` (default: this one): the backends' Python sources (the
    Triton kernels, the host code) and the compiled extension's size and time. An editable install keeps its
    version number while its kernels change; a decision, which vouches for a kernel's correctness, must not
    outlive the kernel it verified."""
    import hashlib
    from pathlib import Path

    package = Path(package) if package is not None else Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted((package / "backend").rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode())
        digest.update(path.read_bytes())
    for path in sorted(package.glob("_C*")):
        stat = path.stat()
        digest.update(f"{path.name} {stat.st_size} {stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:12]


# Switches that change a kernel's speed but not its results (its configs, its loop): a decision timed under one
# setting is not used under another.
SPEED_SWITCHES = ("RESASPP_TRITON_AUTOTUNE", "RESASPP_TRITON_DGRAD_SEGMENTS", "RESASPP_TRITON_SEPARABLE_TAPS")


@functools.lru_cache(maxsize=None)
def _software() -> str:
    from resaspp_ops._version import __version__

    return (f"resaspp_ops {__version__}, torch {torch.__version__}, triton {_version_of('triton')}, "
            f"CUDA {torch.version.cuda or 'none'}, kernels {kernels_fingerprint()}")


def environment() -> str:
    """The software the decisions hold for: the package, torch, Triton and CUDA versions and the kernels'
    fingerprint (the GPU is in each key), and the speed switches that are set. A decision made under others is
    not used: a new kernel or a new cuDNN can change the answer."""
    text = _software()
    switches = [f"{name}={os.environ[name].strip()}" for name in SPEED_SWITCHES if os.environ.get(name, "").strip()]
    return text + (f", {', '.join(switches)}" if switches else "")
