"""Forward kernel, second design (DESIGN.md section 4): one program a job = (tile, branch, block of Co).

Implicit GEMM in NHWC. A program reads its job from the host's work list (resaspp_ops.backend.jobs):
M = the tile's pixels (of STACK images on small maps), N = BLOCK_N output channels of the job's branch (all
Co = 256 in DeepLab: one job a branch), K = C x the branch's live taps, in ONE pipelined loop over the
(live tap, K chunk) pairs; the 1x1 branch is a job whose only tap is the centre. A tap whose shifted tile is
wholly padding is not in the job's tap mask: no loads, no MMAs. The 1 + B jobs of a tile are neighbours in
the list, so the tile is read from HBM once and from L2 by the other branches.

The first design (forward_kernel.py, RESASPP_TRITON_KERNEL=v1) kept all branches' accumulators live in one
program to share the centre tile; that capped BLOCK_N at 64 (benchmarks/NOTES.md: v1 against v2).
"""
from __future__ import annotations

import triton
import triton.language as tl

from resaspp_ops.backend.triton import configs
from resaspp_ops.backend.triton.host import launch
from resaspp_ops.backend.triton.tiles import epilogue_store, job_rows, live_tap_table, load_job


@triton.jit
def _forward_v2_kernel(
    x_ptr,        # [N, H, W, C] NHWC input
    w1_ptr,       # [C, CO] the 1x1 branch, K-major
    w3_ptr,       # [B, 9, C, CO] the atrous branches, tap ky * 3 + kx, K-major
    jobs_ptr,     # [J, 4] int32 work list: image, tile, branch (0 = 1x1), live-tap mask (backend/jobs.py)
    rates_ptr,    # [B] int32
    out_ptr,      # [N, H, W, OUT_C] NHWC output, OUT_C = (1 + B) * CO
    scale_ptr,    # [OUT_C] fp32 or dummy
    shift_ptr,    # [OUT_C] fp32 or dummy
    count_ptr,    # [3] int64 debug counters (live tap-jobs, A elements, B elements loaded) or dummy
    N, H, W, C, CO, OUT_C,
    TILES_W,      # tiles across one image
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 operands cast to fp32 before tl.dot: only for the interpreter, whose dot lacks bf16
    STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    N_NB = (CO + BLOCK_N - 1) // BLOCK_N  # not tl.cdiv: a jit function, which the interpreter may not see
    job = pid // N_NB   # a job's channel blocks are neighbours too: they share the A tiles
    nb = pid % N_NB
    image, tile, branch, taps, rate = load_job(jobs_ptr, job, rates_ptr)

    row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < CO
    table, n_live = live_tap_table(taps)
    # The job's weights: [taps, C, CO] K-major; the 1x1 branch has one "tap".
    w_job = tl.where(branch == 0, w1_ptr, w3_ptr + tl.maximum(branch - 1, 0).to(tl.int64) * 9 * C * CO)
    w_rel = offs_k[:, None] * CO + offs_n[None, :]
    if COUNT:
        tl.atomic_add(count_ptr, n_live.to(tl.int64))

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    n_k = (C + BLOCK_K - 1) // BLOCK_K
    for i in tl.range(0, n_live * n_k, num_stages=STAGES):
        j = i // n_k
        k0 = (i - j * n_k) * BLOCK_K
        tap = (table >> (4 * j)) & 15
        dy = (tap // 3 - 1) * rate
        dx = (tap % 3 - 1) * rate
        hs = hh + dy
        ws = ww + dx
        p_ok = valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        k_ok = offs_k < C - k0
        a_mask = p_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_mask[None, :]
        a = tl.load(x_ptr + (row + dy * W + dx)[:, None] * C + k0 + offs_k[None, :], mask=a_mask, other=0.0)
        w_tap = tl.where(branch == 0, 0, tap)
        b = tl.load(w_job + (w_tap * C + k0) * CO + w_rel, mask=b_mask, other=0.0)
        if COUNT:  # an atomic an element, summing the masks (debug only; tl.sum is a jit function the
            # interpreter may not see)
            tl.atomic_add(count_ptr + 1 + a_mask.to(tl.int32) * 0, a_mask.to(tl.int64))
            tl.atomic_add(count_ptr + 2 + b_mask.to(tl.int32) * 0, b_mask.to(tl.int64))
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    epilogue_store(acc, out_ptr, row * OUT_C, valid, branch * CO, offs_n, CO, scale_ptr, shift_ptr,
                   HAS_SCALE, HAS_SHIFT, RELU)


_forward_v2_tuned = triton.autotune(
    configs=configs.V2_TUNED,
    prune_configs_by={"early_config_prune": configs.v2_prune},
    key=["H", "W", "C", "CO", "OUT_C", "TILES_W", "HAS_SCALE", "HAS_SHIFT", "RELU", "PRECISION", "UPCAST", "STACK",
         "TILE_H", "TILE_W", "BLOCK_M", "BLOCK_K"],   # not N: a new batch size reuses the choice
    cache_results=True,
)(_forward_v2_kernel)


def run(xh, w1p, w3p, jobs, rates_t, out, scale, shift, relu, counter, *, tiles_w, idx64, precision, upcast,
        config, tune=False):
    """One launch over every job of the work list; returns the number of programs.

    xh [N, H, W, C] NHWC; w1p [C, Co]; w3p [B, 9, C, Co]; jobs [J, 4] int32; rates_t [B] int32;
    out [N, H, W, (1+B)*Co] NHWC; config: STACK, TILE_H, TILE_W, BLOCK_M, BLOCK_K (the work list's tile) and
    BLOCK_N, STAGES, num_warps, which tune=True times from configs.V2_TUNED instead.
    """
    n, h, w, c = xh.shape
    co = w1p.shape[1]
    dummy = out
    args = (xh, w1p, w3p, jobs, rates_t, out, dummy if scale is None else scale, dummy if shift is None else shift,
            dummy if counter is None else counter, n, h, w, c, co, out.shape[3], tiles_w,
            scale is not None, shift is not None, relu, idx64, counter is not None, precision, upcast)

    def grid(meta):
        return (jobs.shape[0] * triton.cdiv(co, meta["BLOCK_N"]),)

    return launch(_forward_v2_kernel, _forward_v2_tuned, grid, args, config, tune, configs.V2_TILE_PARAMS)
