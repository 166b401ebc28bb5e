"""The separable multi-rate convolution of DeepLabV3+'s ASPP as a PyTorch op (DESIGN.md section 3).

Branch i of the separable op is a depthwise 3x3 conv (groups=C, dilation = padding = rates[i]), an optional
mid stage (per-channel scale and shift, a folded BatchNorm, then ReLU) and a pointwise 1x1 conv; the 1x1
branch is a plain 1x1 conv. Two custom ops, registered like multi_rate_conv2d's (ops.py):

    resaspp_ops::multi_rate_separable_conv2d            forward, mid stage and scale/shift/ReLU epilogue
    resaspp_ops::multi_rate_separable_conv2d_backward   grads of x, w1x1, w_dw, w_pw, mid_scale, mid_shift
                                                        from the pre-epilogue grad

The public function validates once (checks shared with multi_rate_conv2d: op_common.py), applies autocast,
resolves the backend for this family (backend.SEPARABLE: "auto" as multi_rate_conv2d's, measured per problem on
CUDA tensors or the static order, the first available kernel backend of backend.auto_order on CUDA tensors and
the reference elsewhere; naming a backend that does not implement the family raises NotImplementedError) and
takes the same eager route as multi_rate_conv2d. `depthwise_moments` is the statistics pass a module with a
BatchNorm between depthwise and pointwise runs in training (nn/mid_batchnorm.py); its "auto" is the static order.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from resaspp_ops import autotune as _autotune
from resaspp_ops import backend as _backend
from resaspp_ops.autotune.problems import SeparableProblem
from resaspp_ops.export import declare_inductor_fallbacks, refuse_torchscript
from resaspp_ops.op_common import (accumulation_dtype, autocast_to, check_branch_count, check_per_channel,
                                   check_rates, check_w1x1, check_weight_like_x, check_x, differentiable_plan,
                                   epilogue_backward, needs_grad, plain_eager, resolve_part)

__all__ = ["check_separable_inputs", "depthwise_moments", "multi_rate_separable_conv2d",
           "multi_rate_separable_conv2d_reference"]

_FAMILY = _backend.SEPARABLE


def _check_w_dw(w_dw: Tensor, rates) -> None:
    if w_dw.dim() != 5 or tuple(w_dw.shape[2:]) != (1, 3, 3):
        raise ValueError(f"w_dw must be [B, C, 1, 3, 3], got {tuple(w_dw.shape)}")
    check_branch_count("w_dw", w_dw, rates)


def check_separable_inputs(x: Tensor, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor, rates,
                           mid_scale: Optional[Tensor], mid_shift: Optional[Tensor], scale: Optional[Tensor],
                           shift: Optional[Tensor]) -> None:
    """Raises ValueError / TypeError with a clear message for anything the op does not accept."""
    check_x(x)
    check_w1x1(w1x1)
    _check_w_dw(w_dw, rates)
    if w_pw.dim() != 5 or tuple(w_pw.shape[3:]) != (1, 1):
        raise ValueError(f"w_pw must be [B, Co, C, 1, 1], got {tuple(w_pw.shape)}")
    check_branch_count("w_pw", w_pw, rates)
    c = x.shape[1]
    if w1x1.shape[1] != c or w_dw.shape[1] != c or w_pw.shape[2] != c:
        raise ValueError(f"channel mismatch: x has C={c} but w1x1 expects {w1x1.shape[1]}, w_dw "
                         f"{w_dw.shape[1]} and w_pw {w_pw.shape[2]} input channels")
    if w_pw.shape[1] != w1x1.shape[0]:
        raise ValueError(f"w1x1 has Co={w1x1.shape[0]} output channels but w_pw has {w_pw.shape[1]}")
    check_weight_like_x((("w1x1", w1x1), ("w_dw", w_dw), ("w_pw", w_pw)), x)
    check_per_channel((("mid_scale", mid_scale), ("mid_shift", mid_shift)), len(rates) * c, "[B*C]", x)
    check_per_channel((("scale", scale), ("shift", shift)), (1 + len(rates)) * w1x1.shape[0], "[(1+B)*Co]", x)


def _acc(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(accumulation_dtype(dtype))


def _forward(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, backend) -> Tensor:
    """The forward on validated inputs: the plan's backend's, per-channel vectors in the accumulation dtype."""
    def problem():
        return SeparableProblem(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu)

    spec = resolve_part(_backend.plan_parts(backend)[0], "forward", problem)
    d = x.dtype
    module, variant = _backend.implementation(spec, _FAMILY)
    with variant:
        return module.forward(x, w1x1, w_dw, w_pw, tuple(rates), _acc(mid_scale, d), _acc(mid_shift, d), mid_relu,
                              _acc(scale, d), _acc(shift, d), relu)


def _backward_convs(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid,
                    backend) -> tuple[Tensor, ...]:
    """The six grads from the pre-epilogue grad, in the fixed layouts and dtypes the fake kernel promises; the
    input grad and the weight (and mid stage) grads each by the plan's backend for them (one call where that is
    the same). An empty tensor stands for "not requested" (a custom op cannot return None)."""
    rates = tuple(rates)

    def run(spec, want_x, want_w, want_mid):
        module, variant = _backend.implementation(spec, _FAMILY)
        with variant:
            return module.backward(grad, x, w1x1, w_dw, w_pw, rates, _acc(mid_scale, x.dtype),
                                   _acc(mid_shift, x.dtype), mid_relu, want_x, want_w, want_mid)

    def problem():
        return SeparableProblem(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_w=need_w,
                                need_mid=need_mid)

    _, x_part, w_part = _backend.plan_parts(backend)
    x_spec = resolve_part(x_part, "input_grad", problem, grad) if need_x else None
    w_spec = resolve_part(w_part, "weight_grad", problem, grad) if need_w or need_mid else None
    gx = g1 = gdw = gpw = gms = gmt = None
    if x_spec is not None and w_spec is not None and x_spec != w_spec:
        gx = run(x_spec, True, False, False)[0]
        _, g1, gdw, gpw, gms, gmt = run(w_spec, False, need_w, need_mid)
    elif x_spec is not None or w_spec is not None:
        gx, g1, gdw, gpw, gms, gmt = run(x_spec or w_spec, need_x, need_w, need_mid)
    return (gx.contiguous(memory_format=torch.channels_last) if need_x else x.new_empty(0),
            g1.contiguous() if need_w else x.new_empty(0), gdw.contiguous() if need_w else x.new_empty(0),
            gpw.contiguous() if need_w else x.new_empty(0),
            gms.to(mid_scale.dtype) if need_mid and mid_scale is not None else x.new_empty(0),
            gmt.to(mid_shift.dtype) if need_mid and mid_shift is not None else x.new_empty(0))


def _output_like(x: Tensor, channels: int) -> Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, channels, h, w)).contiguous(memory_format=torch.channels_last)


# The registered ops take inputs that multi_rate_separable_conv2d has validated: call them through it.
@torch.library.custom_op("resaspp_ops::multi_rate_separable_conv2d", mutates_args=())
def _multi_rate_separable_conv2d(x: Tensor, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor, rates: Sequence[int],
                                 mid_scale: Optional[Tensor], mid_shift: Optional[Tensor], mid_relu: bool,
                                 scale: Optional[Tensor], shift: Optional[Tensor], relu: bool,
                                 backend: str) -> Tensor:
    return _forward(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, backend)


@_multi_rate_separable_conv2d.register_fake
def _(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, backend):
    declare_inductor_fallbacks()  # Inductor keeps the op (resaspp_ops/export.py)
    check_separable_inputs(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, scale, shift)
    return _output_like(x, (1 + len(rates)) * w1x1.shape[0])


@torch.library.custom_op("resaspp_ops::multi_rate_separable_conv2d_backward", mutates_args=())
def _multi_rate_separable_conv2d_backward(
        grad: Tensor, x: Tensor, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor, rates: Sequence[int],
        mid_scale: Optional[Tensor], mid_shift: Optional[Tensor], mid_relu: bool, need_x: bool, need_w: bool,
        need_mid: bool, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backward_convs(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w,
                           need_mid, backend)


@_multi_rate_separable_conv2d_backward.register_fake
def _(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid, backend):
    def weight(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if need_w else x.new_empty(0)

    def mid(t):
        return torch.empty_like(t) if need_mid and t is not None else x.new_empty(0)

    return (torch.empty_like(x, memory_format=torch.channels_last) if need_x else x.new_empty(0),
            weight(w1x1), weight(w_dw), weight(w_pw), mid(mid_scale), mid(mid_shift))


def _setup_context(ctx, inputs, output):
    x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, backend = inputs
    ctx.rates, ctx.mid_relu, ctx.backend = tuple(rates), mid_relu, backend
    ctx.eager = False  # _EagerSeparable sets it: the backward then calls the backend directly too
    ctx.save_for_backward(x, w1x1, w_dw, w_pw, mid_scale, mid_shift, scale, shift, output if relu else None)


def _backward(ctx, grad_out):
    x, w1x1, w_dw, w_pw, mid_scale, mid_shift, scale, shift, out = ctx.saved_tensors
    (need_x, need_w1, need_dw, need_pw, _, need_ms, need_mt, _, need_scale, need_shift) = ctx.needs_input_grad[:10]
    forward_op = _forward if ctx.eager else torch.ops.resaspp_ops.multi_rate_separable_conv2d
    backward_op = _backward_convs if ctx.eager else torch.ops.resaspp_ops.multi_rate_separable_conv2d_backward
    grad, grad_scale, grad_shift = epilogue_backward(
        grad_out, out, scale, shift, need_scale, need_shift, x.dtype,
        lambda: forward_op(x, w1x1, w_dw, w_pw, ctx.rates, mid_scale, mid_shift, ctx.mid_relu, None, None, False,
                           ctx.backend))
    grads = [None] * 6
    need_w, need_mid = need_w1 or need_dw or need_pw, need_ms or need_mt
    if need_x or need_w or need_mid:
        computed = backward_op(grad, x, w1x1, w_dw, w_pw, ctx.rates, mid_scale, mid_shift, ctx.mid_relu, need_x,
                               need_w, need_mid, ctx.backend)
        grads = [g if need else None
                 for g, need in zip(computed, (need_x, need_w1, need_dw, need_pw, need_ms, need_mt))]
    gx, g1, gdw, gpw, gms, gmt = grads
    return gx, g1, gdw, gpw, None, gms, gmt, None, grad_scale, grad_shift, None, None


_multi_rate_separable_conv2d.register_autograd(_backward, setup_context=_setup_context)


class _EagerSeparable(torch.autograd.Function):
    """The op's autograd in plain eager mode for a backend with its own backward (as ops._EagerMultiRateConv2d)."""

    @staticmethod
    def forward(ctx, *inputs):
        out = _forward(*inputs)
        _setup_context(ctx, inputs, out)
        ctx.eager = True
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


