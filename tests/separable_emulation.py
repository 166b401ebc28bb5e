"""A NumPy emulation of the separable CUDA kernels (csrc/separable_forward.cu, csrc/separable_backward.cu) in
float64, with the same signatures as their resaspp_ops._C entry points, so that the backend's own host logic
(resaspp_ops.backend.cuda_separable._forward / _backward: packing, plan, branch loop, GEMMs, reductions) runs
unchanged on the CPU with these in place of the kernels.

The forward walks the plan's jobs as the CTAs do: per job the live taps of its mask, rows -> pixels as
csrc/job_geometry.h row_pixel (stacked images, tiles over the edge), the N blocks of the CTA width, the K
chunks of the kernel (64 bytes of the dtype for mma, 16 channels for simt) with the zero fill past C and
Co, the mid stage on rows that hold a pixel, the epilogue at channel offset branch * Co; it counts how
often each output element is written (exactly once, or the plan or the row map is wrong). The backward's
reductions are per chunk of CHUNK_PIXELS pixels in flattened NHW order, as the kernels' partials."""
from __future__ import annotations

import numpy as np
import torch

from resaspp_ops.backend import cuda_separable as CS

CHUNK_PIXELS = 256  # csrc/separable.h kChunkPixels
BLOCK_N = 128       # kBlockN (mma)
SIMT_N = 64         # kSimtN
SIMT_K = 16         # kSimtK


