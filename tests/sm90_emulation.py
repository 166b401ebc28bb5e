"""A NumPy emulation of the sm_90a kernels (csrc/sm90_*.cu) in float64: the same programs, queues, jobs,
TMA boxes (zero outside the tensor) and K steps as resaspp_ops.backend.sm90_plan lays out, one wgmma K
block a step, and the forward epilogue (scale, shift, the ReLU as written) with its row -> pixel map. It
also counts how often each output element is written (exactly once, or the plan is wrong)."""
from __future__ import annotations

import numpy as np

from resaspp_ops.backend import sm90_plan as P


def tma_box(t: np.ndarray, origin, box) -> np.ndarray:
    """The box of `t` (indexed outermost first) at `origin` with extents `box` (both innermost first, as
    TMA counts dimensions), zero where it lies outside `t`; shaped `box` reversed."""
    nd = t.ndim
    org, ext = list(origin[:nd])[::-1], list(box[:nd])[::-1]
    out = np.zeros(ext, dtype=t.dtype)
    src, dst = [], []
    for o, b, size in zip(org, ext, t.shape):
        lo, hi = max(o, 0), min(o + b, size)
        if lo >= hi:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - o, hi - o))
    out[tuple(dst)] = t[tuple(src)]
    return out


def _rows(p: P.Sm90Plan, box_rows: np.ndarray, rows: int) -> np.ndarray:
    """A box's pixel rows in a stage of `rows` rows: the rows past the box stay zero (the kernel clears them once)."""
    out = np.zeros((rows, box_rows.shape[-1]))
    out[: box_rows.shape[0]] = box_rows
    return out


def row_pixel(p: P.Sm90Plan, image: int, tile: int, m: int):
    """(n, h, w) of pixel row m of a job at (image, tile), or None where the row stores nothing."""
    t = p.tiles
    per_image = t.tile_h * t.tile_w
    if m >= per_image * t.stack:
        return None
    h0, w0 = P._origin(t, tile)
    dn, rem = divmod(m, per_image)
    h, w = h0 + rem // t.tile_w, w0 + rem % t.tile_w
    n = image + dn
    return (n, h, w) if n < p.n and h < p.h and w < p.w else None


def _programs(p: P.Sm90Plan):
    g = p.programs
    off = p.queues[: g + 1]
    order = p.queues[g + 1:]
    for prog in range(g):
        for q in range(off[prog], off[prog + 1]):
            yield int(order[q])


def _w3_tma(w3):
    """w3 [B, 3 (ky), 3 (kx), Co, C] in the w3 map's dimension order, outermost first: [B, Co, ky, kx, C]."""
    return np.ascontiguousarray(w3.transpose(0, 3, 1, 2, 4))


def _weight_box(p: P.Sm90Plan, w1, w3t, bmap, origin):
    if bmap == P.MAP_W1:
        return tma_box(w1, origin, p.box_w1())
    return tma_box(w3t, origin, p.box_w3())


def relu(v: np.ndarray) -> np.ndarray:
    """The kernels' ReLU as written, `v < 0 ? 0 : v`: NaN stays NaN (fmaxf(NaN, 0) would be 0)."""
    return np.where(v < 0, 0.0, v)


def epilogue(v: np.ndarray, cols: slice, scale, shift, use_relu: bool) -> np.ndarray:
    """csrc/sm90_forward.cu ForwardOp::epilogue on accumulator rows v [rows, Co] of output channels `cols`:
    times scale, plus shift (each where given), then the ReLU."""
    if scale is not None:
        v = v * scale[cols]
    if shift is not None:
        v = v + shift[cols]
    return relu(v) if use_relu else v


