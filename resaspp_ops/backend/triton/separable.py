"""Triton backend of the separable op (multi_rate_separable_conv2d): the host side of separable_forward.py and
separable_backward.py, on the second design's work list (backend/jobs.py) and the shared separable operands
(backend/separable_plan.py). The contract is backend/reference_separable.py's.

Forward: one launch, a program a (tile, branch) job with all Co; the depthwise outputs stay in registers.
Backward, per branch over one reused dD buffer (one depthwise-sized temporary at the peak): dgrad (dD and the
mid stage's partial grads), the depthwise transpose into grad_x, the depthwise weight grad; then one launch for
every branch's pointwise weight grad. Every reduction has a fixed order (bitwise-reproducible grads).

depthwise_moments (the batch statistics of a BatchNorm between depthwise and pointwise, for
FusedDepthwiseSeparableASPP in training) is the reference backend's PyTorch composition: it must be
differentiable, and no Triton kernel computes it yet.
"""
from __future__ import annotations

import torch

from resaspp_ops.backend.jobs import job_plan
from resaspp_ops.backend.reference_separable import depthwise_moments  # noqa: F401  (see the docstring)
from resaspp_ops.backend.separable_plan import branch_job_lists, pack_weights
from resaspp_ops.backend.triton import availability, host  # noqa: F401  (availability: the backend's own)
from resaspp_ops.backend.triton.design_v2 import _device_array


def _kernels():
    """The separable kernel modules, imported after the package's kernels (which fix compiled-or-interpreted)."""
    k = host.kernels()
    from resaspp_ops.backend.triton import separable_backward, separable_forward

    return k, separable_forward, separable_backward


def _launch_args(k, x, n_channels):
    n, c, h, w = x.shape
    return dict(idx64=k.configs.needs_int64(n * h * w * n_channels), precision=k.configs.dot_precision(x.dtype),
                upcast=host.upcast(k, x))


def forward(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu):
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    out_c = (1 + b) * co
    out_nhwc = torch.empty((n, h, w, out_c), dtype=x.dtype, device=x.device)
    out = out_nhwc.permute(0, 3, 1, 2)  # channels_last [N, (1+B)*Co, H, W]
    if out.numel() == 0:
        return out
    k, kf, _ = _kernels()
    config = k.configs.separable_config("forward", n, h, w, c, co, x.dtype, x.device, tuple(rates))
    plan = job_plan(n, h, w, tuple(rates), config["TILE_H"], config["TILE_W"], config["STACK"])
    ops = pack_weights(w1x1, w_dw, w_pw, mid_scale, mid_shift)
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    shift = None if shift is None else shift.to(torch.float32).contiguous()
    count = host.debug_counter(x.device, 1, torch.int64)
    with host.device_guard(x):
        programs = kf.run(host.nhwc(x), ops, _device_array(plan.jobs, x.device),
                          host.rates_tensor(tuple(rates), x.device), out_nhwc, mid_relu, scale, shift, relu, count,
                          tiles_w=plan.tiles_w, unroll_taps=k.configs.separable_unroll_taps(c), config=config,
                          **_launch_args(k, x, max(c, out_c)))
    if count is not None:
        host.counter().records.append(dict(kernel="separable_forward", tap_tiles=int(count[0].item()),
                                           programs=programs, plan=plan))
    return out


