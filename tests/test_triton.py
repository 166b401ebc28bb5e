"""Triton backend on the CPU through Triton's interpreter (issue #3).

Triton decides compiled-or-interpreted when a kernel is decorated, i.e. when the backend first imports its
kernel modules (never at package import). conftest.py's triton_interpreter fixture sets TRITON_INTERPRET=1
before that happens and restores the variable afterwards; the kernels stay interpreted for the rest of the
process. Where a GPU is visible these tests step aside: the compiled kernels are the ones to test there
(tests/test_triton_cuda.py), and a process holds only one kind.

Everything goes through resaspp_ops.multi_rate_conv2d(..., backend="triton"), so autograd runs through the
ops layer. Problems are tiny: the interpreter costs about the same for every Triton op whatever its size.
"""
from __future__ import annotations

import pytest
import torch

import resaspp_ops
from resaspp_ops import backend as backends
from resaspp_ops.backend import triton as triton_backend
from utils import AWKWARD, Problem, assert_error_rule, float64_reference, make_problem

pytest.importorskip("triton")


pytestmark = pytest.mark.usefixtures("triton_interpreter")  # conftest.py

# ------------------------------------------------------------------------------------------------ helpers


def _layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """x in the given memory layout, same values: "nchw", "channels_last" or "strided" (no dense format)."""
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "strided":
        wide = x.new_zeros(x.shape[:3] + (2 * x.shape[3],))
        wide[..., ::2] = x
        return wide[..., ::2]
    return x.contiguous()


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """A leaf with t's strides (so a strided x stays strided) that records grads."""
    return t.detach().requires_grad_(True)


def _run(fn, x, w1, w3, rates, scale, shift, relu, grad_out):
    y = fn(x, w1, w3, rates, scale, shift, relu)
    y.backward(grad_out.to(y.dtype))
    return y.detach(), x.grad, w1.grad, w3.grad


def check_against_float64(p: Problem, dtype, layout: str, epilogue: bool, relu: bool, floor: float, device="cpu"):
    """Forward and the grads of x, w1x1, w3x3 through the ops layer, judged by DESIGN.md section 5's rule."""
    x, w1, w3, scale, shift = make_problem(p, dtype, device=device, epilogue=epilogue, seed=7)
    x = _layout(x, layout)
    out_channels = (1 + len(p.rates)) * p.co
    grad_out = torch.randn(p.n, out_channels, p.h, p.w, generator=torch.Generator().manual_seed(3),
                           dtype=torch.float64).to(dtype).double().to(device)  # exactly representable in dtype

    def triton(*args):
        return resaspp_ops.multi_rate_conv2d(*args, backend="triton")

    ours = _run(triton, _leaf(x), _leaf(w1), _leaf(w3), p.rates, scale, shift, relu, grad_out)
    pt = _run(resaspp_ops.multi_rate_conv2d_reference, _leaf(x), _leaf(w1), _leaf(w3), p.rates, scale, shift, relu,
              grad_out)
    cast = (lambda t: None if t is None else t.to("cpu", torch.float64))  # noqa: E731
    ref = _run(resaspp_ops.multi_rate_conv2d_reference, _leaf(cast(x)), _leaf(cast(w1)), _leaf(cast(w3)), p.rates,
               cast(scale), cast(shift), relu, grad_out.cpu())

    y = ours[0]
    assert y.shape == (p.n, out_channels, p.h, p.w) and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    for name, a, r, b in zip(("out", "grad_x", "grad_w1x1", "grad_w3x3"), ours, ref, pt):
        assert a.dtype == dtype, name
        assert_error_rule(a, r, b, floor=floor, what=f"{p} {dtype} {layout} {name}")


# ------------------------------------------------------------------------------------------------ accuracy

