"""The separable op's Triton kernels (backend/triton/separable*.py) on the CPU through Triton's interpreter.

Against float64 by DESIGN.md section 5's error rule on the awkward shapes (C and Co not multiples of 16, rates
>= H or W where a branch degenerates to a per-channel scale feeding a 1x1, N = 1, H != W, one to four rates),
every stage combination, every grad; the taps wholly in padding skipped; no depthwise-sized tensor made by the
forward; bitwise-reproducible grads. Tiny problems: the interpreter is slow.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from resaspp_ops import multi_rate_separable_conv2d, multi_rate_separable_conv2d_reference
from resaspp_ops import backend as backend_registry
from resaspp_ops.backend import triton as triton_backend
from resaspp_ops.backend.jobs import job_plan
from resaspp_ops.backend.triton import configs
from utils import (AWKWARD, SEPARABLE_STAGES, Problem, assert_error_rule, detached_copy, make_separable_problem,
                   separable_leaves)

pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest.py

NAMES = ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift")
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def _grads(args, g, backend):
    y = multi_rate_separable_conv2d(**args, backend=backend)
    return y, torch.autograd.grad(y, separable_leaves(args), g)


def check_separable(problem, stage, dtype, seed=0, backward=True, device="cpu"):
    """The triton backend's output (and every grad) against float64 (on the CPU), bounded by PyTorch's own
    error in dtype on the same device. tests/test_triton_cuda.py runs it on a GPU."""
    args = make_separable_problem(problem, stage, dtype, device, channels_last=seed % 2 == 1, seed=seed,
                                  requires_grad=backward)
    channels = (1 + len(problem.rates)) * problem.co
    g = torch.randn((problem.n, channels, problem.h, problem.w), generator=torch.Generator().manual_seed(seed + 7))
    g = g.to(device=device, dtype=dtype)
    args64 = detached_copy(args, torch.float64, "cpu", requires_grad=backward)
    same = detached_copy(args, requires_grad=backward)
    if not backward:
        with torch.no_grad():
            y = multi_rate_separable_conv2d(**args, backend="triton")
            assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
            assert_error_rule(y, multi_rate_separable_conv2d_reference(**args64),
                              multi_rate_separable_conv2d_reference(**same), floor=FLOOR[dtype],
                              what=f"forward {stage} {problem} {dtype}")
        return
    y, grads = _grads(args, g, "triton")
    y64 = multi_rate_separable_conv2d_reference(**args64)
    grads64 = torch.autograd.grad(y64, separable_leaves(args64), g.cpu().double())
    y_same = multi_rate_separable_conv2d_reference(**same)
    grads_same = torch.autograd.grad(y_same, separable_leaves(same), g)
    assert_error_rule(y.detach(), y64.detach(), y_same.detach(), floor=FLOOR[dtype], what=f"forward {stage} {problem} {dtype}")
    names = [n for n in NAMES if args[n] is not None]
    for what, a, r, s in zip(names, grads, grads64, grads_same):
        assert_error_rule(a, r, s, floor=FLOOR[dtype], what=f"grad {what} {stage} {problem} {dtype}")


@pytest.mark.parametrize("problem", AWKWARD, ids=str)
@pytest.mark.parametrize("stage", list(SEPARABLE_STAGES))
def test_forward_matches_float64(problem, stage):
    check_separable(problem, stage, torch.float32, seed=1, backward=False)


@pytest.mark.parametrize("problem", AWKWARD, ids=str)
@pytest.mark.parametrize("stage", ["plain", "mid"])
def test_every_grad_matches_float64(problem, stage):
    check_separable(problem, stage, torch.float32, seed=2)


@pytest.mark.parametrize("stage", ["shift-mid", "linear-mid"])
def test_every_grad_of_the_linear_mid_stages(stage):
    check_separable(AWKWARD[0], stage, torch.float32, seed=3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_precision_forward_and_grads(dtype):
    check_separable(Problem(2, 24, 16, 6, 7, (1, 2, 9)), "mid", dtype, seed=4)


def test_padding_taps_are_skipped():
    """The forward processes exactly the live taps of its work list: at rates (12, 24, 36) on a 7 x 7 map
    every off-centre tap is padding, so each job runs its centre tap alone (counted once a job, though Co = 40
    takes two channel blocks a job here)."""
    p = Problem(1, 17, 40, 7, 7, (12, 24, 36))
    args = make_separable_problem(p, "mid")
    with triton_backend.count_tap_tiles() as counter:
        multi_rate_separable_conv2d(**args, backend="triton")
    (record,) = [r for r in counter.records if r["kernel"] == "separable_forward"]
    plan = record["plan"]
    assert record["tap_tiles"] == int(plan.live_tap_count().sum()) == plan.n_jobs


@pytest.mark.parametrize("problem", [Problem(2, 32, 12, 9, 13, (1, 2, 3)),
                                     Problem(1, 16, 5, 7, 7, (12, 24, 36)),    # every off-centre tap is padding
                                     Problem(2, 32, 7, 12, 4, (1, 2, 3, 5))], ids=str)
def test_both_tap_walks_agree(problem, monkeypatch):
    """The separable forward's two walks over a job's taps (configs.separable_unroll_taps: the loop over the live
    ones, the default, and the nine taps unrolled, where C is a multiple of 16; until a GPU compares them) run
    the same taps in the same order: bitwise the same output, and right against float64."""
    from resaspp_ops.backend.triton import separable_forward

    walks = []
    launch = separable_forward.run
    monkeypatch.setattr(separable_forward, "run", lambda *a, **k: walks.append(k["unroll_taps"]) or launch(*a, **k))
    args = make_separable_problem(problem, "mid", seed=9)
    out = {}
    for choice in ("unrolled", "loop"):
        monkeypatch.setenv("RESASPP_TRITON_SEPARABLE_TAPS", choice)
        with torch.no_grad():
            out[choice] = multi_rate_separable_conv2d(**args, backend="triton")
    assert walks == [True, False]
    assert torch.equal(out["unrolled"], out["loop"])
    assert_error_rule(out["unrolled"], multi_rate_separable_conv2d_reference(**detached_copy(args, torch.float64)),
                      multi_rate_separable_conv2d_reference(**args), floor=FLOOR[torch.float32],
                      what=f"forward, taps unrolled, {problem}")


def test_the_tap_walk_switch(monkeypatch):
    """RESASPP_TRITON_SEPARABLE_TAPS picks the walk (the loop unless set), use_separable_taps overrides it inside
    its block (the bench's fused-triton-unrolled), and the unrolled walk runs only where C is a multiple of 16
    (vector loads)."""
    monkeypatch.delenv("RESASPP_TRITON_SEPARABLE_TAPS", raising=False)
    assert not configs.separable_unroll_taps(2048)
    with configs.use_separable_taps("unrolled"):
        assert configs.separable_unroll_taps(2048) and configs.separable_unroll_taps(32)
        assert not configs.separable_unroll_taps(20) and not configs.separable_unroll_taps(8)
    assert not configs.separable_unroll_taps(2048)
    monkeypatch.setenv("RESASPP_TRITON_SEPARABLE_TAPS", "unrolled")
    assert configs.separable_unroll_taps(2048) and not configs.separable_unroll_taps(20)
    monkeypatch.setenv("RESASPP_TRITON_SEPARABLE_TAPS", "rows")
    with pytest.raises(ValueError, match="RESASPP_TRITON_SEPARABLE_TAPS='rows': choose loop or unrolled"):
        configs.separable_unroll_taps(2048)
    with pytest.raises(ValueError, match="unknown separable tap walk 'rows'"):
        with configs.use_separable_taps("rows"):
            pass


def test_work_list_skips_taps_on_a_partly_padded_map():
    p = Problem(2, 8, 4, 9, 13, (1, 6))
    config = configs.separable_config("forward", p.n, p.h, p.w, p.c, p.co, torch.float32, torch.device("cpu"),
                                      p.rates)
    plan = job_plan(p.n, p.h, p.w, p.rates, config["TILE_H"], config["TILE_W"], config["STACK"])
    args = make_separable_problem(p, "plain")
    with triton_backend.count_tap_tiles() as counter:
        multi_rate_separable_conv2d(**args, backend="triton")
    assert counter.total("separable_forward") == int(plan.live_tap_count().sum()) < plan.n_jobs * 9


class _CreatedTensors(TorchDispatchMode):
    """The element counts of the tensors every aten op creates while active: not views, not in-place ops
    (Triton's interpreter hands kernel arguments over by set_ / copy_ onto their storages)."""

    def __init__(self):
        super().__init__()
        self.numels: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t._base is None and not func.overloadpacket.__name__.endswith("_") \
                    and not func.__name__.startswith(("view", "permute")):
                self.numels.append((str(func), t.numel()))
        return out


def _largest_created(backend: str, args: dict) -> tuple[int, torch.Tensor]:
    """(the element count of the largest tensor the backend's forward creates, its output). The backend is
    called directly: a dispatch mode sees the custom op as one op, not what runs inside it."""
    module = backend_registry.get(backend, backend_registry.SEPARABLE)
    names = ("x", "w1x1", "w_dw", "w_pw", "rates", "mid_scale", "mid_shift", "mid_relu", "scale", "shift", "relu")
    with torch.no_grad(), _CreatedTensors() as created:
        y = module.forward(*(args[n] for n in names))
    return max(numel for _, numel in created.numels), y


def test_the_forward_creates_no_depthwise_sized_tensor():
    """The depthwise outputs never reach memory: no tensor made during the forward is as large as one (C
    channels per pixel), only the output ((1+B) Co < C channels here) and small packed weights; the reference
    backend, which does make them, shows that the count sees a backend's inner tensors."""
    p = Problem(2, 64, 8, 9, 11, (1, 2, 3))
    args = make_separable_problem(p, "mid", channels_last=True)   # channels_last x: its NHWC view, no copy
    depthwise = p.n * p.c * p.h * p.w
    largest, y = _largest_created("triton", args)
    assert largest == y.numel() < depthwise
    assert _largest_created("reference", args)[0] >= depthwise


@pytest.mark.parametrize("wanted", [("mid_scale", "mid_shift"), ("mid_shift",), ("w_dw", "w_pw"), ("x",),
                                    ("w1x1", "mid_scale")], ids="+".join)
def test_grad_subsets(wanted):
    """The backward computes what is asked for (only the mid grads: no dD stored; only weights: no grad_x), each
    as in the full backward."""
    p = Problem(2, 12, 8, 6, 9, (1, 3))
    args = make_separable_problem(p, "mid", seed=6)
    for name in wanted:
        args[name].requires_grad_(True)
    g = torch.randn((p.n, 3 * p.co, p.h, p.w), generator=torch.Generator().manual_seed(8))
    got = torch.autograd.grad(multi_rate_separable_conv2d(**args, backend="triton"), [args[n] for n in wanted], g)
    args64 = detached_copy(args, torch.float64)
    for name in wanted:
        args64[name].requires_grad_(True)
    want = torch.autograd.grad(multi_rate_separable_conv2d_reference(**args64), [args64[n] for n in wanted],
                               g.double())
    same = detached_copy(args)
    for name in wanted:
        same[name].requires_grad_(True)
    pytorch = torch.autograd.grad(multi_rate_separable_conv2d_reference(**same), [same[n] for n in wanted], g)
    for name, a, r, s_ in zip(wanted, got, want, pytorch):
        assert_error_rule(a, r, s_, what=f"grad {name} of {wanted}")


def test_the_backward_is_bitwise_reproducible():
    p = Problem(2, 20, 12, 9, 13, (1, 2, 3))
    args = make_separable_problem(p, "mid", requires_grad=True)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), generator=torch.Generator().manual_seed(5))
    _, first = _grads(args, g, "triton")
    _, second = _grads(args, g, "triton")
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_empty_batch():
    p = Problem(0, 8, 4, 5, 5, (1, 2))
    args = make_separable_problem(p, "mid", requires_grad=True)
    y, grads = _grads(args, torch.zeros((0, 12, 5, 5)), "triton")
    assert y.shape == (0, 12, 5, 5)
    assert all(g.shape == t.shape for g, t in zip(grads, separable_leaves(args)))


def test_float64_is_refused_with_the_reason():
    args = make_separable_problem(Problem(1, 4, 2, 5, 5, (1,)), "plain", torch.float64)
    with pytest.raises(RuntimeError, match="float64 is not supported"):
        multi_rate_separable_conv2d(**args, backend="triton")
