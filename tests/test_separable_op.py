"""The separable op's contract (DESIGN.md section 3): results, grads, registration, routes, backend choice and
input checking of multi_rate_separable_conv2d."""
import pytest
import torch
import torch.nn.functional as F

import resaspp_ops
from resaspp_ops import backend as backend_registry
from resaspp_ops import multi_rate_separable_conv2d, multi_rate_separable_conv2d_reference
from resaspp_ops.ops_separable import depthwise_moments
from utils import (AWKWARD, SEPARABLE_STAGES, Problem, assert_error_rule, detached_copy, make_separable_problem,
                   separable_leaves)

FAMILY = backend_registry.SEPARABLE


def _backends_for(device):
    return [n for n in backend_registry.NAMES if backend_registry.status(n, device, family=FAMILY).available]


def _reference64(args):
    return multi_rate_separable_conv2d_reference(**detached_copy(args, torch.float64, "cpu"))


@pytest.mark.parametrize("problem", AWKWARD, ids=str)
@pytest.mark.parametrize("stage", list(SEPARABLE_STAGES))
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_forward_matches_float64(device, problem, stage, channels_last):
    for name in _backends_for(device):
        args = make_separable_problem(problem, stage, torch.float32, device, channels_last=channels_last, seed=1)
        y = multi_rate_separable_conv2d(**args, backend=name)
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert y.shape == (problem.n, (1 + len(problem.rates)) * problem.co, problem.h, problem.w)
        same = multi_rate_separable_conv2d_reference(**detached_copy(args))
        assert_error_rule(y, _reference64(args), same, what=f"{name} {stage} forward {problem}")


