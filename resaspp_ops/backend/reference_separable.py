"""Reference backend of the separable op (multi_rate_separable_conv2d): PyTorch's own convolutions.

The contract of a separable backend (see backend/__init__.py for how one is declared):

    availability(device, dtype) -> (bool, str)
    forward(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu) -> out
        x [N, C, H, W]; w1x1 [Co, C, 1, 1]; w_dw [B, C, 1, 3, 3] (branch i: depthwise, groups=C, dilation =
        padding = rates[i]); w_pw [B, Co, C, 1, 1]; mid_scale/mid_shift: None or [B*C], applied per branch to
        the depthwise output before the optional mid ReLU; scale/shift: None or [(1+B)*Co], the epilogue.
        The per-channel vectors come in the accumulation dtype (fp32, fp64 for fp64 x).
        out [N, (1+B)*Co, H, W] channels_last in x's dtype, channels ordered 1x1, rates[0], ..., rates[B-1].
    backward(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid)
        -> (grad_x, grad_w1x1, grad_w_dw, grad_w_pw, grad_mid_scale, grad_mid_shift)
        from the grad of the pre-epilogue output; None where not requested (need_w: the three weights,
        need_mid: mid_scale and mid_shift where given). The depthwise outputs are recomputed.
    depthwise_moments(x, w_dw, rates) -> (sum, sum of squares)
        [B*C] each, in the accumulation dtype: the per-channel moments of the depthwise outputs over
        (N, H, W), what a BatchNorm between depthwise and pointwise needs for its batch statistics. It must
        be differentiable (PyTorch ops, or an op with its own autograd).

Padding-only taps are dropped as in backend/reference.py (live_window): a branch whose rate is >= H and >= W
has only its centre tap, so its depthwise conv is a per-channel multiply, and without a mid ReLU or mid shift
the branch is a 1x1 conv with weights w_pw * centre tap (* mid_scale), run in one convolution with the 1x1
branch and every other such branch.

`branch_outputs` is the plain composition (every tap), the ground truth of
`resaspp_ops.multi_rate_separable_conv2d_reference`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from resaspp_ops.backend.reference import _epilogue, apply_epilogue, availability, live_window  # noqa: F401
from resaspp_ops.op_common import accumulation_dtype

# forward() is made of differentiable PyTorch ops: in plain eager mode PyTorch's autograd differentiates it
# (resaspp_ops.ops_separable), and backward() serves the registered op (torch.compile, export, modes).
DIFFERENTIABLE = True


def _slice(t, i: int, width: int):
    return None if t is None else t[i * width:(i + 1) * width]


def branch_outputs(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu) -> list:
    """The 1 + B branch outputs, each [N, Co, H, W]: the plain composition the fused op replaces (every tap)."""
    c = x.shape[1]
    outs = [F.conv2d(x, w1x1)]
    for i, r in enumerate(rates):
        d = F.conv2d(x, w_dw[i], padding=r, dilation=r, groups=c)
        d = apply_epilogue(d, _slice(mid_scale, i, c), _slice(mid_shift, i, c), mid_relu)
        outs.append(F.conv2d(d, w_pw[i]))
    return outs


def _depthwise(x, w_dw, i: int, window):
    """Branch i's depthwise output [N, C, H, W] with its live taps only."""
    if window.centre_only:
        return x * w_dw[i, :, 0, 1, 1].view(1, -1, 1, 1)
    return F.conv2d(x, w_dw[i, :, :, window.rows, window.cols], padding=window.padding, dilation=window.dilation,
                    groups=x.shape[1])


def _centre_pointwise(w_dw, w_pw, i: int, mid_scale):
    """[Co, C, 1, 1]: branch i as one 1x1 conv where it has only its centre tap and a linear mid stage."""
    centre = w_dw[i, :, 0, 1, 1]
    if mid_scale is None:
        return w_pw[i] * centre.view(1, -1, 1, 1)
    scale = centre.to(mid_scale.dtype) * mid_scale
    return (w_pw[i].to(mid_scale.dtype) * scale.view(1, -1, 1, 1)).to(w_pw.dtype)


