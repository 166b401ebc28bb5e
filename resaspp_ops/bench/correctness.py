"""DESIGN.md section 5's error rule, applied to a provider's output and input grad before it is timed.

A result passes when, for the output and (fwd+bwd) the input grad,

    max|result - float64| <= 2 * max|yardstick - float64| + floor * max|float64|

where float64 is the same computation in float64 on the same (dtype-rounded) weights and input, and
the yardstick is PyTorch's own eager NCHW result in the case's dtype (torchvision-eager or
conv2d-eager). The floor keeps a bound when PyTorch happens to be exact.
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


def _judge(name: str, actual: Tensor, ref64: Tensor, yardstick: Tensor, floor: float) -> tuple[bool, str]:
    if tuple(actual.shape) != tuple(ref64.shape):
        return False, f"{name} shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if not torch.isfinite(actual).all():
        return False, f"{name} has NaN or Inf"
    err = max_abs_error(actual, ref64)
    bound = 2 * max_abs_error(yardstick, ref64) + floor * max(float(ref64.abs().max()) if ref64.numel() else 0.0, 1e-30)
    return err <= bound, f"{name} err {err:.2e} (bound {bound:.2e})"


def check(result: Result, ref64: Result, yardstick: Result, dtype: torch.dtype) -> Verdict:
    """Whether `result` passes the rule on its output and, if present, its input grad."""
    floor = FLOORS[dtype]
    ok, detail = _judge("out", result.out, ref64.out, yardstick.out, floor)
    details = [detail]
    if ref64.grad_x is not None:
        if result.grad_x is None:
            return Verdict(False, "no input grad")
        ok_grad, detail = _judge("grad_x", result.grad_x, ref64.grad_x, yardstick.grad_x, floor)
        ok = ok and ok_grad
        details.append(detail)
    return Verdict(ok, "; ".join(details))
