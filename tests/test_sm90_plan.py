"""The host-side plans of the sm_90a kernels (resaspp_ops.backend.sm90_plan): work lists, job order,
persistent queues, TMA boxes and K steps, checked by a NumPy emulation of the kernels (tests/sm90_emulation.py)
that walks exactly those steps and must reproduce F.conv2d in float64; and the C++ step walk of the
kernels (csrc/sm90_plan.h, run on the host by _C.sm90_steps) against the Python one."""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nonfinite
import sm90_emulation as E
from resaspp_ops.backend import jobs as J
from resaspp_ops.backend import sm90_plan as P
from utils import AWKWARD, Problem

# DESIGN.md section 5's awkward shapes, plus a voc-like map with several programs per queue, stacked
# small maps (an odd batch leaves the last stack half outside the tensor), C past one block and Co
# past one wgrad block (the forward takes Co <= 256).
SHAPES = AWKWARD + [Problem(3, 24, 16, 33, 33, (6, 12, 18)), Problem(5, 8, 8, 4, 6, (1, 3)),
                    Problem(1, 264, 200, 6, 9, (1, 3)), Problem(2, 16, 8, 3, 150, (2, 40))]
PROGRAMS = 7  # fewer than the jobs: every queue holds several


def _random(p: Problem, seed=0):
    rng = np.random.default_rng(seed)
    b = len(p.rates)
    x = rng.standard_normal((p.n, p.h, p.w, p.c))
    w1 = rng.standard_normal((p.co, p.c))
    w3 = rng.standard_normal((b, 3, 3, p.co, p.c))
    g = rng.standard_normal((p.n, p.h, p.w, 1 + b, p.co))
    return x, w1, w3, g


def _torch_convs(p, x, w1, w3):
    """The branch convolutions as F.conv2d (float64, NCHW), over leaf tensors that take grads."""
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).clone().requires_grad_()
    w1t = torch.from_numpy(w1).clone().requires_grad_()
    w3t = torch.from_numpy(w3).clone().requires_grad_()
    outs = [F.conv2d(xt, w1t[:, :, None, None])]
    outs += [F.conv2d(xt, w3t[i].permute(2, 3, 0, 1), padding=r, dilation=r) for i, r in enumerate(p.rates)]
    return torch.cat(outs, 1), (xt, w1t, w3t)


