"""NaN and Inf in x reach the Triton backend's outputs and grads where they reach PyTorch's (issue 22 item 7).

A user debugging a diverging run must see the NaN: every ReLU of the Triton kernels (the epilogue of both ops,
both designs of multi_rate_conv2d; the separable op's mid ReLU, forward and the backward's recomputed mask)
keeps NaN as torch.relu does, and a NaN pre-activation passes its grad as torch.relu's backward does
(threshold_backward on the output: zero only where the output is <= 0).

Each test plants NaN, +Inf and -Inf in x (the two infinities within reach of one output pixel, so Inf - Inf
makes NaN there too) and compares with the float64 reference (plain PyTorch, autograd by PyTorch): NaN, +Inf
and -Inf at the same positions, and the finite entries by DESIGN.md section 5's error rule. Under Triton's
interpreter on the CPU (conftest.py's triton_interpreter), tiny shapes.

The backward checks run without the epilogue's ReLU: its grad is the ops layer's (op_common.epilogue_backward),
no Triton kernel's.
"""
from __future__ import annotations

import pytest
import torch

import resaspp_ops
from resaspp_ops.backend import triton as triton_backend
from utils import Problem, assert_error_rule, detached_copy, make_problem, make_separable_problem, separable_leaves

pytest.importorskip("triton")