def _call(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, backend,
          eager: bool) -> Tensor:
    """The op on validated inputs, by the cheapest route that keeps its meaning; eager: op_common.plain_eager's
    verdict."""
    args = (x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, backend)
    if not eager:
        return torch.ops.resaspp_ops.multi_rate_separable_conv2d(*args)
    if needs_grad(x, w1x1, w_dw, w_pw, mid_scale, mid_shift, scale, shift) \
            and not differentiable_plan(backend, _FAMILY):
        return _EagerSeparable.apply(*args)
    # No grad needed, or the reference (differentiable PyTorch ops) for every direction: PyTorch's autograd
    # differentiates them.
    return _forward(*args)


def _plan(backend: str, eager: bool, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift,
          relu) -> str:
    """The plan of a call, as ops._plan's: named and static now, measured now in plain eager mode, else "auto"."""
    if backend != "auto" or not _autotune.measured_auto(x.device):
        return _backend.resolve(backend, x.device, x.dtype, _FAMILY)
    if not eager:
        return _backend.AUTO
    need_w, need_mid = needs_grad(w1x1, w_dw, w_pw), needs_grad(mid_scale, mid_shift)
    problem = SeparableProblem(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu,
                               need_w=need_w, need_mid=need_mid)
    return _autotune.plan(problem, needs_grad(x), need_w or need_mid)


