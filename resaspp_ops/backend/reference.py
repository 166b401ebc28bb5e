"""Reference backend: PyTorch's own convolutions (oneDNN on the CPU, cuDNN on CUDA). The CPU path.

It computes in channels_last, where oneDNN skips the taps that land in padding and cuDNN picks its NHWC
kernels, and it drops the taps that are padding for the whole map before PyTorch sees them: a branch
whose rate is >= H has no live vertical off-centre tap, and is run with its middle kernel row alone
(1x3, dilation (1, r)); one whose rate is >= H and >= W is a 1x1 conv with its centre tap, and runs in
one convolution with the 1x1 branch and every other such branch (one GEMM instead of up to 1+B calls:
on unet-stare's 8x8 map with rates (12, 24, 36) the whole op is one 1x1 conv of 4*Co channels). Only
exact zeros are dropped, so the sums are the same up to their order.

`branch_convs` is the plain composition the fused op replaces (one F.conv2d per branch, every tap),
the ground truth of `resaspp_ops.multi_rate_conv2d_reference`.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F


# forward() is made of differentiable PyTorch ops: in plain eager mode the op lets PyTorch's autograd record
# and differentiate them (resaspp_ops.ops._call); backward() serves the registered op (torch.compile, export).
DIFFERENTIABLE = True


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


@dataclass(frozen=True)
class LiveConv:
    """One convolution of the plan: the branches it computes (0 = the 1x1, 1 + i = rates[i]), each branch's
    kernel rows and columns that can read inside the map (slices of the 3x3 kernel; (0, 1) for the 1x1),
    and the padding and dilation that keep the output H x W."""

    branches: tuple[int, ...]
    rows: slice
    cols: slice
    padding: tuple[int, int]
    dilation: tuple[int, int]


class LiveWindow(NamedTuple):
    """The kernel rows and columns of one 3x3 branch with dilation `rate` that can read inside an H x W map
    (slices of the 3x3 kernel), and the padding and dilation that keep the output H x W with only those."""

    rows: slice
    cols: slice
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @property
    def centre_only(self) -> bool:
        """Every off-centre tap is padding (rate >= H and >= W): the branch is a 1x1 conv with its centre tap."""
        return self.rows.stop - self.rows.start == 1 and self.cols.stop - self.cols.start == 1


def live_window(h: int, w: int, rate: int) -> LiveWindow:
    live_rows, live_cols = rate < h, rate < w
    return LiveWindow(slice(0, 3) if live_rows else slice(1, 2), slice(0, 3) if live_cols else slice(1, 2),
                      (rate if live_rows else 0, rate if live_cols else 0),
                      (rate if live_rows else 1, rate if live_cols else 1))


@functools.lru_cache(maxsize=256)
def plan(h: int, w: int, rates: tuple[int, ...]) -> tuple[LiveConv, ...]:
    """The convolutions that compute the 1+B branches on an H x W map, padding-only taps dropped (cached:
    it depends on the shape and rates alone)."""
    centre_only = [0]
    convs = []
    for i, r in enumerate(rates):
        window = live_window(h, w, r)
        if window.centre_only:
            centre_only.append(1 + i)
            continue
        convs.append(LiveConv((1 + i,), *window))
    return (LiveConv(tuple(centre_only), slice(0, 1), slice(0, 1), (0, 0), (1, 1)), *convs)


def _weight(conv: LiveConv, w1x1: torch.Tensor, w3x3: torch.Tensor) -> torch.Tensor:
    """[len(branches) * Co, C, kh, kw]: the live taps of the conv's branches, stacked along output channels."""
    if conv.branches[0] != 0:  # one atrous branch, its live rows and columns
        weight = w3x3[conv.branches[0] - 1, :, :, conv.rows, conv.cols]
    elif len(conv.branches) == 1:
        weight = w1x1
    else:  # the 1x1 branch and the centre taps of the branches whose off-centre taps are all padding
        centres = w3x3[:, :, :, 1:2, 1:2]
        atrous = [b - 1 for b in conv.branches[1:]]
        picked = centres if atrous == list(range(w3x3.shape[0])) else centres[atrous]
        weight = torch.cat([w1x1.unsqueeze(0), picked]).flatten(0, 1)
    return weight  # any layout: PyTorch reorders a weight for its kernel as cheaply as a copy here would


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    x = x.contiguous(memory_format=torch.channels_last)
    co = w1x1.shape[0]
    convs = plan(x.shape[2], x.shape[3], tuple(rates))
    outs = [F.conv2d(x, _weight(conv, w1x1, w3x3), padding=conv.padding, dilation=conv.dilation) for conv in convs]
    order = [b for conv in convs for b in conv.branches]
    if order != sorted(order):  # a merged conv holds branches out of order: place each branch
        ys: list = [None] * len(order)
        for conv, out in zip(convs, outs):
            for k, b in enumerate(conv.branches):
                ys[b] = out[:, k * co:(k + 1) * co]
        outs = ys
    y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
    y = y.contiguous(memory_format=torch.channels_last)
    return _epilogue(y, scale, shift, relu)


