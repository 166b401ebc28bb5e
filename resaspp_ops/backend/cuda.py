"""CUDA C++ backend: the kernels of csrc/, compiled into resaspp_ops._C by setup.py.

Which kernels run is decided in C++ at every call (csrc/multi_rate_conv2d_tc_conv.cu,
tensor_cores_apply): the tensor-core kernels for float16/bfloat16 when C and Co are multiples of 8
on an sm_80 or newer GPU, the SIMT kernels otherwise (float32, float64, other shapes). The
environment variable RESASPP_CUDA_KERNEL picks a path: "auto" (default), "simt" (always SIMT, for
debugging and comparison) or "tc" (tensor cores, an error where they do not apply).
"""
from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why it cannot be imported). Imported on first use, never at package import."""
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
    return True, "resaspp_ops._C kernels (tensor cores for fp16/bf16 with C, Co % 8 == 0 on sm_80+; SIMT otherwise)"


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    return extension().forward(x, w1x1, w3x3, list(rates), scale, shift, relu)


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    grad_x, grad_w1x1, grad_w3x3 = extension().backward(grad, x, w1x1, w3x3, list(rates), need_x, need_w)
    return grad_x, grad_w1x1, grad_w3x3