def multi_rate_separable_conv2d(x: Tensor, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor, rates: Sequence[int],
                                mid_scale: Optional[Tensor] = None, mid_shift: Optional[Tensor] = None,
                                mid_relu: bool = False, scale: Optional[Tensor] = None,
                                shift: Optional[Tensor] = None, relu: bool = False, *,
                                backend: str = "auto") -> Tensor:
    """The 1x1 branch and the depthwise-separable atrous branches of DeepLabV3+'s ASPP in one op.

    Args:
        x: [N, C, H, W] float16 / bfloat16 / float32 / float64, any memory format.
        w1x1: [Co, C, 1, 1], the 1x1 branch.
        w_dw: [B, C, 1, 3, 3], the depthwise kernels; branch i has groups=C, dilation and padding rates[i].
        w_pw: [B, Co, C, 1, 1], the pointwise kernels.
        rates: B positive integers.
        mid_scale, mid_shift: optional [B*C], per branch on its depthwise output (a folded BatchNorm between
            depthwise and pointwise; a depthwise bias is a mid_shift), in fp32 (fp64 for fp64 x).
        mid_relu: ReLU after the mid scale/shift.
        scale, shift: optional [(1+B)*Co] epilogue (a folded BatchNorm) before the optional ReLU, as
            multi_rate_conv2d's.
        relu: ReLU after the epilogue.
        backend: "auto", "reference", "cuda" or "triton" (see resaspp_ops.backends(op=
            "multi_rate_separable_conv2d")).

    Returns:
        [N, (1+B)*Co, H, W] in x's dtype, channels_last, channels ordered 1x1, rates[0], ..., rates[B-1].

    Under torch.autocast, x and the weights are cast to the autocast dtype as nn.Conv2d's would be.
    """
    refuse_torchscript()
    rates = check_rates(rates)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    x, w1x1, w_dw, w_pw = autocast_to(x, w1x1, w_dw, w_pw)
    check_separable_inputs(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, scale, shift)
    eager = plain_eager(x, w1x1, w_dw, w_pw, mid_scale, mid_shift, scale, shift)
    plan = _plan(backend, eager, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu)
    return _call(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu, plan, eager)


