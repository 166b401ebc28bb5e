"""Weight-gradient kernel: one GEMM a tap, K = pixels, split-K reduced in a fixed order (DESIGN.md section 4).

    dW_b[tap] = sum over pixels p of x[p + tap_b]^T g_b[p]        ([C, CO] for each branch b and tap)

Jobs (grid axis 1): job 0 is the centre of all branches at once, x^T @ g over the whole concatenated grad
([C, (1+B)*CO], the 1x1 branch included); job 1 + 8b + t is off-centre tap t of atrous branch b. A job's K
loop walks only the pixels whose shifted input lies inside the image (a rectangle), in 2-D pixel tiles, so a
tap that is wholly padding has an empty loop and its gradient is an exact zero.

Split-K (grid axis 2): split s sums its own contiguous run of pixel tiles into partial s, and a second
kernel adds the partials in the order 0..S-1. No float atomics anywhere, so every run gives the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from resaspp_ops.backend.triton import configs


@triton.jit
def _wgrad_kernel(
    x_ptr,        # [N, H, W, C] NHWC input
    g_ptr,        # [N, H, W, GC] NHWC grad of the pre-epilogue output, GC = (1 + B) * CO
    rates_ptr,    # [B] int32
    part_ptr,     # [S, C, TOTAL] fp32 partial sums; TOTAL = GC + 8 * B * CO (centre columns, then the taps)
    count_ptr,    # [2] int32 debug counter of pixel tiles: [centre job, off-centre jobs], or dummy
    work_ptr,     # [P, 3] int32 (job, C block, N block) of each program (WORKLIST), or dummy
    N, H, W, C, CO, GC, TOTAL, S,
    RATES_KEY,    # a hash of the rates: only the autotuner reads it
    IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 operands cast to fp32 before tl.dot: only for the interpreter, whose dot lacks bf16
    BLOCK_P: tl.constexpr, TILE_W: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
    WORKLIST: tl.constexpr,  # second design: grid axis 0 walks a list of exactly the (job, block) pairs with work
):
    TILE_H: tl.constexpr = BLOCK_P // TILE_W
    pid = tl.program_id(0)
    split = tl.program_id(2)
    if WORKLIST:
        job = tl.load(work_ptr + pid * 3)
        cb = tl.load(work_ptr + pid * 3 + 1)
        nb = tl.load(work_ptr + pid * 3 + 2)
    else:  # first design: every job gets the column blocks of the widest one, the rest idle
        job = tl.program_id(1)
        n_cb = (C + BLOCK_C - 1) // BLOCK_C
        cb = pid % n_cb
        nb = pid // n_cb

    # The job's tap offset and its columns of the partial / channels of g.
    is_centre = job == 0
    jj = tl.maximum(job - 1, 0)
    br = jj // 8
    tap = jj % 8 + (jj % 8) // 4  # 0..3, 5..8: the off-centre taps
    rate = tl.where(is_centre, 0, tl.load(rates_ptr + br))
    dy = (tap // 3 - 1) * rate
    dx = (tap % 3 - 1) * rate
    n_cols = tl.where(is_centre, GC, CO)
    g_ch = tl.where(is_centre, 0, (1 + br) * CO)
    col0 = tl.where(is_centre, 0, GC + jj * CO)

    # Pixels p whose input p + (dy, dx) lies inside the image: [h_lo, h_hi) x [w_lo, w_hi).
    h_lo = tl.maximum(-dy, 0)
    h_hi = tl.minimum(H, H - dy)
    w_lo = tl.maximum(-dx, 0)
    w_hi = tl.minimum(W, W - dx)
    tiles_x = (tl.maximum(w_hi - w_lo, 0) + TILE_W - 1) // TILE_W
    per_img = ((tl.maximum(h_hi - h_lo, 0) + TILE_H - 1) // TILE_H) * tiles_x
    total = N * per_img
    per_split = (total + S - 1) // S
    it0 = tl.minimum(split * per_split, total)
    it1 = tl.minimum(it0 + per_split, total)
    it1 = tl.where(nb * BLOCK_N < n_cols, it1, it0)  # off-centre jobs have fewer column blocks
    if COUNT:
        tl.atomic_add(count_ptr + (job > 0).to(tl.int32), it1 - it0)

    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = offs_c < C
    n_mask = offs_n < n_cols
    m = tl.arange(0, BLOCK_P)
    mh = m // TILE_W
    mw = m % TILE_W
    m_ok = m < TILE_H * TILE_W
    # Offsets inside a pixel tile, fixed for the whole loop; each iteration only moves a scalar base.
    x_rel = (mh * W + mw)[None, :] * C + offs_c[:, None]       # [BLOCK_C, BLOCK_P]
    g_rel = (mh * W + mw)[:, None] * GC + offs_n[None, :]      # [BLOCK_P, BLOCK_N]
    xc_mask = c_mask[:, None]
    gn_mask = n_mask[None, :]
    x_base = x_ptr + (dy * W + dx) * C
    g_base = g_ptr + g_ch
    acc = tl.full([BLOCK_C, BLOCK_N], 0.0, tl.float32)
    for it in range(it0, it1):
        img = it // per_img
        rest = it % per_img
        th = h_lo + (rest // tiles_x) * TILE_H   # the pixel tile's top-left corner
        tw = w_lo + (rest % tiles_x) * TILE_W
        p_ok = m_ok & (mh < h_hi - th) & (mw < w_hi - tw)
        if IDX64:
            pix = (img.to(tl.int64) * H + th) * W + tw
        else:
            pix = (img * H + th) * W + tw
        xt = tl.load(x_base + pix * C + x_rel, mask=p_ok[None, :] & xc_mask, other=0.0)    # [BLOCK_C, BLOCK_P]
        gb = tl.load(g_base + pix * GC + g_rel, mask=p_ok[:, None] & gn_mask, other=0.0)   # [BLOCK_P, BLOCK_N]
        if UPCAST:
            xt = xt.to(tl.float32)
            gb = gb.to(tl.float32)
        acc = tl.dot(xt, gb, acc, input_precision=PRECISION)

    out = part_ptr + (split.to(tl.int64) * C + offs_c[:, None]) * TOTAL + col0 + offs_n[None, :]
    tl.store(out, acc, mask=c_mask[:, None] & n_mask[None, :])


@triton.jit
def _sum_splits_kernel(
    part_ptr,     # [S, NUMEL] fp32 partial sums
    out_ptr,      # [NUMEL] fp32
    S, NUMEL,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < NUMEL
    acc = tl.full([BLOCK], 0.0, tl.float32)
    for s in range(S):  # always 0, 1, ..., S-1: the fixed order that makes the result reproducible
        acc += tl.load(part_ptr + s * NUMEL + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc, mask=mask)


_wgrad_tuned = triton.autotune(
    configs=configs.WGRAD_CONFIGS,
    key=["N", "H", "W", "C", "CO", "S", "RATES_KEY", "PRECISION", "UPCAST", "BLOCK_P", "TILE_W", "WORKLIST"],
    prune_configs_by={"early_config_prune": configs.wgrad_prune},
)(_wgrad_kernel)


def run(x, g, rates_t, out, counter, *, splits, rates_key, idx64, precision, upcast, block_p, tile_w, config,
        work=None, zero_columns=()):
    """x [N, H, W, C]; g [N, H, W, (1+B)*Co]; rates_t [B] int32; out [C, (1+9B)*Co] fp32, filled.

    config: a dict of BLOCK_C / BLOCK_N / num_warps / num_stages, or None to autotune (first design only).
    work: None (first design: a grid of every job x the widest job's column blocks) or [P, 3] int32 (job, C block,
    N block) of exactly the programs with work, built for config's blocks (second design); zero_columns: the
    (start, stop) column ranges of the jobs it leaves out (taps that are padding on the whole map: their
    grads are exact zeros, written here instead). Returns the config used.
    """
    n, h, w, c = x.shape
    gc = g.shape[3]
    b = rates_t.shape[0]
    co = gc // (1 + b)
    total = out.shape[1]
    part = out if splits == 1 else out.new_empty((splits, c, total))
    for start, stop in zero_columns:
        part[..., start:stop].zero_()
    args = (x, g, rates_t, part, out if counter is None else counter, rates_t if work is None else work,
            n, h, w, c, co, gc, total, splits, rates_key, idx64, counter is not None, precision, upcast, block_p,
            tile_w)

    def grid(meta):
        if work is not None:
            return (work.shape[0], 1, splits)
        return (triton.cdiv(c, meta["BLOCK_C"]) * triton.cdiv(gc, meta["BLOCK_N"]), 1 + 8 * b, splits)

    if config is None:
        _wgrad_tuned[grid](*args, WORKLIST=work is not None)
        config = configs.config_dict(_wgrad_tuned.best_config)
    else:
        _wgrad_kernel[grid](*args, WORKLIST=work is not None, **config)
    if splits > 1:
        block = 1024 if out.is_cuda else 256
        _sum_splits_kernel[(triton.cdiv(out.numel(), block),)](part, out, splits, out.numel(), BLOCK=block)
    return config
