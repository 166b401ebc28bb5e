"""The fused multi-rate convolution as a PyTorch op (DESIGN.md section 3).

Two custom ops, registered with torch.library so that autograd, torch.compile (no graph breaks)
and torch.library.opcheck all work:

    resaspp_ops::multi_rate_conv2d            forward, with the scale/shift/ReLU epilogue
    resaspp_ops::multi_rate_conv2d_backward   grads of x, w1x1, w3x3 from the pre-epilogue grad

Each takes a plan (backend/__init__.py's grammar): a concrete backend ("reference", "cuda", "triton", or with a
kernel variant, "triton:v1"), a backend per direction (forward | input grad | weight grad), or "auto", decided
where the op runs from backend="auto"'s decisions (resaspp_ops/autotune). The public function
`multi_rate_conv2d` validates its inputs (once: the ops themselves do not), applies autocast and resolves
backend="auto": the static order (RESASPP_AUTO=static, and CPU tensors by default), or measured decisions, the
forward's made now in plain eager mode and the backward's when it runs (forward and backward are chosen
apart: the backward of one backend serves the forward of another). In plain eager mode it calls the backend
through an autograd.Function instead of the dispatcher, the same computation without the custom-op layer's host
time (op_common.plain_eager says when). The checks, the eager route and the epilogue's backward are shared with
the separable op (op_common.py).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from resaspp_ops import autotune as _autotune
from resaspp_ops import backend as _backend
from resaspp_ops.autotune.problems import MultiRateProblem
from resaspp_ops.export import declare_inductor_fallbacks, refuse_torchscript
from resaspp_ops.op_common import (accumulation_dtype, autocast_to, check_branch_count, check_per_channel,
                                   check_rates, check_w1x1, check_weight_like_x, check_x, differentiable_plan,
                                   epilogue_backward, needs_grad, plain_eager, resolve_part)

__all__ = ["accumulation_dtype", "check_inputs", "check_rates", "multi_rate_conv2d", "multi_rate_conv2d_reference"]


def check_inputs(x: Tensor, w1x1: Tensor, w3x3: Tensor, rates, scale: Optional[Tensor],
                 shift: Optional[Tensor]) -> None:
    """Raises ValueError / TypeError with a clear message for anything the op does not accept."""
    check_x(x)
    check_w1x1(w1x1)
    if w3x3.dim() != 5 or tuple(w3x3.shape[3:]) != (3, 3):
        raise ValueError(f"w3x3 must be [B, Co, C, 3, 3], got {tuple(w3x3.shape)}")
    check_branch_count("w3x3", w3x3, rates)
    if w1x1.shape[1] != x.shape[1] or w3x3.shape[2] != x.shape[1]:
        raise ValueError(f"channel mismatch: x has C={x.shape[1]} but w1x1 expects {w1x1.shape[1]} "
                         f"and w3x3 expects {w3x3.shape[2]} input channels")
    if w3x3.shape[1] != w1x1.shape[0]:
        raise ValueError(f"w1x1 has Co={w1x1.shape[0]} output channels but w3x3 has {w3x3.shape[1]}")
    check_weight_like_x((("w1x1", w1x1), ("w3x3", w3x3)), x)
    check_per_channel((("scale", scale), ("shift", shift)), (1 + len(rates)) * w1x1.shape[0], "[(1+B)*Co]", x)


def _output_like(x: Tensor, channels) -> Tensor:
    n, _, h, w = x.shape
    return x.new_empty((n, channels, h, w)).contiguous(memory_format=torch.channels_last)


def _forward(x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: Sequence[int], scale: Optional[Tensor],
             shift: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    """The forward on inputs that multi_rate_conv2d has validated: the backend's, epilogue in the acc dtype."""
    spec = resolve_part(_backend.plan_parts(backend)[0], "forward",
                        lambda: MultiRateProblem(x, w1x1, w3x3, rates, scale, shift, relu))
    acc = accumulation_dtype(x.dtype)
    scale = None if scale is None else scale.to(acc)
    shift = None if shift is None else shift.to(acc)
    module, variant = _backend.implementation(spec)
    with variant:
        return module.forward(x, w1x1, w3x3, tuple(rates), scale, shift, relu)


