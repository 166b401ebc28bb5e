"""Triton backend: fused multi-rate forward, dgrad and wgrad kernels, in two designs (DESIGN.md section 4).

    design_v2.py       host side of the second design (the default): work lists, configs, launches
      forward_v2.py    one program a job = (tile, branch, all Co), one K loop over the branch's live taps
      dgrad_v2.py      one program a (tile, C block), one K loop over every branch's live taps, no atomics
    design_v1.py       host side of the first design (RESASPP_TRITON_KERNEL=v1), kept until a GPU compares them
      forward_kernel.py  every branch of a (tile, Co block) in one program, the centre read shared
      dgrad.py         grad_x from the grads of all branches, branch by branch, no atomics
    wgrad.py           grad_w1x1 / grad_w3x3, one GEMM a tap over the valid pixels only, fixed-order split-K
                       (v2: a grid of exactly the (tap, block) programs with work)
    host.py            what both designs' host code shares: layouts, the backward's weight-grad assembly
    tiles.py           the 2-D tiles, tap loops and epilogue the kernels share
    configs.py         configs (the heuristic; opt-in autotuning), the switches

Runs CUDA tensors, and CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 (for tests). The
kernels are imported on first use, never at package import; Triton fixes compiled-or-interpreted when they
are, so the first use in a process decides.

Switches: RESASPP_TRITON_KERNEL=v2|v1 (read at call time; `use_kernel_version` overrides it in a block,
`thread_kernel_version` in a block of one thread only),
RESASPP_TRITON_AUTOTUNE=1 (opt in to autotuning: see configs.py).

Debug: `with count_tap_tiles() as counter:` makes the kernels count the tap-tiles they process (atomic adds
into a counter, compiled out otherwise: COUNT is a constexpr); see TapTileCounter.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
from types import SimpleNamespace

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # an old or broken triton counts as missing
        return f"triton cannot be imported ({exc})"
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_conflict() -> str | None:
    """Triton before 3.7 turns a one-element array into an int in its interpreter in a way NumPy 2.4 made an
    error (triton-lang/triton#9171): every kernel would fail with an opaque InterpreterError."""
    import numpy
    import triton

    def release(text: str) -> tuple:
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2])

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                "(triton-lang/triton#9171): install numpy<2.4 or a newer Triton")
    return None


_KERNELS = None


def _kernels() -> SimpleNamespace:
    """The kernel modules, imported (and so compiled-or-interpreted) on first use."""
    global _KERNELS
    if _KERNELS is None:
        from triton.runtime.interpreter import InterpretedFunction

        # forward_kernel, not forward: importing a submodule sets it as an attribute of this package,
        # which would shadow the backend's forward().
        from resaspp_ops.backend.triton import configs, dgrad, dgrad_v2, forward_kernel, forward_v2, wgrad

        interpreted = isinstance(forward_kernel._forward_kernel, InterpretedFunction)
        _KERNELS = SimpleNamespace(configs=configs, forward=forward_kernel, dgrad=dgrad, wgrad=wgrad,
                                   forward_v2=forward_v2, dgrad_v2=dgrad_v2, interpreted=interpreted)
    return _KERNELS


def kernels_mode() -> str | None:
    """"interpreted" or "compiled" once the kernels are loaded in this process, else None."""
    if _KERNELS is None:
        return None
    return "interpreted" if _KERNELS.interpreted else "compiled"


def _interpret_requested() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype == torch.float64:
        return False, ("float64 is not supported: tl.dot has no fp64 tensor-core path "
                       "(the reference and cuda backends run float64)")
    if dtype not in _DTYPES:
        return False, f"{dtype} is not supported (float16, bfloat16 and float32 are)"
    why = _triton_import_error()
    if why:
        return False, why
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            return False, "bfloat16 tl.dot needs compute capability 8.0 or newer"
        if kernels_mode() == "interpreted":
            return True, "Triton kernels, interpreted (TRITON_INTERPRET=1 was set when they were loaded)"
        return True, "Triton kernels"
    if device.type == "cpu":
        if not _interpret_requested():
            return False, "CPU tensors run only through Triton's interpreter: set TRITON_INTERPRET=1 (slow, for tests)"
        conflict = _interpreter_numpy_conflict()
        if conflict:
            return False, conflict
        if kernels_mode() == "compiled":
            return False, ("the Triton kernels were loaded for the GPU in this process before TRITON_INTERPRET=1 "
                           "was set; set it before their first use")
        return True, "Triton kernels through Triton's interpreter (TRITON_INTERPRET=1)"
    return False, f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"


