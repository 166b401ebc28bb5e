"""Host side of the first kernel design (RESASPP_TRITON_KERNEL=v1): every branch of a (tile, Co block) in one
program, the centre read shared (forward_kernel.py); dgrad branch by branch (dgrad.py); wgrad over a grid of
every job (wgrad.py). Kept selectable until a GPU run compares it with the second design (design_v2.py)."""
from __future__ import annotations

import torch

from resaspp_ops.backend.triton import host


def _conv_config(k, t, h, w, n_out, n_acc, rates):
    """None (autotune) or the heuristic config of a forward / dgrad launch."""
    if host.counter() is None and k.configs.autotune_enabled(t.device):
        return None
    return k.configs.conv_heuristic(h, w, n_out, n_acc, t.dtype, t.shape[0] * h * w, t.device, tuple(rates))


def _record(kernel, count, used, n, h, w, n_out, rates, branches):
    from triton import cdiv
    tile_w = used["TILE_W"]
    tile_h = used["BLOCK_M"] // tile_w
    programs = n * cdiv(h, tile_h) * cdiv(w, tile_w) * cdiv(n_out, used["BLOCK_N"])
    host.counter().records.append(dict(kernel=kernel, tap_tiles=int(count[0].item()), programs=programs, n_img=n,
                                  h=h, w=w, tile_h=tile_h, tile_w=tile_w, rates=tuple(rates), branches=branches))


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    out_c = (1 + b) * co
    out_nhwc = torch.empty((n, h, w, out_c), dtype=x.dtype, device=x.device)
    out = out_nhwc.permute(0, 3, 1, 2)  # channels_last [N, (1+B)*Co, H, W]
    if out.numel() == 0:
        return out
    k = host.kernels()
    xh = host.nhwc(x)
    w1p = w1x1.reshape(co, c).t().contiguous()                               # [C, Co]
    w3p = w3x3.permute(0, 3, 4, 2, 1).reshape(b, 9, c, co).contiguous()     # [B, 9, C, Co]
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    shift = None if shift is None else shift.to(torch.float32).contiguous()
    idx64 = k.configs.needs_int64(h * w * max(c, out_c))
    precision = k.configs.dot_precision(x.dtype)
    step = k.forward.MAX_ATROUS
    with host.device_guard(x):
        for g0 in range(0, b, step):
            group = tuple(rates[g0:g0 + step])
            has_1x1 = g0 == 0
            n_acc = len(group) + int(has_1x1)
            config = _conv_config(k, x, h, w, co, n_acc, group)
            count = host.debug_counter(x.device)
            used = k.forward.run(xh, w1p, w3p[g0:g0 + len(group)], out_nhwc, scale, shift, relu, count,
                                 ch_atrous=(1 + g0) * co, rates=group, has_1x1=has_1x1, idx64=idx64,
                                 precision=precision, upcast=host.upcast(k, x), config=config)
            if count is not None:
                _record("forward", count, used, n, h, w, co, group, n_acc)
    return out


def dgrad(k, g, x, w1x1, w3x3, rates, rates_t, key):
    """grad_x [N, C, H, W] channels_last from the NHWC pre-epilogue grad g."""
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    gc = (1 + b) * co
    gx_nhwc = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device)
    wc, wd = host.dgrad_weights(w1x1, w3x3)   # [GC, C], [B, 9, Co, C]
    config = _conv_config(k, x, h, w, c, 1, rates)
    k.configs.RATES_BY_KEY[key] = tuple(rates)
    count = host.debug_counter(x.device)
    with host.device_guard(x):
        used = k.dgrad.run(g, wc, wd, rates_t, gx_nhwc, count, rates_key=key,
                           idx64=k.configs.needs_int64(h * w * max(c, gc)),
                           precision=k.configs.dot_precision(x.dtype), upcast=host.upcast(k, x), config=config)
    if count is not None:
        _record("dgrad", count, used, n, h, w, c, rates, 1 + b)
    return gx_nhwc.permute(0, 3, 1, 2)


def wgrad_work(k, x, h, w, c, co, rates, config):
    """The first design's wgrad grid covers every job (no work list)."""
    return None, ()