def _backward_convs(grad: Tensor, x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: Sequence[int], need_x: bool,
                    need_w: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    """grad_x, grad_w1x1, grad_w3x3 from the pre-epilogue grad, in fixed layouts whatever the backend (the
    fake kernel promises them); the input grad and the weight grads each by the plan's backend for them (one
    call where that is the same). An empty tensor stands for "not requested" (a custom op cannot return None)."""
    rates = tuple(rates)

    def run(spec, want_x, want_w):
        module, variant = _backend.implementation(spec)
        with variant:
            return module.backward(grad, x, w1x1, w3x3, rates, want_x, want_w)

    def problem():
        return MultiRateProblem(x, w1x1, w3x3, rates)

    _, x_part, w_part = _backend.plan_parts(backend)
    x_spec = resolve_part(x_part, "input_grad", problem, grad) if need_x else None
    w_spec = resolve_part(w_part, "weight_grad", problem, grad) if need_w else None
    grad_x = grad_w1x1 = grad_w3x3 = None
    if x_spec is not None and w_spec is not None and x_spec != w_spec:
        grad_x = run(x_spec, True, False)[0]
        _, grad_w1x1, grad_w3x3 = run(w_spec, False, True)
    elif need_x or need_w:
        grad_x, grad_w1x1, grad_w3x3 = run(x_spec or w_spec, need_x, need_w)
    empty = x.new_empty(0)
    return (grad_x.contiguous(memory_format=torch.channels_last) if need_x else empty,
            grad_w1x1.contiguous() if need_w else empty.clone(), grad_w3x3.contiguous() if need_w else empty.clone())


# The registered ops take inputs that multi_rate_conv2d has validated (shapes, dtypes, devices, rates): validation
# runs once a call, there (and in the fake kernels, at trace time); call them through it.
@torch.library.custom_op("resaspp_ops::multi_rate_conv2d", mutates_args=())
def _multi_rate_conv2d(x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: Sequence[int], scale: Optional[Tensor],
                       shift: Optional[Tensor], relu: bool, backend: str) -> Tensor:
    return _forward(x, w1x1, w3x3, rates, scale, shift, relu, backend)


@_multi_rate_conv2d.register_fake
def _(x, w1x1, w3x3, rates, scale, shift, relu, backend):
    declare_inductor_fallbacks()  # Inductor keeps the op (resaspp_ops/export.py)
    check_inputs(x, w1x1, w3x3, rates, scale, shift)
    return _output_like(x, (1 + len(rates)) * w1x1.shape[0])


@torch.library.custom_op("resaspp_ops::multi_rate_conv2d_backward", mutates_args=())
def _multi_rate_conv2d_backward(grad: Tensor, x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: Sequence[int],
                                need_x: bool, need_w: bool, backend: str) -> tuple[Tensor, Tensor, Tensor]:
    return _backward_convs(grad, x, w1x1, w3x3, rates, need_x, need_w, backend)


@_multi_rate_conv2d_backward.register_fake
def _(grad, x, w1x1, w3x3, rates, need_x, need_w, backend):
    empty = x.new_empty(0)
    return (torch.empty_like(x, memory_format=torch.channels_last) if need_x else empty,
            torch.empty_like(w1x1, memory_format=torch.contiguous_format) if need_w else empty.clone(),
            torch.empty_like(w3x3, memory_format=torch.contiguous_format) if need_w else empty.clone())


def _setup_context(ctx, inputs, output):
    x, w1x1, w3x3, rates, scale, shift, relu, backend = inputs
    ctx.rates, ctx.relu, ctx.backend = tuple(rates), relu, backend
    ctx.eager = False  # _EagerMultiRateConv2d sets it: the backward then calls the backend directly too
    ctx.save_for_backward(x, w1x1, w3x3, scale, shift, output if relu else None)


def _backward(ctx, grad_out):
    x, w1x1, w3x3, scale, shift, out = ctx.saved_tensors
    need_x, need_w1, need_w3, _, need_scale, need_shift = ctx.needs_input_grad[:6]
    forward_op = _forward if ctx.eager else torch.ops.resaspp_ops.multi_rate_conv2d
    backward_op = _backward_convs if ctx.eager else torch.ops.resaspp_ops.multi_rate_conv2d_backward
    grad, grad_scale, grad_shift = epilogue_backward(
        grad_out, out, scale, shift, need_scale, need_shift, x.dtype,
        lambda: forward_op(x, w1x1, w3x3, ctx.rates, None, None, False, ctx.backend))
    grad_x = grad_w1x1 = grad_w3x3 = None
    if need_x or need_w1 or need_w3:
        gx, gw1, gw3 = backward_op(grad, x, w1x1, w3x3, ctx.rates, need_x, need_w1 or need_w3, ctx.backend)
        grad_x = gx if need_x else None
        grad_w1x1 = gw1 if need_w1 else None
        grad_w3x3 = gw3 if need_w3 else None
    return grad_x, grad_w1x1, grad_w3x3, None, grad_scale, grad_shift, None, None


_multi_rate_conv2d.register_autograd(_backward, setup_context=_setup_context)


class _EagerMultiRateConv2d(torch.autograd.Function):
    """The op's autograd in plain eager mode, without the custom-op layer (see op_common.plain_eager): the same
    backend calls and the same _backward as the registered op, less host time (benchmarks/NOTES.md)."""

    @staticmethod
    def forward(ctx, x, w1x1, w3x3, rates, scale, shift, relu, backend):
        out = _forward(x, w1x1, w3x3, rates, scale, shift, relu, backend)
        _setup_context(ctx, (x, w1x1, w3x3, rates, scale, shift, relu, backend), out)
        ctx.eager = True
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out)


