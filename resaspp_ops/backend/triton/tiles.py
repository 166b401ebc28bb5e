"""Triton helpers shared by the forward and dgrad kernels: 2-D output tiles, the atrous taps, the epilogue.

A tile is BLOCK_M flattened pixels laid out TILE_H x TILE_W (TILE_H = BLOCK_M // TILE_W). TILE_W need not
be a power of two, so a 33- or 97-wide map is tiled with little waste; the BLOCK_M - TILE_H * TILE_W spare
rows of the block are masked off.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def program_block(n_out, H, W, BLOCK_M: tl.constexpr, TILE_W: tl.constexpr, BLOCK_N: tl.constexpr):
    """(image, tile, output-channel block) of this program in a 1-D grid over all three.

    The channel blocks of one tile are neighbours in launch order, so they meet its input in L2.
    """
    TILE_H: tl.constexpr = BLOCK_M // TILE_W
    pid = tl.program_id(0)
    n_cob = (n_out + BLOCK_N - 1) // BLOCK_N
    n_tiles = ((H + TILE_H - 1) // TILE_H) * ((W + TILE_W - 1) // TILE_W)
    return pid // (n_cob * n_tiles), (pid // n_cob) % n_tiles, pid % n_cob


@triton.jit
def tile_coords(pid_tile, H, W, BLOCK_M: tl.constexpr, TILE_W: tl.constexpr):
    """(h0, h1, w0, w1, hh [BLOCK_M], ww [BLOCK_M], in_image [BLOCK_M]) of tile `pid_tile` of one image.

    [h0, h1) x [w0, w1) is the tile clipped to the image: the exact extent the tap-skip rule needs.
    """
    TILE_H: tl.constexpr = BLOCK_M // TILE_W
    tiles_w = (W + TILE_W - 1) // TILE_W
    h0 = (pid_tile // tiles_w) * TILE_H
    w0 = (pid_tile % tiles_w) * TILE_W
    h1 = tl.minimum(h0 + TILE_H, H)
    w1 = tl.minimum(w0 + TILE_W, W)
    m = tl.arange(0, BLOCK_M)
    hh = h0 + m // TILE_W
    ww = w0 + m % TILE_W
    in_image = (m < TILE_H * TILE_W) & (hh < H) & (ww < W)
    return h0, h1, w0, w1, hh, ww, in_image


@triton.jit
def pixel_offsets(hh, ww, W, IDX64: tl.constexpr):
    """Row index h * W + w inside one image, in int64 when an image's tensor can pass 2^31 elements."""
    if IDX64:
        return hh.to(tl.int64) * W + ww
    else:
        return hh * W + ww