pytestmark = [pytest.mark.usefixtures("triton_interpreter"),  # conftest.py
              # the interpreter's NumPy arithmetic warns about the NaN and Inf it is meant to carry here
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

P = Problem(2, 20, 12, 9, 13, (1, 2, 3))
# (image, channel, row, column, value): +Inf and -Inf two columns apart, so a rate-1 tap pair of the output pixel
# between them (and the depthwise taps of its channel) sum Inf - Inf = NaN.
PLANTED = [(0, 3, 4, 6, float("nan")), (1, 11, 1, 2, float("inf")), (1, 11, 1, 4, float("-inf"))]


@pytest.fixture(params=["v2", "v1"])
def version(request):
    """Both designs of multi_rate_conv2d's kernels (RESASPP_TRITON_KERNEL)."""
    with triton_backend.use_kernel_version(request.param):
        yield request.param


def _planted(x: torch.Tensor) -> torch.Tensor:
    """x with PLANTED written in (same dtype, device and memory format)."""
    x = x.detach().clone()
    for n, c, h, w, value in PLANTED:
        x[n, c, h, w] = value
    return x


def assert_same_non_finite(actual, ref64, pytorch, *, floor, what):
    """NaN, +Inf and -Inf where the float64 reference has them; the finite rest by the error rule."""
    a, r = actual.detach().to("cpu", torch.float64), ref64.detach().to("cpu", torch.float64)
    for name, kind in (("NaN", torch.isnan), ("+Inf", lambda t: t == float("inf")),
                       ("-Inf", lambda t: t == float("-inf"))):
        got, want = kind(a), kind(r)
        same = torch.equal(got, want)
        assert same, (f"{what}: {name} at {int((got & ~want).sum())} entries where the reference has none, "
                      f"missing at {int((want & ~got).sum())}")
    finite = torch.isfinite(r)
    assert_error_rule(actual.detach().cpu()[finite], r[finite], pytorch.detach().cpu()[finite], floor=floor, what=what)


def test_the_planted_values_reach_the_reference():
    """The comparisons below can fail: the reference's outputs and grads carry NaN and both infinities (after
    the ReLUs too), and NaN from Inf - Inf."""
    x, w1, w3, scale, shift = make_problem(P, torch.float64, epilogue=True, seed=1)
    x = _planted(x).requires_grad_(True)
    y = resaspp_ops.multi_rate_conv2d_reference(x, w1, w3, P.rates, scale, shift, relu=True)
    assert y.isnan().any() and (y == float("inf")).any() and (y == 0).any()
    assert int(y.isnan().sum()) > int((y.isnan().sum(dim=1) > 0).sum())  # NaN in more than one pixel's channels
    args = make_separable_problem(P, "mid", torch.float64, seed=1)
    args["x"] = _planted(args["x"])
    y = resaspp_ops.multi_rate_separable_conv2d_reference(**args)
    assert y.isnan().any() and (y == float("inf")).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_multi_rate_conv2d_forward_keeps_nan_and_inf(version, dtype):
    x, w1, w3, scale, shift = make_problem(P, dtype, epilogue=True, seed=1, channels_last=True)
    x = _planted(x)
    y = resaspp_ops.multi_rate_conv2d(x, w1, w3, P.rates, scale, shift, relu=True, backend="triton")
    cast = (lambda t: t.double())  # noqa: E731
    ref = resaspp_ops.multi_rate_conv2d_reference(cast(x), cast(w1), cast(w3), P.rates, cast(scale), cast(shift),
                                                  relu=True)
    pt = resaspp_ops.multi_rate_conv2d_reference(x, w1, w3, P.rates, scale, shift, relu=True)
    assert_same_non_finite(y, ref, pt, floor=1e-5 if dtype == torch.float32 else 1e-2, what=f"{version} forward")


def test_multi_rate_conv2d_grads_keep_nan_and_inf(version):
    x, w1, w3, scale, shift = make_problem(P, torch.float32, epilogue=True, seed=2)
    x = _planted(x)
    g = torch.randn((P.n, 4 * P.co, P.h, P.w), generator=torch.Generator().manual_seed(3))

    def grads(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (x, w1, w3)]
        y = fn(*leaves, P.rates, scale.to(dtype), shift.to(dtype), relu=False)
        return torch.autograd.grad(y, leaves, g.to(dtype))

    ours = grads(lambda *a, **k: resaspp_ops.multi_rate_conv2d(*a, **k, backend="triton"), torch.float32)
    ref = grads(resaspp_ops.multi_rate_conv2d_reference, torch.float64)
    pt = grads(resaspp_ops.multi_rate_conv2d_reference, torch.float32)
    assert ref[2].isnan().any() and (ref[2].isinf()).any()
    for name, a, r, s in zip(("grad_x", "grad_w1x1", "grad_w3x3"), ours, ref, pt):
        assert_same_non_finite(a, r, s, floor=1e-5, what=f"{version} {name}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_separable_forward_keeps_nan_and_inf(dtype):
    """The mid ReLU between depthwise and pointwise and the epilogue's ReLU both keep NaN."""
    args = make_separable_problem(P, "mid", dtype, seed=1, channels_last=True)
    args["x"] = _planted(args["x"])
    assert args["mid_relu"] and args["relu"]
    y = resaspp_ops.multi_rate_separable_conv2d(**args, backend="triton")
    ref = resaspp_ops.multi_rate_separable_conv2d_reference(**detached_copy(args, torch.float64))
    pt = resaspp_ops.multi_rate_separable_conv2d_reference(**args)
    assert_same_non_finite(y, ref, pt, floor=1e-5 if dtype == torch.float32 else 1e-2, what="separable forward")


def test_separable_grads_keep_nan_and_inf():
    """The backward's recomputed mid ReLU: a NaN pre-activation passes its grad (torch.relu's backward), so
    grad_x and grad_mid_shift near the NaN keep their values; NaN and Inf reach the weight grads as in PyTorch."""
    args = make_separable_problem(P, "mid", torch.float32, seed=2)
    args["x"] = _planted(args["x"])
    args["relu"] = False
    g = torch.randn((P.n, 4 * P.co, P.h, P.w), generator=torch.Generator().manual_seed(4))

    def grads(fn, a):
        a = detached_copy(a, requires_grad=True)
        return torch.autograd.grad(fn(**a), separable_leaves(a), g.to(a["x"].dtype))

    ours = grads(lambda **a: resaspp_ops.multi_rate_separable_conv2d(**a, backend="triton"), args)
    ref = grads(resaspp_ops.multi_rate_separable_conv2d_reference, detached_copy(args, torch.float64))
    pt = grads(resaspp_ops.multi_rate_separable_conv2d_reference, args)
    names = [n for n in ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift") if args[n] is not None]
    assert ref[names.index("w_dw")].isnan().any()
    for name, a, r, s in zip(names, ours, ref, pt):
        assert_same_non_finite(a, r, s, floor=1e-5, what=f"separable grad {name}")
