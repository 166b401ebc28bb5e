"""The work list of the second kernel design (DESIGN.md section 4), shared by the kernel backends.

A job is (image, spatial tile, branch) with all Co output channels of that branch: M = the tile's pixels
(of `stack` images: small maps stack the same tile of several images, whose live taps are identical, so
that they share the weight loads), N = Co, K = C x the branch's live taps. Branch 0 is the 1x1 (its one
tap is the centre); branch 1 + i is the 3x3 branch of rates[i], whose taps are live unless the tile
shifted by the tap is wholly zero padding (DESIGN.md section 2):

    tap (ky, kx) of rate r is live on [h0, h1) x [w0, w1)  iff  h1 + dy > 0, h0 + dy < H, w1 + dx > 0,
    w0 + dx < W, with dy = (ky - 1) r, dx = (kx - 1) r.

Order. The 1 + B jobs of one tile are neighbours in the list, so that the tile and its halo come from
HBM once and from L2 for the other branches (the one input read of all branches); tiles go heaviest first
(most live taps over their branches), and within a tile its branches heaviest first, so that the last
wave holds the shortest jobs. The plan depends on the shape, the rates and the tile alone: it is built on
the host once and cached (job_plan, device_jobs).

    jobs[j] = (image, tile, branch, taps)      int32 [J, 4]
        image   the first image of the job (it covers image .. image + stack - 1)
        tile    row-major index of the tile in the tiles_h x tiles_w grid of one image
        branch  0 for the 1x1, 1 + i for rates[i]
        taps    bit ky * 3 + kx set for each live tap (the 1x1: bit 4)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

CENTRE_TAP = 4
ALL_TAPS = 0x1FF


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def live_taps(h: int, w: int, h0: int, h1: int, w0: int, w1: int, rate: int) -> int:
    """The 9-bit mask of the taps of a 3x3 branch of `rate` that read inside an h x w map on [h0, h1) x [w0, w1)."""
    mask = 0
    for ky in range(3):
        dy = (ky - 1) * rate
        if not (h1 + dy > 0 and h0 + dy < h):
            continue
        for kx in range(3):
            dx = (kx - 1) * rate
            if w1 + dx > 0 and w0 + dx < w:
                mask |= 1 << (ky * 3 + kx)
    return mask


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: job_plan caches one per key
class JobPlan:
    """The cost-sorted work list of one (batch, map, rates, tile, stack); see the module docstring."""

    n: int
    h: int
    w: int
    rates: tuple
    tile_h: int
    tile_w: int
    stack: int
    jobs: np.ndarray    # int32 [J, 4]: image, tile, branch, taps

    @property
    def tiles_h(self) -> int:
        return cdiv(self.h, self.tile_h)

    @property
    def tiles_w(self) -> int:
        return cdiv(self.w, self.tile_w)

    @property
    def n_jobs(self) -> int:
        return int(self.jobs.shape[0])

    def live_tap_count(self) -> np.ndarray:
        """[J] the number of live taps of each job (its K = C x that)."""
        taps = self.jobs[:, 3].astype(np.int64)
        return np.array([bin(t).count("1") for t in taps], dtype=np.int64)

    def tile_bounds(self, tile: int) -> tuple[int, int, int, int]:
        """(h0, h1, w0, w1) of a tile, clipped to the map."""
        th, tw = divmod(int(tile), self.tiles_w)
        h0, w0 = th * self.tile_h, tw * self.tile_w
        return h0, min(h0 + self.tile_h, self.h), w0, min(w0 + self.tile_w, self.w)


@functools.lru_cache(maxsize=512)
def job_plan(n: int, h: int, w: int, rates: tuple, tile_h: int, tile_w: int, stack: int = 1) -> JobPlan:
    """The work list for `n` images of h x w with these rates, tiles of tile_h x tile_w, `stack` images a job."""
    if n < 0 or h < 1 or w < 1 or tile_h < 1 or tile_w < 1 or stack < 1:
        raise ValueError(f"bad job plan arguments n={n} h={h} w={w} tile={tile_h}x{tile_w} stack={stack}")
    tiles_h, tiles_w = cdiv(h, tile_h), cdiv(w, tile_w)
    per_tile = []  # (tile, [(branch, taps)]) in tile order
    for tile in range(tiles_h * tiles_w):
        th, tw = divmod(tile, tiles_w)
        h0, w0 = th * tile_h, tw * tile_w
        h1, w1 = min(h0 + tile_h, h), min(w0 + tile_w, w)
        branches = [(0, 1 << CENTRE_TAP)] + [(1 + i, live_taps(h, w, h0, h1, w0, w1, r)) for i, r in enumerate(rates)]
        per_tile.append((tile, branches))
    cost = {tile: sum(bin(t).count("1") for _, t in branches) for tile, branches in per_tile}
    rows = []
    images = range(0, n, stack)
    # Heaviest tiles first, each tile's jobs adjacent (heaviest branch first); ties keep image, tile, branch order.
    for tile, branches in sorted(per_tile, key=lambda item: -cost[item[0]]):
        ordered = sorted(branches, key=lambda bt: -bin(bt[1]).count("1"))
        for image in images:
            rows.extend((image, tile, branch, taps) for branch, taps in ordered)
    jobs = np.array(rows, dtype=np.int32).reshape(-1, 4)
    return JobPlan(n, h, w, tuple(rates), tile_h, tile_w, stack, jobs)


@functools.lru_cache(maxsize=512)
def _device_jobs(plan: JobPlan, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(plan.jobs).to(device)


def device_jobs(plan: JobPlan, device: torch.device) -> torch.Tensor:
    """plan.jobs as an int32 tensor on `device` (copied there once per plan and device)."""
    return _device_jobs(plan, torch.device(device))


@dataclass(frozen=True, eq=False)
class DgradPlan:
    """The data-gradient work list over the same tiles: a job is (image, tile) with a block of input channels
    (the channel blocks are the grid's fastest axis, so a job's blocks are neighbours), its K the centre taps
    of every branch at once plus the live off-centre taps of each atrous branch.

        jobs[j]        = (image, tile)                    int32 [J, 2], the tiles heaviest first
        segments[t, s] = 16 * branch + tap                int32 [tiles, 8 * B], tile t's live off-centre taps
        n_segments[t]  = how many of segments[t] are used  int32 [tiles]
    """

    plan: JobPlan
    jobs: np.ndarray
    segments: np.ndarray
    n_segments: np.ndarray


@functools.lru_cache(maxsize=512)
def dgrad_plan(plan: JobPlan) -> DgradPlan:
    """The dgrad work list of a forward plan (same tiles and stacking, the same live taps)."""
    b = len(plan.rates)
    n_tiles = plan.tiles_h * plan.tiles_w
    segments = np.zeros((n_tiles, max(8 * b, 1)), dtype=np.int32)
    n_segments = np.zeros(n_tiles, dtype=np.int32)
    order, cost = [], {}
    for image, tile, branch, taps in plan.jobs.tolist():
        if (image, tile) not in cost:
            order.append((image, tile))
            cost[(image, tile)] = 0
        cost[(image, tile)] += bin(taps).count("1")
        if branch == 0 or image != 0:
            continue  # the table is per tile: every image has the same taps
        for tap in range(9):
            if tap != CENTRE_TAP and taps >> tap & 1:
                segments[tile, n_segments[tile]] = 16 * branch + tap
                n_segments[tile] += 1
    jobs = np.array(order, dtype=np.int32).reshape(-1, 2)
    return DgradPlan(plan, jobs, segments, n_segments)


def _in_map(lo: int, hi: int, shift: int, length: int) -> int:
    """How many of lo .. hi-1 stay inside [0, length) once shifted by `shift`."""
    return max(0, min(hi, length - shift) - max(lo, -shift))


def _rows(plan: JobPlan, image: int, tile: int, dy: int, dx: int) -> int:
    """Rows of a job's A tile that read inside the map after the shift (dy, dx): its images times its pixels."""
    h0, h1, w0, w1 = plan.tile_bounds(tile)
    images = min(plan.stack, plan.n - image)
    return images * _in_map(h0, h1, dy, plan.h) * _in_map(w0, w1, dx, plan.w)


