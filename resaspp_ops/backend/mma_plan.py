"""Host-side planning of the mma.sync kernels (csrc/multi_rate_conv2d_mma_*.cu): their tiles and work lists.

A forward job is a tile's branch (jobs.job_plan: (image, tile, branch, taps)), run for every 128-channel
block of Co; a dgrad job is a tile's 128-channel block of C with every branch's live taps
(jobs.dgrad_jobs, with the mirrored masks of jobs.dgrad_masks). Wgrad walks each tap's valid pixels
and needs no list. Jobs go to the hardware scheduler heaviest first (the list's order).
"""
from __future__ import annotations

import functools

import numpy as np
import torch

from resaspp_ops.backend import jobs as J

BLOCK_M = 128  # pixel rows of a job (csrc: mma::kBlockM)
BLOCK_N = 128  # output channels of a forward job, input channels of a dgrad job (mma::kBlockN)


@functools.lru_cache(maxsize=256)
def plan(kind: str, n: int, c: int, h: int, w: int, rates: tuple) -> tuple[tuple[np.ndarray, ...], tuple]:
    """(int32 tables, (tile_h, tile_w, stack)) of one launch: forward (jobs,), dgrad (jobs, masks)."""
    th, tw, stack = J.choose_tile(n, h, w, BLOCK_M)
    tiles = J.job_plan(n, h, w, tuple(rates), th, tw, stack)
    if kind == "forward":
        tables = (tiles.jobs,)
    elif kind == "dgrad":
        tables = (J.dgrad_jobs(tiles, J.cdiv(c, BLOCK_N)), J.dgrad_masks(tiles))
    else:
        raise ValueError(f"unknown mma plan kind {kind!r}")
    return tables, (th, tw, stack)


@functools.lru_cache(maxsize=256)
def device_tables(kind: str, n: int, c: int, h: int, w: int, rates: tuple, device: torch.device) -> tuple:
    """(tables on `device`, tile), copied there once per plan and device."""
    tables, tile = plan(kind, n, c, h, w, rates)
    return [torch.from_numpy(np.array(t, dtype=np.int32)).to(device) for t in tables], list(tile)