def _epilogue(y: torch.Tensor, scale, shift, relu: bool) -> torch.Tensor:
    """ReLU(y * scale + shift) per channel in scale's dtype, cast back to y's; in place (one pass an op over
    [N, (1+B)*Co, H, W]) where y needs no grad, else out of place (autograd is
    recording: see DIFFERENTIABLE). The same arithmetic either way, so both routes round alike."""
    if scale is None and shift is None and not relu:
        return y
    acc_dtype = scale.dtype if scale is not None else shift.dtype if shift is not None else y.dtype
    in_place = not y.requires_grad  # y is this call's own tensor, and so is its copy in acc_dtype
    acc = y if y.dtype == acc_dtype else y.to(acc_dtype)
    if scale is not None and shift is not None:
        if in_place:
            acc = torch.addcmul(shift.view(1, -1, 1, 1), acc, scale.view(1, -1, 1, 1), out=acc)
        else:
            acc = torch.addcmul(shift.view(1, -1, 1, 1), acc, scale.view(1, -1, 1, 1))
    elif scale is not None:
        acc = acc.mul_(scale.view(1, -1, 1, 1)) if in_place else acc * scale.view(1, -1, 1, 1)
    elif shift is not None:
        acc = acc.add_(shift.view(1, -1, 1, 1)) if in_place else acc + shift.view(1, -1, 1, 1)
    if relu:
        acc = acc.relu_() if in_place else acc.relu()
    return acc.to(y.dtype).contiguous(memory_format=torch.channels_last)


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    """One aten.convolution_backward per convolution of the plan (grad_x and grad_w together), grad_x summed
    in place; a dropped tap's weight grad is an exact zero."""
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    co = w1x1.shape[0]
    grads = grad.split(co, dim=1)
    convs = plan(x.shape[2], x.shape[3], tuple(rates))
    grad_x = grad_w1x1 = None
    grad_ws: list = [None] * len(rates)  # per atrous branch: its [Co, C, kh, kw] grad, and where it goes
    for conv in convs:
        g = grads[conv.branches[0]] if len(conv.branches) == 1 else torch.cat([grads[b] for b in conv.branches], 1)
        gx, gw, _ = torch.ops.aten.convolution_backward(
            g, x, _weight(conv, w1x1, w3x3), None, [1, 1], list(conv.padding), list(conv.dilation), False,
            [0, 0], 1, [need_x, need_w, False])
        if need_x:
            grad_x = gx if grad_x is None else grad_x.add_(gx)
        if need_w:
            for k, b in enumerate(conv.branches):
                part = gw[k * co:(k + 1) * co]
                if b == 0:
                    grad_w1x1 = part
                else:
                    grad_ws[b - 1] = (part, (slice(1, 2), slice(1, 2)) if conv.branches[0] == 0 else (conv.rows, conv.cols))
    grad_w3x3 = None
    if need_w:
        if all(where == (slice(0, 3), slice(0, 3)) for _, where in grad_ws):  # every tap live: no zeros to place
            grad_w3x3 = torch.stack([part for part, _ in grad_ws])
        else:
            grad_w3x3 = w3x3.new_zeros(w3x3.shape)
            for i, (part, (rows, cols)) in enumerate(grad_ws):
                grad_w3x3[i, :, :, rows, cols] = part
    if need_x:
        grad_x = grad_x.contiguous(memory_format=torch.channels_last)
    return grad_x, grad_w1x1, grad_w3x3