# (problem, layout, epilogue, relu): every awkward shape once, the layouts and epilogue cycled over them.
_FP32_CASES = [
    (AWKWARD[0], "channels_last", True, True),
    (AWKWARD[1], "strided", True, False),     # every off-centre tap is padding
    (AWKWARD[2], "nchw", False, False),       # one rate, rate >= H only
    (AWKWARD[3], "channels_last", False, False),  # four rates: one launch, five accumulators
    (AWKWARD[4], "nchw", True, True),         # N = 0
    (AWKWARD[5], "strided", True, True),      # one pixel
    (Problem(1, 6, 9, 5, 6, (1, 2, 3, 4, 5)), "nchw", True, False),  # five rates: two forward launches
]


@pytest.fixture(params=["v2", "v1"])
def version(request):
    """Both kernel designs (RESASPP_TRITON_KERNEL): the second is the default, the first kept selectable."""
    with triton_backend.use_kernel_version(request.param):
        yield request.param


@pytest.mark.parametrize("p,layout,epilogue,relu", _FP32_CASES, ids=[f"{c[0]}-{c[1]}" for c in _FP32_CASES])
def test_float32_matches_float64(version, p, layout, epilogue, relu):
    check_against_float64(p, torch.float32, layout, epilogue, relu, floor=1e-5)


# 16-bit: no ReLU in the backward checks (a pre-activation that rounds across zero in one dtype and not in the
# other flips a whole grad), forward and grads otherwise as above.
_HALF_CASES = [
    (AWKWARD[0], torch.bfloat16, "channels_last", True),
    (AWKWARD[1], torch.bfloat16, "nchw", False),
    (AWKWARD[2], torch.bfloat16, "strided", True),
    (AWKWARD[3], torch.bfloat16, "strided", False),
    (AWKWARD[4], torch.bfloat16, "channels_last", True),
    (AWKWARD[5], torch.bfloat16, "nchw", True),
    (AWKWARD[0], torch.float16, "strided", False),
    (AWKWARD[1], torch.float16, "nchw", True),
    (AWKWARD[2], torch.float16, "channels_last", False),
]


@pytest.mark.parametrize("p,dtype,layout,epilogue", _HALF_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-{c[2]}" for c in _HALF_CASES])
def test_half_matches_float64(version, p, dtype, layout, epilogue):
    check_against_float64(p, dtype, layout, epilogue, relu=False, floor=1e-3)


def test_forward_relu_half():
    p = AWKWARD[0]
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, epilogue=True, channels_last=True)
    y = resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, scale, shift, relu=True, backend="triton")
    ref = float64_reference(x, w1, w3, p.rates, scale, shift, relu=True)
    pt = resaspp_ops.multi_rate_conv2d_reference(x, w1, w3, p.rates, scale, shift, relu=True)
    assert_error_rule(y, ref, pt, floor=1e-3, what="bf16 forward relu")
    assert (y >= 0).all()


def test_64bit_offset_paths(version, monkeypatch):
    """The int64 index paths (taken where a tensor can pass 2^31 elements) give the same results."""
    from resaspp_ops.backend.triton import configs

    monkeypatch.setattr(configs, "needs_int64", lambda *numels: True)
    check_against_float64(Problem(2, 6, 5, 6, 7, (1, 4)), torch.float32, "nchw", epilogue=False, relu=False,
                          floor=1e-5)


def test_both_dgrad_segment_loops_agree(monkeypatch):
    """dgrad_v2 with the tile's segment table in registers (the default) and with the earlier loop that loads a
    code and a rate every step (RESASPP_TRITON_DGRAD_SEGMENTS=loads, kept until a GPU compares them): the same
    steps in the same order, so bitwise the same grad_x, and right against float64."""
    p = Problem(2, 20, 12, 9, 13, (1, 2, 3))
    x, w1, w3, scale, shift = make_problem(p, torch.float32, epilogue=True, seed=5)
    grad_out = torch.randn((p.n, 4 * p.co, p.h, p.w), generator=torch.Generator().manual_seed(6))
    grads = {}
    with triton_backend.use_kernel_version("v2"):
        for choice in ("registers", "loads"):
            monkeypatch.setenv("RESASPP_TRITON_DGRAD_SEGMENTS", choice)
            leaf = _leaf(x)
            y = resaspp_ops.multi_rate_conv2d(leaf, w1, w3, p.rates, scale, shift, relu=False, backend="triton")
            (grads[choice],) = torch.autograd.grad(y, [leaf], grad_out)
    assert torch.equal(grads["registers"], grads["loads"])
    leaf = _leaf(x.double())
    y64 = resaspp_ops.multi_rate_conv2d_reference(leaf, w1.double(), w3.double(), p.rates, scale.double(),
                                                  shift.double())
    (want,) = torch.autograd.grad(y64, [leaf], grad_out.double())
    leaf = _leaf(x)
    (same,) = torch.autograd.grad(resaspp_ops.multi_rate_conv2d_reference(leaf, w1, w3, p.rates, scale, shift),
                                  [leaf], grad_out)
    assert_error_rule(grads["registers"], want, same, what="grad_x")


