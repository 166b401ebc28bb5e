"""Host code both kernel designs share: layouts, rates, the weight-grad launch and the backward's assembly.

A design module (design_v1, design_v2) provides forward(x, w1x1, w3x3, rates, scale, shift, relu),
dgrad(k, g, x, w1x1, w3x3, rates, rates_t, key) -> grad_x, and wgrad_work(...) -> its wgrad work list (or
None for a grid over every job); backward() here runs them and assembles the weight grads.
"""
from __future__ import annotations

import contextlib
import functools
import zlib

import torch


def counter():
    """The active TapTileCounter (count_tap_tiles), or None."""
    from resaspp_ops.backend import triton as package

    return package._COUNTER


def kernels():
    from resaspp_ops.backend import triton as package

    return package._kernels()


def nhwc(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in any memory format -> a dense [N, H, W, C] tensor (no copy when already channels_last)."""
    return t.permute(0, 2, 3, 1).contiguous()


def device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def rates_key(rates) -> int:
    return zlib.crc32(",".join(map(str, rates)).encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=256)
def rates_tensor(rates: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(rates, dtype=torch.int32, device=device)


def upcast(k, x) -> bool:
    """Interpreter only: its tl.dot cannot multiply bf16, so bf16 tiles are widened to fp32 first."""
    return k.interpreted and x.dtype == torch.bfloat16


def debug_counter(device, size: int = 1, dtype=torch.int32):
    """A zeroed counter tensor while count_tap_tiles() is active, else None."""
    return None if counter() is None else torch.zeros(size, dtype=dtype, device=device)


def dgrad_weights(w1x1: torch.Tensor, w3x3: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The data-gradient's B operands: wc [(1+B)*Co, C], the centre taps of all branches (1x1 first),
    transposed; wd [B, 9, Co, C], the atrous taps flipped and transposed (tap ky * 3 + kx)."""
    b, co, c = w3x3.shape[:3]
    wc = torch.cat([w1x1.reshape(co, c), w3x3[:, :, :, 1, 1].reshape(b * co, c)]).contiguous()
    wd = w3x3.flip(3, 4).permute(0, 3, 4, 1, 2).reshape(b, 9, co, c).contiguous()
    return wc, wd


def launch(kernel, tuned, grid, args, config: dict, tune: bool, fixed=()) -> int:
    """kernel[grid](*args, **config), or with tune the autotuned `tuned` over its candidates, given only the
    `fixed` meta-parameters of config; returns the number of programs launched."""
    if tune:
        tuned[grid](*args, **{name: config[name] for name in fixed})
        return grid(tuned.best_config.kwargs)[0]
    kernel[grid](*args, **config)
    return grid(config)[0]


def wgrad_splits(k, x, c, gc, co, b, iters, config, programs=None) -> int:
    """Split-K factor: enough programs to fill the GPU, each split still a long K loop."""
    if not x.is_cuda:
        return 2 if iters >= 2 else 1  # the interpreter exercises the reduction path
    cdiv = k.configs.cdiv
    if programs is None:
        programs = cdiv(c, config["BLOCK_C"]) * (cdiv(gc, config["BLOCK_N"]) + 8 * b * cdiv(co, config["BLOCK_N"]))
    splits = min(cdiv(2 * k.configs.sm_count(x.device.index or 0), programs), 16, max(1, iters // 8))
    partial_bytes = 4 * c * (gc + 8 * b * co)
    while splits > 1 and splits * partial_bytes > (512 << 20):
        splits -= 1
    return max(splits, 1)


def wgrad(design, k, g, x, rates, rates_t, key, co) -> torch.Tensor:
    """[C, (1+B)*Co + 8*B*Co] fp32: the centre columns of all branches, then each branch's 8 off-centre taps."""
    n, c, h, w = x.shape
    b = len(rates)
    gc = (1 + b) * co
    flat = torch.empty((c, gc + 8 * b * co), dtype=torch.float32, device=x.device)
    block_p, tile_w = k.configs.wgrad_pixel_tile(h, w, x.dtype, x.device)
    heuristic = k.configs.wgrad_heuristic(c, co, x.dtype, x.device)
    iters = n * k.configs.cdiv(h, block_p // tile_w) * k.configs.cdiv(w, tile_w)
    work, zero_columns = design.wgrad_work(k, x, h, w, c, co, rates, heuristic)
    programs = None if work is None else work.shape[0]
    splits = wgrad_splits(k, x, c, gc, co, b, iters, heuristic, programs)
    tune = work is None and counter() is None and k.configs.autotune_enabled(x.device)
    count = debug_counter(x.device, 2)
    with device_guard(x):
        k.wgrad.run(nhwc(x), g, rates_t, flat, count, splits=splits, rates_key=key,
                    idx64=k.configs.needs_int64(n * h * w * max(c, gc)), precision=k.configs.dot_precision(x.dtype),
                    upcast=upcast(k, x), block_p=block_p, tile_w=tile_w, config=None if tune else heuristic,
                    work=work, zero_columns=zero_columns)
    if count is not None:
        counter().records.append(dict(kernel="wgrad", centre_tiles=int(count[0].item()),
                                      tap_tiles=int(count[1].item()), n_img=n, h=h, w=w,
                                      tile_h=block_p // tile_w, tile_w=tile_w, rates=tuple(rates), splits=splits,
                                      programs=(programs or 0) * splits))
    return flat


def backward(design, grad, x, w1x1, w3x3, rates, need_x, need_w):
    """The backend's backward with `design`'s dgrad and wgrad work list."""
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    gc = (1 + b) * co
    grad_x = grad_w1x1 = grad_w3x3 = None
    if n * h * w == 0:  # nothing to launch: an empty grad_x, zero weight grads
        if need_x:
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        if need_w:
            grad_w1x1, grad_w3x3 = torch.zeros_like(w1x1), torch.zeros_like(w3x3)
        return grad_x, grad_w1x1, grad_w3x3
    k = kernels()
    g = nhwc(grad.to(x.dtype))
    rates_t = rates_tensor(tuple(rates), x.device)
    key = rates_key(rates)
    if need_x:
        grad_x = design.dgrad(k, g, x, w1x1, w3x3, rates, rates_t, key)
    if need_w:
        flat = wgrad(design, k, g, x, rates, rates_t, key, co)
        # Straight from the fp32 columns into the weights' dtype and layout, one strided copy each: no fp32
        # intermediate of the weights' size (56 MiB at C=2048, Co=256, B=3) at the peak of the backward.
        grad_w1x1 = torch.empty((co, c, 1, 1), dtype=w1x1.dtype, device=x.device)
        grad_w1x1.view(co, c).copy_(flat[:, :co].t())
        grad_w3x3 = torch.empty((b, co, c, 3, 3), dtype=w3x3.dtype, device=x.device)
        by_tap = grad_w3x3.view(b, co, c, 9)                                      # tap ky * 3 + kx
        taps = flat[:, gc:].reshape(c, b, 8, co).permute(1, 3, 0, 2)              # [B, Co, C, 8]: the other taps
        by_tap[..., 4].copy_(flat[:, co:gc].reshape(c, b, co).permute(1, 2, 0))   # [B, Co, C]: the centre tap
        by_tap[..., :4].copy_(taps[..., :4])
        by_tap[..., 5:].copy_(taps[..., 4:])
    return grad_x, grad_w1x1, grad_w3x3
