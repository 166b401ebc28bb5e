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

The backward's lists are built from the same plan: dgrad_jobs (a tile's input-channel blocks, every
branch's live taps in one K loop; a tap there reads the grad at p - d, so its mask is the forward mask
mirrored), wgrad_jobs with tap_tiles (per tap, the tiles where it reads inside the map: the K walk of
its weight grad). lpt_queues splits a cost-sorted list over a persistent grid.

Taps are numbered as the packed weights of the kernels: t = 0 the 1x1, t = 1 + 9 i + ky * 3 + kx for
(ky, kx) of rates[i].
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


def choose_tile(n: int, h: int, w: int, slots: int) -> tuple[int, int, int]:
    """(tile_h, tile_w, stack) for jobs of at most `slots` pixel rows: the fewest tiles of one image (least
    padding work: 33 x 33 takes 9 tiles of 11 x 11 at 128 slots, where 8 x 16 would take 15), then the
    squarest (more taps skipped per tile); when the whole map fits, as many images stacked as fit."""
    best = None
    for th in range(1, slots + 1):
        tw = slots // th
        eh, ew = min(th, h), min(tw, w)
        key = (cdiv(h, th) * cdiv(w, tw), abs(eh - ew))
        if best is None or key < best[0]:
            best = (key, max(eh, 1), max(ew, 1))
    _, th, tw = best
    stack = max(1, min(n, slots // (th * tw))) if th >= h and tw >= w else 1
    return th, tw, stack


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


def mirror(mask: int) -> int:
    """Bit k -> bit 8 - k: tap (ky, kx) -> (2 - ky, 2 - kx), whose offset is the negated one."""
    return int(sum(1 << (8 - k) for k in range(9) if mask >> k & 1))


def popcount(mask: int) -> int:
    return bin(int(mask)).count("1")


@functools.lru_cache(maxsize=512)
def tile_masks(plan: JobPlan) -> np.ndarray:
    """int32 [tiles, 1 + B]: the forward live-tap mask of each tile and branch (the jobs' `taps`)."""
    out = np.zeros((plan.tiles_h * plan.tiles_w, 1 + len(plan.rates)), dtype=np.int32)
    for tile in range(out.shape[0]):
        h0, h1, w0, w1 = plan.tile_bounds(tile)
        out[tile, 0] = 1 << CENTRE_TAP
        for i, r in enumerate(plan.rates):
            out[tile, 1 + i] = live_taps(plan.h, plan.w, h0, h1, w0, w1, r)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=512)
def dgrad_masks(plan: JobPlan) -> np.ndarray:
    """int32 [tiles, 1 + B]: the taps whose grad_x contribution is not wholly zero on each tile.

    grad_x[p] = sum over taps of grad_b[p - d] W^T: tap (ky, kx) reads the grad shifted by -d, which is
    the forward read of tap (2 - ky, 2 - kx): the forward mask mirrored."""
    out = np.vectorize(mirror, otypes=[np.int32])(tile_masks(plan)).astype(np.int32)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=512)
def dgrad_jobs(plan: JobPlan, c_blocks: int) -> np.ndarray:
    """int32 [J, 4] = (image, tile, c_block, live taps of all branches): one job per stacked image group,
    tile and block of input channels; tiles heaviest first, a tile's c_blocks adjacent (they read the same
    grad boxes), ties in image, tile, block order."""
    masks = dgrad_masks(plan)
    cost = np.array([sum(popcount(m) for m in row) for row in masks.tolist()], dtype=np.int64)
    order = sorted(range(masks.shape[0]), key=lambda t: -cost[t])
    rows = [(image, tile, cb, int(cost[tile])) for tile in order for image in range(0, plan.n, plan.stack)
            for cb in range(c_blocks)]
    out = np.array(rows, dtype=np.int32).reshape(-1, 4)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=512)
def tap_tiles(plan: JobPlan) -> tuple[np.ndarray, np.ndarray]:
    """(offsets int32 [T + 1], entries int32 [E, 2] = (image, tile)): for each tap t, the stacked image
    groups and tiles where it reads inside the map, in image-major, tile order (the fixed K order of its
    weight grad). A tap that is padding everywhere has none."""
    masks = tile_masks(plan)
    groups = range(0, plan.n, plan.stack)
    offsets, entries = [0], []
    for t in range(1 + 9 * len(plan.rates)):
        branch, bit = (0, CENTRE_TAP) if t == 0 else (1 + (t - 1) // 9, (t - 1) % 9)
        live = [tile for tile in range(masks.shape[0]) if masks[tile, branch] >> bit & 1]
        entries.extend((image, tile) for image in groups for tile in live)
        offsets.append(len(entries))
    off = np.array(offsets, dtype=np.int32)
    ent = np.array(entries, dtype=np.int32).reshape(-1, 2)
    off.setflags(write=False)
    ent.setflags(write=False)
    return off, ent


@functools.lru_cache(maxsize=512)
def wgrad_jobs(plan: JobPlan, co_blocks: int, c_blocks: int) -> np.ndarray:
    """int32 [J, 4] = (tap, co_block, c_block, K steps): every output block of every tap's weight grad
    (a dead tap's blocks too, with 0 steps: they write zeros); heaviest taps first, a tap's blocks adjacent
    (they share its grad and input boxes)."""
    off, _ = tap_tiles(plan)
    steps = np.diff(off.astype(np.int64))
    order = sorted(range(len(steps)), key=lambda t: -steps[t])
    rows = [(t, cob, cb, int(steps[t])) for t in order for cob in range(co_blocks) for cb in range(c_blocks)]
    out = np.array(rows, dtype=np.int32).reshape(-1, 4)
    out.setflags(write=False)
    return out


def lpt_queues(costs: np.ndarray, workers: int) -> np.ndarray:
    """int32 [G + 1 + J]: a persistent grid's queues over a cost-sorted list, G = min(workers, J).

    Jobs are dealt in list order, each to the program with the least work so far (ties: the lowest id),
    so the heaviest go first and neighbours in the list run at about the same time. Layout: offsets[G + 1]
    into the job indices that follow, program g running indices[offsets[g]:offsets[g + 1]] in order."""
    import heapq

    costs = np.asarray(costs, dtype=np.int64)
    g = max(1, min(int(workers), len(costs)))
    heap = [(0, i) for i in range(g)]
    queues = [[] for _ in range(g)]
    for j, c in enumerate(costs.tolist()):
        load, i = heapq.heappop(heap)
        queues[i].append(j)
        heapq.heappush(heap, (load + c, i))
    offsets = np.cumsum([0] + [len(q) for q in queues])
    return np.concatenate([offsets, [j for q in queues for j in q]]).astype(np.int32)


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
