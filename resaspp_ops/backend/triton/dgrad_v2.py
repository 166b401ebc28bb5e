"""Data-gradient kernel, second design (DESIGN.md section 4): one program a job = (tile, block of C).

    grad_x[q] = sum_b sum_tap g_b[q + tap_b] @ W_b[flip(tap)]^T      (stride 1, padding = rate)

M = the tile's pixels (STACK images on small maps), N = BLOCK_N input channels (up to 256), and ONE pipelined
K loop over the job's segments: first the centre taps of all 1 + B branches at once (K = (1 + B) * Co over the
concatenated grad, the 1x1 branch included), then each live off-centre tap of each atrous branch (K = Co), as
listed by the host for the tile (resaspp_ops.backend.jobs.dgrad_plan). grad_x is written once: no atomics.
The first design (dgrad.py, RESASPP_TRITON_KERNEL=v1) looped branch by branch with narrower C blocks.

The tile's segment codes and their rates are loaded into registers before the K loop (PRELOAD_SEGMENTS) and a
step picks its own by a masked sum: a load inside the loop whose value feeds the operand addresses takes the
software pipeline a stage (two chained ones left the loop 2 operand buffers where the forward gets 3;
benchmarks/NOTES.md). PRELOAD_SEGMENTS=False keeps those loads (configs.dgrad_preload_segments) until a GPU
compares the two.
"""
from __future__ import annotations

import triton
import triton.language as tl

from resaspp_ops.backend.triton import configs
from resaspp_ops.backend.triton.host import launch
from resaspp_ops.backend.triton.tiles import job_rows, pick


