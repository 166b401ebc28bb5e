"""The op contract of DESIGN.md section 3: results, grads, registration and input checking."""
import warnings

import pytest
import torch
import torch.nn.functional as F

import resaspp_ops
from resaspp_ops import backend as backend_registry
from resaspp_ops import multi_rate_conv2d
from utils import AWKWARD, Problem, assert_error_rule, float64_reference, make_problem, pytorch_same_dtype


def _backends_for(device):
    """The backends that can run on `device` here (the reference always can)."""
    return [name for name in backend_registry.NAMES if backend_registry.status(name, device).available]


@pytest.mark.parametrize("problem", AWKWARD, ids=str)
@pytest.mark.parametrize("epilogue", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_matches_float64(device, problem, epilogue, channels_last):
    for name in _backends_for(device):
        x, w1, w3, scale, shift = make_problem(problem, torch.float32, device, channels_last=channels_last,
                                               epilogue=epilogue, seed=1)
        y = multi_rate_conv2d(x, w1, w3, problem.rates, scale, shift, relu=epilogue, backend=name)
        assert y.is_contiguous(memory_format=torch.channels_last)
        ref = float64_reference(x, w1, w3, problem.rates, scale, shift, epilogue)
        same = pytorch_same_dtype(x, w1, w3, problem.rates, scale, shift, epilogue)
        assert_error_rule(y, ref, same, what=f"{name} forward {problem}")


@pytest.mark.parametrize("problem", AWKWARD, ids=str)
def test_grads_match_float64(device, problem):
    for name in _backends_for(device):
        x, w1, w3, scale, shift = make_problem(problem, torch.float32, device, epilogue=True, seed=2,
                                               requires_grad=True)
        g = torch.randn((problem.n, (1 + len(problem.rates)) * problem.co, problem.h, problem.w),
                        generator=torch.Generator().manual_seed(3)).to(device)
        y = multi_rate_conv2d(x, w1, w3, problem.rates, scale, shift, relu=True, backend=name)
        grads = torch.autograd.grad(y, (x, w1, w3), g)
        x64, w164, w364 = (t.detach().double().cpu().requires_grad_() for t in (x, w1, w3))
        y64 = resaspp_ops.multi_rate_conv2d_reference(x64, w164, w364, problem.rates, scale.double().cpu(),
                                                      shift.double().cpu(), True)
        grads64 = torch.autograd.grad(y64, (x64, w164, w364), g.double().cpu())
        xs, w1s, w3s = (t.detach().requires_grad_() for t in (x, w1, w3))
        ys = resaspp_ops.multi_rate_conv2d_reference(xs, w1s, w3s, problem.rates, scale, shift, True)
        grads_same = torch.autograd.grad(ys, (xs, w1s, w3s), g)
        for what, a, r, s in zip(("grad_x", "grad_w1x1", "grad_w3x3"), grads, grads64, grads_same):
            assert_error_rule(a, r, s, what=f"{name} {what} {problem}")


def test_gradcheck_with_epilogue():
    p = Problem(2, 3, 2, 5, 4, (1, 3))
    x, w1, w3, scale, shift = make_problem(p, torch.float64, epilogue=True, requires_grad=True)
    scale.requires_grad_(True)
    shift.requires_grad_(True)
    f = lambda *args: multi_rate_conv2d(*args[:3], p.rates, args[3], args[4], relu=True)  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w1, w3, scale, shift))


def test_gradcheck_without_epilogue():
    p = Problem(1, 2, 3, 4, 6, (2, 5))
    x, w1, w3, _, _ = make_problem(p, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: multi_rate_conv2d(*a, p.rates), (x, w1, w3))


@pytest.mark.parametrize("epilogue", [False, True])
def test_opcheck(device, epilogue):
    p = Problem(2, 5, 3, 6, 7, (1, 4))
    for name in _backends_for(device):
        x, w1, w3, scale, shift = make_problem(p, torch.float32, device, epilogue=epilogue, requires_grad=True)
        if epilogue:
            scale.requires_grad_(True)
            shift.requires_grad_(True)
        args = (x, w1, w3, list(p.rates), scale, shift, epilogue, name)
        torch.library.opcheck(torch.ops.resaspp_ops.multi_rate_conv2d.default, args)
        grad = torch.randn(2, 9, 6, 7, device=device)
        torch.library.opcheck(torch.ops.resaspp_ops.multi_rate_conv2d_backward.default,
                              (grad, x.detach(), w1.detach(), w3.detach(), list(p.rates), True, True, name))


