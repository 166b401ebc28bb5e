"""Who backend="auto" measures for one call: the reference backend (PyTorch's own convolutions, the baseline and
the yardstick), each kernel backend that implements the family and can run the call's device and dtype, once per
kernel variant that can run the call (backend.VARIANTS: Triton's v2 and v1 designs; the CUDA sm90, mma and simt
families), and the extra backends planted with backend.add_extra (tests).

A variant pinned by its environment variable (RESASPP_TRITON_KERNEL, RESASPP_CUDA_KERNEL) is the only one of its
backend measured. The CUDA sm90 kernels are measured only where backend/cuda.py's own "auto" would run them (an
(arch, dtype) that a committed GPU run has validated, SM90_VALIDATED) or where RESASPP_CUDA_KERNEL=sm90 asks:
a kernel that has never run on a GPU can fault, and a CUDA fault ends the process instead of raising.
"""
from __future__ import annotations

import os

import torch

from resaspp_ops import backend as _backend

REFERENCE = "reference"


def _pinned(variable: str) -> str | None:
    value = os.environ.get(variable, "").strip().lower()
    return value if value and value != "auto" else None


def _sm90_validated(problem) -> bool:
    from resaspp_ops.backend import cuda

    device = problem.device
    capability = cuda._capability(device.index if device.index is not None else torch.cuda.current_device())
    return (capability, problem.dtype) in cuda.SM90_VALIDATED


def _variants(name: str, problem) -> list[str]:
    """The variants of backend `name` that can run the problem."""
    variants = _backend.VARIANTS.get((name, problem.family), ())
    if name == "triton":
        pinned = _pinned("RESASPP_TRITON_KERNEL")
        return [v for v in variants if pinned in (None, v)]
    if name == "cuda":
        from resaspp_ops.backend import cuda

        pinned = _pinned("RESASPP_CUDA_KERNEL")
        _, c, _, _, co = problem.sizes()
        wanted = []
        for kernel in variants:
            if pinned not in (None, kernel):
                continue
            if kernel == "sm90" and pinned is None and not _sm90_validated(problem):
                continue
            if cuda.kernel_unavailable_reason(kernel, problem.device, problem.dtype, c, co) is None:
                wanted.append(kernel)
        return wanted
    return list(variants)


def candidates(problem) -> list[str]:
    """The backend specs ("reference", "triton:v1", "cuda:mma", an extra's name) to measure for `problem`, the
    reference first."""
    family, device, dtype = problem.family, problem.device, problem.dtype
    specs = [REFERENCE]
    for name in _backend.NAMES:
        if name == REFERENCE or not _backend.implements(name, family):
            continue
        if not _backend.status(name, device, dtype, family).available:
            continue
        if (name, family) in _backend.VARIANTS:
            specs += [f"{name}:{v}" for v in _variants(name, problem)]
        else:
            specs.append(name)
    for name in _backend.extras(family):
        if _backend.get(name, family).availability(device, dtype)[0]:
            specs.append(name)
    return specs
