"""Whether a candidate's results in one direction may be trusted: DESIGN.md section 5's rule
(resaspp_ops/error_rule.py, the benchmark gate's) against the reference backend's float64 results on the call's
own inputs, with the reference backend in the call's dtype as the yardstick (PyTorch's own error)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from resaspp_ops.autotune.problems import ACTIVATIONS
from resaspp_ops.error_rule import FLOORS, judge


@dataclass(frozen=True)
class Verification:
    ok: bool
    detail: str  # each result's error against its bound, e.g. "out err 3.1e-03 (bound 1.2e-04), worst line ..."


def verify(results: dict, references64: dict, yardstick: dict, dtype: torch.dtype,
           images: Optional[int]) -> Verification:
    """Judges every result that references64 names. results, yardstick: a candidate's and the reference
    backend's results in the call's dtype on the whole batch; references64: float64 results on the first
    `images` images (None: all) for the activations, the whole batch for the weight grads."""
    floor = FLOORS[dtype]
    oks, details = [], []
    for name, ref64 in references64.items():
        actual, yard = results.get(name), yardstick[name]
        if actual is None:
            return Verification(False, f"no {name}")
        lines = name in ACTIVATIONS
        if lines and images is not None:
            actual, yard = actual[:images], yard[:images]
        ok, detail = judge(name, actual, ref64, [(yard, ref64)], floor, lines=lines)
        oks.append(ok)
        details.append(detail)
    return Verification(all(oks), "; ".join(details))
