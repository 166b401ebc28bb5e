"""The separable op's CUDA backend (resaspp_ops/backend/cuda_separable.py, csrc/separable_*.cu; issue 14).

- test_emulated_*: not GPU tests. The backend's own host logic (packing, plan, branch loop, GEMMs,
  reductions) run with NumPy emulations of the kernels (tests/separable_emulation.py: the same jobs, tap
  masks, row -> pixel map, N blocks, K chunks and zero fill, chunked pixel reductions), in float64 against
  multi_rate_separable_conv2d_reference on the awkward shapes, forward (every output written once) and
  every grad.
- test_sass_* / test_res_usage_*: not GPU tests. The built resaspp_ops._C holds the separable kernels for
  sm_90: the mma forward runs HMMA fed by LDSM, nothing touches local memory, registers within bounds.
- test_kernel_choice_* / test_entry_points_*: not GPU tests. Which kernel family runs and the errors
  (RESASPP_CUDA_KERNEL, dtypes, shapes) with their reasons.
- the rest carry the `cuda` marker: forward and grads against float64 by DESIGN.md section 5's error rule
  for each kernel family, bitwise determinism, and the errors on a GPU.
"""
from __future__ import annotations

import re

import pytest
import torch

from resaspp_ops import multi_rate_separable_conv2d, multi_rate_separable_conv2d_reference
from resaspp_ops.backend import cuda as cuda_backend
from resaspp_ops.backend import cuda_separable as CS
from resaspp_ops.backend import jobs as J
import nonfinite
from separable_emulation import EmulatedKernels
from test_cuda_kernels import _built_extension, res_usage, sass  # noqa: F401  (module fixtures)
from utils import (AWKWARD, SEPARABLE_STAGES, Problem, assert_error_rule, detached_copy, make_separable_problem,
                   separable_leaves)

# Beyond AWKWARD: several tiles a map (20x17 -> tiles of 128 slots), Co over one mma block (136 > 128) and
# over two simt blocks, stacked small maps with a last stack past N (5 images of 5x6, 4 a job), C past one K chunk.
EXTRA = [Problem(2, 40, 136, 20, 17, (2, 7)), Problem(5, 16, 8, 5, 6, (1, 3))]
EMULATED = [("mma", 2), ("mma", 4), ("simt", 2)]  # (kernel, element size of the K chunks it walks)
ARG_ORDER = ("x", "w1x1", "w_dw", "w_pw", "rates", "mid_scale", "mid_shift", "mid_relu", "scale", "shift", "relu")


def _positional(a):
    return [a[k] for k in ARG_ORDER]


# ----------------------------------------------------------------------------------------------
# The emulation (CPU, float64)
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("problem", AWKWARD + EXTRA, ids=str)
@pytest.mark.parametrize("stage", list(SEPARABLE_STAGES))
@pytest.mark.parametrize("kernel,elem", EMULATED, ids=["mma16", "mma32", "simt"])
def test_emulated_forward_matches_float64(problem, stage, kernel, elem):
    a = make_separable_problem(problem, stage, torch.float64, seed=1)
    k = EmulatedKernels(elem)
    y = CS._forward(k, kernel, *_positional(a))
    assert y.is_contiguous(memory_format=torch.channels_last)
    if y.numel() == 0:
        assert k.writes is None, "a kernel launched for an empty output"
    else:
        assert (k.writes == 1).all(), f"output elements written {set(k.writes.ravel().tolist())} times"
    ref = multi_rate_separable_conv2d_reference(**a)
    assert y.shape == ref.shape
    if ref.numel():
        err = float((y - ref).abs().max())
        assert err <= 1e-12 * max(1.0, float(ref.abs().max())), f"{problem} {stage} {kernel}: error {err:.3e}"


def test_emulated_forward_skips_the_dead_taps():
    """The jobs carry the plan's live-tap masks: rates past the map leave the 3x3 jobs with their centre only."""
    p = CS.plan(1, 7, 7, (12, 24, 36))
    assert set(p.jobs[:, 3].tolist()) == {1 << J.CENTRE_TAP}
    q = CS.plan(2, 20, 17, (2, 7))
    assert len(set(q.jobs[:, 3].tolist())) > 2 and (q.jobs[q.jobs[:, 2] == 0, 3] == 1 << J.CENTRE_TAP).all()


