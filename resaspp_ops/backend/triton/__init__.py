"""Triton backend (issue #3): not implemented yet.

It reports itself unavailable and raises NotImplementedError when called: it never stands in
for another backend under its name.
"""
from __future__ import annotations

import torch

_WHY = "the Triton kernels are not implemented yet"


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    return False, _WHY


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    raise NotImplementedError(f"resaspp_ops backend 'triton': {_WHY}")


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    raise NotImplementedError(f"resaspp_ops backend 'triton': {_WHY}")
