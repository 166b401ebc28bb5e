"""Test helpers: random problems, the float64 ground truth and DESIGN.md section 5's error rule."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from resaspp_ops import multi_rate_conv2d_reference


def randomize_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters, so that folding and the statistics are really tested."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return module


@dataclass(frozen=True)
class Problem:
    n: int
    c: int
    co: int
    h: int
    w: int
    rates: tuple

    def __str__(self):
        return f"N{self.n}_C{self.c}_Co{self.co}_{self.h}x{self.w}_r{'-'.join(map(str, self.rates))}"


# Shapes that break naive kernels (DESIGN.md section 5): N=1 and N=0, odd and unequal H and W,
# C and Co not multiples of 16, rates >= H or W, one rate or four.
AWKWARD = [
    Problem(2, 20, 12, 9, 13, (1, 2, 3)),
    Problem(1, 17, 5, 7, 7, (12, 24, 36)),     # every off-centre tap is padding
    Problem(3, 8, 16, 5, 11, (6,)),            # one rate, rate >= H only
    Problem(2, 33, 7, 12, 4, (1, 2, 3, 5)),    # four rates, H != W
    Problem(0, 16, 8, 6, 6, (1, 2)),           # empty batch
    Problem(1, 3, 19, 1, 1, (1, 2, 3)),        # a single pixel
]


def make_problem(p: Problem, dtype=torch.float32, device="cpu", *, channels_last=False, epilogue=False,
                 seed=0, requires_grad=False):
    """(x, w1x1, w3x3, scale, shift) with fresh random values of unit-ish output scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(p.n, p.c, p.h, p.w, generator=g, dtype=torch.float64)
    w1 = torch.randn(p.co, p.c, 1, 1, generator=g, dtype=torch.float64) / p.c ** 0.5
    w3 = torch.randn(len(p.rates), p.co, p.c, 3, 3, generator=g, dtype=torch.float64) / (9 * p.c) ** 0.5
    channels = (1 + len(p.rates)) * p.co
    scale = shift = None
    if epilogue:
        scale = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5
        shift = torch.randn(channels, generator=g, dtype=torch.float64) * 0.1
    x, w1, w3 = (t.to(device=device, dtype=dtype) for t in (x, w1, w3))
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    if scale is not None:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        scale, shift = scale.to(device=device, dtype=acc), shift.to(device=device, dtype=acc)
    if requires_grad:
        for t in (x, w1, w3):
            t.requires_grad_(True)
    return x, w1, w3, scale, shift


def float64_reference(x, w1, w3, rates, scale=None, shift=None, relu=False):
    """The ground truth: plain PyTorch in float64 on the CPU."""
    cast = lambda t: None if t is None else t.detach().to("cpu", torch.float64)  # noqa: E731
    return multi_rate_conv2d_reference(cast(x), cast(w1), cast(w3), rates, cast(scale), cast(shift), relu)


def pytorch_same_dtype(x, w1, w3, rates, scale=None, shift=None, relu=False):
    """PyTorch's own result in the inputs' dtype and device: the yardstick of the error rule."""
    return multi_rate_conv2d_reference(x.detach(), w1.detach(), w3.detach(), rates, scale, shift, relu)


def max_error(a, b) -> float:
    return float((a.detach().to("cpu", torch.float64) - b.detach().to("cpu", torch.float64)).abs().max()) if a.numel() else 0.0


