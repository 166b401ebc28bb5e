"""When backend="auto" measures: RESASPP_AUTO, and the states in which timing would be wrong or harmful.

    RESASPP_AUTO=measure   measured decisions (the default for CUDA tensors; asked for, also for CPU tensors)
    RESASPP_AUTO=static    the static order of backend.auto_order (the default for CPU tensors: the reference)

Even in measure mode nothing is timed where it cannot be or must not be: while torch.compile, torch.export or a
tracer builds a graph (ops.py then leaves the decision to the call's run: the cache, else the static order),
while a CUDA graph is being captured, and under torch.use_deterministic_algorithms(True), where a choice that
depends on timing noise would make two runs of one program differ (there: the cache, else the static order; under
torch.distributed, rank 0's, see autotune/distributed.py).
"""
from __future__ import annotations

import os

import torch

MODES = ("measure", "static")


# A trace-time constant under torch.compile, like backend.resolve: the mode is fixed when the graph is captured.
@torch.compiler.assume_constant_result
def measured_auto(device: torch.device) -> bool:
    """Whether backend="auto" uses measured decisions for tensors on this device (see the module's docstring);
    ValueError for an unknown RESASPP_AUTO."""
    mode = os.environ.get("RESASPP_AUTO", "").strip().lower()
    if not mode:
        return device.type == "cuda"
    if mode not in MODES:
        raise ValueError(f"RESASPP_AUTO must be one of {', '.join(MODES)} (or unset), got {mode!r}")
    return mode == "measure"


def describe_mode() -> str:
    """RESASPP_AUTO's state in words, for `resaspp info`."""
    mode = os.environ.get("RESASPP_AUTO", "").strip().lower()
    if not mode:
        return "measure for CUDA tensors, static (the reference) for CPU tensors (RESASPP_AUTO unset)"
    return f"{mode} for every device (RESASPP_AUTO={mode})"


def why_not_measure(device: torch.device) -> str | None:
    """Why a call in plain eager mode must not be timed now, or None."""
    if torch.are_deterministic_algorithms_enabled():
        return "torch.use_deterministic_algorithms(True): a choice by timing could differ between runs"
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return None
