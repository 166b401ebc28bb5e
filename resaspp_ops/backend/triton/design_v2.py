"""Host side of the second kernel design (DESIGN.md section 4), the default: the work lists, the configs and
the launches of forward_v2.py and dgrad_v2.py, and wgrad.py over exactly the programs with work.

Configs: one per kernel, chosen here (configs.v2_config) and compiled once per shape: no first-call tuning.
RESASPP_TRITON_AUTOTUNE=1 opts in to timing a few candidates (configs.V2_TUNED: block N, stages and warps
over the heuristic's tile, which the work list is built for), keyed without the batch size, the choice kept
on disk by Triton (cache_results).
"""
from __future__ import annotations

import collections
import functools

import numpy as np
import torch

from resaspp_ops.backend.jobs import dgrad_plan, job_plan
from resaspp_ops.backend.triton import host


def _plan(k, x, n_out, rates):
    """(config, plan): the launch config of a forward / dgrad over x and its work list (cached per shape)."""
    n, _, h, w = x.shape
    config = k.configs.v2_config(n, h, w, n_out, x.dtype, x.device, tuple(rates))
    plan = job_plan(n, h, w, tuple(rates), config["TILE_H"], config["TILE_W"], config["STACK"])
    return config, plan


# (id(array), device) -> (array, its copy there), least recently used first: bounded, so that many shapes
# (multi-scale training) do not keep every plan's copy alive.
_ON_DEVICE: collections.OrderedDict = collections.OrderedDict()
_ON_DEVICE_MAX = 256


def _device_array(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """A plan's host array on `device`, copied there once per plan and device (while it stays cached)."""
    key = (id(array), torch.device(device))
    entry = _ON_DEVICE.get(key)
    if entry is None or entry[0] is not array:
        entry = _ON_DEVICE[key] = (array, torch.from_numpy(array).to(device))
        while len(_ON_DEVICE) > _ON_DEVICE_MAX:
            _ON_DEVICE.popitem(last=False)
    else:
        _ON_DEVICE.move_to_end(key)
    return entry[1]


def _record(kernel, count, programs, plan, n_blocks):
    host.counter().records.append(dict(kernel=kernel, tap_tiles=int(count[0].item()), a_elements=int(count[1].item()),
                                  b_elements=int(count[2].item()), programs=programs, plan=plan,
                                  n_blocks=n_blocks))


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
    w1p = w1x1.reshape(co, c).t().contiguous()                               # [C, Co]: a view of FusedASPP's
    w3p = w3x3.permute(0, 3, 4, 2, 1).reshape(b, 9, c, co).contiguous()     # [B, 9, C, Co]  K-major stacks
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    shift = None if shift is None else shift.to(torch.float32).contiguous()
    config, plan = _plan(k, x, co, rates)
    count = host.debug_counter(x.device, 3, torch.int64)
    with host.device_guard(x):
        programs = k.forward_v2.run(
            xh, w1p, w3p, _device_array(plan.jobs, x.device), host.rates_tensor(tuple(rates), x.device),
            out_nhwc, scale, shift, relu, count, tiles_w=plan.tiles_w,
            idx64=k.configs.needs_int64(n * h * w * max(c, out_c)), precision=k.configs.dot_precision(x.dtype),
            upcast=host.upcast(k, x), config=config, tune=host.counter() is None and k.configs.autotune_enabled(x.device))
    if count is not None:
        _record("forward_v2", count, programs, plan, -(-co // config["BLOCK_N"]))
    return out


def dgrad(k, g, x, w1x1, w3x3, rates, rates_t, key):
    """grad_x [N, C, H, W] channels_last from the NHWC pre-epilogue grad g."""
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    gc = (1 + b) * co
    gx_nhwc = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device)
    wc, wd = host.dgrad_weights(w1x1, w3x3)   # [GC, C], [B, 9, Co, C]
    config, plan = _plan(k, x, c, rates)
    dplan = dgrad_plan(plan)
    count = host.debug_counter(x.device, 3, torch.int64)
    with host.device_guard(x):
        programs = k.dgrad_v2.run(
            g, wc, wd, rates_t, _device_array(dplan.jobs, x.device), _device_array(dplan.segments, x.device),
            _device_array(dplan.n_segments, x.device), gx_nhwc, count, tiles_w=plan.tiles_w,
            idx64=k.configs.needs_int64(n * h * w * max(c, gc)), precision=k.configs.dot_precision(x.dtype),
            upcast=host.upcast(k, x), config=config, tune=host.counter() is None and k.configs.autotune_enabled(x.device),
            preload_segments=k.configs.dgrad_preload_segments())
    if count is not None:
        _record("dgrad_v2", count, programs, plan, -(-c // config["BLOCK_N"]))
    return gx_nhwc.permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=512)
def wgrad_jobs(h: int, w: int, c: int, co: int, rates: tuple, block_c: int, block_n: int):
    """(work [P, 3] int32, zero_columns): the wgrad programs with work, as (job, C block, N block), and the
    column ranges of the jobs without any (a tap that is padding on the whole map: |offset| >= H or W).

    Job 0 is the centre of every branch ([C, (1+B)*Co] columns), job 1 + 8b + t off-centre tap t of branch b
    ([C, Co]): each gets exactly its own column blocks, where the first design gave every job the centre's.
    """
    b = len(rates)
    gc = (1 + b) * co
    n_cb = -(-c // block_c)
    rows, zero_columns = [], []
    rows += [(0, cb, nb) for nb in range(-(-gc // block_n)) for cb in range(n_cb)]
    for br, r in enumerate(rates):
        for t in range(8):
            tap = t + t // 4
            dy, dx = (tap // 3 - 1) * r, (tap % 3 - 1) * r
            job = 1 + 8 * br + t
            if abs(dy) >= h or abs(dx) >= w:
                zero_columns.append((gc + (job - 1) * co, gc + job * co))
                continue
            rows += [(job, cb, nb) for nb in range(-(-co // block_n)) for cb in range(n_cb)]
    return np.array(rows, dtype=np.int32).reshape(-1, 3), tuple(zero_columns)


def wgrad_work(k, x, h, w, c, co, rates, config):
    work, zero_columns = wgrad_jobs(h, w, c, co, tuple(rates), config["BLOCK_C"], config["BLOCK_N"])
    return _device_array(work, x.device), zero_columns


def operand_bytes(kernel: str, n: int, c: int, co: int, h: int, w: int, rates: tuple, dtype: torch.dtype,
                  device: torch.device) -> tuple[int, int]:
    """(A, B) bytes the forward_v2 or dgrad_v2 launch for this problem loads, counted from its work list
    (the lowering report prints them; tests check them against what the interpreter loads)."""
    from resaspp_ops.backend.jobs import dgrad_operand_elements, forward_operand_elements
    from resaspp_ops.backend.triton import configs

    n_out = co if kernel == "forward_v2" else c
    config = configs.v2_config(n, h, w, n_out, dtype, torch.device(device), tuple(rates))
    plan = job_plan(n, h, w, tuple(rates), config["TILE_H"], config["TILE_W"], config["STACK"])
    if kernel == "forward_v2":
        a, bb = forward_operand_elements(plan, c, co, config["BLOCK_N"])
    else:
        a, bb = dgrad_operand_elements(dgrad_plan(plan), c, co, config["BLOCK_N"])
    size = torch.empty((), dtype=dtype).element_size()
    return a * size, bb * size