class _PassThroughMode(torch.overrides.TorchFunctionMode):
    """A function mode that changes nothing: its presence routes the op through the registered custom op."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def _grads(args, g, mode=None, backend="auto"):
    leaves = separable_leaves(args)
    with mode if mode is not None else torch.enable_grad():
        y = multi_rate_separable_conv2d(**args, backend=backend)
    return y, torch.autograd.grad(y, leaves, g), type(y.grad_fn).__name__


@pytest.mark.parametrize("problem", AWKWARD, ids=str)
@pytest.mark.parametrize("stage", ["plain", "mid", "linear-mid"])
@pytest.mark.parametrize("route", ["eager", "registered"])
def test_every_grad_matches_float64(device, problem, stage, route):
    """Grads of x, w1x1, w_dw, w_pw, mid_scale, mid_shift, scale, shift: PyTorch's autograd of the reference
    backend (eager route) and the registered op's backward (any mode), against float64."""
    args = make_separable_problem(problem, stage, torch.float32, device, seed=2, requires_grad=True)
    channels = (1 + len(problem.rates)) * problem.co
    g = torch.randn((problem.n, channels, problem.h, problem.w), generator=torch.Generator().manual_seed(3)).to(device)
    _, grads, fn = _grads(args, g, _PassThroughMode() if route == "registered" else None)
    assert ("resaspp_ops" in fn) == (route == "registered")
    args64 = detached_copy(args, torch.float64, "cpu", requires_grad=True)
    grads64 = torch.autograd.grad(multi_rate_separable_conv2d_reference(**args64), separable_leaves(args64),
                                  g.double().cpu())
    same = detached_copy(args, requires_grad=True)
    grads_same = torch.autograd.grad(multi_rate_separable_conv2d_reference(**same), separable_leaves(same), g)
    names = [n for n in ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift") if args[n] is not None]
    for what, a, r, s in zip(names, grads, grads64, grads_same):
        assert_error_rule(a, r, s, what=f"{route} grad {what} {stage} {problem}")


@pytest.mark.parametrize("route", ["eager", "registered"])
def test_gradcheck(route):
    """Tiny float64 problem with every stage on: a full 3x3 branch, one with rate >= H only, one centre-only."""
    p = Problem(2, 3, 2, 4, 6, (1, 5, 7))
    args = make_separable_problem(p, "mid", torch.float64, requires_grad=True)
    names = [n for n in ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift")]

    def f(*tensors):
        kwargs = dict(args, **dict(zip(names, tensors)))
        with _PassThroughMode() if route == "registered" else torch.enable_grad():
            return multi_rate_separable_conv2d(**kwargs)

    assert torch.autograd.gradcheck(f, tuple(args[n] for n in names))


@pytest.mark.parametrize("stage", ["plain", "mid"])
def test_opcheck(device, stage):
    p = Problem(2, 5, 3, 6, 7, (1, 6))
    for name in _backends_for(device):
        a = make_separable_problem(p, stage, torch.float32, device, requires_grad=True)
        args = (a["x"], a["w1x1"], a["w_dw"], a["w_pw"], list(p.rates), a["mid_scale"], a["mid_shift"], a["mid_relu"],
                a["scale"], a["shift"], a["relu"], name)
        torch.library.opcheck(torch.ops.resaspp_ops.multi_rate_separable_conv2d.default, args)
        grad = torch.randn(2, 9, 6, 7, device=device)
        d = [t.detach() if isinstance(t, torch.Tensor) else t for t in args]
        torch.library.opcheck(torch.ops.resaspp_ops.multi_rate_separable_conv2d_backward.default,
                              (grad, *d[:8], True, True, True, name))


def test_reference_matches_the_plain_composition_exactly_in_float64():
    p = Problem(2, 4, 3, 9, 7, (1, 2, 8))
    a = make_separable_problem(p, "mid", torch.float64)
    y = multi_rate_separable_conv2d(**a)
    outs = [F.conv2d(a["x"], a["w1x1"])]
    for i, r in enumerate(p.rates):
        d = F.conv2d(a["x"], a["w_dw"][i], padding=r, dilation=r, groups=p.c)
        d = (d * a["mid_scale"][i * p.c:(i + 1) * p.c].view(1, -1, 1, 1)
             + a["mid_shift"][i * p.c:(i + 1) * p.c].view(1, -1, 1, 1)).relu()
        outs.append(F.conv2d(d, a["w_pw"][i]))
    ref = (torch.cat(outs, 1) * a["scale"].view(1, -1, 1, 1) + a["shift"].view(1, -1, 1, 1)).relu()
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(multi_rate_separable_conv2d_reference(**a), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stage", ["plain", "linear-mid", "mid"])
def test_the_reference_backend_drops_padding_only_taps(monkeypatch, stage):
    """8x8 map, rates (12, 24, 36): every off-centre tap is padding. Without a mid ReLU or shift the whole op is
    one 1x1 conv of 4*Co channels (w_pw * centre tap); with them, no depthwise conv runs (a per-channel
    multiply), then one 1x1 conv per branch. Rate 9 on a 5x11 map keeps the middle kernel row only."""
    from resaspp_ops.backend import reference_separable

    weights = []
    real = F.conv2d

    def recording(x, weight, *args, **kwargs):
        weights.append(tuple(weight.shape))
        return real(x, weight, *args, **kwargs)

    monkeypatch.setattr(reference_separable.F, "conv2d", recording)
    p = Problem(2, 5, 3, 8, 8, (12, 24, 36))
    a = make_separable_problem(p, stage, torch.float64)
    with torch.no_grad():
        y = multi_rate_separable_conv2d(**a)
    assert weights == ([(12, 5, 1, 1)] if stage != "mid" else [(3, 5, 1, 1)] * 4)
    torch.testing.assert_close(y, multi_rate_separable_conv2d_reference(**a), rtol=1e-12, atol=1e-12)
    weights.clear()
    p = Problem(1, 5, 3, 5, 11, (9,))
    a = make_separable_problem(p, stage, torch.float64)
    with torch.no_grad():
        y = multi_rate_separable_conv2d(**a)
    assert (5, 1, 1, 3) in weights and all(w[2:] != (3, 3) for w in weights)
    torch.testing.assert_close(y, multi_rate_separable_conv2d_reference(**a), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stage", ["plain", "mid"])
def test_eager_route_matches_the_registered_op(stage):
    p = Problem(2, 6, 4, 7, 5, (1, 3, 9))  # rate 9 >= H and W: the centre-only path
    args = make_separable_problem(p, stage, seed=4, requires_grad=True)
    g = torch.ones(2, 16, 7, 5)
    y0, g0, fn0 = _grads(args, g)
    y1, g1, fn1 = _grads(args, g, _PassThroughMode())
    assert "resaspp_ops" not in fn0 and "resaspp_ops_multi_rate_separable_conv2d" in fn1
    assert torch.equal(y0, y1)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_eager_route_of_a_kernel_backend_is_the_same_computation(monkeypatch):
    """A backend with its own backward runs, in plain eager mode, through an autograd.Function calling the same
    backend functions as the registered op: bitwise the same (the reference standing in, DIFFERENTIABLE off)."""
    from resaspp_ops.backend import reference_separable

    monkeypatch.setattr(reference_separable, "DIFFERENTIABLE", False)
    p = Problem(2, 6, 4, 7, 5, (1, 3, 9))
    args = make_separable_problem(p, "mid", seed=4, requires_grad=True)
    g = torch.randn(2, 16, 7, 5, generator=torch.Generator().manual_seed(0))
    y0, g0, fn0 = _grads(args, g)
    y1, g1, fn1 = _grads(args, g, _PassThroughMode())
    assert fn0 == "_EagerSeparableBackward" and "resaspp_ops_multi_rate_separable_conv2d" in fn1
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_compile_fullgraph_traces_it():
    p = Problem(2, 6, 4, 7, 9, (1, 3))
    args = make_separable_problem(p, "mid", requires_grad=True)
    leaves = separable_leaves(args)
    names = [n for n in ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift")]

    def f(*tensors):
        return multi_rate_separable_conv2d(**dict(args, **dict(zip(names, tensors))))

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    y, y_compiled = f(*leaves), compiled(*leaves)
    torch.testing.assert_close(y_compiled, y)
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y_compiled, leaves, g), torch.autograd.grad(y, leaves, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_autocast_cpu_bfloat16():
    p = Problem(2, 8, 4, 6, 6, (1, 2))
    args = make_separable_problem(p, "mid", requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = multi_rate_separable_conv2d(**args)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert args["w_dw"].grad is not None and args["w_dw"].grad.dtype == torch.float32


def test_empty_batch_gives_empty_result_and_grads():
    p = Problem(0, 4, 3, 5, 5, (1, 2))
    args = make_separable_problem(p, "mid", requires_grad=True)
    y = multi_rate_separable_conv2d(**args)
    assert y.shape == (0, 9, 5, 5)
    y.sum().backward()
    assert args["x"].grad.shape == args["x"].shape and torch.equal(args["w_pw"].grad, torch.zeros_like(args["w_pw"]))


def test_depthwise_moments_are_the_depthwise_outputs_sums_and_differentiable():
    p = Problem(2, 2, 2, 5, 4, (1, 4, 9))
    a = make_separable_problem(p, "plain", torch.float64, requires_grad=True)
    s, ss = depthwise_moments(a["x"], a["w_dw"], p.rates)
    d = torch.cat([F.conv2d(a["x"], a["w_dw"][i], padding=r, dilation=r, groups=p.c) for i, r in enumerate(p.rates)], 1)
    torch.testing.assert_close(s, d.sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ss, d.square().sum((0, 2, 3)), rtol=1e-12, atol=1e-12)
    assert s.dtype == torch.float64 and s.shape == (6,)
    assert torch.autograd.gradcheck(lambda x, w: torch.cat(depthwise_moments(x, w, p.rates)), (a["x"], a["w_dw"]))
    x32 = a["x"].detach().half()
    assert depthwise_moments(x32, a["w_dw"].detach().half(), p.rates)[0].dtype == torch.float32


def _reference_only(monkeypatch):
    """FAMILIES as before any kernel backend declared the separable family."""
    monkeypatch.setitem(backend_registry.FAMILIES, FAMILY, {"reference": "reference_separable"})
    monkeypatch.setattr(backend_registry, "_MODULES", {})


def test_backends_not_declaring_the_family_raise_not_implemented_naming_what_exists(monkeypatch):
    _reference_only(monkeypatch)
    a = make_separable_problem(Problem(1, 4, 2, 5, 5, (1,)), "plain")
    for name in ("cuda", "triton"):
        with pytest.raises(NotImplementedError, match=rf"backend '{name}' does not implement "
                                                      r"multi_rate_separable_conv2d yet; implemented by: reference"):
            multi_rate_separable_conv2d(**a, backend=name)
    with pytest.raises(ValueError, match="unknown backend"):
        multi_rate_separable_conv2d(**a, backend="cudnn")
    report = resaspp_ops.backends("cpu", op="multi_rate_separable_conv2d")
    assert report["reference"].available and not report["triton"].available
    assert "does not implement" in report["cuda"].reason


def test_the_kernel_backends_declare_the_family_and_say_why_they_cannot_run_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for name, module in (("triton", "resaspp_ops.backend.triton.separable"),
                         ("cuda", "resaspp_ops.backend.cuda_separable")):
        assert backend_registry.implements(name, FAMILY)
        assert backend_registry.get(name, FAMILY).__name__ == module
    a = make_separable_problem(Problem(1, 4, 2, 5, 5, (1,)), "plain")
    for name in ("cuda", "triton"):
        with pytest.raises(RuntimeError, match=rf"backend '{name}' cannot run"):
            multi_rate_separable_conv2d(**a, backend=name)
    report = resaspp_ops.backends("cpu", op="multi_rate_separable_conv2d")
    assert not report["cuda"].available and "does not implement" not in report["cuda"].reason
    assert not report["triton"].available and "does not implement" not in report["triton"].reason


def test_auto_is_the_reference_until_a_kernel_backend_declares_the_family(monkeypatch):
    """"auto" resolves to the reference where only it implements the family (no warning on CUDA: nothing
    better exists); a kernel backend that declares the family in FAMILIES is then chosen on CUDA first, and can
    be named."""
    import warnings

    _reference_only(monkeypatch)
    cuda = torch.device("cuda")  # resolve reads the device type only: no GPU is touched
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_registry.resolve("auto", cuda, torch.bfloat16, FAMILY) == "reference"
    assert backend_registry.resolve("auto", torch.device("cpu"), torch.float32, FAMILY) == "reference"
    monkeypatch.setitem(backend_registry.FAMILIES, FAMILY, {"reference": "reference_separable",
                                                            "triton": "reference_separable"})
    monkeypatch.setattr(backend_registry, "_MODULES", {})
    assert backend_registry.resolve("auto", cuda, torch.bfloat16, FAMILY) == "triton"
    a = make_separable_problem(Problem(1, 4, 2, 5, 5, (1,)), "plain")
    torch.testing.assert_close(multi_rate_separable_conv2d(**a, backend="triton"),
                               multi_rate_separable_conv2d_reference(**a))


def test_auto_takes_the_first_available_kernel_backend_of_auto_order(monkeypatch):
    """With the real FAMILIES, "auto" on CUDA tensors takes the first backend of auto_order that can run them
    (before sm_90: cuda, then triton), the reference on the CPU."""
    import warnings

    from resaspp_ops.backend import cuda_separable

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # auto_order's pre-Hopper order
    monkeypatch.setattr(cuda_separable, "availability", lambda device, dtype: (True, "patched"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend_registry.resolve("auto", cuda, torch.bfloat16, FAMILY) == "cuda"
    assert backend_registry.resolve("auto", torch.device("cpu"), torch.float32, FAMILY) == "reference"


class TestBadInput:
    p = Problem(2, 4, 3, 5, 5, (1, 2))

    def args(self, **changes):
        return dict(make_separable_problem(self.p, "mid"), **changes)

    def test_wrong_rank(self):
        a = self.args()
        with pytest.raises(ValueError, match="4-D"):
            multi_rate_separable_conv2d(**dict(a, x=a["x"][0]))

    def test_weight_shapes(self):
        a = self.args()
        with pytest.raises(ValueError, match=r"w_dw must be \[B, C, 1, 3, 3\]"):
            multi_rate_separable_conv2d(**dict(a, w_dw=a["w_dw"][:, :, 0]))
        with pytest.raises(ValueError, match=r"w_pw must be \[B, Co, C, 1, 1\]"):
            multi_rate_separable_conv2d(**dict(a, w_pw=a["w_pw"][0]))
        with pytest.raises(ValueError, match=r"w1x1 must be \[Co, C, 1, 1\]"):
            multi_rate_separable_conv2d(**dict(a, w1x1=a["w_dw"][0]))

    def test_channel_mismatch(self):
        a = self.args()
        with pytest.raises(ValueError, match="channel mismatch: x has C=5"):
            multi_rate_separable_conv2d(**dict(a, x=torch.randn(2, 5, 5, 5)))
        with pytest.raises(ValueError, match="w1x1 has Co=3 output channels but w_pw has 4"):
            multi_rate_separable_conv2d(**dict(a, w_pw=torch.randn(2, 4, 4, 1, 1)))

    def test_rates_and_branches_disagree(self):
        with pytest.raises(ValueError, match="w_dw holds 2 atrous branches but 3 rates"):
            multi_rate_separable_conv2d(**self.args(rates=(1, 2, 3)))
        with pytest.raises(ValueError, match="rates"):
            multi_rate_separable_conv2d(**self.args(rates=(0, 2)))

    def test_mid_and_epilogue_shapes(self):
        with pytest.raises(ValueError, match=r"mid_scale must be \[B\*C\] = \[8\]"):
            multi_rate_separable_conv2d(**self.args(mid_scale=torch.ones(4)))
        with pytest.raises(ValueError, match=r"shift must be \[\(1\+B\)\*Co\] = \[9\]"):
            multi_rate_separable_conv2d(**self.args(shift=torch.ones(8)))
        with pytest.raises(TypeError, match="mid_shift must be a floating tensor"):
            multi_rate_separable_conv2d(**self.args(mid_shift=torch.ones(8, dtype=torch.long)))

    def test_mixed_devices_and_dtypes(self):
        a = self.args()
        with pytest.raises(ValueError, match="w_pw is on meta but x is on cpu"):
            multi_rate_separable_conv2d(**dict(a, w_pw=a["w_pw"].to("meta")))
        with pytest.raises(TypeError, match="w_dw is torch.float64 but x is torch.float32"):
            multi_rate_separable_conv2d(**dict(a, w_dw=a["w_dw"].double()))
        with pytest.raises(ValueError, match="mid_scale is on meta but x is on cpu"):
            multi_rate_separable_conv2d(**dict(a, mid_scale=a["mid_scale"].to("meta")))


def test_registered_backward_passes_the_grad_where_the_mid_relu_sees_nan():
    """torch.relu's backward zeroes the grad where its input is <= 0 and passes it where the input is NaN; the
    reference backend's mid-stage backward (what the registered op runs) must do the same, so that a NaN in x
    gives the grads autograd gives through the plain composition (float64, NaN in the same places)."""
    from nonfinite import plant

    problem = Problem(2, 24, 8, 9, 11, (1, 3))
    args = make_separable_problem(problem, "mid", torch.float64, "cpu", seed=5, requires_grad=True)
    args["x"] = plant(args["x"], ((0, 5, 4, 6, float("nan")),)).requires_grad_(True)
    g = torch.randn((problem.n, 3 * problem.co, problem.h, problem.w), dtype=torch.float64,
                    generator=torch.Generator().manual_seed(6))
    _, grads, fn = _grads(args, g, _PassThroughMode(), backend="reference")
    assert "resaspp_ops" in fn
    plain = detached_copy(args, requires_grad=True)
    expected = torch.autograd.grad(multi_rate_separable_conv2d_reference(**plain), separable_leaves(plain), g)
    for a, e in zip(grads, expected):
        torch.testing.assert_close(a, e, equal_nan=True)