def test_an_unknown_dgrad_segment_loop_is_refused(monkeypatch):
    from resaspp_ops.backend.triton import configs

    monkeypatch.setenv("RESASPP_TRITON_DGRAD_SEGMENTS", "shared")
    with pytest.raises(ValueError, match="RESASPP_TRITON_DGRAD_SEGMENTS='shared': choose registers or loads"):
        configs.dgrad_preload_segments()


def test_autotuned_launch_path(version, monkeypatch):
    """The opt-in autotuning path (RESASPP_TRITON_AUTOTUNE=1: autotuner, pruners, grid from META, best_config),
    with fake timings: the interpreter cannot time a kernel, so every config ties and the first pruned one runs.
    The second design times at most six candidates a kernel."""
    from triton.runtime import autotuner

    from resaspp_ops.backend.triton import configs

    monkeypatch.setattr(configs, "autotune_enabled", lambda device: True)
    pruned = []

    def fake_bench(self, *args, config, **meta):
        pruned.append(config)
        return [1.0, 1.0, 1.0]

    monkeypatch.setattr(autotuner.Autotuner, "_bench", fake_bench)
    co = 12 if version == "v1" else 130  # v2 prunes blocks wider than the channels: 130 keeps every candidate
    check_against_float64(Problem(1, 20, co, 9, 13, (2, 5)), torch.float32, "nchw", epilogue=True, relu=False,
                          floor=1e-5)
    assert pruned and all(c.kwargs["BLOCK_M"] >= 64 and c.num_warps % 4 == 0 for c in pruned if "BLOCK_M" in c.kwargs)
    if version == "v2":
        tried = {(c.kwargs["BLOCK_N"], c.kwargs["STAGES"], c.num_warps) for c in pruned if "STAGES" in c.kwargs}
        assert 2 <= len(tried) <= 6, tried


def test_a_new_shape_compiles_one_config_a_kernel_by_default(monkeypatch):
    """No first-call autotuning: without RESASPP_TRITON_AUTOTUNE a CUDA call takes the heuristic config
    (one compile a kernel); =1 opts in."""
    from resaspp_ops.backend.triton import configs

    cuda = torch.device("cuda", 0)
    monkeypatch.delenv("RESASPP_TRITON_AUTOTUNE", raising=False)
    monkeypatch.setattr(configs, "interpreting", lambda: False)
    assert not configs.autotune_enabled(cuda)
    monkeypatch.setenv("RESASPP_TRITON_AUTOTUNE", "1")
    assert configs.autotune_enabled(cuda)
    assert len(configs.V2_TUNED) <= 6


# ------------------------------------------------------------------------------------------------ determinism

def test_backward_is_bitwise_reproducible(version):
    p = Problem(2, 20, 12, 9, 13, (1, 2, 3))
    x, w1, w3, scale, shift = make_problem(p, torch.float32, epilogue=True)
    grad_out = torch.randn((p.n, 4 * p.co, p.h, p.w), generator=torch.Generator().manual_seed(1))
    runs = []
    for _ in range(2):
        leaves = [_leaf(t) for t in (x, w1, w3)]
        y = resaspp_ops.multi_rate_conv2d(*leaves, p.rates, scale, shift, relu=False, backend="triton")
        runs.append(torch.autograd.grad(y, leaves, grad_out))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------------ skipping

