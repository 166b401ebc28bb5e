"""Bitwise-reproducible gradients, NaN/Inf propagation and 64-bit indexing (issue 7)."""
import pytest
import torch

from resaspp_ops import backend as backend_registry
from resaspp_ops import multi_rate_conv2d, multi_rate_conv2d_reference
from utils import Problem, make_problem


def _backends_for(device):
    return [n for n in backend_registry.NAMES if backend_registry.status(n, device).available]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_is_bitwise_reproducible(device, dtype):
    p = Problem(3, 24, 16, 11, 9, (1, 3, 7))
    for name in _backends_for(device):
        runs = []
        for _ in range(2):
            x, w1, w3, scale, shift = make_problem(p, dtype, device, epilogue=True, seed=5, requires_grad=True)
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


@pytest.mark.cuda
def test_input_past_2_31_elements_uses_64_bit_offsets(gpu_device):
    """x has 2^31 + a few elements; the last pixels' outputs must read the last input pixels."""
    n, c, h, w, co, r = 1, 2048, 1025, 1025, 8, 3
    assert n * c * h * w > 2**31
    x = torch.randn(n, c, h, w, device=gpu_device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(co, c, 1, 1, device=gpu_device, dtype=torch.bfloat16) / c**0.5
    w3 = torch.randn(1, co, c, 3, 3, device=gpu_device, dtype=torch.bfloat16) / (9 * c) ** 0.5
    for name in [b for b in ("cuda", "triton") if backend_registry.status(b, gpu_device, torch.bfloat16).available]:
        y = multi_rate_conv2d(x, w1, w3, (r,), backend=name)
        crop = x[:, :, h - 2 * r - 2:, w - 2 * r - 2:].double()  # the corner the last outputs read
        ref = multi_rate_conv2d_reference(crop, w1.double(), w3.double(), (r,))
        # the bottom-right r x r outputs see the same neighbourhood in the crop as in x (below/right is padding)
        torch.testing.assert_close(y[:, :, -r:, -r:].double(), ref[:, :, -r:, -r:], rtol=2e-2, atol=2e-2)
        del y
