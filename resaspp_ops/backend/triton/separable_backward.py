"""Backward kernels of the separable op; the depthwise outputs are recomputed from x, never stored.

Per branch b (the 1x1 is branch 0, its depthwise the identity; backend/separable_plan.py), from the grad G_b
[M, Co] of the branch's pre-epilogue output:

    dgrad      one program a (tile, block of input channels): dA = G_b @ Wpw_b^T (MMA over Co), then with a
               mid stage the depthwise block D recomputed on the job's live taps: dM = dA, zeroed where
               m = D s + t <= 0 under the mid ReLU (a NaN m passes, as in torch.relu's backward), the job's
               partial sums of dM D and dM (grad_mid_scale / grad_mid_shift, reduced over jobs by the host in
               a fixed order), dD = dM s, stored [N, H, W, C]. Branch 0's dD is its grad_x contribution and
               goes straight into grad_x.
    stencil    one program a (tile, channel block): grad_x += sum over the live taps of dD[p - offset] w_dw[tap]
               (the depthwise transpose; a tap whose mirrored shift is wholly padding is skipped), and the host
               runs it branch by branch over ONE dD buffer: one depthwise-sized temporary at the peak.
    dw_wgrad   one program a (pixel split, channel block): grad_w_dw[tap, c] = sum_p dD[p, c] x[p + offset, c]
               over the split's tiles, partials [splits, 9, C] summed by the host in a fixed order.
    pw_wgrad   one program a (pixel split, branch, C block, Co block): grad_w_pw = A^T G over the split's
               tiles, A = mid(depthwise(x)) recomputed; fp32 partials summed in a fixed order.

No atomics and fixed reduction orders: the grads are bitwise reproducible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from resaspp_ops.backend.triton.separable_forward import depthwise_block, mid_stage
from resaspp_ops.backend.triton.tiles import branch_rate, column_sum, job_rows, live_tap_table, load_job, relu_grad


@triton.jit
def _separable_dgrad_kernel(
    g_ptr,          # [N, H, W, GC] NHWC grad of the pre-epilogue output, GC = (1 + B) * CO
    pwt_ptr,        # [1+B, CO, C] pointwise weights as the op takes them (branch 0: w1x1)
    x_ptr,          # [N, H, W, C] NHWC input (for the recomputed depthwise block)
    dw_ptr,         # [1+B, 9, C] fp32 depthwise taps
    mid_scale_ptr,  # [(1+B) * C] fp32 or dummy
    mid_shift_ptr,  # [(1+B) * C] fp32 or dummy
    jobs_ptr,       # [T, 4] int32: this branch's jobs (image, tile, branch, live-tap mask)
    rates_ptr,      # [B] int32
    dd_ptr,         # [N, H, W, C] NHWC out: dD of the branch, in x's dtype
    mid_grad_ptr,   # [2, T, C] fp32 out: per job sum_p dM D, sum_p dM; or dummy
    N, H, W, C, CO, GC, T, TILES_W,
    RECOMPUTE: tl.constexpr,   # D recomputed: for the mid ReLU's mask and the grads of the mid stage
    HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, MID_RELU: tl.constexpr, NEED_MID: tl.constexpr,
    STORE_DD: tl.constexpr,    # dD is needed (grad_x or the depthwise weight grad), not only the mid grads
    IDX64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
):
    pid = tl.program_id(0)
    N_CB = (C + BLOCK_N - 1) // BLOCK_N
    job = pid // N_CB
    cb = pid % N_CB
    image, tile, branch, taps, rate = load_job(jobs_ptr, job, rates_ptr)
    row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
    offs_c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    offs_k = tl.arange(0, BLOCK_K)
    pwt_branch = pwt_ptr + branch.to(tl.int64) * CO * C

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    for k0 in tl.range(0, CO, BLOCK_K, num_stages=STAGES):
        k_ok = offs_k < CO - k0
        a = tl.load(g_ptr + (row * GC + branch * CO + k0)[:, None] + offs_k[None, :],
                    mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(pwt_branch + (k0 + offs_k)[:, None] * C + offs_c[None, :],
                    mask=k_ok[:, None] & c_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)

    if RECOMPUTE:
        table, n_live = live_tap_table(taps)
        c0 = cb * BLOCK_N
        offs_b = tl.arange(0, BLOCK_N)
        d = depthwise_block(x_ptr, dw_ptr, row, hh, ww, valid, table, n_live, branch, rate, c0, offs_b, c_mask,
                            H, W, C, BLOCK_M, BLOCK_N)
        m, _ = mid_stage(d, branch, c0, offs_b, c_mask, C, mid_scale_ptr, mid_shift_ptr,
                         HAS_MID_SCALE, HAS_MID_SHIFT, MID_RELU)
        if MID_RELU:
            acc = relu_grad(acc, m)
        if NEED_MID:
            if HAS_MID_SCALE:
                tl.store(mid_grad_ptr + job * C + offs_c, column_sum(acc * d), mask=c_mask)
            if HAS_MID_SHIFT:
                tl.store(mid_grad_ptr + (T + job) * C + offs_c, column_sum(acc), mask=c_mask)
    if STORE_DD:
        if HAS_MID_SCALE:   # branch 0's scale is 1 (separable_plan.pack_weights)
            acc = acc * tl.load(mid_scale_ptr + branch * C + offs_c, mask=c_mask, other=0.0)[None, :]
        tl.store(dd_ptr + (row * C)[:, None] + offs_c[None, :], acc.to(dd_ptr.dtype.element_ty),
                 mask=valid[:, None] & c_mask[None, :])


@triton.jit
def _depthwise_dgrad_kernel(
    dd_ptr,         # [N, H, W, C] NHWC: dD of one branch
    dw_ptr,         # [1+B, 9, C] fp32 depthwise taps
    jobs_ptr,       # [T, 4] int32: the branch's jobs, their tap masks MIRRORED (tap t live where 8 - t reads in)
    rates_ptr,      # [B] int32
    gx_ptr,         # [N, H, W, C] NHWC grad_x, read, added to and written back (x's dtype)
    N, H, W, C, TILES_W,
    IDX64: tl.constexpr, STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    N_CB = (C + BLOCK_N - 1) // BLOCK_N
    job = pid // N_CB
    cb = pid % N_CB
    image, tile, branch, taps, rate = load_job(jobs_ptr, job, rates_ptr)
    row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
    offs_c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    out_mask = valid[:, None] & c_mask[None, :]
    gx_ptrs = gx_ptr + (row * C)[:, None] + offs_c[None, :]
    acc = tl.load(gx_ptrs, mask=out_mask, other=0.0).to(tl.float32)
    table, n_live = live_tap_table(taps)
    for j in range(0, n_live):
        tap = (table >> (4 * j)) & 15
        dy = (tap // 3 - 1) * rate
        dx = (tap % 3 - 1) * rate
        hs = hh - dy
        ws = ww - dx
        p_ok = valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        v = tl.load(dd_ptr + ((row - dy * W - dx) * C)[:, None] + offs_c[None, :],
                    mask=p_ok[:, None] & c_mask[None, :], other=0.0)
        wv = tl.load(dw_ptr + (branch * 9 + tap) * C + offs_c, mask=c_mask, other=0.0)
        acc += v.to(tl.float32) * wv[None, :]
    tl.store(gx_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _depthwise_wgrad_kernel(
    dd_ptr,         # [N, H, W, C] NHWC: dD of one branch
    x_ptr,          # [N, H, W, C] NHWC input
    jobs_ptr,       # [T, 4] int32: the branch's jobs (forward tap masks)
    rates_ptr,      # [B] int32
    out_ptr,        # [S, 9, C] fp32 out: per split, sum_p dD[p, c] x[p + offset(tap), c]
    N, H, W, C, T, TILES_PER_SPLIT, TILES_W,
    IDX64: tl.constexpr, STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    N_CB = (C + BLOCK_N - 1) // BLOCK_N
    split = pid // N_CB
    cb = pid % N_CB
    offs_c = cb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    tap_rows = tl.arange(0, 16)
    acc = tl.full([16, BLOCK_N], 0.0, tl.float32)   # row t: tap t (rows 9-15 unused)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, T)):
        image, tile, branch, taps, rate = load_job(jobs_ptr, t, rates_ptr)
        row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
        dv = tl.load(dd_ptr + (row * C)[:, None] + offs_c[None, :], mask=valid[:, None] & c_mask[None, :],
                     other=0.0).to(tl.float32)
        table, n_live = live_tap_table(taps)
        for j in range(0, n_live):
            tap = (table >> (4 * j)) & 15
            dy = (tap // 3 - 1) * rate
            dx = (tap % 3 - 1) * rate
            hs = hh + dy
            ws = ww + dx
            p_ok = valid & (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            xv = tl.load(x_ptr + ((row + dy * W + dx) * C)[:, None] + offs_c[None, :],
                         mask=p_ok[:, None] & c_mask[None, :], other=0.0)
            contribution = column_sum(dv * xv.to(tl.float32))
            acc += tl.where(tap_rows[:, None] == tap, contribution[None, :], 0.0)
    tl.store(out_ptr + (split * 9 + tap_rows)[:, None] * C + offs_c[None, :], acc,
             mask=(tap_rows[:, None] < 9) & c_mask[None, :])


@triton.jit
def _pointwise_wgrad_kernel(
    x_ptr,          # [N, H, W, C] NHWC input
    dw_ptr,         # [1+B, 9, C] fp32 depthwise taps
    mid_scale_ptr,  # [(1+B) * C] fp32 or dummy
    mid_shift_ptr,  # [(1+B) * C] fp32 or dummy
    g_ptr,          # [N, H, W, GC] NHWC grad of the pre-epilogue output
    jobs_ptr,       # [1+B, T, 4] int32: every branch's jobs, the same tiles in the same order
    rates_ptr,      # [B] int32
    out_ptr,        # [S, 1+B, C, CO] fp32 out: per split, A^T G of each branch
    N, H, W, C, CO, GC, NB, T, TILES_PER_SPLIT, TILES_W,
    HAS_MID_SCALE: tl.constexpr, HAS_MID_SHIFT: tl.constexpr, MID_RELU: tl.constexpr,
    IDX64: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    N_CB = (C + BLOCK_C - 1) // BLOCK_C
    N_NB = (CO + BLOCK_N - 1) // BLOCK_N
    nb = pid % N_NB
    cb = (pid // N_NB) % N_CB
    branch = (pid // (N_NB * N_CB)) % NB
    split = pid // (N_NB * N_CB * NB)
    rate = branch_rate(branch, rates_ptr)
    c0 = cb * BLOCK_C
    offs_b = tl.arange(0, BLOCK_C)
    c_mask = c0 + offs_b < C
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < CO
    branch_jobs = jobs_ptr + branch * T * 4
    acc = tl.full([BLOCK_C, BLOCK_N], 0.0, tl.float32)
    first = split * TILES_PER_SPLIT
    for t in range(first, tl.minimum(first + TILES_PER_SPLIT, T)):
        image, tile, _, taps, _ = load_job(branch_jobs, t, rates_ptr)
        row, hh, ww, valid = job_rows(image, tile, TILES_W, N, H, W, STACK, TILE_H, TILE_W, BLOCK_M, IDX64)
        table, n_live = live_tap_table(taps)
        d = depthwise_block(x_ptr, dw_ptr, row, hh, ww, valid, table, n_live, branch, rate, c0, offs_b, c_mask,
                            H, W, C, BLOCK_M, BLOCK_C)
        _, a = mid_stage(d, branch, c0, offs_b, c_mask, C, mid_scale_ptr, mid_shift_ptr,
                         HAS_MID_SCALE, HAS_MID_SHIFT, MID_RELU)
        a = a.to(x_ptr.dtype.element_ty)   # the A operand the forward's MMA saw
        gv = tl.load(g_ptr + (row * GC + branch * CO)[:, None] + offs_n[None, :],
                     mask=valid[:, None] & n_mask[None, :], other=0.0)   # rows past the map: 0, whatever a is
        if UPCAST:
            a = a.to(tl.float32)
            gv = gv.to(tl.float32)
        acc = tl.dot(tl.trans(a), gv, acc, input_precision=PRECISION)
    out = out_ptr + ((split * NB + branch).to(tl.int64) * C + c0) * CO
    tl.store(out + offs_b[:, None] * CO + offs_n[None, :], acc, mask=c_mask[:, None] & n_mask[None, :])


def _program_split(t: int, other_programs: int, device, k, cap: int | None = 16) -> int:
    """Pixel splits of a weight-grad launch: enough programs to fill the GPU (at most `cap`, where the partials
    are large), each split a long walk; two on the interpreter so that the fixed-order reduction is exercised."""
    if device.type != "cuda":
        return min(2, max(t, 1))
    splits = min(t, k.configs.cdiv(2 * k.configs.sm_count(device.index or 0), other_programs))
    return max(1, splits if cap is None else min(splits, cap))


def dgrad(g, pwt, xh, ops, branch, jobs, rates_t, dd, mid_grad, mid_relu, need_mid, *, tiles_w, idx64, precision,
          upcast, config):
    """dD of `branch` (its jobs [T, 4]) into dd, or None where only the mid grads are wanted (branch 0: its grad_x
    contribution); mid_grad [2, T, C] fp32 or None."""
    n, h, w, c = xh.shape
    co = pwt.shape[1]
    t = jobs.shape[0]
    dummy = ops.dw
    need_mid = need_mid and mid_grad is not None
    recompute = branch > 0 and (mid_relu or need_mid)   # a linear mid stage's dD needs no D
    grid = (t * triton.cdiv(c, config["BLOCK_N"]),)
    _separable_dgrad_kernel[grid](
        g, pwt, xh, ops.dw, dummy if ops.mid_scale is None else ops.mid_scale,
        dummy if ops.mid_shift is None else ops.mid_shift, jobs, rates_t, dummy if dd is None else dd,
        dummy if mid_grad is None else mid_grad, n, h, w, c, co, g.shape[3], t, tiles_w,
        recompute, ops.mid_scale is not None, ops.mid_shift is not None, mid_relu, need_mid, dd is not None,
        idx64, precision, upcast, **config)


def stencil(dd, ops, mirrored_jobs, rates_t, gx, *, tiles_w, idx64, config):
    n, h, w, c = dd.shape
    grid = (mirrored_jobs.shape[0] * triton.cdiv(c, config["BLOCK_N"]),)
    _depthwise_dgrad_kernel[grid](dd, ops.dw, mirrored_jobs, rates_t, gx, n, h, w, c, tiles_w, idx64,
                                  **{key: config[key] for key in ("STACK", "TILE_H", "TILE_W", "BLOCK_M", "BLOCK_N",
                                                                  "num_warps")})


def dw_wgrad(dd, xh, jobs, rates_t, k, *, tiles_w, idx64, config):
    """[9, C] fp32: the depthwise weight grad of one branch (tap ky * 3 + kx)."""
    n, h, w, c = xh.shape
    t = jobs.shape[0]
    n_cb = triton.cdiv(c, config["BLOCK_N"])
    splits = _program_split(t, n_cb, xh.device, k, cap=None)   # the partials are [splits, 9, C]: small
    per_split = triton.cdiv(t, splits)
    splits = triton.cdiv(t, per_split)
    partials = torch.empty((splits, 9, c), dtype=torch.float32, device=xh.device)
    _depthwise_wgrad_kernel[(splits * n_cb,)](
        dd, xh, jobs, rates_t, partials, n, h, w, c, t, per_split, tiles_w, idx64,
        **{key: config[key] for key in ("STACK", "TILE_H", "TILE_W", "BLOCK_M", "BLOCK_N", "num_warps")})
    return partials.sum(dim=0)


def pw_wgrad(xh, ops, g, all_jobs, rates_t, mid_relu, k, *, tiles_w, idx64, precision, upcast, config):
    """[1+B, C, Co] fp32: every branch's pointwise weight grad A^T G (branch 0: w1x1's), K-major."""
    n, h, w, c = xh.shape
    nb_branches, t = all_jobs.shape[:2]
    co = g.shape[3] // nb_branches
    blocks = nb_branches * triton.cdiv(c, config["BLOCK_C"]) * triton.cdiv(co, config["BLOCK_N"])
    splits = _program_split(t, blocks, xh.device, k)
    while splits > 1 and splits * nb_branches * c * co * 4 > (512 << 20):   # the partials' memory
        splits -= 1
    per_split = triton.cdiv(t, splits)
    splits = triton.cdiv(t, per_split)
    partials = torch.empty((splits, nb_branches, c, co), dtype=torch.float32, device=xh.device)
    dummy = ops.dw
    _pointwise_wgrad_kernel[(splits * blocks,)](
        xh, ops.dw, dummy if ops.mid_scale is None else ops.mid_scale,
        dummy if ops.mid_shift is None else ops.mid_shift, g, all_jobs, rates_t, partials,
        n, h, w, c, co, g.shape[3], nb_branches, t, per_split, tiles_w,
        ops.mid_scale is not None, ops.mid_shift is not None, mid_relu, idx64, precision, upcast, **config)
    return partials.sum(dim=0)
