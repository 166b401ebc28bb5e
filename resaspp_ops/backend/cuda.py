"""CUDA C++ backend: the kernels of csrc/, compiled into resaspp_ops._C by setup.py.

Three kernel families; which one runs is decided here at every call (kernel_choice), never at import:

    sm90  warpgroup MMA fed by TMA (csrc/sm90_*.cu): builds whose arch list names 9.0 (sm_90a), on an
          sm_90 GPU, fp16 / bf16 with C and Co multiples of 8 and Co <= 256
    mma   ldmatrix + mma.sync, 64 x 64 warp tiles (csrc/multi_rate_conv2d_mma_*.cu): sm_80 and newer,
          fp16 / bf16, and fp32 as TF32 where PyTorch's cuDNN switch allows TF32 (torch.backends.cudnn
          .allow_tf32, or cudnn.conv.fp32_precision), C and Co multiples of 8
    simt  exact fp32 / fp64 FMAs (csrc/multi_rate_conv2d_simt.cu): everything else

RESASPP_CUDA_KERNEL (read at every call) picks: "auto" (default), "sm90", "mma" or "simt"; a named family
that cannot run the call raises with the reason, never a silent stand-in. `use_kernel(name)` picks one, ahead
of the variable, for the calls a thread makes inside a block (autograd's backward threads do not see it):
backend="auto" measures each family that way (resaspp_ops/autotune). "auto" takes sm90 only for an
(arch, dtype) that a committed GPU run has validated (SM90_VALIDATED, empty until one has), then mma,
then simt.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch

from resaspp_ops.backend import mma_plan, precision, sm90_plan
from resaspp_ops.backend.precision import tf32_convolutions

KERNELS = ("auto", "sm90", "mma", "simt")

# (compute capability, dtype) -> the committed evidence (benchmarks/results/...) that the sm90 kernels
# passed `pytest -m cuda` and compute-sanitizer there. "auto" chooses them only for these entries; the
# GPU-validation issue fills it. Until then they run when asked for (RESASPP_CUDA_KERNEL=sm90).
SM90_VALIDATED: dict = {}


def build_record() -> dict | None:
    """What setup.py recorded of the last build of _C (archs, toolkit, the torch it compiled against), or None."""
    try:
        from resaspp_ops._build_config import BUILD_CONFIG
    except ImportError:
        return None
    return BUILD_CONFIG


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())


def torch_mismatch(record: dict | None) -> str | None:
    """Why a _C built as `record` says cannot load in this torch, or None. A C++ extension is tied to the torch
    release (and CUDA major) it compiled against: under another one it fails with undefined symbols, or worse."""
    if not record or not record.get("torch"):
        return None
    built, built_cuda = record["torch"], record.get("torch_cuda") or ""
    here_cuda = torch.version.cuda or ""
    if _release(built) == _release(torch.__version__) and built_cuda.split(".")[0] == here_cuda.split(".")[0]:
        return None
    return (f"resaspp_ops._C was built against torch {built} (CUDA {built_cuda or 'none'}), but this is torch "
            f"{torch.__version__} (CUDA {here_cuda or 'none'}): rebuild it for this torch (pip install "
            "--no-build-isolation --force-reinstall resaspp_ops, or a wheel built against this torch)")


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why it cannot be imported). Imported on first use, never at package import;
    not at all under a torch other than the one it was built against."""
    mismatch = torch_mismatch(build_record())
    if mismatch:
        return None, mismatch
    try:
        from resaspp_ops import _C
    except ImportError as exc:
        return None, (f"resaspp_ops._C is not built ({exc}); reinstall with nvcc on PATH "
                      "(RESASPP_FORCE_CUDA=1 makes a missing toolkit an error)")
    return _C, None


def extension():
    """The compiled extension module, or None."""
    return _load()[0]


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    module, why = _load()
    if module is None:
        return False, why
    if device.type != "cuda":
        return False, f"needs CUDA tensors, got {device.type}"
    if not torch.cuda.is_available():
        return False, "no CUDA device is visible"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False, f"{dtype} is not supported"
    return True, "resaspp_ops._C kernels (sm90 / mma / simt, chosen per call: RESASPP_CUDA_KERNEL)"


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm90_built() -> bool:
    module = extension()
    return bool(getattr(module, "sm90_built", False))


