"""Timing the verified candidates of one problem, within a budget: CUDA events on the current stream on a GPU,
time.perf_counter elsewhere.

Each candidate has already run once (its verification, which also compiled it): that was the warm-up. Then
every candidate runs SCREENING_ROUNDS times, interleaved (so that a clock or load drift hits them alike); those
whose best screening run is within CONTENDER_RATIO of the fastest's run MIN_ROUNDS to MAX_ROUNDS more rounds,
interleaved, as many as BUDGET_S allows. The result is each candidate's median over all its runs. Total: two
timed runs of every candidate plus about BUDGET_S.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

BUDGET_S = 0.1
SCREENING_ROUNDS = 2  # more than one: a single hiccup must not drop a candidate from the contest
CONTENDER_RATIO = 1.5
MIN_ROUNDS = 2
MAX_ROUNDS = 10


def time_once(run: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one run(), the device idle before it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    start_s = time.perf_counter()
    run()
    return (time.perf_counter() - start_s) * 1e3


def time_candidates(runs: dict[str, Callable[[], object]], device: torch.device,
                    budget_s: float = BUDGET_S) -> dict[str, list[float]]:
    """{candidate: its timed runs in ms} (see the module's docstring); runs: {candidate: one call of it}."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(SCREENING_ROUNDS if len(runs) > 1 else 1):
        for name, run in runs.items():
            times[name].append(time_once(run, device))
    if len(runs) < 2:
        return times
    best = min(min(t) for t in times.values())
    contenders = [name for name, t in times.items() if min(t) <= CONTENDER_RATIO * best]
    if len(contenders) < 2:
        return times
    per_round_s = sum(min(times[name]) for name in contenders) / 1e3
    rounds = max(MIN_ROUNDS, min(MAX_ROUNDS, int(budget_s / max(per_round_s, 1e-9))))
    for _ in range(rounds):
        for name in contenders:
            times[name].append(time_once(runs[name], device))
    return times


def median_ms(times: list[float]) -> float:
    return float(statistics.median(times))