# ---------------------------------------------------------------------------------------------- debug counter

class TapTileCounter:
    """What the kernels did while count_tap_tiles() was active: one record a launch.

    v1 forward / dgrad record: kernel, tap_tiles (centre taps of every branch + live off-centre taps, summed over
    programs), programs, n_img, h, w, tile_h, tile_w, rates (of the launch), branches (accumulated branches).
    v2 forward_v2 / dgrad_v2 record: kernel, tap_tiles (live taps, resp. K segments, summed over programs),
    a_elements and b_elements (operand elements the loads read, masks applied), programs, plan (jobs.JobPlan),
    n_blocks (channel blocks a job).
    wgrad record: kernel, centre_tiles and tap_tiles (pixel tiles the centre job and the off-centre jobs walked,
    summed over programs), and the launch's shape and pixel tile.
    """

    def __init__(self):
        self.records: list[dict] = []

    def total(self, kernel: str, field: str = "tap_tiles") -> int:
        return sum(r[field] for r in self.records if r["kernel"] == kernel)


_COUNTER: TapTileCounter | None = None


@contextlib.contextmanager
def count_tap_tiles():
    """Count the tap-tiles the kernels process (debug; adds a sync a launch, and never autotunes)."""
    global _COUNTER
    previous, _COUNTER = _COUNTER, TapTileCounter()
    try:
        yield _COUNTER
    finally:
        _COUNTER = previous


# ---------------------------------------------------------------------------------------------- versions

KERNEL_VERSIONS = ("v2", "v1")
_VERSION_OVERRIDE: str | None = None
# thread_kernel_version's choice: a context variable, so that it stays in the thread (or task) that set it.
_THREAD_VERSION: contextvars.ContextVar = contextvars.ContextVar("resaspp_triton_kernel", default=None)


def kernel_version() -> str:
    """The kernel design calls run on: thread_kernel_version's, else use_kernel_version's, else
    RESASPP_TRITON_KERNEL, else "v2"."""
    import os

    version = (_THREAD_VERSION.get() or _VERSION_OVERRIDE
               or os.environ.get("RESASPP_TRITON_KERNEL", "v2").strip().lower() or "v2")
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"RESASPP_TRITON_KERNEL={version!r}: choose one of {', '.join(KERNEL_VERSIONS)}")
    return version


@contextlib.contextmanager
def use_kernel_version(version: str):
    """Run the Triton backend's calls inside the block on kernel design `version` ("v1" or "v2")."""
    global _VERSION_OVERRIDE
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"unknown Triton kernel version {version!r}; choose one of {', '.join(KERNEL_VERSIONS)}")
    previous, _VERSION_OVERRIDE = _VERSION_OVERRIDE, version
    try:
        yield
    finally:
        _VERSION_OVERRIDE = previous


@contextlib.contextmanager
def thread_kernel_version(version: str):
    """Run the Triton backend's calls made by this thread inside the block on kernel design `version`, leaving
    other threads' alone (use_kernel_version's choice is process-wide, so that it also reaches autograd's
    backward threads). backend="auto" runs each design that way, around single backend calls."""
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"unknown Triton kernel version {version!r}; choose one of {', '.join(KERNEL_VERSIONS)}")
    token = _THREAD_VERSION.set(version)
    try:
        yield
    finally:
        _THREAD_VERSION.reset(token)


def _design():
    if kernel_version() == "v1":
        from resaspp_ops.backend.triton import design_v1 as design
    else:
        from resaspp_ops.backend.triton import design_v2 as design
    return design


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    return _design().forward(x, w1x1, w3x3, rates, scale, shift, relu)


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    from resaspp_ops.backend.triton import host

    return host.backward(_design(), grad, x, w1x1, w3x3, rates, need_x, need_w)
