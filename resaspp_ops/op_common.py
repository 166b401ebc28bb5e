"""What the op families (ops.py: multi_rate_conv2d, ops_separable.py: multi_rate_separable_conv2d) share.

    accumulation_dtype        the dtype kernels accumulate in and per-channel vectors are held in
    check_rates, check_x, check_w1x1, check_branch_count, check_weight_like_x, check_per_channel
                              input checks with clear messages
    autocast_to               x and the weights cast as nn.Conv2d's would be under torch.autocast
    plain_eager, needs_grad   when a public op may skip the custom-op layer (the eager route)
    epilogue_backward         the backward of the scale/shift/ReLU epilogue both families end with
    resolve_part, differentiable_plan   what a part of a plan (backend/__init__.py's grammar) runs
"""
from __future__ import annotations

import numbers
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype kernels accumulate in and the epilogue's scale/shift are held in."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_rates(rates) -> tuple[int, ...]:
    """rates as a tuple of positive Python ints, or ValueError."""
    if type(rates) is tuple and rates and all(type(r) is int and r > 0 for r in rates):
        return rates  # the common case, without the ABC checks below (host time)
    if isinstance(rates, (int, Tensor)) or not isinstance(rates, Sequence):
        raise ValueError(f"rates must be a sequence of positive integers, got {rates!r}")
    out = []
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, numbers.Integral) or int(r) < 1:
            raise ValueError(f"rates must be positive integers, got {list(rates)!r}")
        out.append(int(r))
    if not out:
        raise ValueError("rates must hold at least one atrous rate")
    return tuple(out)


def check_x(x: Tensor) -> None:
    """x must be a 4-D floating tensor [N, C, H, W]."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"x must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_w1x1(w1x1: Tensor) -> None:
    if w1x1.dim() != 4 or tuple(w1x1.shape[2:]) != (1, 1):
        raise ValueError(f"w1x1 must be [Co, C, 1, 1], got {tuple(w1x1.shape)}")


def check_branch_count(name: str, t: Tensor, rates: Sequence[int]) -> None:
    """A stacked per-branch weight holds one branch per rate."""
    if t.shape[0] != len(rates):
        raise ValueError(f"{name} holds {t.shape[0]} atrous branches but {len(rates)} rates were given")


def check_weight_like_x(named: Sequence[tuple[str, Tensor]], x: Tensor) -> None:
    """Each weight on x's device and in x's dtype (the convolutions take one dtype)."""
    for name, t in named:
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if t.dtype != x.dtype:
            raise TypeError(f"{name} is {t.dtype} but x is {x.dtype}; cast them to one dtype or use torch.autocast")


def check_per_channel(named: Sequence[tuple[str, Optional[Tensor]]], channels: int, shape_text: str,
                      x: Tensor) -> None:
    """Optional per-channel vectors (an epilogue's or mid stage's scale/shift): [channels], on x's device,
    floating. shape_text names the expected shape in the message, e.g. "[(1+B)*Co]"."""
    for name, t in named:
        if t is None:
            continue
        if t.dim() != 1 or t.shape[0] != channels:
            raise ValueError(f"{name} must be {shape_text} = [{channels}], got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")


def autocast_to(x: Tensor, *weights: Tensor) -> tuple[Tensor, ...]:
    """(x, *weights), cast to the autocast dtype where autocast is on for x's device (as nn.Conv2d's inputs
    would be); float64 is left alone, as autocast leaves it."""
    if torch.is_autocast_enabled(x.device.type) and x.dtype in FLOAT_DTYPES and x.dtype != torch.float64:
        dtype = torch.get_autocast_dtype(x.device.type)
        return tuple(t.to(dtype) for t in (x, *weights))
    return (x, *weights)


_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def plain_eager(*tensors: Optional[Tensor]) -> bool:
    """Whether nothing but eager autograd will see this call: not compiling, exporting or tracing, no
    functorch transform, no Python dispatch or function mode, no tensor subclass. Only then may an op skip
    the custom-op layer; anything that needs to see the op (torch.compile, torch.export, opcheck, FakeTensor,
    vmap, FlopCounterMode, DTensor, jit.trace) gets the registered op."""
    if (torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None
            or torch._C._are_functorch_transforms_active() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled()):
        return False
    return all(t is None or type(t) in _PLAIN_TENSORS for t in tensors)


def needs_grad(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd will record a call on these tensors."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def epilogue_backward(grad_out: Tensor, out: Optional[Tensor], scale: Optional[Tensor], shift: Optional[Tensor],
                      need_scale: bool, need_shift: bool, x_dtype: torch.dtype,
                      pre_epilogue: Callable[[], Tensor]) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
    """(grad of the pre-epilogue output, grad_scale, grad_shift) for out = ReLU(y * scale + shift).

    out: the op's output where it applied the ReLU (its mask), else None. pre_epilogue(): y, recomputed
    (called only for grad_scale). The grads of scale and shift are summed in the accumulation dtype."""
    grad = grad_out
    if out is not None:
        grad = torch.where(out <= 0, 0, grad)  # as torch.relu's backward: zero where out <= 0, NaN passes
    grad_scale = grad_shift = None
    if scale is not None or shift is not None:
        acc = accumulation_dtype(x_dtype)
        grad_acc = grad.to(acc)
        if shift is not None and need_shift:
            grad_shift = grad_acc.sum(dim=(0, 2, 3)).to(shift.dtype)
        if scale is not None and need_scale:
            grad_scale = (grad_acc * pre_epilogue().to(acc)).sum(dim=(0, 2, 3)).to(scale.dtype)
        if scale is not None:
            grad = (grad_acc * scale.to(acc).view(1, -1, 1, 1)).to(x_dtype)
    return grad, grad_scale, grad_shift


def resolve_part(part: str, direction: str, problem: Callable[[], object], grad: Optional[Tensor] = None) -> str:
    """The concrete spec that runs one direction of a call: the part itself, or for "auto" / "measure" what
    backend="auto" decides (resaspp_ops.autotune.selection.decide) for problem() (called only then)."""
    from resaspp_ops import backend

    if part != backend.AUTO and part != backend.MEASURE:
        return part
    from resaspp_ops import autotune

    return autotune.decide(problem(), direction, grad, eager=part == backend.MEASURE)


def differentiable_plan(plan: str, family: str) -> bool:
    """Whether every direction of the plan runs one backend made of differentiable PyTorch ops (the reference),
    so that in plain eager mode PyTorch's autograd may differentiate its forward directly."""
    from resaspp_ops import backend

    if "|" in plan or ":" in plan or plan == backend.AUTO:
        return False
    return bool(getattr(backend.get(plan, family), "DIFFERENTIABLE", False))
