"""Triton backend on a GPU (issue #3): the compiled kernels, against float64 and cuDNN. Needs CUDA.

(The 64-bit offset case, x past 2^31 elements, is tests/test_determinism.py's, for every GPU backend.)

A process holds the kernels either compiled or interpreted (Triton decides when they are first loaded), so
these tests skip where the interpreter got them first; tests/test_triton.py steps aside when a GPU is visible.
"""
from __future__ import annotations

import pytest
import torch

import resaspp_ops
from resaspp_ops.backend import triton as triton_backend
from test_triton import check_against_float64
from utils import AWKWARD, Problem, make_problem

pytest.importorskip("triton")
pytestmark = pytest.mark.cuda


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    if triton_backend.kernels_mode() == "interpreted":
        pytest.skip("the Triton kernels were loaded interpreted in this process")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("RESASPP_TRITON_AUTOTUNE", "0")  # the heuristic config: fast; one test autotunes
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 in full precision on both sides


_CASES = AWKWARD + [
    Problem(2, 256, 64, 33, 33, (6, 12, 18)),   # voc-os16 in miniature: real tiles, split-K, pipelined loops
    Problem(1, 96, 40, 21, 50, (3, 7, 12, 30)),  # odd channels, H != W, a rate past H only
]


@pytest.mark.parametrize("version", ["v2", "v1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("p", _CASES, ids=str)
def test_matches_float64(p, dtype, version, gpu_device):
    relu = dtype == torch.float32  # see test_triton.py: a 16-bit ReLU mask may flip near zero
    with triton_backend.use_kernel_version(version):
        check_against_float64(p, dtype, "channels_last", epilogue=True, relu=relu,
                              floor=1e-5 if dtype == torch.float32 else 1e-3, device=gpu_device)


def test_nchw_and_strided_inputs(gpu_device):
    for layout in ("nchw", "strided"):
        check_against_float64(_CASES[-1], torch.bfloat16, layout, epilogue=False, relu=False, floor=1e-3,
                              device=gpu_device)


def test_autotuned_matches_float64(gpu_device, monkeypatch):
    monkeypatch.setenv("RESASPP_TRITON_AUTOTUNE", "1")
    check_against_float64(Problem(2, 128, 64, 33, 33, (6, 12, 18)), torch.bfloat16, "channels_last",
                          epilogue=True, relu=False, floor=1e-3, device=gpu_device)


def test_tf32_follows_cudnn_flag(gpu_device, monkeypatch):
    p = Problem(1, 64, 32, 17, 17, (2, 4))
    x, w1, w3, _, _ = make_problem(p, torch.float32, device=gpu_device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    tf32 = resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, backend="triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    ieee = resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, backend="triton")
    ref = resaspp_ops.multi_rate_conv2d_reference(x.double(), w1.double(), w3.double(), p.rates)
    assert (ieee.double() - ref).abs().max() < (tf32.double() - ref).abs().max()


def test_backward_bitwise_reproducible(gpu_device):
    p = Problem(4, 512, 128, 33, 33, (6, 12, 18))
    x, w1, w3, _, _ = make_problem(p, torch.bfloat16, device=gpu_device, channels_last=True)
    grad = torch.randn(p.n, 4 * p.co, p.h, p.w, device=gpu_device, dtype=torch.bfloat16)
    runs = []
    for _ in range(3):
        leaves = [t.detach().requires_grad_(True) for t in (x, w1, w3)]
        y = resaspp_ops.multi_rate_conv2d(*leaves, p.rates, backend="triton")
        runs.append(torch.autograd.grad(y, leaves, grad))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("version", ["v2", "v1"])
def test_skipping_on_the_gpu(gpu_device, version):
    p = Problem(2, 64, 32, 9, 11, (12, 24, 36))
    x, w1, w3, _, _ = make_problem(p, torch.bfloat16, device=gpu_device, requires_grad=True)
    with triton_backend.use_kernel_version(version), triton_backend.count_tap_tiles() as counter:
        y = resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, backend="triton")
        y.backward(torch.ones_like(y))
    suffix = "_v2" if version == "v2" else ""
    assert {r["kernel"] for r in counter.records} >= {"forward" + suffix, "dgrad" + suffix, "wgrad"}, counter.records
    for r in counter.records:
        if r["kernel"] == "wgrad":
            assert r["tap_tiles"] == 0
        elif version == "v1":
            assert r["tap_tiles"] == r["programs"] * r["branches"]
        elif r["kernel"] == "forward_v2":
            assert r["tap_tiles"] == r["programs"]  # the centre tap alone, every job
        else:
            assert r["tap_tiles"] == r["programs"]  # dgrad: the centre segment alone, every (tile, C block)
    off = w3.grad.clone()
    off[..., 1, 1] = 0
    assert torch.count_nonzero(off) == 0


def test_compile_fullgraph_inductor(gpu_device):
    p = Problem(2, 64, 32, 17, 19, (2, 4, 6))
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, device=gpu_device, epilogue=True, requires_grad=True)

    def f(x, w1, w3):
        return torch.ops.resaspp_ops.multi_rate_conv2d(x, w1, w3, p.rates, scale, shift, True, "triton").float()

    y = torch.compile(f, fullgraph=True)(x, w1, w3)
    torch.testing.assert_close(y, f(x, w1, w3), rtol=0, atol=0)
    y.sum().backward()
    assert x.grad is not None and w3.grad is not None


# ---------------------------------------------------------------------------------------------- separable op

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("stage", ["plain", "mid"])
@pytest.mark.parametrize("p", _CASES, ids=str)
def test_separable_matches_float64(p, stage, dtype, gpu_device):
    """The separable op's compiled kernels, forward and every grad (backend/triton/separable*.py)."""
    from test_triton_separable import check_separable

    check_separable(p, stage, dtype, seed=1, device=gpu_device)


def test_separable_tap_walks_agree(gpu_device, monkeypatch):
    """The separable forward's loop over the live taps (the default) and its unrolled taps (RESASPP_TRITON_
    SEPARABLE_TAPS=unrolled, at C = 256): the same taps in the same order, so bitwise the same output."""
    from utils import make_separable_problem

    args = make_separable_problem(Problem(2, 256, 64, 33, 33, (6, 12, 18)), "mid", torch.bfloat16, gpu_device)
    out = []
    for choice in ("unrolled", "loop"):
        monkeypatch.setenv("RESASPP_TRITON_SEPARABLE_TAPS", choice)
        with torch.no_grad():
            out.append(resaspp_ops.multi_rate_separable_conv2d(**args, backend="triton"))
    assert torch.equal(*out)


def test_separable_backward_is_bitwise_reproducible(gpu_device):
    from utils import make_separable_problem, separable_leaves

    p = Problem(2, 256, 64, 33, 33, (6, 12, 18))
    args = make_separable_problem(p, "mid", torch.bfloat16, gpu_device, requires_grad=True)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), device=gpu_device, dtype=torch.bfloat16)
    runs = []
    for _ in range(2):
        y = resaspp_ops.multi_rate_separable_conv2d(**args, backend="triton")
        runs.append(torch.autograd.grad(y, separable_leaves(args), g))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
