"""Forward kernel: the 1x1 branch and up to MAX_ATROUS atrous 3x3 branches in one pass (DESIGN.md section 4).

Implicit GEMM in NHWC. One program owns (image, 2-D output tile, block of BLOCK_N output channels) and
computes that block for every branch of the launch, one fp32 accumulator per branch:

    centre phase   per K chunk, the centre input tile is loaded ONCE and feeds the 1x1 dot and the centre-tap
                   dot of every atrous branch (the shared read);
    off-centre     per branch, the 8 taps at (+-r, 0), (0, +-r), (+-r, +-r); a tap whose shifted tile is
                   wholly zero padding is skipped by one scalar test (no loads, no dots);
    epilogue       scale / shift / ReLU in fp32, cast, store into the branch's channels of the concatenated
                   output.
"""
from __future__ import annotations

import triton
import triton.language as tl

from resaspp_ops.backend.triton import configs
from resaspp_ops.backend.triton.tiles import branch_taps, epilogue_store, pixel_offsets, program_block, tile_coords

# Accumulators live together through the centre phase; more branches than this take another launch.
MAX_ATROUS = 4


@triton.jit
def _load_w(ptrs, mask, UPCAST: tl.constexpr):
    w = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:
        w = w.to(tl.float32)
    return w


@triton.jit
def _forward_kernel(
    x_ptr,        # [N, H, W, C] NHWC input
    w1_ptr,       # [C, CO] the 1x1 branch, K-major (unused unless HAS_1X1)
    w3_ptr,       # [NR, 9, C, CO] this launch's atrous branches, tap ky * 3 + kx
    out_ptr,      # [N, H, W, OUT_C] NHWC output, OUT_C = (1 + B) * CO
    scale_ptr,    # [OUT_C] fp32 or dummy
    shift_ptr,    # [OUT_C] fp32 or dummy
    count_ptr,    # [1] int32 tap-tile counter (debug) or dummy
    N, H, W, C, CO, OUT_C,
    CH_ATROUS,    # output channel of this launch's first atrous branch
    R1, R2, R3, R4,  # rates of the launch's atrous branches (unused ones 0)
    HAS_1X1: tl.constexpr, NR: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr,
    IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,  # bf16 operands cast to fp32 before tl.dot: only for the interpreter, whose dot lacks bf16
    BLOCK_M: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    FLAT: tl.constexpr,  # one loop over a branch's (live tap, K chunk) pairs instead of a loop a tap
):
    img, tile, cob = program_block(CO, H, W, BLOCK_M, TILE_W, BLOCK_N)

    h0, h1, w0, w1, hh, ww, in_image = tile_coords(tile, H, W, BLOCK_M, TILE_W)
    offs_n = cob * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < CO
    x_img = x_ptr + img.to(tl.int64) * H * W * C
    out_img = out_ptr + img.to(tl.int64) * H * W * OUT_C
    p_off = pixel_offsets(hh, ww, W, IDX64)

    acc0 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)  # the 1x1 branch
    acc1 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)  # atrous branches of the launch
    acc2 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc3 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    acc4 = tl.full([BLOCK_M, BLOCK_N], 0.0, tl.float32)
    tap_stride = C * CO          # one tap of the packed weights
    branch_stride = 9 * C * CO   # one branch
    centre = 4 * tap_stride

    if COUNT:  # the centre tap of every branch of the launch: always live
        tl.atomic_add(count_ptr, NR + HAS_1X1)

    # Centre phase: one load of the input tile per K chunk feeds every branch.
    a_ptrs = x_img + p_off[:, None] * C + offs_k[None, :]
    w_rel = offs_k[:, None] * CO + offs_n[None, :]
    w1_ptrs = w1_ptr + w_rel
    wc_ptrs = w3_ptr + centre + w_rel  # centre tap of the launch's first atrous branch
    for k0 in range(0, C, BLOCK_K):
        k_ok = offs_k < C - k0
        a = tl.load(a_ptrs, mask=in_image[:, None] & k_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
        w_mask = k_ok[:, None] & n_mask[None, :]
        if HAS_1X1:
            acc0 = tl.dot(a, _load_w(w1_ptrs, w_mask, UPCAST), acc0, input_precision=PRECISION)
        if NR >= 1:
            acc1 = tl.dot(a, _load_w(wc_ptrs, w_mask, UPCAST), acc1, input_precision=PRECISION)
        if NR >= 2:
            acc2 = tl.dot(a, _load_w(wc_ptrs + branch_stride, w_mask, UPCAST), acc2, input_precision=PRECISION)
        if NR >= 3:
            acc3 = tl.dot(a, _load_w(wc_ptrs + 2 * branch_stride, w_mask, UPCAST), acc3, input_precision=PRECISION)
        if NR >= 4:
            acc4 = tl.dot(a, _load_w(wc_ptrs + 3 * branch_stride, w_mask, UPCAST), acc4, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w1_ptrs += BLOCK_K * CO
        wc_ptrs += BLOCK_K * CO

    # Off-centre taps and the store, branch by branch.
    o_off = p_off * OUT_C
    if HAS_1X1:
        epilogue_store(acc0, out_img, o_off, in_image, 0, offs_n, CO, scale_ptr, shift_ptr,
                        HAS_SCALE, HAS_SHIFT, RELU)
    if NR >= 1:
        acc1 = branch_taps(acc1, x_img, C, w3_ptr, CO, C, R1, h0, h1, w0, w1, hh, ww, H, W, offs_n,
                           count_ptr, BLOCK_K, IDX64, COUNT, PRECISION, UPCAST, FLAT)
        epilogue_store(acc1, out_img, o_off, in_image, CH_ATROUS, offs_n, CO, scale_ptr, shift_ptr,
                        HAS_SCALE, HAS_SHIFT, RELU)
    if NR >= 2:
        acc2 = branch_taps(acc2, x_img, C, w3_ptr + branch_stride, CO, C, R2, h0, h1, w0, w1, hh, ww, H, W,
                           offs_n, count_ptr, BLOCK_K, IDX64, COUNT, PRECISION, UPCAST, FLAT)
        epilogue_store(acc2, out_img, o_off, in_image, CH_ATROUS + CO, offs_n, CO, scale_ptr, shift_ptr,
                        HAS_SCALE, HAS_SHIFT, RELU)
    if NR >= 3:
        acc3 = branch_taps(acc3, x_img, C, w3_ptr + 2 * branch_stride, CO, C, R3, h0, h1, w0, w1, hh, ww,
                           H, W, offs_n, count_ptr, BLOCK_K, IDX64, COUNT, PRECISION, UPCAST, FLAT)
        epilogue_store(acc3, out_img, o_off, in_image, CH_ATROUS + 2 * CO, offs_n, CO, scale_ptr, shift_ptr,
                        HAS_SCALE, HAS_SHIFT, RELU)
    if NR >= 4:
        acc4 = branch_taps(acc4, x_img, C, w3_ptr + 3 * branch_stride, CO, C, R4, h0, h1, w0, w1, hh, ww,
                           H, W, offs_n, count_ptr, BLOCK_K, IDX64, COUNT, PRECISION, UPCAST, FLAT)
        epilogue_store(acc4, out_img, o_off, in_image, CH_ATROUS + 3 * CO, offs_n, CO, scale_ptr, shift_ptr,
                        HAS_SCALE, HAS_SHIFT, RELU)


_forward_tuned = triton.autotune(
    configs=configs.CONV_CONFIGS,
    key=["N", "H", "W", "C", "CO", "R1", "R2", "R3", "R4", "HAS_1X1", "NR", "HAS_SCALE", "HAS_SHIFT", "RELU",
         "PRECISION", "UPCAST"],
    prune_configs_by={"early_config_prune": configs.conv_prune("forward")},
)(_forward_kernel)


def run(x, w1p, w3p, out, scale, shift, relu, counter, *, ch_atrous, rates, has_1x1, idx64, precision, upcast,
        config):
    """One launch over a group of branches; config: a dict of meta-parameters, or None to autotune.

    x [N, H, W, C] NHWC; w1p [C, CO]; w3p [len(rates), 9, C, CO]; out [N, H, W, OUT_C] NHWC.
    Returns the config used (the debug counter records it).
    """
    n, h, w, c = x.shape
    co = w1p.shape[1]
    out_c = out.shape[3]
    r = list(rates) + [0] * (MAX_ATROUS - len(rates))
    dummy = out
    args = (x, w1p, w3p, out, dummy if scale is None else scale, dummy if shift is None else shift,
            dummy if counter is None else counter, n, h, w, c, co, out_c, ch_atrous, r[0], r[1], r[2], r[3],
            has_1x1, len(rates), scale is not None, shift is not None, relu, idx64, counter is not None, precision,
            upcast)

    def grid(meta):
        tile_h = meta["BLOCK_M"] // meta["TILE_W"]
        return (n * triton.cdiv(h, tile_h) * triton.cdiv(w, meta["TILE_W"]) * triton.cdiv(co, meta["BLOCK_N"]),)

    if config is None:
        _forward_tuned[grid](*args)
        return configs.config_dict(_forward_tuned.best_config)
    _forward_kernel[grid](*args, **config)
    return config