def _call(x, w1x1, w3x3, rates, scale, shift, relu, backend, eager: bool) -> Tensor:
    """The op on validated inputs, by the cheapest route that keeps its meaning; eager: plain_eager's verdict."""
    if not eager:
        return torch.ops.resaspp_ops.multi_rate_conv2d(x, w1x1, w3x3, rates, scale, shift, relu, backend)
    if needs_grad(x, w1x1, w3x3, scale, shift) and not differentiable_plan(backend, _backend.MULTI_RATE):
        return _EagerMultiRateConv2d.apply(x, w1x1, w3x3, rates, scale, shift, relu, backend)
    # No grad needed, or a backend made of differentiable PyTorch ops (the reference) for every direction:
    # PyTorch's own autograd then records and differentiates them, which no hand-written backward undercuts.
    return _forward(x, w1x1, w3x3, rates, scale, shift, relu, backend)


def _plan(backend: str, eager: bool, x, w1x1, w3x3, rates, scale, shift, relu) -> str:
    """The plan of a call (see the module's docstring): a named backend, or auto's static order, resolved now;
    measured auto decided now in plain eager mode, else where the op runs ("auto")."""
    if backend != "auto" or not _autotune.measured_auto(x.device):
        return _backend.resolve(backend, x.device, x.dtype)
    if not eager:
        return _backend.AUTO
    return _autotune.plan(MultiRateProblem(x, w1x1, w3x3, rates, scale, shift, relu),
                          needs_grad(x), needs_grad(w1x1, w3x3))


def multi_rate_conv2d(x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: Sequence[int], scale: Optional[Tensor] = None,
                      shift: Optional[Tensor] = None, relu: bool = False, *, backend: str = "auto") -> Tensor:
    """The 1x1 branch and the atrous 3x3 branches of ASPP in one fused op.

    Args:
        x: [N, C, H, W] float16 / bfloat16 / float32 / float64, any memory format.
        w1x1: [Co, C, 1, 1], the 1x1 branch.
        w3x3: [B, Co, C, 3, 3], the atrous branches; branch i has dilation and padding rates[i].
        rates: B positive integers.
        scale, shift: optional [(1+B)*Co] per-channel epilogue (a folded BatchNorm), applied in fp32
            (fp64 for fp64 x) before the optional ReLU.
        relu: apply ReLU after the epilogue.
        backend: "auto", "reference", "cuda" or "triton" (see resaspp_ops.backends()); "auto" measures and
            verifies the candidates per problem on CUDA tensors (docs/auto.md, resaspp_ops.auto_choices()).

    Returns:
        [N, (1+B)*Co, H, W] in x's dtype, channels_last, channels ordered 1x1, rates[0], ..., rates[B-1].

    Under torch.autocast, x and the weights are cast to the autocast dtype as nn.Conv2d's would be.
    """
    refuse_torchscript()
    rates = check_rates(rates)
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    x, w1x1, w3x3 = autocast_to(x, w1x1, w3x3)
    check_inputs(x, w1x1, w3x3, rates, scale, shift)
    eager = plain_eager(x, w1x1, w3x3, scale, shift)
    plan = _plan(backend, eager, x, w1x1, w3x3, rates, scale, shift, relu)
    return _call(x, w1x1, w3x3, rates, scale, shift, relu, plan, eager)


def multi_rate_conv2d_reference(x: Tensor, w1x1: Tensor, w3x3: Tensor, rates: Sequence[int],
                                scale: Optional[Tensor] = None, shift: Optional[Tensor] = None,
                                relu: bool = False) -> Tensor:
    """Plain PyTorch with the same signature and result (autograd by PyTorch itself): the ground truth."""
    from resaspp_ops.backend.reference import apply_epilogue, branch_convs

    rates = check_rates(rates)
    check_inputs(x, w1x1, w3x3, rates, scale, shift)
    acc = accumulation_dtype(x.dtype)
    y = torch.cat(branch_convs(x, w1x1, w3x3, rates), dim=1)
    return apply_epilogue(y, None if scale is None else scale.to(acc), None if shift is None else shift.to(acc), relu)