def forward(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu):
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    co = w1x1.shape[0]
    windows = [live_window(h, w, r) for r in rates]
    # Centre-only branches with a linear mid stage join the 1x1 conv (one GEMM for all of them).
    merged = [i for i, win in enumerate(windows) if win.centre_only and not mid_relu and mid_shift is None]
    outs: list = [None] * (1 + len(rates))
    if merged:
        weight = torch.cat([w1x1] + [_centre_pointwise(w_dw, w_pw, i, _slice(mid_scale, i, c)) for i in merged])
        parts = F.conv2d(x, weight).split(co, dim=1)
        outs[0] = parts[0]
        for i, part in zip(merged, parts[1:]):
            outs[1 + i] = part
    else:
        outs[0] = F.conv2d(x, w1x1)
    for i, win in enumerate(windows):
        if outs[1 + i] is not None:
            continue
        d = _depthwise(x, w_dw, i, win)
        # The mid stage in the accumulation dtype, cast back (in place: d is this call's own tensor).
        d = _epilogue(d.contiguous(memory_format=torch.channels_last), _slice(mid_scale, i, c),
                      _slice(mid_shift, i, c), mid_relu)
        outs[1 + i] = F.conv2d(d, w_pw[i])
    y = torch.cat(outs, dim=1).contiguous(memory_format=torch.channels_last)
    return _epilogue(y, scale, shift, relu)


def backward(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid):
    """One aten.convolution_backward per convolution (pointwise, then depthwise on the live taps), the
    depthwise outputs and the mid stage recomputed; a dropped tap's weight grad is an exact zero."""
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    co = w1x1.shape[0]
    acc = accumulation_dtype(x.dtype)
    grads = grad.split(co, dim=1)
    grad_x, grad_w1x1, _ = torch.ops.aten.convolution_backward(
        grads[0], x, w1x1, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_x, need_w, False])
    grad_w_dw = w_dw.new_zeros(w_dw.shape) if need_w else None
    grad_w_pw = w_pw.new_empty(w_pw.shape) if need_w else None
    grad_scales, grad_shifts = [], []
    for i, r in enumerate(rates):
        win = live_window(h, w, r)
        s, t = _slice(mid_scale, i, c), _slice(mid_shift, i, c)
        d = _depthwise(x, w_dw, i, win)
        m = d
        if s is not None or t is not None:
            m = d.to(acc)
            m = m * s.view(1, -1, 1, 1) if s is not None else m
            m = m + t.view(1, -1, 1, 1) if t is not None else m
        a = (m.relu() if mid_relu else m).to(x.dtype).contiguous(memory_format=torch.channels_last)
        g_a, g_pw, _ = torch.ops.aten.convolution_backward(
            grads[1 + i], a, w_pw[i], None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, need_w, False])
        if mid_relu:
            g_a = torch.where(m <= 0, 0, g_a)  # as torch.relu's backward: the grad passes where m is NaN
        g_m = g_a.to(acc)
        if need_mid:
            if s is not None:
                grad_scales.append((g_m * d.to(acc)).sum(dim=(0, 2, 3)))
            if t is not None:
                grad_shifts.append(g_m.sum(dim=(0, 2, 3)))
        g_d = (g_m * s.view(1, -1, 1, 1) if s is not None else g_m).to(x.dtype)
        if need_w:
            grad_w_pw[i] = g_pw
        if not (need_x or need_w):
            continue
        if win.centre_only:  # the per-channel multiply's backward
            if need_x:
                grad_x = grad_x.add_(g_d * w_dw[i, :, 0, 1, 1].view(1, -1, 1, 1))
            if need_w:
                grad_w_dw[i, :, 0, 1, 1] = (g_d.to(acc) * x.to(acc)).sum(dim=(0, 2, 3)).to(w_dw.dtype)
            continue
        g_x, g_dw, _ = torch.ops.aten.convolution_backward(
            g_d.contiguous(memory_format=torch.channels_last), x, w_dw[i, :, :, win.rows, win.cols], None, [1, 1],
            list(win.padding), list(win.dilation), False, [0, 0], c, [need_x, need_w, False])
        if need_x:
            grad_x = grad_x.add_(g_x)
        if need_w:
            grad_w_dw[i, :, :, win.rows, win.cols] = g_dw
    grad_mid_scale = torch.cat(grad_scales).to(mid_scale.dtype) if grad_scales else None
    grad_mid_shift = torch.cat(grad_shifts).to(mid_shift.dtype) if grad_shifts else None
    if need_x:
        grad_x = grad_x.contiguous(memory_format=torch.channels_last)
    return grad_x, grad_w1x1, grad_w_dw, grad_w_pw, grad_mid_scale, grad_mid_shift


def depthwise_moments(x, w_dw, rates):
    """(sum, sum of squares) [B*C] of the depthwise outputs over (N, H, W), in the accumulation dtype
    (differentiable: PyTorch records them)."""
    x = x.contiguous(memory_format=torch.channels_last)
    h, w = x.shape[2:]
    acc = accumulation_dtype(x.dtype)
    sums, squares = [], []
    for i, r in enumerate(rates):
        d = _depthwise(x, w_dw, i, live_window(h, w, r)).to(acc)
        sums.append(d.sum(dim=(0, 2, 3)))
        squares.append(d.square().sum(dim=(0, 2, 3)))
    return torch.cat(sums), torch.cat(squares)
