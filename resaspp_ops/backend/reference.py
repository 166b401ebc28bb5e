"""Reference backend: one F.conv2d per branch. The ground truth of every test and the CPU path.

It computes in channels_last, where oneDNN (CPU) skips the taps that land in padding and cuDNN
picks its NHWC kernels, and folds the epilogue into one pass over the output.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False, f"{dtype} is not a supported dtype"
    return True, "PyTorch convolutions (oneDNN on the CPU, cuDNN on CUDA)"


def branch_convs(x: torch.Tensor, w1x1: torch.Tensor, w3x3: torch.Tensor, rates) -> list[torch.Tensor]:
    """The 1 + B branch outputs, each [N, Co, H, W]: the plain PyTorch composition the fused op replaces."""
    return [F.conv2d(x, w1x1)] + [F.conv2d(x, w3x3[i], padding=r, dilation=r) for i, r in enumerate(rates)]


def apply_epilogue(y: torch.Tensor, scale, shift, relu: bool) -> torch.Tensor:
    """out = ReLU(y * scale + shift), per channel, computed in scale's dtype and cast back to y's."""
    if scale is None and shift is None and not relu:
        return y
    acc = y.to(scale.dtype if scale is not None else shift.dtype if shift is not None else y.dtype)
    if scale is not None:
        acc = acc * scale.view(1, -1, 1, 1)
    if shift is not None:
        acc = acc + shift.view(1, -1, 1, 1)
    if relu:
        acc = acc.relu()
    return acc.to(y.dtype).contiguous(memory_format=torch.channels_last)


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    x = x.contiguous(memory_format=torch.channels_last)
    ys = branch_convs(x, w1x1, w3x3, rates)
    if x.dtype in (torch.float32, torch.float64) and (scale is not None or shift is not None or relu):
        # The epilogue in place on each branch's output, in one or two passes: the outputs are small
        # next to the weights at ASPP's shapes, so this beats folding scale into the weights.
        co = w1x1.shape[0]
        for i, y in enumerate(ys):
            channels = slice(i * co, (i + 1) * co)
            if scale is not None:
                y.mul_(scale[channels].to(y.dtype).view(1, -1, 1, 1))
            if shift is not None:
                y.add_(shift[channels].to(y.dtype).view(1, -1, 1, 1))
            if relu:
                y.relu_()
        return torch.cat(ys, dim=1).contiguous(memory_format=torch.channels_last)
    y = torch.cat(ys, dim=1).contiguous(memory_format=torch.channels_last)
    return apply_epilogue(y, scale, shift, relu)


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    co = w1x1.shape[0]
    grads = grad.split(co, dim=1)
    grad_x = grad_w1x1 = grad_w3x3 = None
    if need_x:
        shape = list(x.shape)
        grad_x = torch.nn.grad.conv2d_input(shape, w1x1, grads[0])
        for i, r in enumerate(rates):
            grad_x = grad_x + torch.nn.grad.conv2d_input(shape, w3x3[i], grads[i + 1], padding=r, dilation=r)
        grad_x = grad_x.contiguous(memory_format=torch.channels_last)
    if need_w:
        grad_w1x1 = torch.nn.grad.conv2d_weight(x, list(w1x1.shape), grads[0])
        grad_w3x3 = torch.stack([
            torch.nn.grad.conv2d_weight(x, list(w3x3.shape[1:]), grads[i + 1], padding=r, dilation=r)
            for i, r in enumerate(rates)
        ])
    return grad_x, grad_w1x1, grad_w3x3