@triton.jit
def off_centre_taps(acc, src_img, src_stride, w_taps, n_out, k_total, rate,
                    h0, h1, w0, w1, hh, ww, H, W, offs_n, count_ptr,
                    BLOCK_K: tl.constexpr, IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
                    UPCAST: tl.constexpr):
    """acc += sum over the 8 off-centre taps of one branch of src[p + tap] @ w_taps[tap].

    acc      [BLOCK_M, BLOCK_N] fp32, one branch
    src_img  pointer to pixel 0 of this image (channel base of the branch added), src_stride channels a pixel
    w_taps   pointer to the branch's packed weights [9, k_total, n_out] (tap ky * 3 + kx; index 4 unused here)
    rate     the branch's dilation; tap (ky, kx) reads pixel (h + (ky - 1) * rate, w + (kx - 1) * rate)
    The skip rule (DESIGN.md section 2): the tile [h0, h1) x [w0, w1) shifted by (dy, dx) is wholly zero padding
    iff h1 + dy <= 0 or h0 + dy >= H or w1 + dx <= 0 or w0 + dx >= W. That is one scalar test a (tile, tap),
    uniform over the program (no divergence); a dead tap costs no loads and no dots.
    """
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n_out
    w_rel = offs_k[:, None] * n_out + offs_n[None, :]  # [BLOCK_K, BLOCK_N], the same for every tap
    for t in range(8):
        tap = t + t // 4  # 0..3, 5..8: index 4, the centre, is done in the shared phase
        dy = (tap // 3 - 1) * rate
        dx = (tap % 3 - 1) * rate
        if (h1 + dy > 0) & (h0 + dy < H) & (w1 + dx > 0) & (w0 + dx < W):
            if COUNT:
                tl.atomic_add(count_ptr, 1)
            hs = hh + dy
            ws = ww + dx
            p_mask = (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
            if IDX64:
                p_off = (hs.to(tl.int64) * W + ws) * src_stride
            else:
                p_off = (hs * W + ws) * src_stride
            a_ptrs = src_img + p_off[:, None] + offs_k[None, :]
            b_ptrs = w_taps + tap * k_total * n_out + w_rel
            # Pointers advance by whole chunks, so the K loop does no index arithmetic on tensors.
            for k0 in range(0, k_total, BLOCK_K):
                k_ok = offs_k < k_total - k0
                a = tl.load(a_ptrs, mask=p_mask[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(b_ptrs, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
                if UPCAST:  # the interpreter's dot cannot take bf16
                    a = a.to(tl.float32)
                    b = b.to(tl.float32)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
                a_ptrs += BLOCK_K
                b_ptrs += BLOCK_K * n_out
    return acc


@triton.jit
def off_centre_taps_flat(acc, src_img, src_stride, w_taps, n_out, k_total, rate,
                         h0, h1, w0, w1, hh, ww, H, W, offs_n, count_ptr,
                         BLOCK_K: tl.constexpr, IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
                         UPCAST: tl.constexpr):
    """off_centre_taps as ONE loop over the (live tap, K chunk) pairs of the branch.

    Same arguments, result and skip rule. The live taps are packed 4 bits each into a scalar first, so the
    software pipeline runs through all of a branch's taps instead of draining and refilling at every tap
    (8 short loops); the price is a few scalar ops and a fresh address a chunk.
    """
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < n_out
    w_rel = offs_k[:, None] * n_out + offs_n[None, :]
    table = rate * 0   # live tap indices, 4 bits each, in tap order
    n_live = rate * 0
    for t in tl.static_range(8):
        tap = t + t // 4  # 0..3, 5..8: the centre is done in the shared phase
        dy = (tap // 3 - 1) * rate
        dx = (tap % 3 - 1) * rate
        live = (h1 + dy > 0) & (h0 + dy < H) & (w1 + dx > 0) & (w0 + dx < W)
        table = table | tl.where(live, (n_live * 0 + tap) << (4 * n_live), 0)
        n_live = n_live + live.to(tl.int32)
    if COUNT:
        tl.atomic_add(count_ptr, n_live)
    n_k = (k_total + BLOCK_K - 1) // BLOCK_K
    for i in range(0, n_live * n_k):
        j = i // n_k
        k0 = (i - j * n_k) * BLOCK_K
        tap = (table >> (4 * j)) & 15
        hs = hh + (tap // 3 - 1) * rate
        ws = ww + (tap % 3 - 1) * rate
        p_mask = (hs >= 0) & (hs < H) & (ws >= 0) & (ws < W)
        if IDX64:
            p_off = (hs.to(tl.int64) * W + ws) * src_stride + k0
        else:
            p_off = (hs * W + ws) * src_stride + k0
        k_ok = offs_k < k_total - k0
        a = tl.load(src_img + p_off[:, None] + offs_k[None, :], mask=p_mask[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_taps + (tap * k_total + k0) * n_out + w_rel, mask=k_ok[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def branch_taps(acc, src_img, src_stride, w_taps, n_out, k_total, rate, h0, h1, w0, w1, hh, ww, H, W, offs_n,
                count_ptr, BLOCK_K: tl.constexpr, IDX64: tl.constexpr, COUNT: tl.constexpr, PRECISION: tl.constexpr,
                UPCAST: tl.constexpr, FLAT: tl.constexpr):
    """The 8 off-centre taps of one branch: off_centre_taps_flat if FLAT else off_centre_taps (autotuned)."""
    if FLAT:
        acc = off_centre_taps_flat(acc, src_img, src_stride, w_taps, n_out, k_total, rate, h0, h1, w0, w1, hh, ww,
                                   H, W, offs_n, count_ptr, BLOCK_K, IDX64, COUNT, PRECISION, UPCAST)
    else:
        acc = off_centre_taps(acc, src_img, src_stride, w_taps, n_out, k_total, rate, h0, h1, w0, w1, hh, ww,
                              H, W, offs_n, count_ptr, BLOCK_K, IDX64, COUNT, PRECISION, UPCAST)
    return acc


@triton.jit
def relu(v):
    """torch.relu: max(v, 0) with NaN kept (max.NaN.f32). tl.maximum's default would not do: max.f32 returns the
    number when one operand is NaN."""
    return tl.maximum(v, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def relu_grad(grad, pre):
    """torch.relu's backward (threshold_backward on its output): grad, zeroed where the pre-activation is <= 0;
    a NaN pre-activation passes its grad."""
    return tl.where(pre <= 0, 0.0, grad)


@triton.jit
def epilogue_store(acc, out_ptr, row_off, row_mask, ch, offs_n, CO, scale_ptr, shift_ptr,
                   HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr):
    """out[row, ch + n] = act(acc * scale[ch + n] + shift[ch + n]) for n < CO: the folded BatchNorm and ReLU in
    fp32, then the cast. acc [BLOCK_M, BLOCK_N] fp32; row_off [BLOCK_M] element offsets of each pixel's row."""
    n_mask = offs_n < CO
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + ch + offs_n, mask=n_mask, other=0.0)[None, :]
    if HAS_SHIFT:
        acc = acc + tl.load(shift_ptr + ch + offs_n, mask=n_mask, other=0.0)[None, :]
    if RELU:
        acc = relu(acc)
    tl.store(out_ptr + row_off[:, None] + ch + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def epilogue_store_halves(acc, out_ptr, row_off, row_mask, ch, n0, CO, scale_ptr, shift_ptr,
                          HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, RELU: tl.constexpr):
    """epilogue_store of acc [BLOCK_M, BLOCK_N] (channels n0 .. n0 + BLOCK_N - 1) as two halves of BLOCK_N / 2
    channels, one after the other. A thread of a 256-wide warpgroup-MMA accumulator holds 64 of its columns:
    their scale and shift take 128 registers beside the accumulator's 128 when the epilogue is done whole
    (the separable forward spilled 72 B under Triton 3.6), half that by halves. The split only relabels
    registers: every thread holds columns of both halves."""
    BLOCK_M: tl.constexpr = acc.shape[0]
    HALF: tl.constexpr = acc.shape[1] // 2
    lo, hi = tl.split(tl.permute(tl.reshape(acc, [BLOCK_M, 2, HALF]), [0, 2, 1]))   # columns [0, HALF), [HALF, ..)
    offs_h = n0 + tl.arange(0, HALF)
    epilogue_store(lo, out_ptr, row_off, row_mask, ch, offs_h, CO, scale_ptr, shift_ptr, HAS_SCALE, HAS_SHIFT, RELU)
    epilogue_store(hi, out_ptr, row_off, row_mask, ch, offs_h + HALF, CO, scale_ptr, shift_ptr, HAS_SCALE,
                   HAS_SHIFT, RELU)


@triton.jit
def job_rows(image, tile, TILES_W, N, H, W, STACK: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr,
             BLOCK_M: tl.constexpr, IDX64: tl.constexpr):
    """(row [BLOCK_M], hh, ww, valid) of a job of the work list: its tile in images image .. image + STACK - 1.

    Block row m is pixel (m % (TILE_H * TILE_W)) of the tile in image image + m // (TILE_H * TILE_W); row is its
    pixel index n * H * W + h * W + w (int64 where tensors can pass 2^31 elements); valid masks the rows past
    the stacked tiles, past the map's edge and past the last image.
    """
    TILE_PIX: tl.constexpr = TILE_H * TILE_W
    m = tl.arange(0, BLOCK_M)
    img = image + m // TILE_PIX
    loc = m % TILE_PIX
    hh = (tile // TILES_W) * TILE_H + loc // TILE_W
    ww = (tile % TILES_W) * TILE_W + loc % TILE_W
    valid = (m < STACK * TILE_PIX) & (img < N) & (hh < H) & (ww < W)
    if IDX64:
        row = (img.to(tl.int64) * H + hh) * W + ww
    else:
        row = (img * H + hh) * W + ww
    return row, hh, ww, valid


@triton.jit
def branch_rate(branch, rates_ptr):
    """The dilation of `branch` (0 for the 1x1, rates[branch - 1] otherwise); rates_ptr [B] int32."""
    return tl.where(branch == 0, 0, tl.load(rates_ptr + tl.maximum(branch - 1, 0)))


@triton.jit
def load_job(jobs_ptr, job, rates_ptr):
    """(image, tile, branch, taps, rate) of item `job` of a work list [J, 4] int32 (backend/jobs.py)."""
    image = tl.load(jobs_ptr + job * 4)
    tile = tl.load(jobs_ptr + job * 4 + 1)
    branch = tl.load(jobs_ptr + job * 4 + 2)
    taps = tl.load(jobs_ptr + job * 4 + 3)
    return image, tile, branch, taps, branch_rate(branch, rates_ptr)


@triton.jit
def live_tap_table(taps):
    """(table, n_live): the set bits of a 9-bit tap mask as 4-bit tap indices in tap order (int64: nine taps
    take 36 bits), and their count."""
    table = taps.to(tl.int64) * 0
    n_live = taps * 0
    for t in tl.static_range(9):
        live = (taps >> t) & 1
        table = table | tl.where(live == 1, (table * 0 + t) << (4 * n_live).to(tl.int64), 0)
        n_live = n_live + live
    return table, n_live


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def pick(values, offs, index):
    """values[index] as a scalar, for a small 1-D register tensor `values` whose element j sits at offs == j:
    a masked sum, so a loop can index a table it loaded once (no load in the loop)."""
    return tl.reduce(tl.where(offs == index, values, 0), 0, _add)


@triton.jit
def column_sum(x):
    """x [M, N] summed over M: tl.sum's result through tl.reduce, because tl.sum (like tl.zeros) is a
    standard-library jit function, which Triton's interpreter cannot call when triton was imported before
    TRITON_INTERPRET was set (as in a test process)."""
    return tl.reduce(x, 0, _add)