@triton.jit
def _dgrad_v2_kernel(
    g_ptr,        # [N, H, W, GC] NHWC grad of the pre-epilogue output, GC = (1 + B) * CO
    wc_ptr,       # [GC, C] centre taps of all branches (1x1 first), transposed
    wd_ptr,       # [B, 9, CO, C] atrous taps, flipped and transposed
    rates_ptr,    # [B] int32
    jobs_ptr,     # [J, 2] int32: image, tile
    seg_ptr,      # [TILES, SEG_STRIDE] int32: 16 * branch + tap of the tile's live off-centre taps
    nseg_ptr,     # [TILES] int32
    gx_ptr,       # [N, H, W, C] NHWC grad_x
    count_ptr,    # [3] int64 debug counters (segments, A elements, B elements loaded) or dummy
    N, H, W, C, CO, GC, SEG_STRIDE,
    TILES_W,      # tiles across one image
    IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 operands cast to fp32 before tl.dot: only for the interpreter, whose dot lacks bf16
    SEG_BLOCK: tl.constexpr,         # SEG_STRIDE rounded up to a power of two
    PRELOAD_SEGMENTS: tl.constexpr,  # the segment table in registers before the K loop (else a load a step)
    STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    N_CB = (C + BLOCK_N - 1) // BLOCK_N  # not tl.cdiv: a jit function, which the interpreter may not see
    job = pid // N_CB   # a job's channel blocks are neighbours: they share the grad tiles
    cb = pid % N_CB
    image = tl.load(jobs_ptr + job * 2)
    tile = tl.load(jobs_ptr + job * 2 + 1)
    n_seg = tl.load(nseg_ptr + tile)

    row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
    offs_n = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < C
    if COUNT:
        tl.atomic_add(count_ptr, 1 + n_seg.to(tl.int64))

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    n_kc = (GC + BLOCK_K - 1) // BLOCK_K   # K chunks of the centre segment
    n_ko = (CO + BLOCK_K - 1) // BLOCK_K   # K chunks of an off-centre segment
    tile_segments = seg_ptr + tile * SEG_STRIDE
    if PRELOAD_SEGMENTS:
        offs_s = tl.arange(0, SEG_BLOCK)
        seg_ok = offs_s < n_seg
        codes = tl.load(tile_segments + offs_s, mask=seg_ok, other=0)              # [SEG_BLOCK]
        seg_rates = tl.load(rates_ptr + tl.maximum(codes // 16 - 1, 0), mask=seg_ok, other=0)
    for i in tl.range(0, n_kc + n_seg * n_ko, num_stages=STAGES):
        centre = i < n_kc
        s = tl.maximum(i - n_kc, 0) // n_ko
        if PRELOAD_SEGMENTS:
            code = pick(codes, offs_s, s)
            rate = pick(seg_rates, offs_s, s)
        else:
            code = tl.load(tile_segments + tl.minimum(s, SEG_STRIDE - 1))
            rate = tl.load(rates_ptr + tl.maximum(code // 16 - 1, 0))
        br = tl.maximum(code // 16 - 1, 0)   # atrous branch index (0-based) of an off-centre segment
        tap = code % 16
        k0 = tl.where(centre, i, i - n_kc - s * n_ko) * BLOCK_K
        k_len = tl.where(centre, GC, CO)
        ch = tl.where(centre, 0, (1 + br) * CO)
        dy = tl.where(centre, 0, (tap // 3 - 1) * rate)
        dx = tl.where(centre, 0, (tap % 3 - 1) * rate)
        hs = hh + dy
        ws = ww + dx
        p_ok = valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        k_ok = offs_k < k_len - k0
        a_mask = p_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_mask[None, :]
        a = tl.load(g_ptr + (row + dy * W + dx)[:, None] * GC + ch + k0 + offs_k[None, :], mask=a_mask, other=0.0)
        w_seg = tl.where(centre, wc_ptr, wd_ptr + (br * 9 + tap).to(tl.int64) * CO * C)
        b = tl.load(w_seg + (k0 + offs_k)[:, None] * C + offs_n[None, :], mask=b_mask, other=0.0)
        if COUNT:  # an atomic an element, summing the masks (debug only; tl.sum is a jit function the
            # interpreter may not see)
            tl.atomic_add(count_ptr + 1 + a_mask.to(tl.int32) * 0, a_mask.to(tl.int64))
            tl.atomic_add(count_ptr + 2 + b_mask.to(tl.int32) * 0, b_mask.to(tl.int64))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    tl.store(gx_ptr + row[:, None] * C + offs_n[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


_dgrad_v2_tuned = triton.autotune(
    configs=configs.V2_TUNED,
    prune_configs_by={"early_config_prune": configs.v2_prune},
    key=["H", "W", "C", "CO", "GC", "SEG_STRIDE", "TILES_W", "PRECISION", "UPCAST", "PRELOAD_SEGMENTS", "STACK",
         "TILE_H", "TILE_W", "BLOCK_M", "BLOCK_K"],   # not N: a new batch size reuses the choice
    cache_results=True,
)(_dgrad_v2_kernel)


def run(g, wc, wd, rates_t, jobs, segments, n_segments, grad_x, counter, *, tiles_w, idx64, precision, upcast,
        config, tune=False, preload_segments=True):
    """g [N, H, W, (1+B)*Co] NHWC; wc [(1+B)*Co, C]; wd [B, 9, Co, C]; rates_t [B] int32; jobs [J, 2],
    segments [tiles, 8B], n_segments [tiles] int32 (jobs.dgrad_plan); grad_x [N, H, W, C] NHWC, written whole.
    config and tune as forward_v2.run's; preload_segments: the K loop's segment table in registers (False: the
    earlier loop, a load a step). Returns the number of programs."""
    n, h, w, gc = g.shape
    c = grad_x.shape[3]
    b = rates_t.shape[0]
    co = gc // (1 + b)
    args = (g, wc, wd, rates_t, jobs, segments, n_segments, grad_x, grad_x if counter is None else counter,
            n, h, w, c, co, gc, segments.shape[1], tiles_w, idx64, counter is not None, precision, upcast,
            triton.next_power_of_2(segments.shape[1]), preload_segments)

    def grid(meta):
        return (jobs.shape[0] * triton.cdiv(c, meta["BLOCK_N"]),)

    return launch(_dgrad_v2_kernel, _dgrad_v2_tuned, grid, args, config, tune, configs.V2_TILE_PARAMS)
