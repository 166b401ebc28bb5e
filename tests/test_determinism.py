"""Bitwise-reproducible gradients, NaN/Inf propagation and 64-bit indexing (issue 7)."""
import contextlib

import pytest
import torch

from resaspp_ops import backend as backend_registry
from resaspp_ops import multi_rate_conv2d, multi_rate_conv2d_reference
from utils import Problem, make_problem


def _backends_for(device):
    return [n for n in backend_registry.NAMES if backend_registry.status(n, device).available]


def _pytorch_determinism(name, device):
    """The reference backend is cuDNN on a GPU, whose weight-grad algorithms may use atomics: PyTorch
    promises bitwise-equal grads there only with cudnn.deterministic. Our own kernels need no flag."""
    if name == "reference" and torch.device(device).type == "cuda":
        return torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, benchmark=False,
                                          deterministic=True, allow_tf32=torch.backends.cudnn.allow_tf32)
    return contextlib.nullcontext()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_reproducible(device, dtype):
    p = Problem(3, 24, 16, 11, 9, (1, 3, 7))
    names = _backends_for(device)
    assert "reference" in names
    for name in names:
        runs = []
        for _ in range(2):
            x, w1, w3, scale, shift = make_problem(p, dtype, device, epilogue=True, seed=5, requires_grad=True)
            with _pytorch_determinism(name, device):
                y = multi_rate_conv2d(x, w1, w3, p.rates, scale, shift, relu=True, backend=name)
                runs.append(torch.autograd.grad(y.float().square().sum(), (x, w1, w3)))
        for a, b in zip(*runs):
            assert torch.equal(a, b), name


def test_deterministic_algorithms_mode_raises_nothing(device):
    p = Problem(2, 8, 4, 7, 7, (1, 2))
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        for name in _backends_for(device):
            x, w1, w3, _, _ = make_problem(p, torch.float32, device, requires_grad=True)
            multi_rate_conv2d(x, w1, w3, p.rates, backend=name).sum().backward()
    finally:
        torch.use_deterministic_algorithms(previous)


def test_nan_and_inf_propagate_as_in_pytorch(device):
    p = Problem(1, 6, 4, 9, 9, (1, 3))
    for name in _backends_for(device):
        x, w1, w3, _, _ = make_problem(p, torch.float32, device)
        x[0, 2, 4, 4] = float("nan")
        x[0, 3, 0, 8] = float("inf")
        y = multi_rate_conv2d(x, w1, w3, p.rates, backend=name)
        ref = multi_rate_conv2d_reference(x, w1, w3, p.rates)
        assert torch.equal(torch.isnan(y), torch.isnan(ref)), name
        assert torch.equal(torch.isinf(y), torch.isinf(ref)), name
        finite = torch.isfinite(ref)
        torch.testing.assert_close(y[finite], ref[finite], rtol=1e-4, atol=1e-5)


def _check_corner(x, w1, w3, r, backend):
    """Forward and backward of multi_rate_conv2d on x [1, C, H, W] (channels_last), judged on what the last
    rows and columns see: a crop of x's bottom-right corner holds everything they read, so the float64
    reference runs on the crop only (x itself may be too large for it). The output grad is non-zero only
    on the outputs whose whole neighbourhood lies in the crop, so that the weight grads, which sum over
    all outputs, are the crop's too; the input grad is compared on the last r x r pixels, which receive
    only from outputs in the crop."""
    n, c, h, w = x.shape
    k = 2 * r + 2  # crop size
    g = torch.zeros(n, (1 + w3.shape[0]) * w1.shape[0], h, w, device=x.device, dtype=x.dtype)
    g[:, :, h - r - 2:, w - r - 2:] = torch.randn(n, g.shape[1], r + 2, r + 2, device=x.device, dtype=x.dtype)
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w3)]
    y = multi_rate_conv2d(*leaves, (r,), backend=backend)
    y_corner = y[:, :, -r:, -r:].detach().double().cpu()
    gx, gw1, gw3 = torch.autograd.grad(y, leaves, g)
    del y
    gx_corner = gx[:, :, -r:, -r:].double().cpu()
    del gx
    crop = [x[:, :, h - k:, w - k:].detach().double().cpu().requires_grad_(True)] + \
        [t.detach().double().cpu().requires_grad_(True) for t in (w1, w3)]
    ref = multi_rate_conv2d_reference(*crop, (r,))
    ref_gx, ref_gw1, ref_gw3 = torch.autograd.grad(ref, crop, g[:, :, h - k:, w - k:].double().cpu())
    tol = dict(rtol=2e-2, atol=2e-2) if x.dtype != torch.float64 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y_corner, ref[:, :, -r:, -r:].detach(), **tol, msg=f"{backend} out")
    torch.testing.assert_close(gx_corner, ref_gx[:, :, -r:, -r:], **tol, msg=f"{backend} grad_x")
    torch.testing.assert_close(gw1.double().cpu(), ref_gw1, **tol, msg=f"{backend} grad_w1x1")
    torch.testing.assert_close(gw3.double().cpu(), ref_gw3, **tol, msg=f"{backend} grad_w3x3")


def test_corner_check_holds_on_a_small_input():
    """_check_corner's cropping argument, on an input small enough to run anywhere."""
    torch.manual_seed(0)
    c, h, w, r = 5, 13, 11, 3
    x = torch.randn(1, c, h, w, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    _check_corner(x, torch.randn(4, c, 1, 1, dtype=torch.float64), torch.randn(1, 4, c, 3, 3, dtype=torch.float64),
                  r, "reference")


@pytest.mark.cuda
@pytest.mark.parametrize("n,h,w", [(1, 1025, 1025), (2, 725, 725)], ids=["one-image", "two-images"])
def test_input_past_2_31_elements_uses_64_bit_offsets(gpu_device, monkeypatch, n, h, w):
    """x has 2^31 + a few elements; the last pixels' outputs must read the last input pixels, and the
    backward (input and weight grads) must write and read them too. One image past 2^31 elements, or
    two images each under it (so only the image offset needs 64 bits). About 9 GB of bf16 tensors (x
    and its grad) on the GPU; the float64 reference runs on a small crop, on the CPU."""
    c, co, r = 2048, 8, 3
    assert n * c * h * w > 2**31
    monkeypatch.setenv("RESASPP_TRITON_AUTOTUNE", "0")  # indexing, not tuning: no timing of configs on 4 GB
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device=gpu_device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(co, c, 1, 1, device=gpu_device, dtype=torch.bfloat16) / c**0.5
    w3 = torch.randn(1, co, c, 3, 3, device=gpu_device, dtype=torch.bfloat16) / (9 * c) ** 0.5
    names = [b for b in ("cuda", "triton") if backend_registry.status(b, gpu_device, torch.bfloat16).available]
    assert names, "neither GPU backend can run here: nothing would be tested"
    for name in names:
        _check_corner(x, w1, w3, r, name)
        torch.cuda.empty_cache()