def _why_not(kernel: str, capability, dtype: torch.dtype, c: int, co: int) -> str | None:
    """Why `kernel` cannot run these tensors, or None when it can."""
    if kernel == "simt":
        return None
    shape = None if c % 8 == 0 and co % 8 == 0 else f"C and Co must be multiples of 8 (got C={c}, Co={co})"
    if kernel == "sm90":
        if not sm90_built():
            return "resaspp_ops._C was built without the sm_90a kernels (see `resaspp info`)"
        if capability != (9, 0):
            return f"needs an sm_90 GPU, got sm_{capability[0]}{capability[1]}"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"takes float16 or bfloat16, got {dtype}"
        if co > sm90_plan.BLOCK_N:
            return f"takes Co <= {sm90_plan.BLOCK_N}, got {co}"
        return shape
    if capability < (8, 0):
        return f"needs an sm_80 or newer GPU, got sm_{capability[0]}{capability[1]}"
    if dtype == torch.float32 and not tf32_convolutions():
        return f"float32 with TF32 disallowed ({precision.describe()}) runs exact fp32 (simt)"
    if dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"takes float16, bfloat16 or float32 (as TF32), got {dtype}"
    return shape


# use_kernel's choice: a context variable, so that a block's choice stays in the thread (or task) that set it.
_KERNEL_OVERRIDE: contextvars.ContextVar = contextvars.ContextVar("resaspp_cuda_kernel", default=None)