def test_skipped_grads_are_not_computed():
    p = Problem(1, 4, 2, 5, 5, (1,))
    x, w1, w3, _, _ = make_problem(p)
    w3.requires_grad_(True)
    y = multi_rate_conv2d(x, w1, w3, p.rates)
    (gw3,) = torch.autograd.grad(y.sum(), (w3,))
    assert gw3.shape == w3.shape and x.grad is None


def test_matches_separate_convs_exactly_in_float64():
    p = Problem(2, 6, 4, 9, 7, (1, 2, 8))
    x, w1, w3, _, _ = make_problem(p, torch.float64)
    y = multi_rate_conv2d(x, w1, w3, p.rates)
    ref = torch.cat([F.conv2d(x, w1)] + [F.conv2d(x, w3[i], padding=r, dilation=r) for i, r in enumerate(p.rates)], 1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)


def test_autocast_cpu_bfloat16():
    p = Problem(2, 8, 4, 6, 6, (1, 2))
    x, w1, w3, _, _ = make_problem(p, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = multi_rate_conv2d(x, w1, w3, p.rates)
        ref = F.conv2d(x, w1)
    assert y.dtype == ref.dtype == torch.bfloat16
    y.float().sum().backward()
    assert w1.grad is not None and w1.grad.dtype == torch.float32


def test_empty_batch_gives_empty_result_and_grads():
    p = Problem(0, 4, 3, 5, 5, (1, 2))
    x, w1, w3, _, _ = make_problem(p, requires_grad=True)
    y = multi_rate_conv2d(x, w1, w3, p.rates)
    assert y.shape == (0, 9, 5, 5)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(w1.grad, torch.zeros_like(w1))


def test_backends_report():
    report = resaspp_ops.backends("cpu")
    assert set(report) == {"reference", "cuda", "triton"}
    assert report["reference"].available
    assert not report["cuda"].available and "CUDA" in report["cuda"].reason


def test_auto_picks_reference_on_cpu():
    assert backend_registry.resolve("auto", torch.device("cpu"), torch.float32) == "reference"


def test_named_backend_that_cannot_run_raises():
    p = Problem(1, 4, 2, 5, 5, (1,))
    x, w1, w3, _, _ = make_problem(p)
    with pytest.raises(RuntimeError, match="backend 'cuda' cannot run"):
        multi_rate_conv2d(x, w1, w3, p.rates, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend"):
        multi_rate_conv2d(x, w1, w3, p.rates, backend="cudnn")


class TestBadInput:
    p = Problem(2, 4, 3, 5, 5, (1, 2))

    def inputs(self):
        return make_problem(self.p)[:3]

    def test_wrong_rank(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match="4-D"):
            multi_rate_conv2d(x[0], w1, w3, self.p.rates)

    def test_channel_mismatch(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match="channel mismatch: x has C=5"):
            multi_rate_conv2d(torch.randn(2, 5, 5, 5), w1, w3, self.p.rates)

    @pytest.mark.parametrize("rates", [(0, 2), (-1, 2), (1.5, 2), (True, 2), (), 3])
    def test_bad_rates(self, rates):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match="rates"):
            multi_rate_conv2d(x, w1, w3, rates)

    def test_rates_and_branches_disagree(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match="2 atrous branches but 3 rates"):
            multi_rate_conv2d(x, w1, w3, (1, 2, 3))

    def test_weight_shapes(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match=r"w1x1 must be \[Co, C, 1, 1\]"):
            multi_rate_conv2d(x, w3[0], w3, self.p.rates)
        with pytest.raises(ValueError, match=r"w3x3 must be \[B, Co, C, 3, 3\]"):
            multi_rate_conv2d(x, w1, w3[0], self.p.rates)

    def test_mixed_devices(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match="w1x1 is on meta but x is on cpu"):
            multi_rate_conv2d(x, w1.to("meta"), w3, self.p.rates)

    def test_mixed_dtypes(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(TypeError, match="w3x3 is torch.float64 but x is torch.float32"):
            multi_rate_conv2d(x, w1, w3.double(), self.p.rates)

    def test_integer_input(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
            multi_rate_conv2d(x.long(), w1, w3, self.p.rates)

    def test_epilogue_shape(self):
        x, w1, w3 = self.inputs()
        with pytest.raises(ValueError, match=r"scale must be \[\(1\+B\)\*Co\] = \[9\]"):
            multi_rate_conv2d(x, w1, w3, self.p.rates, scale=torch.ones(3))


def test_auto_says_once_why_cuda_tensors_miss_the_cuda_backend(monkeypatch):
    cuda_backend, triton_backend = backend_registry.get("cuda"), backend_registry.get("triton")
    monkeypatch.setattr(cuda_backend, "availability", lambda device, dtype: (False, "resaspp_ops._C is not built"))
    monkeypatch.setattr(triton_backend, "availability", lambda device, dtype: (True, "stub"))
    monkeypatch.setattr(backend_registry, "_WARNED", set())
    device = torch.device("cuda")  # resolve only reads the device type: no GPU is touched
    with pytest.warns(UserWarning, match="runs torch.bfloat16 CUDA tensors on 'triton', not 'cuda': resaspp_ops._C"):
        assert backend_registry.resolve("auto", device, torch.bfloat16) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_registry.resolve("auto", device, torch.bfloat16) == "triton"  # said once


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    """A function mode that changes nothing: its presence alone routes multi_rate_conv2d through the
    registered custom op (as under any mode, transform or tracer)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _routes(p, device, epilogue, backend):
    """(output, grads of x, w1x1, w3x3, scale, shift, grad_fn name) by the plain eager route, then through
    the registered op (forced by a function mode)."""
    results = []
    for mode in (None, _PassThroughMode()):
        x, w1, w3, scale, shift = make_problem(p, torch.float32, device, epilogue=epilogue, seed=4,
                                               requires_grad=True)
        leaves = [t for t in (x, w1, w3, scale, shift) if t is not None]
        for t in leaves:
            t.requires_grad_(True)
        with mode if mode is not None else torch.enable_grad():
            y = multi_rate_conv2d(x, w1, w3, p.rates, scale, shift, relu=epilogue, backend=backend)
        grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        results.append((y, grads, type(y.grad_fn).__name__))
    return results


@pytest.mark.parametrize("epilogue", [False, True])
def test_eager_route_matches_the_registered_op(device, epilogue):
    """Plain eager calls skip the custom-op layer (host time). The reference backend is then differentiated
    by PyTorch's autograd itself (the same convolutions forward, PyTorch's own backward of them); through the
    registered op its backward() runs. The same outputs bitwise, the same grads up to summation order."""
    p = Problem(2, 6, 4, 7, 5, (1, 3, 9))   # rate 9 >= H and W: merged with the 1x1; the others full 3x3
    (y0, g0, fn0), (y1, g1, fn1) = _routes(p, device, epilogue, "reference")
    assert "resaspp_ops" not in fn0 and "resaspp_ops_multi_rate_conv2d" in fn1
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("epilogue", [False, True])
def test_eager_route_of_a_kernel_backend_is_the_same_computation(epilogue, monkeypatch):
    """A backend with its own backward (cuda, triton) runs, in plain eager mode, through an autograd.Function
    that calls the same backend functions and the same _backward as the registered op: bitwise the same.
    Shown with the reference backend's functions standing in for a kernel backend's (DIFFERENTIABLE off)."""
    from resaspp_ops.backend import reference

    monkeypatch.setattr(reference, "DIFFERENTIABLE", False)
    p = Problem(2, 6, 4, 7, 5, (1, 3, 9))
    (y0, g0, fn0), (y1, g1, fn1) = _routes(p, "cpu", epilogue, "reference")
    assert fn0 == "_EagerMultiRateConv2dBackward" and "resaspp_ops_multi_rate_conv2d" in fn1
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_the_reference_backend_plans_only_live_taps():
    """The reference backend drops taps that are padding on the whole map before PyTorch sees them: branches
    whose rate is >= H and >= W join the 1x1 conv; rate >= H alone leaves the middle kernel row."""
    from resaspp_ops.backend.reference import plan

    merged, = plan(8, 8, (12, 24, 36))                # unet-stare: the whole op is one 1x1 conv
    assert merged.branches == (0, 1, 2, 3) and merged.padding == (0, 0)
    convs = plan(5, 11, (1, 6))                        # rate 6 >= H = 5 only
    assert [c.branches for c in convs] == [(0,), (1,), (2,)]
    assert (convs[2].rows, convs[2].cols) == (slice(1, 2), slice(0, 3))
    assert convs[2].padding == (0, 6) and convs[2].dilation == (1, 6)
    assert [c.branches for c in plan(33, 33, (6, 12, 18))] == [(0,), (1,), (2,), (3,)]
    assert [c.branches for c in plan(7, 7, (12, 2, 30))] == [(0, 1, 3), (2,)]  # out of order: placed back


def test_auto_order_follows_the_arch_dtype_and_tf32_switch(monkeypatch):
    """backend="auto" on CUDA: Triton first on sm_90 for fp16/bf16/TF32 (until GPU numbers decide), the CUDA
    kernels first elsewhere; fp32 with TF32 off goes to PyTorch (no fused kernel expected to beat cuDNN's exact
    fp32), and the reason says so."""
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert backend_registry.auto_order(cuda, torch.bfloat16)[0] == ("triton", "cuda", "reference")
    assert backend_registry.auto_order(cuda, torch.float32)[0][0] == "triton"
    assert backend_registry.auto_order(cuda, torch.float64)[0][0] == "cuda"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    order, why = backend_registry.auto_order(cuda, torch.float32)
    assert order == ("reference",) and "TF32 off" in why
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert backend_registry.auto_order(cuda, torch.bfloat16)[0][0] == "cuda"
    assert backend_registry.auto_order(torch.device("cpu"), torch.bfloat16)[0] == ("reference",)


@pytest.fixture
def fp32_precision_restored():
    """Puts PyTorch's fp32 precision settings (both APIs share them) back as they were."""
    getter = torch._C._get_fp32_precision_getter
    saved = {key: getter(*key) for key in (("generic", "all"), ("cuda", "all"), ("cuda", "conv"), ("cuda", "rnn"),
                                           ("cuda", "matmul"))}
    yield
    for (backend, op), value in saved.items():  # parents first: setting one resets its children
        torch._C._set_fp32_precision_setter(backend, op, value)


@pytest.mark.parametrize("api", ["conv", "cudnn", "global"])
def test_tf32_switch_follows_the_new_precision_api(api, fp32_precision_restored, monkeypatch):
    """PyTorch's new precision API (torch.backends[.cudnn[.conv]].fp32_precision) makes the legacy
    torch.backends.cudnn.allow_tf32 raise on read once convolutions and RNNs differ; every fp32 decision of the
    package (auto's order, the Triton dot precision, the CUDA kernel choice, the bench metadata) reads the one
    helper, which follows the new API's inheritance (conv, else cuDNN, else global)."""
    pytest.importorskip("triton")
    from resaspp_ops.backend import cuda as cuda_backend
    from resaspp_ops.backend import precision
    from resaspp_ops.backend.triton import configs
    from resaspp_ops.bench import environment

    settings = {"conv": torch.backends.cudnn.conv, "cudnn": torch.backends.cudnn, "global": torch.backends}[api]
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(cuda_backend, "_capability", lambda index: (9, 0))
    for value, tf32 in (("ieee", False), ("tf32", True), ("ieee", False)):
        if api != "conv":
            torch.backends.cudnn.conv.fp32_precision = "none"  # inherit from the level under test
        settings.fp32_precision = value
        if api == "conv" and not tf32:  # convolutions apart from RNNs: the legacy flag cannot answer
            with pytest.raises(RuntimeError):
                torch.backends.cudnn.allow_tf32
        assert precision.tf32_convolutions() is tf32
        order, why = backend_registry.auto_order(cuda, torch.float32)
        assert (order == ("reference",)) is not tf32, why
        assert configs.dot_precision(torch.float32) == ("tf32" if tf32 else "ieee")
        assert configs.dot_precision(torch.bfloat16) == "tf32"
        assert cuda_backend.kernel_choice(cuda, torch.float32, 64, 64)[0] == ("mma" if tf32 else "simt")
        assert environment.metadata(torch.device("cpu"), "test")["cudnn_allow_tf32"] is tf32
