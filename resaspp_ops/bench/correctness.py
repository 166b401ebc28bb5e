"""DESIGN.md section 5's error rule (defined once in resaspp_ops/error_rule.py, which backend="auto"'s
verification shares), applied to a provider's output and input grad before it is timed.

A result passes when, for the output and (fwd+bwd) the input grad,

    max|result - its float64| <= 2 * max|yardstick - its float64| + floor * max|float64|

where "float64" is the same computation in float64 on the same (dtype-rounded) weights and input, and
the yardstick is PyTorch's own eager NCHW result in the case's dtype (torchvision-eager or
conv2d-eager). The floor keeps a bound when PyTorch happens to be exact. The same rule holds for the
relative mean error of each spatial row and column (line_errors; the floor is then relative):

    max over lines of mean|result - its float64| / mean|float64|  <=  2 * the same of the yardstick + floor

A kernel bug is a structured error: a wrong tap on one border row or column of a tile or of the map.
Rounding noise averages out over a line and is the same in every line, so a line's mean shows a wrong
row that the max over all elements hides: at module level the projection mixes one branch's wrong row
into every output channel, diluted to about a fifth, and in bf16 a 5% bottom row of one branch moved the
output's max error from 3.5e-3 to 7.1e-3 against a bound of 7.7e-3 (unet-stare), while its line stood
at 1.3-2.3x its bound. Lines and not channels or images: legitimate rounding is coherent along those
(a BatchNorm's batch statistics, a folded scale, the pooled branch's per-image bias: a fused run's
channel means sat at 0.93 of such a bound in fp32), never along a spatial line.

Each run is compared with a float64 reference of its own: in fwd+bwd the reference's ReLUs use the
ReLU masks of the run being judged (resaspp_ops.bench.relu_masks), for the result and the yardstick
alike. Why: the max-abs rule holds for functions continuous in their inputs, and a gradient through ReLU
is not. Where a pre-activation lies within rounding of zero, the run and float64 may put it on opposite
sides of the kink; ReLU's derivative is then 1 in one and 0 in the other, and grad_x differs by that
unit's whole contribution over its footprint (in fp32 on isaid-os8 one such unit put channels_last
PyTorch 400x past the bound while its output was exact to 1e-6). With the run's own masks, float64
differentiates the same piecewise-linear function as the run, the two differ by rounding alone, and
the rule is valid again. It still catches what matters:

- a wrong forward (a wrong tap, a wrong row) shows in the output, which is continuous; it cannot
  hide behind the masks, which only choose a side where the pre-activation is zero up to rounding
  (elsewhere a run's masks are float64's);
- a wrong backward changes grad_x and not the forward masks, so it is judged against the float64
  derivative of the very function the run computed;
- a ReLU backward that drops or keeps the wrong elements (a mask applied wrongly) is a wrong backward.

tests/test_bench_gate.py plants border-row errors of 1e-3 (fp32) and 5e-2 (fp16, bf16) relative in a
backend's forward and backward and checks that the rule fails them, and that clean runs pass it on the
default CPU suite over several seeds. Measured margins on the CPU presets: clean runs reach 0.13 of the
line bound in fp32 and 0.63 in bf16; the planted rows land at 14-77x (fp32), 18-35x (fp16) and 2.2-3.9x
(bf16, voc-os16 and isaid-os8) past it.

A compiled fused provider (fused-auto-compile) runs the ops around the fused op through torch.compile,
which rounds them differently (in bf16 its BatchNorm backward lands at several times eager's error): it
is judged against the worse of the eager yardstick and the compiled baseline of the same case, when that
ran, so that it answers for its own error and not for the compiler's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from resaspp_ops.bench.workloads import Result
from resaspp_ops.error_rule import FLOORS, judge, line_errors, max_abs_error  # noqa: F401  (re-exported)


@dataclass(frozen=True)
class Judged:
    """A run's result and the float64 reference it is compared with (with that run's ReLU masks)."""

    result: Result
    reference: Result


@dataclass(frozen=True)
class Verdict:
    correct: bool
    detail: str


def flipped_units(run: Judged, float64_masks: dict | None) -> int:
    """How many ReLU units the run put on the other side of the kink from float64 (for the report)."""
    if run.result.relu_masks is None or not float64_masks:
        return 0
    return sum(int((run.result.relu_masks[k] != float64_masks[k]).sum()) for k in float64_masks)


def check(run: Judged, yardstick: Judged, dtype: torch.dtype, compiled_yardstick: Judged | None = None) -> Verdict:
    """Whether `run` passes the rule on its output and, in fwd+bwd, its input grad; compiled_yardstick: the compiled baseline's run, for a compiled fused provider (see the module's
    docstring)."""
    floor = FLOORS[dtype]
    yardsticks = [yardstick] + ([compiled_yardstick] if compiled_yardstick is not None else [])
    ok, detail = judge("out", run.result.out, run.reference.out,
                       [(y.result.out, y.reference.out) for y in yardsticks], floor)
    details = [detail]
    if run.reference.grad_x is not None:
        if run.result.grad_x is None:
            return Verdict(False, "no input grad")
        ok_grad, detail = judge("grad_x", run.result.grad_x, run.reference.grad_x,
                                [(y.result.grad_x, y.reference.grad_x) for y in yardsticks
                                 if y.result.grad_x is not None], floor)
        ok = ok and ok_grad
        details.append(detail)
    return Verdict(ok, "; ".join(details))