def backward(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid):
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    need_mid = need_mid and (mid_scale is not None or mid_shift is not None)
    if n * h * w == 0:  # nothing to launch: an empty grad_x, zero grads of the rest
        zeros = torch.zeros_like
        return (torch.empty_like(x, memory_format=torch.channels_last) if need_x else None,
                zeros(w1x1) if need_w else None, zeros(w_dw) if need_w else None, zeros(w_pw) if need_w else None,
                zeros(mid_scale) if need_mid and mid_scale is not None else None,
                zeros(mid_shift) if need_mid and mid_shift is not None else None)
    k, _, kb = _kernels()
    xh = host.nhwc(x)
    g = host.nhwc(grad.to(x.dtype))
    ops = pack_weights(w1x1, w_dw, w_pw, mid_scale, mid_shift, pointwise=False)   # the GEMMs read pwt
    pwt = torch.cat([w1x1.reshape(1, co, c), w_pw.reshape(b, co, c)]).contiguous()   # [1+B, Co, C]
    rates_t = host.rates_tensor(tuple(rates), x.device)
    dconf = k.configs.separable_config("dgrad", n, h, w, c, co, x.dtype, x.device, tuple(rates))
    sconf = k.configs.separable_config("stencil", n, h, w, c, co, x.dtype, x.device, tuple(rates))
    plan = job_plan(n, h, w, tuple(rates), dconf["TILE_H"], dconf["TILE_W"], dconf["STACK"])
    lists = branch_job_lists(plan)   # per branch [T, 4], the same tiles in the same order
    t = lists.stacked.shape[1]
    args = _launch_args(k, x, max(c, (1 + b) * co))
    grad_x = grad_w1x1 = grad_w_dw = grad_w_pw = None
    scale_parts, shift_parts = [], []
    with host.device_guard(x):
        gx = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device) if need_x else None
        if need_x:   # branch 0 (the identity depthwise): its dA is grad_x's first term
            kb.dgrad(g, pwt, xh, ops, 0, _device_array(lists.each[0], x.device), rates_t, gx, None, mid_relu,
                     False, tiles_w=plan.tiles_w, config=dconf, **args)
        if need_w:
            grad_w_dw = torch.zeros_like(w_dw)
        dd = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device) if b and (need_x or need_w) else None
        for i in range(b if need_x or need_w or need_mid else 0):
            jobs = _device_array(lists.each[1 + i], x.device)
            mid_grad = torch.empty((2, t, c), dtype=torch.float32, device=x.device) if need_mid else None
            kb.dgrad(g, pwt, xh, ops, 1 + i, jobs, rates_t, dd, mid_grad, mid_relu, need_mid,
                     tiles_w=plan.tiles_w, config=dconf, **args)
            if need_mid:   # fixed-order sums over the jobs; a slot without its mid vector is never written
                if mid_scale is not None:
                    scale_parts.append(mid_grad[0].sum(dim=0))
                if mid_shift is not None:
                    shift_parts.append(mid_grad[1].sum(dim=0))
            if need_x:
                kb.stencil(dd, ops, _device_array(lists.mirrored[1 + i], x.device), rates_t, gx,
                           tiles_w=plan.tiles_w, idx64=args["idx64"], config=sconf)
            if need_w:
                taps = kb.dw_wgrad(dd, xh, jobs, rates_t, k, tiles_w=plan.tiles_w, idx64=args["idx64"],
                                   config=sconf)                                     # [9, C]
                grad_w_dw[i].view(c, 9).copy_(taps.t())
        if need_w:
            wconf = k.configs.separable_config("pw_wgrad", n, h, w, c, co, x.dtype, x.device, tuple(rates))
            pw = kb.pw_wgrad(xh, ops, g, _device_array(lists.stacked, x.device), rates_t, mid_relu, k,
                             tiles_w=plan.tiles_w, config=wconf, **args)             # [1+B, C, Co] fp32
            grad_w1x1 = pw[0].t().to(w1x1.dtype).reshape(co, c, 1, 1)
            grad_w_pw = pw[1:].transpose(1, 2).to(w_pw.dtype).reshape(b, co, c, 1, 1)
    if need_x:
        grad_x = gx.permute(0, 3, 1, 2)
    grad_mid_scale = torch.cat(scale_parts).to(mid_scale.dtype) if need_mid and mid_scale is not None else None
    grad_mid_shift = torch.cat(shift_parts).to(mid_shift.dtype) if need_mid and mid_shift is not None else None
    return grad_x, grad_w1x1, grad_w_dw, grad_w_pw, grad_mid_scale, grad_mid_shift

