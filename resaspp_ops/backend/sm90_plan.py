"""Host-side planning of the sm_90a kernels (csrc/sm90_*.cu, DESIGN.md section 4): tiles, work lists,
persistent queues, TMA boxes and the K steps of every job.

The kernels walk the jobs of these plans; each K step is one stage of the mbarrier ring: TMA boxes of
the A and B operands, loaded at the coordinates `steps()` lists, and one wgmma K block. A box starts
at signed coordinates and TMA fills what lies outside the tensor with zeros: that is the padding.
csrc/sm90_plan.h computes the same coordinates on the device; _C.sm90_steps runs that C++ on the host,
and tests/test_sm90_plan.py checks that both agree and that a NumPy emulation of the kernels walking
these steps reproduces F.conv2d in float64.

Tensor maps (dimensions innermost first, as TMA counts them):
    x     [C, W, H, N]            box (64, tile_w, tile_h, stack)        forward A, wgrad B (4 boxes at c + 64 j)
    grad  [Co, 1 + B, W, H, N]    box (64, 1, tile_w, tile_h, stack)     dgrad A, wgrad A (2 boxes at co + 64 i)
    w1    [C, Co]                 forward box (64, 256); dgrad box (64, 64), 4 boxes at c + 64 j
    w3    [C, 3 (kx), 3 (ky), Co, B]  box (64, 1, 1, 256 or 64, 1): each branch channels_last
                                  ([B, Co, 3, 3, C] in memory), so the strides grow outwards as TMA expects

A step is (a, b_map, b): the A box origin (5 ints), which map B comes from (MAP_W1, MAP_W3, MAP_X) and
its origin; unused trailing coordinates are 0.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from resaspp_ops.backend import jobs as J

BLOCK_M = 128     # pixel rows of a forward / dgrad job: two consumer warpgroups x wgmma M = 64
BLOCK_N = 256     # output channels of a forward job (Co <= 256); input channels of a dgrad job
BLOCK_K = 64      # channels of a K step: one 128-byte swizzled row per pixel (16-bit elements)
WGRAD_PIX = 64    # pixel rows (K) of a wgrad step
WGRAD_M = 128     # output channels of a wgrad job (two warpgroups x 64)
WGRAD_N = 256     # input channels of a wgrad job
STAGES = 4        # depth of the mbarrier ring (4 x 48 KiB of shared memory)
MAX_RATE = 1 << 29  # rates are clamped to this in the tap offsets (csrc: kMaxRate); H, W stay below it

MAP_W1, MAP_W3, MAP_X = 0, 1, 2


def tap_offset(rate: int, tap: int) -> tuple[int, int]:
    """(dy, dx) of tap bit ky * 3 + kx at `rate` (rate 0: the 1x1)."""
    ky, kx = divmod(tap, 3)
    r = min(rate, MAX_RATE)
    return (ky - 1) * r, (kx - 1) * r


def bits(mask: int) -> list[int]:
    return [k for k in range(9) if mask >> k & 1]


def _origin(job_plan: J.JobPlan, tile: int) -> tuple[int, int]:
    th, tw = divmod(int(tile), job_plan.tiles_w)
    return th * job_plan.tile_h, tw * job_plan.tile_w


@dataclass(frozen=True, eq=False)
class Sm90Plan:
    """One launch of an sm_90a kernel: its tiles, its work list, the persistent grid's queues."""

    kind: str                 # "forward", "dgrad" or "wgrad"
    n: int
    c: int
    co: int
    h: int
    w: int
    rates: tuple
    tiles: J.JobPlan          # the spatial tiles and their live-tap masks
    jobs: np.ndarray          # int32 [J, 4], the kind's rows (see jobs.py)
    queues: np.ndarray        # int32 [G + 1 + J] (jobs.lpt_queues)
    masks: np.ndarray         # int32 [tiles, 1 + B]: forward masks (forward, wgrad) or dgrad_masks (dgrad)
    tap_offsets: np.ndarray   # wgrad: int32 [T + 1]; others: empty
    tap_entries: np.ndarray   # wgrad: int32 [E, 2] (image, tile); others: empty

    @property
    def num_branches(self) -> int:
        return 1 + len(self.rates)

    @property
    def programs(self) -> int:
        return int(self.queues.shape[0] - self.jobs.shape[0] - 1)

    @property
    def k_chunks(self) -> int:
        """K blocks of BLOCK_K channels per tap: C (forward), Co (dgrad); wgrad steps are tiles."""
        return J.cdiv(self.c if self.kind == "forward" else self.co, BLOCK_K)

    @property
    def pixel_rows(self) -> int:
        """Rows the TMA box of a tile fills (tile_h * tile_w * stack); the rest of a stage stays zero."""
        return self.tiles.tile_h * self.tiles.tile_w * self.tiles.stack

    def box_x(self) -> tuple:
        return (BLOCK_K, self.tiles.tile_w, self.tiles.tile_h, self.tiles.stack)

    def box_grad(self) -> tuple:
        return (BLOCK_K, 1, self.tiles.tile_w, self.tiles.tile_h, self.tiles.stack)

    def box_w1(self) -> tuple:
        """The w1 box (C, Co extents): all BLOCK_N output channels for the forward, 64 x 64 for dgrad."""
        return (BLOCK_K, BLOCK_N) if self.kind == "forward" else (BLOCK_K, BLOCK_K)

    def box_w3(self) -> tuple:
        """The w3 box (C, kx, ky, Co, branch extents)."""
        return (BLOCK_K, 1, 1, self.box_w1()[1], 1)

    def stage_bytes(self) -> int:
        """Bytes TMA writes per stage (the mbarrier's transaction count; zero-filled bytes count too)."""
        row = BLOCK_K * 2
        if self.kind == "forward":
            return self.pixel_rows * row + BLOCK_N * row
        if self.kind == "dgrad":
            return self.pixel_rows * row + (BLOCK_N // BLOCK_K) * BLOCK_K * row
        return (WGRAD_M // BLOCK_K + WGRAD_N // BLOCK_K) * self.pixel_rows * row

    def job_steps(self, j: int) -> int:
        """The K steps of job j (what the consumers count)."""
        a, b, c, d = (int(v) for v in self.jobs[j])
        if self.kind == "forward":
            return J.popcount(d) * self.k_chunks
        if self.kind == "dgrad":
            return d * self.k_chunks
        return d

    def costs(self) -> np.ndarray:
        """The scheduler's cost of each job: its K steps plus one for the epilogue."""
        return np.array([self.job_steps(j) + 1 for j in range(self.jobs.shape[0])], dtype=np.int64)

    def steps(self, j: int) -> Iterator[tuple[tuple, int, tuple]]:
        """The K steps of job j in the kernel's order: (A origin, B map, B origin)."""
        row = [int(v) for v in self.jobs[j]]
        if self.kind == "forward":
            image, tile, branch, taps = row
            h0, w0 = _origin(self.tiles, tile)
            rate = 0 if branch == 0 else self.rates[branch - 1]
            for tap in bits(taps):
                dy, dx = tap_offset(rate, tap)
                ky, kx = divmod(tap, 3)
                for kc in range(self.k_chunks):
                    a = (kc * BLOCK_K, w0 + dx, h0 + dy, image, 0)
                    if branch == 0:
                        yield a, MAP_W1, (kc * BLOCK_K, 0, 0, 0, 0)
                    else:
                        yield a, MAP_W3, (kc * BLOCK_K, kx, ky, 0, branch - 1)
        elif self.kind == "dgrad":
            image, tile, cblock, _ = row
            h0, w0 = _origin(self.tiles, tile)
            for branch in range(self.num_branches):
                rate = 0 if branch == 0 else self.rates[branch - 1]
                for tap in bits(int(self.masks[tile, branch])):
                    dy, dx = tap_offset(rate, tap)
                    ky, kx = divmod(tap, 3)
                    for kc in range(self.k_chunks):
                        a = (kc * BLOCK_K, branch, w0 - dx, h0 - dy, image)
                        if branch == 0:
                            yield a, MAP_W1, (cblock * BLOCK_N, kc * BLOCK_K, 0, 0, 0)
                        else:
                            yield a, MAP_W3, (cblock * BLOCK_N, kx, ky, kc * BLOCK_K, branch - 1)
        else:
            t, coblock, cblock, _ = row
            branch, tap = (0, J.CENTRE_TAP) if t == 0 else (1 + (t - 1) // 9, (t - 1) % 9)
            dy, dx = tap_offset(0 if branch == 0 else self.rates[branch - 1], tap)
            for e in range(int(self.tap_offsets[t]), int(self.tap_offsets[t + 1])):
                image, tile = (int(v) for v in self.tap_entries[e])
                h0, w0 = _origin(self.tiles, tile)
                yield ((coblock * WGRAD_M, branch, w0, h0, image), MAP_X,
                       (cblock * WGRAD_N, w0 + dx, h0 + dy, image, 0))

    def device_tensors(self, device: torch.device) -> dict:
        """The plan's int32 tensors on `device`, copied there once per plan and device."""
        return _device_tensors(self, torch.device(device))


_EMPTY = np.zeros(0, dtype=np.int32)


@functools.lru_cache(maxsize=256)
def plan(kind: str, n: int, c: int, co: int, h: int, w: int, rates: tuple, programs: int) -> Sm90Plan:
    """The cached plan of one launch; `programs` is the most the persistent grid may use (the SM count)."""
    rates = tuple(int(r) for r in rates)
    slots = WGRAD_PIX if kind == "wgrad" else BLOCK_M
    th, tw, stack = J.choose_tile(n, h, w, slots)
    tiles = J.job_plan(n, h, w, rates, th, tw, stack)
    off, ent = _EMPTY, _EMPTY.reshape(0, 2)
    if kind == "forward":
        rows, masks = tiles.jobs, J.tile_masks(tiles)
    elif kind == "dgrad":
        rows, masks = J.dgrad_jobs(tiles, J.cdiv(c, BLOCK_N)), J.dgrad_masks(tiles)
    elif kind == "wgrad":
        rows, masks = J.wgrad_jobs(tiles, J.cdiv(co, WGRAD_M), J.cdiv(c, WGRAD_N)), J.tile_masks(tiles)
        off, ent = J.tap_tiles(tiles)
    else:
        raise ValueError(f"unknown sm90 plan kind {kind!r}")
    draft = Sm90Plan(kind, n, c, co, h, w, rates, tiles, rows, np.zeros(1, np.int32), masks, off, ent)
    queues = J.lpt_queues(draft.costs(), programs)
    return Sm90Plan(kind, n, c, co, h, w, rates, tiles, rows, queues, masks, off, ent)


@functools.lru_cache(maxsize=256)
def _device_tensors(p: Sm90Plan, device: torch.device) -> dict:
    def put(a):
        return torch.from_numpy(np.array(a, dtype=np.int32)).to(device)  # a writable copy
    return {"jobs": put(p.jobs), "queues": put(p.queues), "masks": put(p.masks),
            "tap_offsets": put(p.tap_offsets if p.tap_offsets.size else np.zeros(1, np.int32)),
            "tap_entries": put(p.tap_entries if p.tap_entries.size else np.zeros((1, 2), np.int32))}