def assert_error_rule(actual, ref64, pytorch, *, floor=1e-5, what=""):
    """DESIGN.md section 5: |actual - ref64| <= 2 |pytorch - ref64| + floor * max|ref64|."""
    assert actual.shape == ref64.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    assert actual.dtype == pytorch.dtype, f"{what}: dtype {actual.dtype} != {pytorch.dtype}"
    if ref64.numel() == 0:
        return
    err, err_pt = max_error(actual, ref64), max_error(pytorch, ref64)
    scale = float(ref64.abs().max())
    bound = 2 * err_pt + floor * max(scale, 1e-30)
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e} (PyTorch's own error {err_pt:.3e}, max|ref| {scale:.3e})"


# The separable op's optional stages, as the tests combine them: the mid stage (scale/shift/ReLU between
# depthwise and pointwise) and the epilogue. "linear-mid": a mid scale alone, which the reference backend
# folds into the pointwise weights of centre-only branches; "shift-mid": a mid shift without ReLU, which it
# does not.
SEPARABLE_STAGES = {
    "plain": dict(mid_scale=False, mid_shift=False, mid_relu=False, epilogue=False),
    "mid": dict(mid_scale=True, mid_shift=True, mid_relu=True, epilogue=True),
    "linear-mid": dict(mid_scale=True, mid_shift=False, mid_relu=False, epilogue=True),
    "shift-mid": dict(mid_scale=False, mid_shift=True, mid_relu=False, epilogue=False),
}


def make_separable_problem(p: Problem, stage: str = "mid", dtype=torch.float32, device="cpu", *,
                           channels_last=False, seed=0, requires_grad=False) -> dict:
    """The separable op's arguments for problem `p` (keyword names of multi_rate_separable_conv2d, rates
    included) with fresh random values of unit-ish output scale; the stage's optional tensors (see
    SEPARABLE_STAGES) in the accumulation dtype. requires_grad: on every tensor argument."""
    g = torch.Generator().manual_seed(seed)
    b = len(p.rates)
    flags = SEPARABLE_STAGES[stage]
    args = dict(
        x=torch.randn(p.n, p.c, p.h, p.w, generator=g, dtype=torch.float64),
        w1x1=torch.randn(p.co, p.c, 1, 1, generator=g, dtype=torch.float64) / p.c ** 0.5,
        w_dw=torch.randn(b, p.c, 1, 3, 3, generator=g, dtype=torch.float64) / 3,
        w_pw=torch.randn(b, p.co, p.c, 1, 1, generator=g, dtype=torch.float64) / p.c ** 0.5)
    args = {k: v.to(device=device, dtype=dtype) for k, v in args.items()}
    if channels_last:
        args["x"] = args["x"].contiguous(memory_format=torch.channels_last)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_channel = {"mid_scale": (b * p.c, flags["mid_scale"], True), "mid_shift": (b * p.c, flags["mid_shift"], False),
                   "scale": ((1 + b) * p.co, flags["epilogue"], True), "shift": ((1 + b) * p.co, flags["epilogue"], False)}
    for name, (channels, on, is_scale) in per_channel.items():
        if not on:
            args[name] = None
            continue
        t = torch.rand(channels, generator=g, dtype=torch.float64) + 0.5 if is_scale else \
            torch.randn(channels, generator=g, dtype=torch.float64) * 0.1
        args[name] = t.to(device=device, dtype=acc)
    args["mid_relu"], args["relu"], args["rates"] = flags["mid_relu"], flags["epilogue"], p.rates
    if requires_grad:
        for t in args.values():
            if isinstance(t, torch.Tensor):
                t.requires_grad_(True)
    return args


def separable_leaves(args: dict) -> list:
    """The tensor arguments of make_separable_problem's dict, in the op's argument order."""
    names = ("x", "w1x1", "w_dw", "w_pw", "mid_scale", "mid_shift", "scale", "shift")
    return [args[n] for n in names if args[n] is not None]


def detached_copy(args: dict, dtype=None, device=None, requires_grad=False) -> dict:
    """The same arguments detached (optionally moved to dtype / device), fresh leaves where requires_grad."""
    out = {}
    for k, v in args.items():
        if isinstance(v, torch.Tensor):
            v = v.detach()
            if dtype is not None or device is not None:
                v = v.to(device=device or v.device, dtype=dtype or v.dtype)
            else:
                v = v.clone()
            v.requires_grad_(requires_grad)
        out[k] = v
    return out