def depthwise_moments(x: Tensor, w_dw: Tensor, rates: Sequence[int], *, backend: str = "auto"
                      ) -> tuple[Tensor, Tensor]:
    """(sum, sum of squares) [B*C] over (N, H, W) of the depthwise outputs F.conv2d(x, w_dw[i], groups=C,
    dilation=padding=rates[i]), in fp32 (fp64 for fp64 x): the batch statistics of a BatchNorm between
    depthwise and pointwise. Differentiable; the depthwise outputs are computed and dropped, never returned.

    x [N, C, H, W], w_dw [B, C, 1, 3, 3]; checks and backend choice as multi_rate_separable_conv2d."""
    rates = check_rates(rates)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    x, w_dw = autocast_to(x, w_dw)
    check_x(x)
    _check_w_dw(w_dw, rates)
    if w_dw.shape[1] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has C={x.shape[1]} but w_dw expects {w_dw.shape[1]} input channels")
    check_weight_like_x((("w_dw", w_dw),), x)
    name = _backend.resolve(backend, x.device, x.dtype, _FAMILY)
    return _backend.get(name, _FAMILY).depthwise_moments(x, w_dw, rates)


def multi_rate_separable_conv2d_reference(x: Tensor, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor,
                                          rates: Sequence[int], mid_scale: Optional[Tensor] = None,
                                          mid_shift: Optional[Tensor] = None, mid_relu: bool = False,
                                          scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                                          relu: bool = False) -> Tensor:
    """Plain PyTorch with the same signature and result (every tap, autograd by PyTorch itself): the ground truth."""
    from resaspp_ops.backend.reference import apply_epilogue
    from resaspp_ops.backend.reference_separable import branch_outputs

    rates = check_rates(rates)
    check_separable_inputs(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, scale, shift)
    d = x.dtype
    y = torch.cat(branch_outputs(x, w1x1, w_dw, w_pw, rates, _acc(mid_scale, d), _acc(mid_shift, d), mid_relu), dim=1)
    return apply_epilogue(y, _acc(scale, d), _acc(shift, d), relu)
