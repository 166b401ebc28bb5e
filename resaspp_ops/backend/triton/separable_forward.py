"""Forward kernel of the separable op (multi_rate_separable_conv2d): one program a job = (tile, branch, block of Co).

The jobs are the second design's (backend/jobs.py), the operands backend/separable_plan.py's: every branch is
a depthwise 3x3 of its rate (the 1x1 branch: the identity, its centre tap 1), a per-channel mid stage and a
pointwise GEMM. A program walks C in chunks of BLOCK_K; per chunk it loads the job's live shifted taps of x,
multiply-adds the depthwise taps in fp32 registers, applies the mid stage (scale, shift, ReLU), casts to x's
dtype and feeds that [BLOCK_M, BLOCK_K] block as the A operand of the pointwise MMA against the chunk's
[BLOCK_K, BLOCK_N] weights. The depthwise output never leaves registers; a tap wholly in padding costs nothing.
Two walks over a job's taps (UNROLL_TAPS; configs.separable_unroll_taps), the same taps in the same order, so
bitwise the same result: a loop over the live taps (the default; the nested loop keeps Triton's pipeliner off,
so each chunk waits for its weights), or the nine taps unrolled, each under a branch on its bit (opt-in, where C
is a multiple of 16: no inner loop, so the pipeliner takes the K loop and the weight chunk arrives by cp.async
ahead of its use, but the compiler then moves the depthwise block's conversion to the MMA operand layout into
every live tap's branch); the first GPU run compares them (benchmarks/NOTES.md).
Then multi_rate_conv2d's epilogue into the concatenated channels_last output, half the channels at a time
(tiles.epilogue_store_halves: whole, it spilled under Triton 3.6).
"""
from __future__ import annotations

import triton
import triton.language as tl

from resaspp_ops.backend.triton.tiles import epilogue_store_halves, job_rows, live_tap_table, load_job, relu