@pytest.mark.parametrize("problem", AWKWARD + EXTRA, ids=str)
@pytest.mark.parametrize("stage", list(SEPARABLE_STAGES))
@pytest.mark.parametrize("kernel,elem", EMULATED, ids=["mma16", "mma32", "simt"])
def test_emulated_backward_matches_float64(problem, stage, kernel, elem):
    a = make_separable_problem(problem, stage, torch.float64, seed=2, requires_grad=True)
    a.update(scale=None, shift=None, relu=False)  # the backend's grads are of the pre-epilogue output
    names = [n for n in ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift") if a[n] is not None]
    y = multi_rate_separable_conv2d_reference(**a)
    g = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    want = dict(zip(names, torch.autograd.grad(y, [a[n] for n in names], g)))
    d = detached_copy(a)
    got = CS._backward(EmulatedKernels(elem), kernel, g, d["x"], d["w1x1"], d["w_dw"], d["w_pw"], d["rates"], d["mid_scale"],
                       d["mid_shift"], d["mid_relu"], True, True, True)
    got = dict(zip(("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift"), got))
    assert got["x"].is_contiguous(memory_format=torch.channels_last)
    for n in names:
        assert got[n].shape == want[n].shape and got[n].dtype == want[n].dtype, n
        if want[n].numel():
            err = float((got[n] - want[n]).abs().max())
            assert err <= 1e-11 * max(1.0, float(want[n].abs().max())), f"{n} {problem} {stage}: error {err:.3e}"
    for n in ("mid_scale", "mid_shift"):
        assert (got[n] is None) == (a[n] is None), n


def test_emulated_backward_leaves_out_what_is_not_requested():
    a = make_separable_problem(AWKWARD[0], "mid", torch.float64, seed=4)
    y = multi_rate_separable_conv2d_reference(**a)
    g = torch.randn(y.shape, dtype=torch.float64)
    args = (g, a["x"], a["w1x1"], a["w_dw"], a["w_pw"], a["rates"], a["mid_scale"], a["mid_shift"], a["mid_relu"])
    only_x = CS._backward(EmulatedKernels(), "mma", *args, True, False, False)
    assert only_x[0] is not None and all(t is None for t in only_x[1:])
    only_mid = CS._backward(EmulatedKernels(), "mma", *args, False, False, True)
    full = CS._backward(EmulatedKernels(), "mma", *args, True, True, True)
    assert only_mid[:4] == (None,) * 4
    torch.testing.assert_close(only_mid[4], full[4], rtol=0, atol=0)
    torch.testing.assert_close(only_x[0], full[0], rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("stage", ["plain", "mid"])
@pytest.mark.parametrize("kernel,elem", EMULATED, ids=["mma16", "mma32", "simt"])
def test_emulated_forward_keeps_nan_and_inf_like_the_reference(stage, kernel, elem):
    """NaN and +-Inf in x reach exactly the outputs whose window reads them, through the mid stage and the
    epilogue with the ReLUs as the kernels write them (NaN stays NaN, as in torch.relu; issue 22 item 7)."""
    p = Problem(2, 40, 24, 9, 13, (1, 3, 20))
    a = make_separable_problem(p, stage, torch.float64, seed=3)
    a["x"] = nonfinite.plant(a["x"])
    y = CS._forward(EmulatedKernels(elem), kernel, *_positional(a))
    ref = multi_rate_separable_conv2d_reference(**a)
    assert torch.equal(torch.isnan(ref), nonfinite.footprint(torch.isnan(a["x"]).any(1), p.rates, p.co))
    nonfinite.assert_same_nonfinite(y, ref, f"emulated {kernel} {stage}")
    finite = torch.isfinite(ref)
    torch.testing.assert_close(y[finite], ref[finite], rtol=0, atol=1e-11)


NO_PIXELS = [Problem(0, 16, 8, 5, 6, (1, 2)), Problem(2, 16, 8, 0, 6, (1, 2)), Problem(2, 16, 8, 5, 0, (1, 2))]


def _expected_empty(a):
    """(out, grads) of a problem without pixels or input channels: the epilogue of an empty sum (ReLU(shift)
    where given) on every output, zero grads of the parameters, an empty grad_x."""
    x, co = a["x"], a["w1x1"].shape[0]
    n, _, h, w = x.shape
    channels = (1 + len(a["rates"])) * co
    v = torch.zeros(channels, dtype=torch.float64)
    if a["scale"] is not None:
        v = v * a["scale"]
    if a["shift"] is not None:
        v = v + a["shift"]
    v = torch.relu(v) if a["relu"] else v
    out = v.to(x.dtype).view(1, -1, 1, 1).expand(n, channels, h, w)
    grads = [None if a[k] is None else torch.zeros_like(a[k]) for k in ("w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift")]
    return out, [torch.empty_like(x)] + grads


@pytest.mark.parametrize("problem", NO_PIXELS + [Problem(2, 0, 8, 5, 6, (1, 2))], ids=str)
@pytest.mark.parametrize("kernel,elem", EMULATED, ids=["mma16", "mma32", "simt"])
def test_emulated_empty_problems(problem, kernel, elem):
    """N, H or W = 0 (no plan to build: the backend returns before planning) and C = 0 (every output is the
    epilogue of an empty sum): the right shapes, the epilogue, zero grads (issue 22 item 9)."""
    a = make_separable_problem(problem, "mid", torch.float64, seed=5)
    want_y, want_grads = _expected_empty(a)
    y = CS._forward(EmulatedKernels(elem), kernel, *_positional(a))
    assert y.shape == want_y.shape and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, want_y, rtol=0, atol=0)
    g = torch.randn(y.shape, dtype=torch.float64)
    got = CS._backward(EmulatedKernels(elem), kernel, g, a["x"], a["w1x1"], a["w_dw"], a["w_pw"], a["rates"],
                       a["mid_scale"], a["mid_shift"], a["mid_relu"], True, True, True)
    assert got[0].shape == a["x"].shape and got[0].dtype == a["x"].dtype  # empty: no layout to speak of
    for name, t, want in zip(("w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift"), got[1:], want_grads[1:]):
        assert t.shape == want.shape and t.dtype == want.dtype, name
        torch.testing.assert_close(t, want, rtol=0, atol=0, msg=name)
    only_x = CS._backward(EmulatedKernels(elem), kernel, g, a["x"], a["w1x1"], a["w_dw"], a["w_pw"], a["rates"],
                          a["mid_scale"], a["mid_shift"], a["mid_relu"], True, False, False)
    assert only_x[0].shape == a["x"].shape and all(t is None for t in only_x[1:])


# ----------------------------------------------------------------------------------------------
# Machine code
# ----------------------------------------------------------------------------------------------

MMA_TYPES = {"I6__half": "HMMA.16816.F32", "I13__nv_bfloat16": "HMMA.16816.F32.BF16", "If": "HMMA.1688.F32.TF32"}
SIMT_KERNELS = ("separable_forward_simt_kernel", "activation_kernel", "mid_backward_kernel", "dgrad_stencil_kernel",
                "wgrad_dw_kernel")
SIMT_TYPES = ("I6__halff", "I13__nv_bfloat16f", "Iff", "Idd")
MAX_REGS = 255


def _functions(sass, kernel, dtype):
    return {f: t for (a, f), t in sass.items() if a == "sm_90a" and "9separable" in f and f"{kernel}{dtype}" in f}


@pytest.mark.parametrize("dtype", list(MMA_TYPES))
def test_sass_separable_forward_uses_ldmatrix_and_mma_sync(sass, res_usage, dtype):
    funcs = _functions(sass, "separable_forward_mma_kernel", dtype)
    assert len(funcs) == 1, f"expected one sm_90a separable_forward_mma_kernel{dtype}, found {list(funcs)}"
    (name, text), = funcs.items()
    assert set(re.findall(r"\b(HMMA\.\S+)", text)) == {MMA_TYPES[dtype]}, name
    assert re.search(r"\bLDSM\b", text), f"{name}: no ldmatrix"
    assert not re.search(r"\bMOVM\b", text), f"{name}: register transposes (MOVM)"
    assert re.search(r"\bLDGSTS\b", text), f"{name}: the pointwise weights are not copied by cp.async"
    assert not re.search(r"\b(LDL|STL)\b", text), f"{name}: local-memory loads/stores"
    usage = res_usage[name]
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0 and usage["REG"] <= MAX_REGS, f"{name}: {usage}"


@pytest.mark.parametrize("dtype", SIMT_TYPES)
@pytest.mark.parametrize("kernel", SIMT_KERNELS)
def test_res_usage_separable_simt_kernels_no_local_memory(sass, res_usage, kernel, dtype):
    funcs = _functions(sass, kernel, dtype)
    assert len(funcs) == 1, f"expected one sm_90a {kernel}{dtype}, found {list(funcs)}"
    (name, text), = funcs.items()
    assert not re.search(r"\bHMMA\b", text), f"{name}: tensor-core MMAs in a SIMT kernel"
    assert not re.search(r"\b(LDL|STL)\b", text), f"{name}: local-memory loads/stores"
    usage = res_usage[name]
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0 and usage["REG"] <= MAX_REGS, f"{name}: {usage}"


# ----------------------------------------------------------------------------------------------
# Kernel choice and errors (no GPU needed)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def fake_sm90(monkeypatch):
    monkeypatch.setattr(cuda_backend, "_capability", lambda index: (9, 0))
    monkeypatch.delenv("RESASPP_CUDA_KERNEL", raising=False)
    return monkeypatch


def test_kernel_choice_auto(fake_sm90):
    dev = torch.device("cuda", 0)
    assert CS.kernel_choice(dev, torch.bfloat16, 2048, 256)[0] == "mma"
    kernel, why = CS.kernel_choice(dev, torch.float16, 20, 12)
    assert kernel == "simt" and "multiples of 8" in why
    assert CS.kernel_choice(dev, torch.float64, 64, 64)[0] == "simt"
    fake_sm90.setattr(cuda_backend, "tf32_convolutions", lambda: True)
    assert CS.kernel_choice(dev, torch.float32, 64, 64)[0] == "mma"
    fake_sm90.setattr(cuda_backend, "tf32_convolutions", lambda: False)
    kernel, why = CS.kernel_choice(dev, torch.float32, 64, 64)
    assert kernel == "simt" and "TF32" in why


def test_kernel_choice_named_family_that_cannot_run_raises(fake_sm90):
    dev = torch.device("cuda", 0)
    fake_sm90.setenv("RESASPP_CUDA_KERNEL", "mma")
    with pytest.raises(RuntimeError, match="multiples of 8"):
        CS.kernel_choice(dev, torch.bfloat16, 20, 16)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        CS.kernel_choice(dev, torch.float64, 16, 16)
    fake_sm90.setenv("RESASPP_CUDA_KERNEL", "sm90")
    with pytest.raises(RuntimeError, match="no sm_90a kernels"):
        CS.kernel_choice(dev, torch.bfloat16, 16, 16)
    fake_sm90.setenv("RESASPP_CUDA_KERNEL", "fastest")
    with pytest.raises(RuntimeError, match="RESASPP_CUDA_KERNEL must be one of"):
        CS.kernel_choice(dev, torch.bfloat16, 16, 16)
    fake_sm90.setenv("RESASPP_CUDA_KERNEL", "simt")
    assert CS.kernel_choice(dev, torch.float64, 20, 12)[0] == "simt"


def test_entry_points_refuse_cpu_tensors_with_the_reason():
    if _built_extension() is None:
        pytest.skip("resaspp_ops._C is not built")
    _C = cuda_backend.extension()
    a = make_separable_problem(Problem(1, 8, 8, 5, 5, (1,)), "plain")
    p = CS.plan(1, 5, 5, (1,))
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        CS._forward(_C, "mma", *_positional(a))
    x = a["x"].contiguous(memory_format=torch.channels_last)
    with pytest.raises(RuntimeError, match="x must be a channels_last CUDA"):
        _C.separable_wgrad_dw(x.permute(0, 2, 3, 1).reshape(-1, 8), x, 1)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        _C.separable_forward(x, torch.zeros(2, 9, 8), torch.zeros(2, 8, 8), None, None, False, None, None, False,
                             [1], "mma", J.device_jobs(p, "cpu"), [p.tile_h, p.tile_w, p.stack])


def test_backend_is_declared_and_unavailable_on_cpu_with_the_reason():
    from resaspp_ops import backend as registry

    assert registry.FAMILIES[registry.SEPARABLE]["cuda"] == "cuda_separable"
    st = registry.status("cuda", "cpu", torch.float32, family=registry.SEPARABLE)
    assert not st.available and st.reason
    a = make_separable_problem(Problem(1, 8, 8, 5, 5, (1,)), "plain")
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        multi_rate_separable_conv2d(**a, backend="cuda")


# ----------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------

HALF_TYPES = (torch.float16, torch.bfloat16)
TC_SHAPES = [Problem(2, 64, 32, 13, 17, (1, 6, 30)), Problem(1, 40, 136, 9, 20, (2, 3, 4, 5)),
             Problem(2, 24, 16, 33, 33, (6, 12, 18)), Problem(1, 16, 8, 7, 7, (12, 24, 36)),
             Problem(3, 8, 16, 5, 11, (6,)), Problem(2, 8, 24, 1, 1, (1, 2, 3)), Problem(0, 16, 8, 6, 6, (1, 2))]


def _floor(dtype):
    return 1e-3 if dtype in HALF_TYPES else 1e-5


@pytest.fixture
def kernel_env(monkeypatch):
    def set_kernel(value):
        if value is None:
            monkeypatch.delenv("RESASPP_CUDA_KERNEL", raising=False)
        else:
            monkeypatch.setenv("RESASPP_CUDA_KERNEL", value)
    return set_kernel


def _check(problem, stage, dtype, device, channels_last, seed=5):
    a = make_separable_problem(problem, stage, dtype, device, channels_last=channels_last, seed=seed,
                               requires_grad=True)
    channels = (1 + len(problem.rates)) * problem.co
    torch.full((problem.n * channels * problem.h * problem.w + 1024,), float("nan"), dtype=dtype, device=device)
    y = multi_rate_separable_conv2d(**a, backend="cuda")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert not torch.isnan(y).any(), "unwritten output elements"
    a64 = detached_copy(a, torch.float64, "cpu", requires_grad=True)
    y64 = multi_rate_separable_conv2d_reference(**a64)
    same = detached_copy(a, requires_grad=True)
    ys = multi_rate_separable_conv2d_reference(**same)
    assert_error_rule(y, y64, ys, floor=_floor(dtype), what=f"forward {dtype} {problem} {stage}")
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    leaves = separable_leaves(a)
    grads = torch.autograd.grad(y, leaves, g)
    grads64 = torch.autograd.grad(y64, separable_leaves(a64), g.detach().to("cpu", torch.float64))
    grads_same = torch.autograd.grad(ys, separable_leaves(same), g)
    names = [n for n in ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift") if a[n] is not None]
    for n, got, r, s in zip(names, grads, grads64, grads_same):
        assert not torch.isnan(got).any(), f"grad {n}: NaN"
        # Under the ReLUs a flipped pre-activation moves a grad by one element's contribution: judge such grads
        # at a looser floor (DESIGN.md section 5).
        floor = _floor(dtype) * (10 if stage == "mid" else 1)
        assert_error_rule(got, r, s, floor=floor, what=f"grad {n} {dtype} {problem} {stage}")


@pytest.mark.cuda
@pytest.mark.parametrize("problem", TC_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALF_TYPES + (torch.float32,), ids=str)
@pytest.mark.parametrize("stage", ["plain", "mid"])
@pytest.mark.parametrize("kernel", ["mma", "simt"])
def test_forward_and_grads_tc_shapes(gpu_device, kernel_env, problem, dtype, stage, kernel):
    kernel_env(kernel)  # a named family that cannot run the call raises: these really ran on it
    _check(problem, stage, dtype, gpu_device, channels_last=True)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", AWKWARD, ids=str)
@pytest.mark.parametrize("dtype", HALF_TYPES + (torch.float32, torch.float64), ids=str)
@pytest.mark.parametrize("stage", list(SEPARABLE_STAGES))
def test_forward_and_grads_auto_awkward(gpu_device, kernel_env, problem, dtype, stage):
    kernel_env(None)
    _check(problem, stage, dtype, gpu_device, channels_last=False)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["mma", "simt"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_bitwise_reproducible(gpu_device, kernel_env, kernel, dtype):
    kernel_env(kernel)
    p = Problem(2, 64, 40, 21, 19, (3, 9, 27))
    runs = []
    for _ in range(2):
        a = make_separable_problem(p, "mid", dtype, gpu_device, seed=8, requires_grad=True)
        y = multi_rate_separable_conv2d(**a, backend="cuda")
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(9)).to(device=gpu_device, dtype=dtype)
        runs.append((y,) + torch.autograd.grad(y, separable_leaves(a), g))
    for t0, t1 in zip(*runs):
        assert torch.equal(t0, t1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_mma_matches_simt(gpu_device, kernel_env, dtype):
    p = Problem(2, 96, 80, 21, 35, (3, 9, 27))
    a = make_separable_problem(p, "mid", dtype, gpu_device, channels_last=True, seed=6)
    outs = []
    for k in ("mma", "simt"):
        kernel_env(k)
        outs.append(CS.forward(*_positional(a)).float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(outs[0], outs[1], rtol=4 * eps, atol=4 * eps * float(outs[1].abs().max()))


@pytest.mark.cuda
def test_errors_on_the_gpu(gpu_device, kernel_env):
    kernel_env("mma")
    a = make_separable_problem(Problem(1, 20, 12, 5, 5, (1, 2)), "plain", torch.float16, gpu_device)
    with pytest.raises(RuntimeError, match="multiples of 8"):
        multi_rate_separable_conv2d(**a, backend="cuda")
    a64 = make_separable_problem(Problem(1, 16, 8, 5, 5, (1, 2)), "plain", torch.float64, gpu_device)
    with pytest.raises(RuntimeError, match="float16, bfloat16 or float32"):
        multi_rate_separable_conv2d(**a64, backend="cuda")
    with pytest.raises(RuntimeError, match="takes float16, bfloat16 or float32"):  # the extension's own check
        CS._forward(cuda_backend.extension(), "mma", *_positional(a64))
    kernel_env("sm90")
    with pytest.raises(RuntimeError, match="no sm_90a kernels"):
        multi_rate_separable_conv2d(**a64, backend="cuda")


@pytest.mark.cuda
def test_rate_past_int32_is_not_wrapped(gpu_device, kernel_env):
    kernel_env(None)
    p = Problem(2, 16, 8, 7, 9, (2, 2**32 + 1))
    a = make_separable_problem(p, "mid", torch.float16, gpu_device, channels_last=True, seed=7)
    huge, past = dict(a, rates=(2, 2**32 + 1)), dict(a, rates=(2, 1000))
    assert torch.equal(multi_rate_separable_conv2d(**huge, backend="cuda"),
                       multi_rate_separable_conv2d(**past, backend="cuda"))


@pytest.mark.cuda
@pytest.mark.parametrize("stage", ["plain", "mid"])
@pytest.mark.parametrize("kernel,dtype", [("mma", torch.float16), ("mma", torch.bfloat16), ("simt", torch.bfloat16),
                                          ("simt", torch.float32), ("simt", torch.float64)],
                         ids=lambda v: str(v).replace("torch.", ""))
def test_nan_and_inf_propagate_like_the_reference(gpu_device, kernel_env, kernel, dtype, stage):
    """NaN and +-Inf in x reach exactly the outputs whose window reads them, through the mid stage (its ReLU
    keeps NaN) and the epilogue, as in the float64 reference (issue 22 item 7)."""
    kernel_env(kernel)
    p = Problem(2, 40, 24, 9, 13, (1, 3, 20))
    a = make_separable_problem(p, stage, dtype, gpu_device, channels_last=True, seed=3)
    a["x"] = nonfinite.plant(a["x"])
    y = CS.forward(*_positional(a))
    ref = multi_rate_separable_conv2d_reference(**detached_copy(a, torch.float64, "cpu"))
    assert torch.equal(torch.isnan(ref), nonfinite.footprint(torch.isnan(a["x"]).any(1), p.rates, p.co))
    nonfinite.assert_same_nonfinite(y, ref, f"{kernel} {dtype} {stage}")
    finite = torch.isfinite(ref)
    bound = 64 * torch.finfo(dtype).eps * (1 + float(ref[finite].abs().max()))
    torch.testing.assert_close(y.cpu().double()[finite], ref[finite], rtol=0, atol=bound)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", NO_PIXELS + [Problem(2, 0, 8, 5, 6, (1, 2))], ids=str)
@pytest.mark.parametrize("kernel", ["mma", "simt"])
def test_empty_problems(gpu_device, kernel_env, problem, kernel):
    """N, H or W = 0 and C = 0 on the GPU: the shapes, the epilogue of an empty sum, zero grads (issue 22
    item 9)."""
    kernel_env(kernel)
    a = make_separable_problem(problem, "mid", torch.bfloat16, gpu_device, channels_last=True, seed=5)
    want_y, want_grads = _expected_empty(detached_copy(a, torch.float64, "cpu"))
    y = CS.forward(*_positional(a))
    assert y.shape == want_y.shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y.cpu(), want_y.to(y.dtype))
    g = torch.randn(y.shape, device=gpu_device, dtype=y.dtype)
    got = CS.backward(g, a["x"], a["w1x1"], a["w_dw"], a["w_pw"], a["rates"], a["mid_scale"], a["mid_shift"],
                      a["mid_relu"], True, True, True)
    torch.cuda.synchronize(gpu_device)
    assert got[0].shape == a["x"].shape and got[0].dtype == a["x"].dtype
    for name, t, want in zip(("w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift"), got[1:], want_grads[1:]):
        assert t.shape == want.shape and t.dtype == a[name].dtype and not t.any(), name
