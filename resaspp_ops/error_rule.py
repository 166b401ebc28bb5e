"""DESIGN.md section 5's error rule, one definition for the benchmark's gate (bench/correctness.py) and for
backend="auto"'s verification of a kernel before it is trusted (autotune/verify.py).

A result passes when

    max|result - its float64| <= 2 * max|yardstick - its float64| + floor * max|float64|

where the yardstick is PyTorch's own result in the same dtype and the floor (FLOORS, relative) keeps a bound
when PyTorch happens to be exact. For an activation [N, C, H, W] the same holds for the relative mean error of
each spatial row and column (line_errors; the floor is then relative): a wrong tap on one border row shows in
its line's mean while the max over all elements hides it. bench/correctness.py says why lines, and how the rule
is made valid through ReLU kinks.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

# Relative floors (times max|float64|): well below one unit in the last place of each dtype, so the
# rule is decided by the 2x-PyTorch term whenever PyTorch itself rounds. float64 is judged against itself
# (its yardstick is exact), so its floor alone bounds a different summation order.
FLOORS = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def max_abs_error(a: Tensor, b: Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    return float((a.to(torch.float64) - b.to(torch.float64)).abs().max())


def line_errors(actual: Tensor, ref64: Tensor) -> Tensor:
    """The relative mean error of every spatial row and column of [N, C, H, W]: mean|actual - ref64| over
    (N, C, W) for each row, over (N, C, H) for each column, over mean|ref64| there; [H + W].

    Rows and columns whose mean|ref64| is under a tenth of the whole tensor's (say, zeroed by a ReLU) are
    measured against that tenth, so that near-empty lines do not divide by nothing."""
    err = (actual.to(torch.float64) - ref64.to(torch.float64)).abs()
    ref = ref64.to(torch.float64).abs()
    least = 0.1 * max(float(ref.mean()), 1e-300)
    return torch.cat([err.mean(dim=dims) / ref.mean(dim=dims).clamp_min(least) for dims in ((0, 1, 3), (0, 1, 2))])


def judge(name: str, actual: Tensor, ref64: Tensor, yardsticks: Sequence[tuple[Tensor, Tensor]], floor: float,
          lines: bool = True) -> tuple[bool, str]:
    """(passes, detail) of one tensor against its float64 ref64; yardsticks: (PyTorch's result, its float64)
    pairs, the worst of which sets the bound. lines: also judge each spatial line (activations [N, C, H, W]
    only: a weight grad has no rows)."""
    if tuple(actual.shape) != tuple(ref64.shape):
        return False, f"{name} shape {tuple(actual.shape)} != {tuple(ref64.shape)}"
    if not torch.isfinite(actual).all():
        return False, f"{name} has NaN or Inf"
    err = max_abs_error(actual, ref64)
    pytorch_err = max(max_abs_error(y, r) for y, r in yardsticks)
    bound = 2 * pytorch_err + floor * max(float(ref64.abs().max()) if ref64.numel() else 0.0, 1e-30)
    ok, detail = err <= bound, f"{name} err {err:.2e} (bound {bound:.2e})"
    if lines and actual.dim() == 4 and actual.numel():
        errors = line_errors(actual, ref64)
        line_bound = 2 * max(float(line_errors(y, r).max()) for y, r in yardsticks) + floor
        worst = int(errors.argmax())
        h = actual.shape[2]
        where = f"row {worst}" if worst < h else f"column {worst - h}"
        ok = ok and float(errors[worst]) <= line_bound
        detail += f", worst line {where} {float(errors[worst]):.2e} (bound {line_bound:.2e})"
    return ok, detail
