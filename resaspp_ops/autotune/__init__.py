"""backend="auto" that measures and verifies: per problem key, the fastest correct of this package's kernels
and PyTorch's own convolutions, decided once, cached in memory and on disk (docs/auto.md).

    policy.py       RESASPP_AUTO (measure | static) and when nothing may be timed
    key.py          the problem key (device, family, direction, dtype, shapes, rates, flags), the environment
    problems.py     the two op families as measurable problems: results per direction, the float64 reference
    candidates.py   who is measured: the reference, each backend and kernel variant, planted extras (tests)
    verify.py       DESIGN.md section 5's rule (error_rule.py) against float64 on the call's own inputs
    timing.py       CUDA events / perf_counter within a budget
    decision.py     a decision with every candidate's trial; the pick rule (MIN_GAIN against the reference)
    cache.py        the decisions in memory and in $RESASPP_CACHE_DIR (or ~/.cache/resaspp_ops), atomic writes
    distributed.py  under torch.distributed, rank 0 decides and broadcasts
    selection.py    the steps above, per key; the plan of a plain eager call
    tune.py         `resaspp tune`: fill the cache ahead of time from a model
"""
from __future__ import annotations

from resaspp_ops.autotune.selection import COUNTS, auto_choices, decide, plan, recording, reset
from resaspp_ops.autotune.decision import Decision, Trial
from resaspp_ops.autotune.policy import measured_auto
from resaspp_ops.autotune.problems import MultiRateProblem, SeparableProblem

__all__ = ["COUNTS", "Decision", "MultiRateProblem", "SeparableProblem", "Trial", "auto_choices", "decide",
           "measured_auto", "plan", "recording", "reset"]