def _offset(tap: int, rate: int) -> tuple[int, int]:
    return (tap // 3 - 1) * rate, (tap % 3 - 1) * rate


def forward_operand_elements(plan: JobPlan, c: int, co: int, block_n: int) -> tuple[int, int]:
    """(A, B): the input and weight elements the second design's forward loads for this plan, masks applied:
    each job reads its live taps' shifted tiles (C channels each) once per block of BLOCK_N output channels,
    and each live tap's [C, Co] weights once."""
    n_nb = cdiv(co, block_n)
    a = b = 0
    for image, tile, branch, taps in plan.jobs.tolist():
        rate = 0 if branch == 0 else plan.rates[branch - 1]
        for tap in range(9):
            if taps >> tap & 1:
                a += n_nb * c * _rows(plan, image, tile, *_offset(tap, rate))
                b += c * co
    return a, b


def dgrad_operand_elements(dplan: DgradPlan, c: int, co: int, block_n: int) -> tuple[int, int]:
    """(A, B) of the second design's dgrad: each (image, tile) reads the grad's centre (all (1+B) * Co
    channels) and each live off-centre tap's shifted Co channels, once per block of BLOCK_N input channels;
    the weights of each segment, [K, C] in all, once."""
    plan = dplan.plan
    gc = (1 + len(plan.rates)) * co
    n_cb = cdiv(c, block_n)
    a = b = 0
    for image, tile in dplan.jobs.tolist():
        a += n_cb * gc * _rows(plan, image, tile, 0, 0)
        b += gc * c
        for code in dplan.segments[tile, :dplan.n_segments[tile]].tolist():
            a += n_cb * co * _rows(plan, image, tile, *_offset(code % 16, plan.rates[code // 16 - 1]))
            b += co * c
    return a, b