@triton.jit
def depthwise_tap(x_ptr, dw_ptr, row, hh, ww, valid, branch, rate, tap, k0, offs_k, k_ok, H, W, C):
    """[BLOCK_M, BLOCK_K] fp32: one tap's term of the depthwise output, x shifted by the tap's offset (zero
    where that lands in padding) times the tap's weights. x_ptr [N, H, W, C] NHWC; dw_ptr [1+B, 9, C] fp32."""
    dy = (tap // 3 - 1) * rate
    dx = (tap % 3 - 1) * rate
    hs = hh + dy
    ws = ww + dx
    p_ok = valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
    xv = tl.load(x_ptr + (row + dy * W + dx)[:, None] * C + k0 + offs_k[None, :],
                 mask=p_ok[:, None] & k_ok[None, :], other=0.0)
    wv = tl.load(dw_ptr + (branch * 9 + tap) * C + k0 + offs_k, mask=k_ok, other=0.0)
    return xv.to(tl.float32) * wv[None, :]


@triton.jit
def depthwise_block(x_ptr, dw_ptr, row, hh, ww, valid, table, n_live, branch, rate, k0, offs_k, k_ok, H, W, C,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_K] fp32: the depthwise output of one branch on a tile's rows for channels k0 + offs_k,
    summed over the live taps in `table` (tiles.live_tap_table), one a step."""
    d = tl.full([BLOCK_M, BLOCK_K], 0.0, tl.float32)
    for j in range(0, n_live):
        d += depthwise_tap(x_ptr, dw_ptr, row, hh, ww, valid, branch, rate, (table >> (4 * j)) & 15, k0, offs_k,
                           k_ok, H, W, C)
    return d


@triton.jit
def depthwise_block_unrolled(x_ptr, dw_ptr, row, hh, ww, valid, taps, branch, rate, k0, offs_k, k_ok, H, W, C,
                             BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """depthwise_block with the nine taps unrolled, each under a branch on its bit of the job's tap mask `taps`,
    in tap order as the loop's live-tap table: no inner loop left in the caller's K loop."""
    d = tl.full([BLOCK_M, BLOCK_K], 0.0, tl.float32)
    for tap in tl.static_range(9):
        if ((taps >> tap) & 1) != 0:
            d += depthwise_tap(x_ptr, dw_ptr, row, hh, ww, valid, branch, rate, tap, k0, offs_k, k_ok, H, W, C)
    return d


@triton.jit
def mid_stage(d, branch, k0, offs_k, k_ok, C, mid_scale_ptr, mid_shift_ptr,
              HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, MID_RELU: tl.constexpr):
    """(m, a): m = d * mid_scale + mid_shift of the branch's channels (fp32), a = ReLU(m) under MID_RELU (never
    on branch 0, the 1x1, whose mid stage is the identity; NaN kept, as torch.relu). mid_*_ptr [(1+B) * C] fp32."""
    if HAS_MID_SCALE:
        d = d * tl.load(mid_scale_ptr + branch * C + k0 + offs_k, mask=k_ok, other=0.0)[None, :]
    if HAS_MID_SHIFT:
        d = d + tl.load(mid_shift_ptr + branch * C + k0 + offs_k, mask=k_ok, other=0.0)[None, :]
    a = d
    if MID_RELU:
        a = tl.where(branch == 0, d, relu(d))
    return d, a


@triton.jit
def _separable_forward_kernel(
    x_ptr,          # [N, H, W, C] NHWC input
    dw_ptr,         # [1+B, 9, C] fp32 depthwise taps, tap ky * 3 + kx (branch 0: the identity)
    pw_ptr,         # [1+B, C, CO] pointwise weights, K-major (branch 0: w1x1)
    mid_scale_ptr,  # [(1+B) * C] fp32 or dummy
    mid_shift_ptr,  # [(1+B) * C] fp32 or dummy
    jobs_ptr,       # [J, 4] int32 work list: image, tile, branch (0 = 1x1), live-tap mask (backend/jobs.py)
    rates_ptr,      # [B] int32
    out_ptr,        # [N, H, W, OUT_C] NHWC output, OUT_C = (1 + B) * CO
    scale_ptr,      # [OUT_C] fp32 or dummy
    shift_ptr,      # [OUT_C] fp32 or dummy
    count_ptr,      # [1] int64 debug counter (live tap-jobs) or dummy
    N, H, W, C, CO, OUT_C,
    TILES_W,        # tiles across one image
    HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, MID_RELU: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 operands cast to fp32 before tl.dot: only for the interpreter, whose dot lacks bf16
    UNROLL_TAPS: tl.constexpr,  # the nine taps unrolled (depthwise_block_unrolled), else a loop over the live ones
    STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    N_NB = (CO + BLOCK_N - 1) // BLOCK_N
    job = pid // N_NB
    nb = pid % N_NB
    image, tile, branch, taps, rate = load_job(jobs_ptr, job, rates_ptr)

    row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < CO
    table, n_live = live_tap_table(taps)
    pw_job = pw_ptr + branch.to(tl.int64) * C * CO
    if COUNT:
        if nb == 0:  # once a job, not once a channel block
            tl.atomic_add(count_ptr, n_live.to(tl.int64))

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in tl.range(0, C, BLOCK_K, num_stages=STAGES):
        k_ok = offs_k < C - k0
        if UNROLL_TAPS:
            d = depthwise_block_unrolled(x_ptr, dw_ptr, row, hh, ww, valid, taps, branch, rate, k0, offs_k, k_ok,
                                         H, W, C, BLOCK_M, BLOCK_K)
        else:
            d = depthwise_block(x_ptr, dw_ptr, row, hh, ww, valid, table, n_live, branch, rate, k0, offs_k, k_ok,
                                H, W, C, BLOCK_M, BLOCK_K)
        _, a = mid_stage(d, branch, k0, offs_k, k_ok, C, mid_scale_ptr, mid_shift_ptr,
                         HAS_MID_SCALE, HAS_MID_SHIFT, MID_RELU)
        a = a.to(x_ptr.dtype.element_ty)
        b = tl.load(pw_job + (k0 + offs_k)[:, None] * CO + offs_n[None, :],
                    mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    epilogue_store_halves(acc, out_ptr, row * OUT_C, valid, branch * CO, nb * BLOCK_N, CO, scale_ptr, shift_ptr,
                          HAS_SCALE, HAS_SHIFT, RELU)


def run(xh, ops, jobs, rates_t, out, mid_relu, scale, shift, relu, counter, *, tiles_w, idx64, precision, upcast,
        unroll_taps, config):
    """One launch over every job of the work list; returns the number of programs.

    xh [N, H, W, C] NHWC; ops: separable_plan.SeparableOperands; jobs [J, 4] int32; rates_t [B] int32;
    out [N, H, W, (1+B)*Co] NHWC; config: STACK, TILE_H, TILE_W, BLOCK_M, BLOCK_K (the work list's tile),
    BLOCK_N, STAGES, num_warps.
    """
    n, h, w, c = xh.shape
    co = ops.pw.shape[2]
    dummy = ops.dw
    grid = (jobs.shape[0] * triton.cdiv(co, config["BLOCK_N"]),)
    _separable_forward_kernel[grid](
        xh, ops.dw, ops.pw, dummy if ops.mid_scale is None else ops.mid_scale,
        dummy if ops.mid_shift is None else ops.mid_shift, jobs, rates_t, out,
        dummy if scale is None else scale, dummy if shift is None else shift, dummy if counter is None else counter,
        n, h, w, c, co, out.shape[3], tiles_w,
        ops.mid_scale is not None, ops.mid_shift is not None, mid_relu, scale is not None, shift is not None, relu,
        idx64, counter is not None, precision, upcast, unroll_taps, **config)
    return grid[0]
