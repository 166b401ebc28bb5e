"""What PyTorch's own convolution would do with fp32 tensors: TF32 or exact fp32.

PyTorch has two APIs for it. The legacy one, `torch.backends.cudnn.allow_tf32`, raises RuntimeError on read once
the new one (`torch.backends.fp32_precision`, `torch.backends.cudnn.fp32_precision`,
`torch.backends.cudnn.conv.fp32_precision`, torch >= 2.9) has set cuDNN's convolutions and RNNs apart. The new one
resolves "none" by inheritance: the convolutions' own setting, else cuDNN's, else the global one. Every fp32
decision of this package (auto's order, the kernels' TF32 switch, the benchmark's metadata) reads this module.
"""
from __future__ import annotations

import torch

# The new API's settings, most specific first: the first that is not "none" decides.
_PRECISION_CHAIN = (("cuda", "conv"), ("cuda", "all"), ("generic", "all"))


def _new_api_precision() -> str | None:
    """cuDNN convolutions' fp32 precision by the new API ("tf32", "ieee"), "none" where nothing is set, or None
    where this torch has no such API."""
    getter = getattr(torch._C, "_get_fp32_precision_getter", None)
    if getter is None:
        return None
    for backend, op in _PRECISION_CHAIN:
        value = getter(backend, op)
        if value != "none":
            return value
    return "none"


def tf32_convolutions() -> bool:
    """Whether PyTorch lets fp32 convolutions use TF32 (what cuDNN would do with the same tensors)."""
    precision = _new_api_precision()
    if precision is None:  # a torch from before the new API
        return bool(torch.backends.cudnn.allow_tf32)
    return precision == "tf32"


def describe() -> str:
    """The switch's state in words, for messages: which API said what."""
    precision = _new_api_precision()
    if precision is None:
        return f"torch.backends.cudnn.allow_tf32 = {bool(torch.backends.cudnn.allow_tf32)}"
    return f"cuDNN convolutions' fp32 precision = {precision!r} (torch.backends.cudnn.conv.fp32_precision)"
