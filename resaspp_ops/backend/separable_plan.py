"""Host-side planning of the separable kernels (multi_rate_separable_conv2d), shared by the kernel backends.

The separable op runs on the jobs of the second design (backend/jobs.py: a (tile, branch) with all Co, a
tile's 1 + B jobs adjacent, live taps per job). Its kernels treat the 1x1 branch as one more depthwise-
separable branch whose depthwise kernel is the identity (the centre tap 1, no mid stage), so that every
branch is the same three stages over the same operands (DESIGN.md section 4, "Separable branches"):

    D_b = depthwise_b(x)            [M, C] on the job's live taps, fp32 in registers
    A_b = mid_b(D_b) cast to x's dtype     (scale, shift, ReLU per channel; the identity for b = 0)
    Y_b = A_b @ Wpw_b               [M, Co], the pointwise MMA, then the epilogue of multi_rate_conv2d

pack_weights builds those operands; branch_jobs splits a plan's jobs by branch for the backward's per-branch
launches (the same tiles in the same order for every branch).
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
import torch

from resaspp_ops.backend.jobs import JobPlan


class SeparableOperands(NamedTuple):
    """The kernels' operands, every branch alike (branch 0 = the 1x1).

    dw        [1+B, 9, C] fp32 (pack_weights' dtype): depthwise taps, tap ky * 3 + kx; branch 0 is 1 at the
              centre, 0 elsewhere
    pw        [1+B, C, Co] in x's dtype, K-major: branch 0 is w1x1, branch 1 + i is w_pw[i]; None where not
              asked for (a backward that reads the weights as the op takes them)
    mid_scale [(1+B) * C] fp32 (pack_weights' dtype) or None (branch 0: ones)
    mid_shift [(1+B) * C] fp32 (pack_weights' dtype) or None (branch 0: zeros)
    """

    dw: torch.Tensor
    pw: torch.Tensor | None
    mid_scale: torch.Tensor | None
    mid_shift: torch.Tensor | None


def pack_weights(w1x1, w_dw, w_pw, mid_scale, mid_shift, dtype=torch.float32,
                 pointwise: bool = True) -> SeparableOperands:
    """SeparableOperands from the op's weights: w1x1 [Co, C, 1, 1], w_dw [B, C, 1, 3, 3], w_pw [B, Co, C, 1, 1],
    mid_scale / mid_shift None or [B*C]. dtype: of dw and the mid vectors (fp32; the CUDA backend's fp64 SIMT
    kernels take fp64 for fp64 x, its accumulation dtype). pointwise=False: no K-major pointwise copy (pw None)."""
    co, c = w1x1.shape[:2]
    b = w_dw.shape[0]
    dw = torch.zeros((1 + b, 9, c), dtype=dtype, device=w1x1.device)
    dw[0, 4] = 1.0
    dw[1:] = w_dw.reshape(b, c, 9).permute(0, 2, 1).to(dtype)
    pw = torch.cat([w1x1.reshape(1, co, c), w_pw.reshape(b, co, c)]).transpose(1, 2).contiguous() if pointwise \
        else None

    def extended(t, fill):
        if t is None:
            return None
        return torch.cat([torch.full((c,), fill, dtype=dtype, device=t.device), t.to(dtype)])

    return SeparableOperands(dw, pw, extended(mid_scale, 1.0), extended(mid_shift, 0.0))


@functools.lru_cache(maxsize=256)
def branch_jobs(plan: JobPlan) -> np.ndarray:
    """int32 [1+B, T, 4]: the plan's jobs of each branch (image, tile, branch, taps), tiles in (image, tile)
    order, the same T tiles for every branch (every tile has one job a branch: each has at least its centre)."""
    jobs = plan.jobs
    order = np.lexsort((jobs[:, 1], jobs[:, 0], jobs[:, 2]))  # by branch, then image, then tile
    per_branch = jobs[order].reshape(1 + len(plan.rates), -1, 4)
    assert (per_branch[:, :, :2] == per_branch[:1, :, :2]).all(), "every branch must cover the same tiles"
    return np.ascontiguousarray(per_branch)


def mirror_taps(taps: np.ndarray) -> np.ndarray:
    """Tap masks mirrored (bit t <- bit 8 - t): the live taps of the depthwise transpose, which reads dD at
    p - offset, are those whose opposite tap the forward reads inside the map."""
    taps = np.asarray(taps)
    return sum(((taps >> t) & 1) << (8 - t) for t in range(9)).astype(taps.dtype)


class BranchJobLists(NamedTuple):
    """branch_jobs(plan) as stable host arrays (kept alive by the cache, so a device copy can be cached by id)."""

    stacked: np.ndarray     # [1+B, T, 4]
    each: tuple             # 1+B arrays [T, 4]
    mirrored: tuple         # 1+B arrays [T, 4], their tap masks mirrored (mirror_taps)


@functools.lru_cache(maxsize=256)
def branch_job_lists(plan: JobPlan) -> BranchJobLists:
    stacked = branch_jobs(plan)
    each = tuple(np.ascontiguousarray(jobs) for jobs in stacked)
    mirrored = []
    for jobs in each:
        m = jobs.copy()
        m[:, 3] = mirror_taps(jobs[:, 3])
        mirrored.append(m)
    return BranchJobLists(stacked, each, tuple(mirrored))