@pytest.mark.parametrize("problem", SHAPES, ids=str)
def test_emulated_kernels_reproduce_conv2d(problem):
    p = problem
    x, w1, w3, g = _random(p)
    y, (xt, w1t, w3t) = _torch_convs(p, x, w1, w3)
    fwd = P.plan("forward", p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    out, count = E.forward(fwd, x, w1, w3)
    assert (count == 1).all(), "forward: an output element written other than once"
    np.testing.assert_allclose(out, y.detach().permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-11)
    if p.n == 0:
        return
    gt = torch.from_numpy(g.reshape(p.n, p.h, p.w, -1)).permute(0, 3, 1, 2)
    gx, gw1, gw3 = torch.autograd.grad(y, (xt, w1t, w3t), gt)
    dg = P.plan("dgrad", p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    out, count = E.dgrad(dg, g, w1, w3)
    assert (count == 1).all(), "dgrad: a grad_x element written other than once"
    np.testing.assert_allclose(out, gx.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-11)
    wg = P.plan("wgrad", p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    out, count = E.wgrad(wg, g, x)
    assert (count == 1).all(), "wgrad: a weight-grad element written other than once"
    want = np.concatenate([gw1.numpy()[None], gw3.numpy().reshape(-1, p.co, p.c)])
    np.testing.assert_allclose(out, want, rtol=0, atol=1e-10)


def test_an_over_eager_skip_breaks_the_emulation():
    """The emulation is sharp: dropping one live tap of one job changes the result."""
    p = Problem(2, 8, 8, 9, 13, (1, 2, 3))
    x, w1, w3, _ = _random(p)
    fwd = P.plan("forward", p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    jobs = fwd.jobs.copy()
    j = int(np.argmax([J.popcount(t) for t in jobs[:, 3]]))
    jobs[j, 3] &= jobs[j, 3] - 1  # clear the lowest live tap
    broken = P.Sm90Plan(**{**fwd.__dict__, "jobs": jobs})
    out, _ = E.forward(broken, x, w1, w3)
    y, _ = _torch_convs(p, x, w1, w3)
    assert np.abs(out - y.detach().permute(0, 2, 3, 1).numpy()).max() > 1e-3


@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad"])
def test_queues_run_every_job_once_heaviest_first(kind):
    p = P.plan(kind, 8, 2048, 256, 33, 33, (6, 12, 18), 132)
    g = p.programs
    assert g == min(132, p.jobs.shape[0])
    off, order = p.queues[: g + 1], p.queues[g + 1:]
    assert off[0] == 0 and off[-1] == p.jobs.shape[0] and (np.diff(off) >= 1).all()
    assert sorted(order.tolist()) == list(range(p.jobs.shape[0]))
    costs = p.costs()
    assert (np.diff(costs) <= 0).all() or kind == "forward"  # forward: tiles heaviest first, see jobs.py
    loads = [costs[order[off[i]:off[i + 1]]].sum() for i in range(g)]
    assert max(loads) <= sum(loads) / g + costs.max()  # list scheduling's bound
    for i in range(g):  # each queue runs its jobs in list order
        q = order[off[i]:off[i + 1]]
        assert (np.diff(q) > 0).all()


def test_a_tiles_jobs_are_neighbours():
    fwd = P.plan("forward", 4, 64, 32, 65, 65, (12, 24, 36), 132)
    rows = fwd.jobs.reshape(-1, 4, 4)
    assert (rows[:, :, :2] == rows[:, :1, :2]).all()  # each run of 1 + B jobs: one image, one tile
    dg = P.plan("dgrad", 4, 1024, 32, 65, 65, (12, 24, 36), 132)
    rows = dg.jobs.reshape(-1, 4, 4)  # 4 input-channel blocks of 256
    assert (rows[:, :, :2] == rows[:, :1, :2]).all() and (rows[:, :, 2] == np.arange(4)).all()
    wg = P.plan("wgrad", 4, 512, 256, 65, 65, (12, 24, 36), 132)
    rows = wg.jobs.reshape(-1, 4, 4)  # 2 co blocks x 2 c blocks per tap
    assert (rows[:, :, 0] == rows[:, :1, 0]).all()


@pytest.mark.parametrize("problem", SHAPES, ids=str)
def test_dgrad_masks_and_tap_tiles_against_brute_force(problem):
    p = problem
    tiles = P.plan("wgrad", p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS).tiles
    masks = J.dgrad_masks(tiles)
    off, ent = J.tap_tiles(tiles)
    for tile in range(masks.shape[0]):
        h0, h1, w0, w1 = tiles.tile_bounds(tile)
        for b, r in enumerate((0,) + p.rates):
            for k in range(9):
                dy, dx = P.tap_offset(r, k)
                if b == 0 and k != J.CENTRE_TAP:
                    continue
                # dgrad reads the grad at p - d; the forward (and wgrad) reads x at p + d
                reads_inside = lambda s: any(0 <= y + s * dy < p.h and 0 <= x + s * dx < p.w  # noqa: E731
                                             for y in range(h0, h1) for x in range(w0, w1))
                assert bool(masks[tile, b] >> k & 1) == reads_inside(-1)
                t = 0 if b == 0 else 1 + 9 * (b - 1) + k
                listed = {tuple(e) for e in ent[off[t]:off[t + 1]].tolist()}
                want = {(i, tile) for i in range(0, p.n, tiles.stack)} if reads_inside(+1) else set()
                assert {e for e in listed if e[1] == tile} == want


@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad"])
def test_boxes_fit_tma_and_the_stage(kind):
    """TMA: box extents <= 256, inner extent 128 bytes (the 128-byte swizzle's span); a stage's bytes fit
    its 48 KiB slot (A 16 KiB, B 32 KiB)."""
    for n, h, w in [(8, 33, 33), (2, 97, 97), (4, 8, 8), (1, 1, 1), (3, 3, 150), (2, 64, 128)]:
        p = P.plan(kind, n, 64, 256, h, w, (6, 12, 18), 132)
        for box in (p.box_x(), p.box_grad(), p.box_w1(), p.box_w3()):
            assert all(1 <= e <= 256 for e in box) and box[0] * 2 == 128
        rows = P.WGRAD_PIX if kind == "wgrad" else P.BLOCK_M
        assert p.pixel_rows <= rows
        assert p.stage_bytes() <= 48 * 1024


def test_plans_are_cached_and_moved_to_a_device_once():
    a = P.plan("forward", 2, 16, 8, 9, 9, (1, 2), 4)
    assert P.plan("forward", 2, 16, 8, 9, 9, (1, 2), 4) is a
    t = a.device_tensors("cpu")
    assert t is a.device_tensors(torch.device("cpu")) and t["jobs"].dtype == torch.int32


# ----------------------------------------------------------------------------------------------
# The C++ step walk (csrc/sm90_plan.h, the code the kernels' producer warp runs) against the Python one
# ----------------------------------------------------------------------------------------------

def _extension():
    if importlib.util.find_spec("resaspp_ops._C") is None:
        pytest.skip("resaspp_ops._C is not built")
    from resaspp_ops import _C
    if not hasattr(_C, "sm90_steps"):
        pytest.skip("resaspp_ops._C was built without the sm_90a kernels (see `resaspp info`)")
    return _C


def test_cpp_constants_match_the_plan():
    C = _extension()
    assert dict(C.sm90_constants) == {"block_m": P.BLOCK_M, "block_n": P.BLOCK_N, "block_k": P.BLOCK_K,
                                      "wgrad_pix": P.WGRAD_PIX, "wgrad_m": P.WGRAD_M, "wgrad_n": P.WGRAD_N,
                                      "stages": P.STAGES, "max_rate": P.MAX_RATE}


@pytest.mark.parametrize("problem", SHAPES + [Problem(2, 64, 256, 13, 17, (1, 6, 2**32 + 1))], ids=str)
@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad"])
def test_cpp_steps_and_rows_match_the_plan(problem, kind):
    C = _extension()
    p = problem
    plan = P.plan(kind, p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    t = plan.device_tensors("cpu")
    steps, rows = C.sm90_steps(kind, t["jobs"], t["masks"], t["tap_offsets"], t["tap_entries"],
                               list(p.rates), p.n, p.c, p.co, p.h, p.w, plan.tiles.tile_h, plan.tiles.tile_w,
                               plan.tiles.stack)
    want = [(j,) + a + (m,) + b for j in range(plan.jobs.shape[0]) for a, m, b in plan.steps(j)]
    assert steps.tolist() == [list(s) for s in want]
    pix = [(j, m) + (E.row_pixel(plan, int(plan.jobs[j, 0]), int(plan.jobs[j, 1]), m) or (-1, -1, -1))
           for j in range(plan.jobs.shape[0]) if kind != "wgrad" for m in range(P.BLOCK_M)]
    assert rows.tolist() == [list(r) for r in pix]


# ----------------------------------------------------------------------------------------------
# The epilogue with NaN and Inf in x (issue 22 item 7): the kernel's ReLU keeps NaN, as torch.relu does
# ----------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("use_relu", [False, True], ids=["plain", "relu"])
def test_emulated_epilogue_keeps_nan_and_inf_like_the_reference(use_relu):
    """NaN and +-Inf in x reach exactly the outputs whose window reads them, through scale, shift and the
    ReLU as the kernel writes it (tests/sm90_emulation.py epilogue), as in F.conv2d and torch.relu."""
    p = Problem(2, 40, 24, 9, 13, (1, 3, 20))
    x, w1, w3, _ = _random(p, seed=3)
    xt = nonfinite.plant(torch.from_numpy(x).permute(0, 3, 1, 2))
    x = np.ascontiguousarray(xt.permute(0, 2, 3, 1).numpy())
    rng = np.random.default_rng(4)
    scale = rng.random((1 + len(p.rates)) * p.co) + 0.5
    shift = rng.standard_normal((1 + len(p.rates)) * p.co) * 0.1
    fwd = P.plan("forward", p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    out, count = E.forward(fwd, x, w1, w3, scale, shift, use_relu)
    assert (count == 1).all()
    y, _ = _torch_convs(p, x, w1, w3)
    ref = y.detach() * torch.from_numpy(scale)[:, None, None] + torch.from_numpy(shift)[:, None, None]
    ref = torch.relu(ref) if use_relu else ref
    assert torch.equal(torch.isnan(ref), nonfinite.footprint(torch.isnan(xt).any(1), p.rates, p.co))
    got = torch.from_numpy(out).permute(0, 3, 1, 2)
    nonfinite.assert_same_nonfinite(got, ref, "emulated sm90 forward")
    finite = torch.isfinite(ref)
    torch.testing.assert_close(got[finite], ref[finite], rtol=0, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# make_plan's checks (csrc/sm90_host.cpp): tables the kernels could not walk raise before a launch
# ----------------------------------------------------------------------------------------------

def _check(plan, **replace):
    """_C.sm90_check_plan on the plan's host tables, with some replaced."""
    C = _extension()
    t = {k: v.clone() for k, v in plan.device_tensors("cpu").items()}
    t.update(replace)
    C.sm90_check_plan(plan.kind, t["jobs"], t["queues"], t["masks"], t["tap_offsets"], t["tap_entries"],
                      list(plan.rates), plan.n, plan.c, plan.co, plan.h, plan.w, plan.tiles.tile_h,
                      plan.tiles.tile_w, plan.tiles.stack)


def _set(name, index, value):
    """An edit of a plan's host table: name[index] = value(table, plan), on a copy."""
    def edit(plan):
        a = np.array(plan.device_tensors("cpu")[name].numpy())
        a[index] = value(a, plan)
        return {name: torch.from_numpy(a)}
    return edit


def _replace(name, value):
    """A plan's host table `name` replaced by value(table)."""
    return lambda plan: {name: value(plan.device_tensors("cpu")[name])}


@pytest.mark.parametrize("problem", SHAPES + [Problem(8, 64, 256, 33, 33, (6, 12, 18))], ids=str)
@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad"])
def test_cpp_check_accepts_the_plans(problem, kind):
    p = problem
    plan = P.plan(kind, p.n, p.c, p.co, p.h, p.w, p.rates, PROGRAMS)
    _check(plan)
    from resaspp_ops.backend import cuda as cuda_backend
    assert cuda_backend.checked_sm90_plan(plan) is plan


PLAN = Problem(3, 72, 136, 13, 17, (1, 4, 9))  # 2 tiles, stacks of 1, 2 Co blocks of wgrad


def _plan(kind):
    return P.plan(kind, PLAN.n, PLAN.c, PLAN.co, PLAN.h, PLAN.w, PLAN.rates, PROGRAMS)


def _drop_lowest_bit(v):
    return v & (v - 1)


BAD_TABLES = {  # case: (plan kind, edit, the error it must raise)
    # The producer walks the masks (dgrad) or the tap entries (wgrad) while the consumers count job[3]:
    # a mismatch hangs the kernel.
    "dgrad job counts a tap too many": ("dgrad", _set("jobs", (0, 3), lambda a, pl: a[0, 3] + 1),
                                        "counts .* taps where its tile's masks hold"),
    "dgrad mask loses a tap": ("dgrad", _set("masks", (0, 1), lambda a, pl: _drop_lowest_bit(a[0, 1])),
                               "counts .* taps where its tile's masks hold"),
    "wgrad job counts a step too few": ("wgrad", _set("jobs", (0, 3), lambda a, pl: a[0, 3] - 1), "steps where tap"),
    "wgrad tap offsets shifted": ("wgrad", _set("tap_offsets", 1, lambda a, pl: a[1] + 1), "steps where tap"),
    "wgrad tap offsets past the entries": ("wgrad", _set("tap_offsets", -1, lambda a, pl: a[-1] + 1),
                                           "tap_offsets must be"),
    "wgrad tap offsets of the wrong length": ("wgrad", _replace("tap_offsets", lambda t: t[:-1].clone()),
                                              "tap_offsets must be"),
    # An offset far past the entries, a smaller one after it: rejected before any entry is read through it.
    "wgrad tap offset jumping past the entries": ("wgrad", _set("tap_offsets", 1, lambda a, pl: 10**6),
                                                  "must not decrease"),
    # Indices the walks and the epilogues read.
    "wgrad entry past the tiles": ("wgrad", _set("tap_entries", (0, 1), lambda a, pl: 10**6),
                                   "not a tile where that tap is live"),
    "forward tile past the map": ("forward", _set("jobs", (0, 1), lambda a, pl: 10**6), "names image .* tile"),
    "forward image past the batch": ("forward", _set("jobs", (0, 0), lambda a, pl: PLAN.n), "names image"),
    "forward branch past the rates": ("forward", _set("jobs", (0, 2), lambda a, pl: 1 + len(PLAN.rates)),
                                      "names branch"),
    "forward taps not the tile's": ("forward", _set("jobs", (0, 3), lambda a, pl: _drop_lowest_bit(a[0, 3])),
                                    "has taps .* where its tile's mask is"),
    "dgrad channel block past C": ("dgrad", _set("jobs", (0, 2), lambda a, pl: 1), "names channel block"),
    "wgrad tap past the branches": ("wgrad", _set("jobs", (0, 0), lambda a, pl: 1 + 9 * len(PLAN.rates)),
                                    "names tap"),
    "mask of more than 9 bits": ("dgrad", _set("masks", (0, 1), lambda a, pl: a[0, 1] | 1 << 9), "9-bit mask"),
    "1x1 mask with an off-centre tap": ("forward", _set("masks", (0, 0), lambda a, pl: 0x1FF), "9-bit mask"),
    "masks of the wrong shape": ("forward", _replace("masks", lambda t: t[:-1].clone()), "masks must be"),
    # Every output block some job's, every job queued, each once.
    "forward job repeated": ("forward", _set("jobs", 1, lambda a, pl: a[0]), "repeats"),
    "queue runs a job twice": ("forward", _set("queues", -1, lambda a, pl: a[-2]), "every job index"),
    "queue offsets short of the jobs": ("dgrad", _set("queues", _plan("dgrad").programs,
                                                      lambda a, pl: a[pl.programs] - 1),
                                        "queue offsets must run from 0"),
    "jobs as int64": ("forward", _replace("jobs", lambda t: t.long()), "contiguous int32"),
}


@pytest.mark.parametrize("case", list(BAD_TABLES))
def test_cpp_check_rejects_tables_the_kernels_cannot_walk(case):
    kind, edit, message = BAD_TABLES[case]
    plan = _plan(kind)
    _check(plan)  # the plan itself passes
    with pytest.raises(RuntimeError, match=message):
        _check(plan, **edit(plan))


def test_cpp_check_rejects_empty_problems():
    """A job with no K chunk (C = 0 forward, Co = 0 dgrad) would walk forever: the backends write those outputs
    on the host and never hand such a plan over."""
    plan = _plan("forward")
    C = _extension()
    t = plan.device_tensors("cpu")
    args = [t["jobs"], t["queues"], t["masks"], t["tap_offsets"], t["tap_entries"], list(PLAN.rates)]
    tile = [plan.tiles.tile_h, plan.tiles.tile_w, plan.tiles.stack]
    for n, c, co, h, w in [(PLAN.n, 0, PLAN.co, PLAN.h, PLAN.w), (PLAN.n, PLAN.c, 0, PLAN.h, PLAN.w),
                           (PLAN.n, PLAN.c, PLAN.co, 0, PLAN.w)]:
        with pytest.raises(RuntimeError, match="H, W, C, Co >= 1"):
            C.sm90_check_plan("forward", *args, n, c, co, h, w, *tile)


def test_the_backend_checks_each_plan_before_copying_it(monkeypatch):
    """cuda._sm90_tables hands the kernels only plans that passed the checks."""
    _extension()
    from resaspp_ops.backend import cuda as cuda_backend

    monkeypatch.setattr(cuda_backend, "_sm_count", lambda index: PROGRAMS)
    x = torch.zeros(PLAN.n, PLAN.c, PLAN.h, PLAN.w)
    good = _plan("dgrad")
    tables, tile = cuda_backend._sm90_tables("dgrad", x, PLAN.co, PLAN.rates)
    assert tables[0].tolist() == good.jobs.tolist()
    assert tile == [good.tiles.tile_h, good.tiles.tile_w, good.tiles.stack]
    jobs = good.jobs.copy()
    jobs[0, 3] += 1
    broken = P.Sm90Plan(**{**good.__dict__, "jobs": jobs})
    monkeypatch.setattr(P, "plan", lambda *args: broken)
    with pytest.raises(RuntimeError, match="counts .* taps where its tile's masks hold"):
        cuda_backend._sm90_tables("dgrad", x, PLAN.co, PLAN.rates)