@contextlib.contextmanager
def use_kernel(kernel: str):
    """Run this thread's calls of the CUDA backends (both op families) inside the block on kernel family `kernel`
    ("sm90", "mma", "simt" or "auto"), whatever RESASPP_CUDA_KERNEL says; a family that cannot run a call raises,
    as the variable's would."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown CUDA kernel family {kernel!r}; choose one of {', '.join(KERNELS)}")
    token = _KERNEL_OVERRIDE.set(kernel)
    try:
        yield
    finally:
        _KERNEL_OVERRIDE.reset(token)


def requested_kernel() -> str:
    """The kernel family asked for: use_kernel's, else RESASPP_CUDA_KERNEL, else "auto"; RuntimeError for an
    unknown name in the variable."""
    kernel = _KERNEL_OVERRIDE.get()
    if kernel is not None:
        return kernel
    env = os.environ.get("RESASPP_CUDA_KERNEL", "").strip() or "auto"
    if env not in KERNELS:
        raise RuntimeError(f"RESASPP_CUDA_KERNEL must be one of {', '.join(KERNELS)}, got {env!r}")
    return env


def kernel_unavailable_reason(kernel: str, device: torch.device, dtype: torch.dtype, c: int, co: int) -> str | None:
    """Why kernel family `kernel` cannot run tensors of this device, dtype and channel counts, or None."""
    return _why_not(kernel, _capability(device.index if device.index is not None else torch.cuda.current_device()),
                    dtype, c, co)


def kernel_choice(device: torch.device, dtype: torch.dtype, c: int, co: int) -> tuple[str, str]:
    """(kernel family, why) for tensors of this device, dtype and channel counts; RuntimeError where
    use_kernel or RESASPP_CUDA_KERNEL names a family that cannot run them."""
    env = requested_kernel()
    capability = _capability(device.index if device.index is not None else torch.cuda.current_device())
    if env != "auto":
        why = _why_not(env, capability, dtype, c, co)
        if why is not None:
            raise RuntimeError(f"RESASPP_CUDA_KERNEL={env} cannot run these tensors: {why}")
        return env, "RESASPP_CUDA_KERNEL"
    sm90_why = _why_not("sm90", capability, dtype, c, co)
    if sm90_why is None and (capability, dtype) in SM90_VALIDATED:
        return "sm90", f"validated on this arch and dtype ({SM90_VALIDATED[(capability, dtype)]})"
    mma_why = _why_not("mma", capability, dtype, c, co)
    if mma_why is None:
        return "mma", "sm90: " + (sm90_why or "not validated on a GPU yet (SM90_VALIDATED is empty)")
    return "simt", f"mma: {mma_why}"


def kernel_status() -> str:
    """A line for `resaspp info`: the sm90 build, and what "auto" does with it."""
    info = (build_record() or {}).get("sm90") or {}
    if extension() is None:
        return "cuda kernels: resaspp_ops._C not built"
    built = sm90_built()
    head = f"sm90 kernels: {'built' if built else 'not built'} ({info.get('reason', 'no build record')})"
    if not built:
        return head + "; auto runs mma, then simt"
    validated = ", ".join(f"sm_{cap[0]}{cap[1]} {str(dtype).replace('torch.', '')} ({evidence})"
                          for (cap, dtype), evidence in SM90_VALIDATED.items())
    return head + ("; auto runs them for " + validated if validated else
                   "; auto does not run them yet: no committed GPU run has validated an (arch, dtype) "
                   "(SM90_VALIDATED in resaspp_ops/backend/cuda.py); RESASPP_CUDA_KERNEL=sm90 runs them")


@functools.lru_cache(maxsize=256)
def checked_sm90_plan(p: sm90_plan.Sm90Plan) -> sm90_plan.Sm90Plan:
    """p, once its host tables have passed the C++ checks of what the kernels walk (csrc/sm90_host.cpp make_plan,
    through _C.sm90_check_plan: shapes, index ranges, the producer's walk against the consumers' step counts,
    every job queued and every output block written once). A mismatch would hang the GPU; make_plan cannot
    read the device copies without a sync at every launch, so each plan is checked here, once."""
    t = p.device_tensors("cpu")
    extension().sm90_check_plan(p.kind, t["jobs"], t["queues"], t["masks"], t["tap_offsets"], t["tap_entries"],
                                list(p.rates), p.n, p.c, p.co, p.h, p.w, p.tiles.tile_h, p.tiles.tile_w,
                                p.tiles.stack)
    return p


def _sm90_tables(kind, x, co, rates):
    n, c, h, w = x.shape
    p = checked_sm90_plan(sm90_plan.plan(kind, n, c, co, h, w, tuple(rates), _sm_count(x.device.index)))
    t = p.device_tensors(x.device)
    tables = [t["jobs"], t["queues"], t["masks"], t["tap_offsets"], t["tap_entries"]]
    return tables, [p.tiles.tile_h, p.tiles.tile_w, p.tiles.stack]


def _empty_output(x, w1x1, rates):
    """[N, (1+B) Co, H, W] channels_last: the output of a problem without output elements."""
    n, _, h, w = x.shape
    return x.new_empty((n, (1 + len(rates)) * w1x1.shape[0], h, w)).contiguous(memory_format=torch.channels_last)


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    n, c, h, w = x.shape
    co = w1x1.shape[0]
    if n * h * w * co == 0:  # nothing to compute; the plans have no tiles to cover (H = 0 or W = 0)
        return _empty_output(x, w1x1, rates)
    kernel, _ = kernel_choice(x.device, x.dtype, c, co)
    tables, tile = [], []
    if c == 0:
        pass  # the epilogue of an empty sum, written by the host (csrc/multi_rate_conv2d.cpp): no plan
    elif kernel == "sm90":
        tables, tile = _sm90_tables("forward", x, co, rates)
    elif kernel == "mma":
        tables, tile = mma_plan.device_tables("forward", n, c, h, w, tuple(rates), x.device)
    return extension().forward(x, w1x1, w3x3, list(rates), scale, shift, relu, kernel, tables, tile)


def _no_pixel_grads(x, w1x1, w3x3, need_x, need_w):
    """(grad_x, grad_w1x1, grad_w3x3) of a problem without pixels (N, H or W = 0): an empty grad_x, zero weight
    grads, None where not requested."""
    grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
    if not need_w:
        return grad_x, None, None
    zeros = [torch.zeros_like(t, memory_format=torch.contiguous_format) for t in (w1x1, w3x3)]
    return grad_x, zeros[0], zeros[1]


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    n, c, h, w = x.shape
    co = w1x1.shape[0]
    if n * h * w == 0:
        return _no_pixel_grads(x, w1x1, w3x3, need_x, need_w)
    kernel, _ = kernel_choice(x.device, x.dtype, c, co)
    dgrad, dtile, wgrad, wtile = [], [], [], []
    launches = c > 0 and co > 0  # else the host writes the zeros or empties (csrc/multi_rate_conv2d.cpp): no plan
    if kernel == "sm90" and launches:
        if need_x:
            dgrad, dtile = _sm90_tables("dgrad", x, co, rates)
        if need_w:
            wgrad, wtile = _sm90_tables("wgrad", x, co, rates)
    elif kernel == "mma" and need_x and launches:
        dgrad, dtile = mma_plan.device_tables("dgrad", n, c, h, w, tuple(rates), x.device)
    grad_x, grad_w1x1, grad_w3x3 = extension().backward(grad, x, w1x1, w3x3, list(rates), need_x, need_w, kernel,
                                                         dgrad, dtile, wgrad, wtile)
    return grad_x, grad_w1x1, grad_w3x3