def _live_taps(h, w, tile_h, tile_w, rate):
    """Off-centre taps of one branch that are not wholly padding, summed over the tiles (DESIGN.md section 2)."""
    live = 0
    for h0 in range(0, h, tile_h):
        for w0 in range(0, w, tile_w):
            h1, w1 = min(h0 + tile_h, h), min(w0 + tile_w, w)
            for ky in range(3):
                for kx in range(3):
                    if (ky, kx) == (1, 1):
                        continue
                    dy, dx = (ky - 1) * rate, (kx - 1) * rate
                    live += h1 + dy > 0 and h0 + dy < h and w1 + dx > 0 and w0 + dx < w
    return live


def _conv_expected(record):
    """Tap-tiles a forward / dgrad launch should have processed: centre of every branch + live taps."""
    tiles = -(-record["h"] // record["tile_h"]) * -(-record["w"] // record["tile_w"])
    blocks = record["programs"] // (record["n_img"] * tiles)  # output-channel blocks
    live = sum(_live_taps(record["h"], record["w"], record["tile_h"], record["tile_w"], r) for r in record["rates"])
    return record["n_img"] * blocks * (tiles * record["branches"] + live)


@pytest.fixture
def first_design():
    with triton_backend.use_kernel_version("v1"):
        yield


def _counted_pass(p: Problem):
    x, w1, w3, _, _ = make_problem(p, torch.float32, requires_grad=True)
    with triton_backend.count_tap_tiles() as counter:
        y = resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, backend="triton")
        y.backward(torch.ones_like(y))
    return counter, x, w1, w3, y


def test_skipping_rates_beyond_the_map_do_only_centre_work_v1(first_design):
    p = Problem(1, 8, 8, 7, 9, (9, 18, 27))  # every rate >= H and W
    counter, x, w1, w3, y = _counted_pass(p)
    fwd = [r for r in counter.records if r["kernel"] == "forward"]
    dgrad = [r for r in counter.records if r["kernel"] == "dgrad"]
    assert fwd and dgrad
    for r in fwd + dgrad:  # the centre tap of each branch, nothing else
        assert r["tap_tiles"] == r["programs"] * r["branches"]
    (wgrad,) = [r for r in counter.records if r["kernel"] == "wgrad"]
    assert wgrad["tap_tiles"] == 0 and wgrad["centre_tiles"] > 0
    # the skipped taps' weight grads are exact zeros, the result equals the 1x1-like centre conv
    off_centre = w3.grad.clone()
    off_centre[..., 1, 1] = 0
    assert torch.count_nonzero(off_centre) == 0
    ref = float64_reference(x, w1, w3, p.rates)
    assert_error_rule(y, ref, resaspp_ops.multi_rate_conv2d_reference(x.detach(), w1.detach(), w3.detach(), p.rates),
                      what="centre-only forward")


def test_skipping_rate_one_does_all_the_work_v1(first_design):
    p = Problem(1, 8, 8, 8, 8, (1, 1))
    counter, *_ = _counted_pass(p)
    for r in counter.records:
        if r["kernel"] in ("forward", "dgrad"):
            assert r["tile_h"] >= 2 and 8 % r["tile_h"] == 0 and 8 % r["tile_w"] == 0  # no tap is wholly padding
            assert r["tap_tiles"] == r["programs"] * (r["branches"] + 8 * len(r["rates"]))
    (wgrad,) = [r for r in counter.records if r["kernel"] == "wgrad"]
    assert wgrad["tap_tiles"] > 0


def test_skipping_matches_the_rule_tile_by_tile_v1(first_design):
    p = Problem(2, 8, 8, 13, 11, (1, 5, 12))  # some taps of some tiles dead, others live
    counter, *_ = _counted_pass(p)
    conv = [r for r in counter.records if r["kernel"] in ("forward", "dgrad")]
    assert len(conv) == 2
    for r in conv:
        assert r["tap_tiles"] == _conv_expected(r), r
    # rate 12 >= W = 11 kills the horizontal and diagonal taps of that branch on every tile, rate 5 some taps of
    # some tiles: strictly between centre-only and dense
    for r in conv:
        assert r["programs"] * r["branches"] < r["tap_tiles"] < r["programs"] * (r["branches"] + 8 * len(r["rates"]))

