"""DESIGN.md section 5's error rule, applied to a provider's output and input grad before it is timed.

A result passes when, for the output and (fwd+bwd) the input grad,

    max|result - float64| <= 2 * max|yardstick - float64| + floor * max|float64|

where float64 is the same computation in float64 on the same (dtype-rounded) weights and input, and
the yardstick is PyTorch's own eager NCHW result in the case's dtype (torchvision-eager or
conv2d-eager). The floor keeps a bound when PyTorch happens to be exact.

A compiled fused provider (fused-auto-compile) runs the ops around the fused op through torch.compile,
which rounds them differently (in bf16 its BatchNorm backward lands at several times eager's error): it
is judged against the worse of the eager yardstick and the compiled baseline of the same case, when that
ran, so that it answers for its own error and not for the compiler's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from resaspp_ops.bench.workloads import Result

# Relative floors (times max|float64|): well below one unit in the last place of each dtype, so the
# rule is decided by the 2x-PyTorch term whenever PyTorch itself rounds.
FLOORS = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_abs_error(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


@dataclass(frozen=True)
class Verdict:
    correct: bool
    detail: str


def _judge(name: str, actual: Tensor, ref64: Tensor, yardsticks: list, floor: float) -> tuple[bool, str]:
    if tuple(actual.shape) != tuple(ref64.shape):
        return False, f"{name} shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if not torch.isfinite(actual).all():
        return False, f"{name} has NaN or Inf"
    err = max_abs_error(actual, ref64)
    pytorch_err = max(max_abs_error(y, ref64) for y in yardsticks)
    bound = 2 * pytorch_err + floor * max(float(ref64.abs().max()) if ref64.numel() else 0.0, 1e-30)
    return err <= bound, f"{name} err {err:.2e} (bound {bound:.2e})"


def check(result: Result, ref64: Result, yardstick: Result, dtype: torch.dtype,
          compiled_yardstick: Result | None = None) -> Verdict:
    """Whether `result` passes the rule on its output and, if present, its input grad; compiled_yardstick:
    the compiled baseline's result, for a compiled fused provider (see the module's docstring)."""
    floor = FLOORS[dtype]
    yardsticks = [yardstick] + ([compiled_yardstick] if compiled_yardstick is not None else [])
    ok, detail = _judge("out", result.out, ref64.out, [y.out for y in yardsticks], floor)
    details = [detail]
    if ref64.grad_x is not None:
        if result.grad_x is None:
            return Verdict(False, "no input grad")
        ok_grad, detail = _judge("grad_x", result.grad_x, ref64.grad_x,
                                 [y.grad_x for y in yardsticks if y.grad_x is not None], floor)
        ok = ok and ok_grad
        details.append(detail)
    return Verdict(ok, "; ".join(details))
