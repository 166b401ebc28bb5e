"""The work list of the second kernel design (resaspp_ops.backend.jobs) against a per-pixel brute force."""
import itertools

import numpy as np
import pytest
import torch

from resaspp_ops.backend.jobs import device_jobs, job_plan
from utils import AWKWARD


def brute_force_taps(h, w, h0, h1, w0, w1, rate):
    """Bit ky*3+kx set iff some output pixel of the tile reads that tap inside the map."""
    mask = 0
    for ky, kx in itertools.product(range(3), range(3)):
        dy, dx = (ky - 1) * rate, (kx - 1) * rate
        if any(0 <= y + dy < h and 0 <= x + dx < w for y in range(h0, h1) for x in range(w0, w1)):
            mask |= 1 << (ky * 3 + kx)
    return mask


@pytest.mark.parametrize("problem", AWKWARD + [type(AWKWARD[0])(2, 8, 8, 33, 33, (6, 12, 18))], ids=str)
@pytest.mark.parametrize("tile", [(4, 4), (3, 5), (8, 16)])
@pytest.mark.parametrize("stack", [1, 2])
def test_every_job_once_with_exactly_its_live_taps(problem, tile, stack):
    p = problem
    plan = job_plan(p.n, p.h, p.w, p.rates, *tile, stack)
    seen = set()
    for image, t, branch, taps in plan.jobs.tolist():
        key = (image, t, branch)
        assert key not in seen
        seen.add(key)
        h0, h1, w0, w1 = plan.tile_bounds(t)
        expected = 1 << 4 if branch == 0 else brute_force_taps(p.h, p.w, h0, h1, w0, w1, p.rates[branch - 1])
        assert taps == expected, (key, bin(taps), bin(expected))
    assert seen == {(i, t, b) for i in range(0, p.n, stack) for t in range(plan.tiles_h * plan.tiles_w)
                    for b in range(1 + len(p.rates))}


def test_order_keeps_a_tiles_branches_adjacent_and_puts_the_heaviest_first():
    plan = job_plan(2, 33, 33, (6, 12, 18), 11, 11)
    jobs = plan.jobs
    b = 4
    groups = jobs.reshape(-1, b, 4)  # consecutive runs of 1 + B jobs
    assert (groups[:, :, 0] == groups[:, :1, 0]).all() and (groups[:, :, 1] == groups[:, :1, 1]).all()
    cost = np.array([bin(int(t)).count("1") for t in jobs[:, 3]]).reshape(-1, b)
    assert (np.diff(cost.sum(1)) <= 0).all()      # tiles heaviest first
    assert (np.diff(cost, axis=1) <= 0).all()     # within a tile, branches heaviest first
    assert cost.sum(1)[0] == 1 + 9 * 3 and cost.sum(1)[-1] < cost.sum(1)[0]  # the middle tile has every tap


def test_plans_are_cached_and_copied_to_a_device_once():
    a = job_plan(1, 7, 9, (2, 4), 4, 4)
    assert job_plan(1, 7, 9, (2, 4), 4, 4) is a
    t = device_jobs(a, torch.device("cpu"))
    assert t.dtype == torch.int32 and t is device_jobs(a, "cpu") and t.shape == (a.n_jobs, 4)


def test_separable_branch_jobs_cover_every_tile_once_per_branch_and_mirror_their_taps():
    from resaspp_ops.backend.separable_plan import branch_job_lists, mirror_taps

    plan = job_plan(3, 9, 13, (1, 2, 12), 4, 4, 1)
    lists = branch_job_lists(plan)
    assert lists.stacked.shape == (4, plan.n_jobs // 4, 4)
    for branch, jobs in enumerate(lists.each):
        assert (jobs[:, 2] == branch).all()
        assert sorted(map(tuple, jobs.tolist())) == sorted(map(tuple, plan.jobs[plan.jobs[:, 2] == branch].tolist()))
        assert (jobs[:, :2] == lists.each[0][:, :2]).all()   # the same tiles in the same order
    # Mirroring: tap t of the transpose reads at p - offset(t) = p + offset(8 - t).
    for jobs, mirrored in zip(lists.each, lists.mirrored):
        for taps, back in zip(jobs[:, 3], mirrored[:, 3]):
            assert all(((back >> t) & 1) == ((taps >> (8 - t)) & 1) for t in range(9))
    assert mirror_taps(np.array([0b000000001, 0b000010000, 0b100000110])).tolist() == [0b100000000, 0b000010000,
                                                                                         0b011000001]