def _v2_records(p: Problem):
    counter, x, w1, w3, y = _counted_pass(p)
    by_kernel = {r["kernel"]: r for r in counter.records}
    return by_kernel, x, w1, w3, y


def test_second_design_processes_exactly_the_plans_live_taps_and_loads():
    """forward_v2 and dgrad_v2 do the live taps of their work list and nothing else (tap tiles), and read the
    operand elements the work list predicts (what the lowering report prints as A and B bytes)."""
    from resaspp_ops.backend.jobs import dgrad_operand_elements, dgrad_plan, forward_operand_elements

    for p in (Problem(2, 8, 8, 13, 11, (1, 5, 12)), Problem(3, 5, 7, 4, 4, (1, 2)), AWKWARD[3]):
        records, *_ = _v2_records(p)
        fwd, dgrad = records["forward_v2"], records["dgrad_v2"]
        plan = fwd["plan"]
        assert fwd["tap_tiles"] == fwd["n_blocks"] * int(plan.live_tap_count().sum())
        assert (fwd["a_elements"], fwd["b_elements"]) == forward_operand_elements(
            plan, p.c, p.co, -(-p.co // fwd["n_blocks"])), p
        dplan = dgrad_plan(dgrad["plan"])
        assert dgrad["tap_tiles"] == dgrad["n_blocks"] * (dplan.jobs.shape[0] + int(
            sum(dplan.n_segments[t] for _, t in dplan.jobs.tolist())))
        assert (dgrad["a_elements"], dgrad["b_elements"]) == dgrad_operand_elements(
            dplan, p.c, p.co, -(-p.c // dgrad["n_blocks"])), p


def test_second_design_skips_rates_beyond_the_map_to_centre_work():
    p = Problem(1, 8, 8, 7, 9, (9, 18, 27))  # every rate >= H and W
    records, x, w1, w3, y = _v2_records(p)
    fwd = records["forward_v2"]
    assert fwd["tap_tiles"] == fwd["programs"]  # one tap (the centre) a job
    wgrad = records["wgrad"]
    assert wgrad["tap_tiles"] == 0 and wgrad["centre_tiles"] > 0
    off_centre = w3.grad.clone()
    off_centre[..., 1, 1] = 0
    assert torch.count_nonzero(off_centre) == 0  # the dead taps' grads: the zeroed columns, exact
    assert_error_rule(y, float64_reference(x, w1, w3, p.rates),
                      resaspp_ops.multi_rate_conv2d_reference(x.detach(), w1.detach(), w3.detach(), p.rates),
                      what="centre-only forward v2")


def test_second_design_wgrad_grid_holds_only_programs_with_work():
    """The wgrad work list: the centre job's column blocks, and each tap with any live pixel its own (fewer)."""
    from resaspp_ops.backend.triton.design_v2 import wgrad_jobs

    work, zero = wgrad_jobs(33, 33, 2048, 256, (6, 12, 18), 128, 128)
    assert work.shape[0] == 16 * 8 + 24 * 16 * 2 and not zero   # 896 (the first design's grid: 3,200)
    work, zero = wgrad_jobs(8, 8, 64, 16, (12, 24, 36), 64, 64)
    assert (work[:, 0] == 0).all() and len(zero) == 24       # unet-stare: only the centre job has work


# ------------------------------------------------------------------------------------------------ compile

def test_compile_fullgraph_through_the_custom_op():
    """The backend runs inside the opaque custom op: torch.compile traces it with no graph break."""
    p = Problem(1, 8, 8, 5, 6, (1, 2))
    x, w1, w3, scale, shift = make_problem(p, torch.float32, epilogue=True, requires_grad=True)

    def f(x, w1, w3):
        return torch.ops.resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, scale, shift, True, "triton")

    y = torch.compile(f, fullgraph=True, backend="aot_eager")(x, w1, w3)
    grads = torch.autograd.grad(y.square().sum(), (x, w1, w3))
    y_eager = f(x, w1, w3)
    grads_eager = torch.autograd.grad(y_eager.square().sum(), (x, w1, w3))
    torch.testing.assert_close(y, y_eager, rtol=0, atol=0)
    for a, b in zip(grads, grads_eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_loop_a_tap_variant(first_design, monkeypatch):
    """The other tap loop (FLAT=False, one K loop a live tap; the autotuner times both): same results, same
    skipping."""
    from resaspp_ops.backend.triton import configs

    monkeypatch.setattr(configs, "FLAT_DEFAULT", False)
    check_against_float64(AWKWARD[0], torch.float32, "channels_last", epilogue=True, relu=True, floor=1e-5)
    check_against_float64(AWKWARD[3], torch.bfloat16, "nchw", epilogue=False, relu=False, floor=1e-3)
    counter, *_ = _counted_pass(Problem(2, 8, 8, 13, 11, (1, 5, 12)))
    for r in counter.records:
        if r["kernel"] != "wgrad":
            assert r["tap_tiles"] == _conv_expected(r), r


# ------------------------------------------------------------------------------------------------ contract

def test_availability(monkeypatch):
    cpu = torch.device("cpu")
    ok, why = triton_backend.availability(cpu, torch.float32)
    assert ok, why
    for dtype in (torch.float16, torch.bfloat16):
        assert triton_backend.availability(cpu, dtype)[0]
    ok, why = triton_backend.availability(cpu, torch.float64)
    assert not ok and "float64" in why
    assert not triton_backend.availability(cpu, torch.int32)[0]
    monkeypatch.delenv("TRITON_INTERPRET")
    ok, why = triton_backend.availability(cpu, torch.float32)  # read at call time
    assert not ok and "TRITON_INTERPRET" in why


def test_interpreter_numpy_conflict_is_named(monkeypatch):
    """Triton < 3.7's interpreter breaks on NumPy >= 2.4: availability says so instead of an opaque error."""
    import numpy
    import triton

    check = triton_backend._interpreter_numpy_conflict
    for triton_v, numpy_v, conflict in (("3.6.0", "2.4.1", True), ("3.6.0", "2.3.5", False),
                                        ("3.8.0", "2.5.5", False), ("3.7.0+git1a2b", "2.4.0", False)):
        monkeypatch.setattr(triton, "__version__", triton_v)
        monkeypatch.setattr(numpy, "__version__", numpy_v)
        check.cache_clear()
        ok, why = triton_backend.availability(torch.device("cpu"), torch.float32)
        assert ok is not conflict, (triton_v, numpy_v, why)
        assert ("9171" in why) is conflict
    monkeypatch.undo()
    check.cache_clear()


def test_fused_aspp_inference_hands_the_kernels_their_layout(monkeypatch):
    """FusedASPP(backend="triton") in eval without autograd: matches torchvision's ASPP, and the forward launch
    reads the module's cached K-major weights as they are (the backend's re-layout is a view, not a copy)."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    torch.manual_seed(0)
    tv = ASPP(12, [1, 3], 8).eval()
    for m in tv.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.3, 0.3)
            m.running_var.uniform_(0.5, 1.5)
    fused = resaspp_ops.FusedASPP(12, [1, 3], 8, backend="triton").eval()
    fused.load_state_dict(tv.state_dict())
    x = torch.randn(2, 12, 6, 7)
    k = triton_backend._kernels()
    seen = []
    real_run = k.forward_v2.run

    def run(xh, w1p, w3p, *args, **kwargs):
        seen.append((w1p.data_ptr(), w3p.data_ptr()))
        return real_run(xh, w1p, w3p, *args, **kwargs)

    monkeypatch.setattr(k.forward_v2, "run", run)
    with torch.no_grad():
        y = fused(x)
        plan = fused._inference_cache.peek("inference:k-major")
        assert seen == [(plan.w1x1.data_ptr(), plan.w3x3.data_ptr())]
        ref = tv(x)
    assert (y - ref).abs().max() <= 1e-4 * ref.abs().max()


def test_fused_aspp_training_matches_torchvision_with_k_major_weights(monkeypatch):
    """FusedASPP(backend="triton") in training: the same output, input grad and weight grads as torchvision's
    ASPP, with the atrous weights stacked K-major so that the forward's re-layout is a view of that stack."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    torch.manual_seed(0)
    tv = ASPP(8, [1, 3], 8).train()
    fused = resaspp_ops.FusedASPP(8, [1, 3], 8, backend="triton").train()
    fused.load_state_dict(tv.state_dict())
    for m in (tv, fused):
        m.project[3].p = 0.0  # dropout off: the same function on both sides
    k = triton_backend._kernels()
    shared = []
    real_forward, real_run = triton_backend.forward, k.forward_v2.run

    def forward(x, w1x1, w3x3, *args):
        shared.append(w3x3.data_ptr())
        return real_forward(x, w1x1, w3x3, *args)

    def run(xh, w1p, w3p, *args, **kwargs):
        shared.append(w3p.data_ptr())
        return real_run(xh, w1p, w3p, *args, **kwargs)

    monkeypatch.setattr(triton_backend, "forward", forward)
    monkeypatch.setattr(k.forward_v2, "run", run)
    x = torch.randn(2, 8, 5, 6)
    outs = []
    for m in (tv, fused):
        xi = x.clone().requires_grad_(True)
        y = m(xi)
        grads = torch.autograd.grad(y.square().sum(), [xi] + [m.convs[i][0].weight for i in range(3)])
        outs.append((y,) + grads)
    assert len(shared) == 2 and shared[0] == shared[1], shared
    for got, want in zip(outs[1], outs[0]):
        assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()


def test_named_backend_never_stands_in():
    x, w1, w3, _, _ = make_problem(Problem(1, 4, 4, 3, 3, (1,)), torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        resaspp_ops.multi_rate_conv2d(x, w1, w3, (1,), backend="triton")
    assert backends.resolve("triton", torch.device("cpu"), torch.float32) == "triton"


def test_no_autotuning_under_the_interpreter(monkeypatch):
    from resaspp_ops.backend.triton import configs

    monkeypatch.setenv("RESASPP_TRITON_AUTOTUNE", "1")
    assert not configs.autotune_enabled(torch.device("cpu"))


def test_tile_shapes_and_configs():
    from resaspp_ops.backend.triton import configs

    assert configs.tile_width(33, 33, 128) == 11  # 3 x 3 tiles of 11 x 11 instead of 5 x 3 of 8 x 16
    for h, w in ((97, 97), (65, 65), (64, 128), (8, 8), (1, 1), (7, 300)):
        for bm in (64, 128):
            tw = configs.tile_width(h, w, bm)
            assert 1 <= tw <= bm and (bm // tw) * tw >= bm // 2
    for cfg in configs.CONV_CONFIGS:  # Hopper: warpgroup MMA wants block M >= 64, warps a multiple of 4
        assert cfg.kwargs["BLOCK_M"] >= 64 and cfg.num_warps % 4 == 0
    prune = configs.conv_prune("forward")
    x = torch.empty(0, dtype=torch.bfloat16)
    args = dict(x_ptr=x, H=33, W=33, C=2048, CO=256, NR=3, HAS_1X1=True, R1=6, R2=12, R3=18, R4=0)
    pruned = prune(configs.CONV_CONFIGS, args)
    assert pruned and all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * 4 / (32 * c.num_warps) <= 128 for c in pruned)
    assert {c.kwargs["TILE_W"] for c in pruned if c.kwargs["BLOCK_M"] == 128} == {11}
    assert len(prune(configs.CONV_CONFIGS, {**args, "x_ptr": x.float()})) < len(pruned)  # fp32: less fits
    # the rule's count factorises over the tile grid: check it against a direct count
    for h, w, th, tw, rates in ((33, 33, 11, 11, (6, 12, 18)), (13, 11, 4, 8, (1, 5, 12)), (8, 8, 4, 8, (1,))):
        direct = sum(_live_taps(h, w, th, tw, r) for r in rates)
        tiles = -(-h // th) * -(-w // tw)
        assert configs.tap_tiles(h, w, th, tw, rates, 1 + len(rates)) == tiles * (1 + len(rates)) + direct
