"""Data-gradient kernel: the grads of all branches into grad_x in one pass (DESIGN.md section 4).

With stride 1 and padding = rate, grad_x is the same multi-rate correlation as the forward, applied to the
branch grads with spatially flipped, transposed weights:

    grad_x[q] = sum_b sum_tap g_b[q + tap_b] @ W_b[flip(tap)]^T

One program owns (image, 2-D tile, block of input channels) and one fp32 accumulator. The centre taps of all
1 + B branches form a single GEMM with K = (1 + B) * Co over the concatenated grad; the off-centre taps
follow branch by branch with the forward's tap skipping. Every grad_x element is written once: no atomics.
"""
from __future__ import annotations

import triton
import triton.language as tl

from resaspp_ops.backend.triton import configs
from resaspp_ops.backend.triton.tiles import branch_taps, pixel_offsets, program_block, tile_coords


@triton.jit
def _dgrad_kernel(
    g_ptr,        # [N, H, W, GC] NHWC grad of the pre-epilogue output, GC = (1 + B) * CO
    wc_ptr,       # [GC, C] centre taps of all branches (1x1 first), transposed
    wd_ptr,       # [B, 9, CO, C] atrous taps, flipped and transposed
    rates_ptr,    # [B] int32
    gx_ptr,       # [N, H, W, C] NHWC grad_x
    count_ptr,    # [1] int32 tap-tile counter (debug) or dummy
    N, H, W, C, CO, GC, B,
    RATES_KEY,    # a hash of the rates: only the autotuner reads it
    IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 operands cast to fp32 before tl.dot: only for the interpreter, whose dot lacks bf16
    BLOCK_M: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT: tl.constexpr,  # one loop over a branch's (live tap, K chunk) pairs instead of a loop a tap
):
    img, tile, cob = program_block(C, H, W, BLOCK_M, TILE_W, BLOCK_N)

    h0, h1, w0, w1, hh, ww, in_image = tile_coords(tile, H, W, BLOCK_M, TILE_W)
    offs_n = cob * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < C
    g_img = g_ptr + img.to(tl.int64) * H * W * GC
    p_off = pixel_offsets(hh, ww, W, IDX64)

    acc = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    if COUNT:
        tl.atomic_add(count_ptr, B + 1)
    # Centre taps of every branch at once: K runs over the whole concatenated grad.
    a_ptrs = g_img + p_off[:, None] * GC + offs_k[None, :]
    b_ptrs = wc_ptr + offs_k[:, None] * C + offs_n[None, :]
    for k0 in range(0, GC, BLOCK_K):
        k_ok = offs_k < GC - k0
        a = tl.load(a_ptrs, mask=in_image[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K * C
    # Off-centre taps, branch by branch (one accumulator, so the branch loop need not unroll).
    for br in range(B):
        rate = tl.load(rates_ptr + br)
        acc = branch_taps(acc, g_img + (1 + br) * CO, GC, wd_ptr + br * 9 * CO * C, C, CO, rate,
                          h0, h1, w0, w1, hh, ww, H, W, offs_n, count_ptr, BLOCK_K, IDX64, COUNT, PRECISION,
                          UPCAST, FLAT)

    gx_img = gx_ptr + img.to(tl.int64) * H * W * C
    tl.store(gx_img + p_off[:, None] * C + offs_n[None, :], acc.to(gx_ptr.dtype.element_ty),
             mask=in_image[:, None] & n_mask[None, :])


_dgrad_tuned = triton.autotune(
    configs=configs.CONV_CONFIGS,
    key=["N", "H", "W", "C", "CO", "B", "RATES_KEY", "PRECISION", "UPCAST"],
    prune_configs_by={"early_config_prune": configs.conv_prune("dgrad")},
)(_dgrad_kernel)


def run(g, wc, wd, rates_t, grad_x, counter, *, rates_key, idx64, precision, upcast, config):
    """g [N, H, W, (1+B)*Co] NHWC; wc [(1+B)*Co, C]; wd [B, 9, Co, C]; rates_t [B] int32; grad_x [N, H, W, C].

    config: a dict of meta-parameters, or None to autotune. Returns the config used.
    """
    n, h, w, gc = g.shape
    c = grad_x.shape[3]
    b = rates_t.shape[0]
    co = gc // (1 + b)
    args = (g, wc, wd, rates_t, grad_x, grad_x if counter is None else counter, n, h, w, c, co, gc, b, rates_key,
            idx64, counter is not None, precision, upcast)

    def grid(meta):
        tile_h = meta["BLOCK_M"] // meta["TILE_W"]
        return (n * triton.cdiv(h, tile_h) * triton.cdiv(w, meta["TILE_W"]) * triton.cdiv(c, meta["BLOCK_N"]),)

    if config is None:
        _dgrad_tuned[grid](*args)
        return configs.config_dict(_dgrad_tuned.best_config)
    _dgrad_kernel[grid](*args, **config)
    return config