def cdiv(a, b):
    return -(-a // b)


def _nhwc(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().permute(0, 2, 3, 1).numpy().astype(np.float64)


def _np(t):
    return None if t is None else t.detach().cpu().numpy().astype(np.float64)


def row_pixel(n, h, w, tile_h, tile_w, stack, image, tile, m):
    """csrc/job_geometry.h row_pixel: (n, h, w) of pixel row m of a job, or None."""
    per_image = tile_h * tile_w
    if m >= per_image * stack:
        return None
    tiles_w = cdiv(w, tile_w)
    h0, w0 = (tile // tiles_w) * tile_h, (tile % tiles_w) * tile_w
    dn, rem = divmod(m, per_image)
    pn, ph, pw = image + dn, h0 + rem // tile_w, w0 + rem % tile_w
    return (pn, ph, pw) if pn < n and ph < h and pw < w else None


def pixel_rows(a: np.ndarray) -> np.ndarray:
    """[..., C] as [pixels, C] (also where C = 0, which reshape(-1, C) cannot infer)."""
    return a.reshape(int(np.prod(a.shape[:-1])), a.shape[-1])


def shifted(xn: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """out[n, h, w] = xn[n, h + dy, w + dx], zero outside the map."""
    out = np.zeros_like(xn)
    _, h, w, _ = xn.shape
    h0, h1 = max(0, -dy), min(h, h - dy)
    w0, w1 = max(0, -dx), min(w, w - dx)
    if h0 < h1 and w0 < w1:
        out[:, h0:h1, w0:w1] = xn[:, h0 + dy:h1 + dy, w0 + dx:w1 + dx]
    return out


def _taps(branch, rate):
    """The per-pixel geometry's taps of the backward kernels: the centre for the 1x1, all nine otherwise."""
    return [4] if branch == 0 else list(range(9))


def _offset(k, rate):
    return (k // 3 - 1) * rate, (k % 3 - 1) * rate


def _relu(v):
    """The kernels' ReLU as written (csrc/separable_common.cuh mid_stage, the epilogues), `v < 0 ? 0 : v`: NaN
    stays NaN, as in torch.relu (fmaxf(NaN, 0) would be 0)."""
    return np.where(v < 0, 0.0, v)


def _mid(v, ms, mt, c, relu):
    if ms is not None:
        v = v * ms[c]
    if mt is not None:
        v = v + mt[c]
    return _relu(v) if relu else v


class EmulatedKernels:
    """The separable entry points of resaspp_ops._C, emulated. mma_elem: the element size whose 64-byte K
    chunks the emulated mma kernel walks (2: fp16 / bf16, 4: fp32 as TF32)."""

    def __init__(self, mma_elem: int = 2):
        self.mma_elem = mma_elem
        self.writes = None

    # ---------------------------------------------------------------- forward
    def separable_forward(self, x, dw, pw, mid_scale, mid_shift, mid_relu, scale, shift, relu, rates, kernel, jobs,
                          tile):
        assert kernel in ("mma", "simt")
        xn, dwn, pwn = _nhwc(x), _np(dw), _np(pw)
        ms, mt, sc, sh = _np(mid_scale), _np(mid_shift), _np(scale), _np(shift)
        n, h, w, c = xn.shape
        nb, _, co = pwn.shape
        th, tw, stack = tile
        r_of = [0] + list(rates)
        bn = BLOCK_N if kernel == "mma" else SIMT_N
        kck = 64 // self.mma_elem if kernel == "mma" else SIMT_K
        out = np.full((n, h, w, nb * co), np.nan)
        self.writes = np.zeros(out.shape, dtype=np.int64)
        for image, tile_i, branch, taps in jobs.cpu().tolist():
            rows = [row_pixel(n, h, w, th, tw, stack, image, tile_i, m) for m in range(CS.BLOCK_M)]
            ok = np.array([r is not None for r in rows])
            pn = np.array([r[0] if r else 0 for r in rows])
            ph = np.array([r[1] if r else 0 for r in rows])
            pq = np.array([r[2] if r else 0 for r in rows])
            live = [(k,) + _offset(k, r_of[branch]) for k in range(9) if taps >> k & 1]
            mid = dict(ms=None if ms is None else ms[branch * c:(branch + 1) * c],
                       mt=None if mt is None else mt[branch * c:(branch + 1) * c], relu=mid_relu and branch > 0)
            for n0 in range(0, co, bn):
                acc = np.zeros((CS.BLOCK_M, bn))
                for k0 in range(0, cdiv(c, kck) * kck, kck):
                    cs = np.arange(k0, k0 + kck)
                    cv = cs[cs < c]
                    a = np.zeros((CS.BLOCK_M, kck))
                    d = np.zeros((CS.BLOCK_M, len(cv)))
                    for k, dy, dx in live:
                        hh, ww = ph + dy, pq + dx
                        valid = ok & (hh >= 0) & (hh < h) & (ww >= 0) & (ww < w)
                        d[valid] += xn[pn[valid], hh[valid], ww[valid]][:, cv] * dwn[branch, k, cv]
                    d = _mid(d, mid["ms"], mid["mt"], cv, mid["relu"])
                    a[ok, :len(cv)] = d[ok]  # rows without a pixel stay zero (no mid stage)
                    b = np.zeros((kck, bn))
                    nv = np.arange(n0, min(n0 + bn, co))
                    b[:len(cv), :len(nv)] = pwn[branch][np.ix_(cv, nv)]
                    acc += a @ b
                cols = np.arange(n0, min(n0 + bn, co))
                cb = branch * co
                v = acc[:, :len(cols)]
                if sc is not None:
                    v = v * sc[cb + cols]
                if sh is not None:
                    v = v + sh[cb + cols]
                if relu:
                    v = _relu(v)
                for m in np.nonzero(ok)[0]:
                    out[pn[m], ph[m], pq[m], cb + cols] = v[m]
                    self.writes[pn[m], ph[m], pq[m], cb + cols] += 1
        return torch.from_numpy(out).to(x.dtype).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)

    # ---------------------------------------------------------------- backward
    @staticmethod
    def _depthwise(xn, dwn, branch, rate):
        d = np.zeros_like(xn)
        for k in _taps(branch, rate):
            d += shifted(xn, *_offset(k, rate)) * dwn[branch, k]
        return d

    def separable_activation(self, x, dw, mid_scale, mid_shift, mid_relu, branch, rate, out):
        xn, dwn = _nhwc(x), _np(dw)
        c = xn.shape[3]
        ms, mt = _np(mid_scale), _np(mid_shift)
        d = pixel_rows(self._depthwise(xn, dwn, branch, rate))
        a = _mid(d, None if ms is None else ms[branch * c:(branch + 1) * c],
                 None if mt is None else mt[branch * c:(branch + 1) * c], slice(None), mid_relu and branch > 0)
        out.copy_(torch.from_numpy(a))
        return out

    def separable_mid_backward(self, x, dw, mid_scale, mid_shift, mid_relu, branch, rate, buf, need_mid):
        xn, dwn = _nhwc(x), _np(dw)
        c = xn.shape[3]
        ms = None if mid_scale is None else _np(mid_scale)[branch * c:(branch + 1) * c]
        mt = None if mid_shift is None else _np(mid_shift)[branch * c:(branch + 1) * c]
        d = pixel_rows(self._depthwise(xn, dwn, branch, rate))
        s = ms if ms is not None else np.ones(c)
        t = mt if mt is not None else np.zeros(c)
        m = d * s + t
        da = _np(buf)
        dm = np.where(m <= 0, 0.0, da) if (mid_relu and branch > 0) else da
        chunks = cdiv(d.shape[0], CHUNK_PIXELS)
        ps = np.stack([(dm * d)[i * CHUNK_PIXELS:(i + 1) * CHUNK_PIXELS].sum(0) for i in range(chunks)]) \
            if chunks else np.zeros((0, c))
        pt = np.stack([dm[i * CHUNK_PIXELS:(i + 1) * CHUNK_PIXELS].sum(0) for i in range(chunks)]) \
            if chunks else np.zeros((0, c))
        buf.copy_(torch.from_numpy(dm * s if ms is not None else dm))
        return [torch.from_numpy(ps) if need_mid and ms is not None else None,
                torch.from_numpy(pt) if need_mid and mt is not None else None]

    def separable_dgrad_stencil(self, dd, dw, branch, rate, shape, gx):
        n, c, h, w = shape
        ddn = _np(dd).reshape(n, h, w, c)
        dwn = _np(dw)
        v = np.zeros_like(ddn)
        for k in _taps(branch, rate):
            dy, dx = _offset(k, rate)
            v += shifted(ddn, -dy, -dx) * dwn[branch, k]
        gx += torch.from_numpy(pixel_rows(v)).to(gx.dtype)

    def separable_pointwise_dgrad(self, grad, branch, pw, out, jobs, tile):
        """The mma forward kernel run as the dA GEMM (one 1x1 branch, K = Co, N = C): the jobs' rows, 128-wide
        blocks of C, K chunks of Co with zero fill; every element of out written once."""
        gn = _nhwc(grad)
        n, h, w, _ = gn.shape
        pwn = _np(pw)[branch]                      # [C, Co]: rows = the GEMM's output channels
        c, co = pwn.shape
        kck = 64 // self.mma_elem
        th, tw, stack = tile
        res = np.full((n, h, w, c), np.nan)
        writes = np.zeros(res.shape, dtype=np.int64)
        for image, tile_i, b0, taps in jobs.cpu().tolist():
            assert b0 == 0 and taps == 1 << 4, "the dA GEMM's jobs are the 1x1 branch's"
            rows = [row_pixel(n, h, w, th, tw, stack, image, tile_i, m) for m in range(CS.BLOCK_M)]
            ok = np.array([r is not None for r in rows])
            idx = tuple(np.array([r[i] for r in rows if r is not None], dtype=int) for i in range(3))
            g_rows = np.zeros((CS.BLOCK_M, gn.shape[3]))
            g_rows[ok] = gn[idx]
            for n0 in range(0, c, BLOCK_N):
                acc = np.zeros((CS.BLOCK_M, BLOCK_N))
                cols = np.arange(n0, min(n0 + BLOCK_N, c))
                for k0 in range(0, cdiv(co, kck) * kck, kck):
                    ks = np.arange(k0, min(k0 + kck, co))
                    a = np.zeros((CS.BLOCK_M, kck))
                    a[:, :len(ks)] = g_rows[:, branch * co + ks]
                    bmat = np.zeros((kck, BLOCK_N))
                    bmat[:len(ks), :len(cols)] = pwn[np.ix_(cols, ks)].T
                    acc += a @ bmat
                res[idx + (slice(n0, n0 + len(cols)),)] = acc[ok, :len(cols)]
                writes[idx + (slice(n0, n0 + len(cols)),)] += 1
        assert (writes == 1).all(), "dA elements not written exactly once"
        out.copy_(torch.from_numpy(pixel_rows(res)))

    def separable_pointwise_wgrad(self, grad, branch, a, co):
        """The mma wgrad kernel with one 1x1 tap, split over groups of whole images as csrc/separable.cpp does
        (S = min(N, 256 / output blocks), split points N s / S), the parts summed in order: [Co, C]."""
        n, _, h, w = grad.shape
        an = _np(a)
        gn = _nhwc(grad).reshape(-1, grad.shape[1])[:, branch * co:(branch + 1) * co]
        blocks = cdiv(an.shape[1], 128) * cdiv(co, 128)
        splits = max(1, min(n, 256 // max(blocks, 1)))
        out = np.zeros((co, an.shape[1]))
        for s in range(splits):
            p0, p1 = (n * s // splits) * h * w, (n * (s + 1) // splits) * h * w
            out += gn[p0:p1].T @ an[p0:p1]
        return torch.from_numpy(out)

    def separable_wgrad_dw(self, dd, x, rate):
        xn = _nhwc(x)
        n, h, w, c = xn.shape
        ddn = pixel_rows(_np(dd))
        chunks = cdiv(n * h * w, CHUNK_PIXELS)
        part = np.zeros((chunks, 9, c))
        for k in range(9):
            xs = pixel_rows(shifted(xn, *_offset(k, rate)))
            for i in range(chunks):
                sl = slice(i * CHUNK_PIXELS, (i + 1) * CHUNK_PIXELS)
                part[i, k] = (ddn[sl] * xs[sl]).sum(0)
        return torch.from_numpy(part)
