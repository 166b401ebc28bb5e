"""resaspp_ops: fused multi-rate dilated convolutions for DeepLab's ASPP.

    multi_rate_conv2d   the fused op (1x1 + atrous 3x3 branches, one read of the input)
    multi_rate_separable_conv2d   the same for DeepLabV3+'s depthwise-separable branches
    FusedASPP           drop-in replacement for torchvision's ASPP
    FusedSeparableASPP  drop-in replacement for segmentation_models_pytorch's separable ASPP (DeepLabV3+)
    FusedDepthwiseSeparableASPP   the ASPP of mmsegmentation's DepthwiseSeparableASPPHead (BN + ReLU between)
    convert_aspp        swap the fused modules into an existing model; revert_aspp swaps back
    resolution_aware_rate(s), fov_size   the atrous-rate guideline of Kim et al.
    backends()          which backends can run here, and why not
    auto_choices()      what backend="auto" decided per problem, and why: every candidate's time and verdict
    export              ONNX export of the fused ops (registered at import); TorchScript refused with a way out

Importing the package queries no GPU and loads no compiled code.
"""
from __future__ import annotations

import torch

from resaspp_ops import backend as _backend
from resaspp_ops._version import __version__
from resaspp_ops.autotune import auto_choices
from resaspp_ops.nn import FusedASPP, FusedDepthwiseSeparableASPP, FusedSeparableASPP, convert_aspp, revert_aspp
from resaspp_ops.ops import multi_rate_conv2d, multi_rate_conv2d_reference
from resaspp_ops.ops_separable import multi_rate_separable_conv2d, multi_rate_separable_conv2d_reference
from resaspp_ops.rates import fov_size, resolution_aware_rate, resolution_aware_rates
from resaspp_ops.export import register_onnx_decompositions as _register_onnx_decompositions

_register_onnx_decompositions()  # torch.onnx.export(..., dynamo=True) of the fused ops: see resaspp_ops.export


def backends(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
             op: str = "multi_rate_conv2d") -> dict:
    """{name: BackendStatus(available, reason)} for the op ("multi_rate_conv2d" or "multi_rate_separable_conv2d")
    on tensors of `device` (default: cuda if visible, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if op not in _backend.FAMILIES:
        raise ValueError(f"unknown op {op!r}; choose one of {', '.join(_backend.FAMILIES)}")
    return {name: _backend.status(name, device, dtype, op) for name in _backend.NAMES}


__all__ = [
    "FusedASPP", "FusedDepthwiseSeparableASPP", "FusedSeparableASPP", "__version__", "auto_choices", "backends",
    "convert_aspp", "fov_size", "multi_rate_conv2d", "multi_rate_conv2d_reference", "multi_rate_separable_conv2d",
    "multi_rate_separable_conv2d_reference", "resolution_aware_rate", "resolution_aware_rates", "revert_aspp",
]