def forward(p: P.Sm90Plan, x, w1, w3, scale=None, shift=None, use_relu=False):
    """x [N, H, W, C], w1 [Co, C], w3 [B, 3, 3, Co, C], scale / shift [(1+B) Co] or None ->
    (out [N, H, W, (1+B) Co], write counts)."""
    co = p.co
    out = np.full((p.n, p.h, p.w, p.num_branches * co), np.nan)
    count = np.zeros(out.shape, dtype=np.int64)
    w3t = _w3_tma(w3)
    for j in _programs(p):
        image, tile, branch, _ = (int(v) for v in p.jobs[j])
        acc = np.zeros((P.BLOCK_M, P.BLOCK_N))
        steps = 0
        for a, bmap, b in p.steps(j):
            rows = tma_box(x, a, p.box_x()).reshape(-1, P.BLOCK_K)
            wt = _weight_box(p, w1, w3t, bmap, b).reshape(P.BLOCK_N, P.BLOCK_K)
            acc += _rows(p, rows, P.BLOCK_M) @ wt.T
            steps += 1
        assert steps == p.job_steps(j)
        cols = slice(branch * co, (branch + 1) * co)
        res = epilogue(acc[:, :co], cols, scale, shift, use_relu)
        for m in range(P.BLOCK_M):
            px = row_pixel(p, image, tile, m)
            if px is not None:
                out[px][cols] = res[m]
                count[px][cols] += 1
    return out, count


def dgrad(p: P.Sm90Plan, grad, w1, w3):
    """grad [N, H, W, 1+B, Co], w1 [Co, C], w3 [B, 3, 3, Co, C] -> (grad_x [N, H, W, C], write counts)."""
    out = np.full((p.n, p.h, p.w, p.c), np.nan)
    count = np.zeros(out.shape, dtype=np.int64)
    w3t = _w3_tma(w3)
    for j in _programs(p):
        image, tile, cblock, _ = (int(v) for v in p.jobs[j])
        acc = np.zeros((P.BLOCK_M, P.BLOCK_N))
        steps = 0
        for a, bmap, b in p.steps(j):
            rows = tma_box(grad, a, p.box_grad()).reshape(-1, P.BLOCK_K)
            # B [K = 64 co, N = 256 c]: four 64 x 64 boxes at c + 64 i, c innermost (MN-major).
            wt = np.concatenate([_weight_box(p, w1, w3t, bmap, (b[0] + i * P.BLOCK_K,) + tuple(b[1:]))
                                 .reshape(P.BLOCK_K, P.BLOCK_K) for i in range(P.BLOCK_N // P.BLOCK_K)], axis=1)
            acc += _rows(p, rows, P.BLOCK_M) @ wt
            steps += 1
        assert steps == p.job_steps(j)
        c0 = cblock * P.BLOCK_N
        width = min(P.BLOCK_N, p.c - c0)
        for m in range(P.BLOCK_M):
            px = row_pixel(p, image, tile, m)
            if px is not None:
                out[px][c0:c0 + width] = acc[m, :width]
                count[px][c0:c0 + width] += 1
    return out, count


def wgrad(p: P.Sm90Plan, grad, x):
    """grad [N, H, W, 1+B, Co], x [N, H, W, C] -> (dw [T, Co, C], write counts)."""
    taps = 1 + 9 * len(p.rates)
    out = np.full((taps, p.co, p.c), np.nan)
    count = np.zeros(out.shape, dtype=np.int64)
    for j in _programs(p):
        t, coblock, cblock, _ = (int(v) for v in p.jobs[j])
        acc = np.zeros((P.WGRAD_M, P.WGRAD_N))
        steps = 0
        for a, bmap, b in p.steps(j):
            assert bmap == P.MAP_X
            # A [M = 128 co, K = pixels]: two boxes at co + 64 i; B [K = pixels, N = 256 c]: four at c + 64 i.
            ga = np.concatenate([_rows(p, tma_box(grad, (a[0] + i * P.BLOCK_K,) + tuple(a[1:]), p.box_grad())
                                       .reshape(-1, P.BLOCK_K), P.WGRAD_PIX) for i in range(P.WGRAD_M // P.BLOCK_K)],
                                axis=1)
            xb = np.concatenate([_rows(p, tma_box(x, (b[0] + i * P.BLOCK_K,) + tuple(b[1:4]), p.box_x())
                                       .reshape(-1, P.BLOCK_K), P.WGRAD_PIX) for i in range(P.WGRAD_N // P.BLOCK_K)],
                                axis=1)
            acc += ga.T @ xb
            steps += 1
        assert steps == p.job_steps(j)
        co0, c0 = coblock * P.WGRAD_M, cblock * P.WGRAD_N
        hm, wn = min(P.WGRAD_M, p.co - co0), min(P.WGRAD_N, p.c - c0)
        out[t, co0:co0 + hm, c0:c0 + wn] = acc[:hm, :wn]
        count[t, co0:co0 + hm, c0:c0 + wn] += 1
    return out, count
