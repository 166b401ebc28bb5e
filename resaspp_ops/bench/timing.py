"""Timing one step: CUDA events on the GPU, time.perf_counter on the CPU; median and 20th/80th percentiles;
and the host's time to issue one (host_time_us).

A step is `step(i)`: the caller rotates through several input buffers by i, and on the GPU each
timed step starts with an L2 flush (a write larger than the cache) outside the events, so that no
measurement is flattered by the previous step's data still sitting in L2.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

# Bigger than the L2 of any current GPU (H100: 50 MB, H200: 60 MB, B200: 126 MB).
L2_FLUSH_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class TimingSettings:
    """How long to warm up and to measure, in seconds, and the bounds on the number of timed steps."""

    warmup_s: float = 0.1
    measure_s: float = 0.5
    min_steps: int = 5
    max_steps: int = 500
    host_calls: int = 200  # calls issued back to back for the host time of a launch-bound case

    @classmethod
    def for_run(cls, device_type: str, quick: bool) -> "TimingSettings":
        if device_type == "cuda":
            return cls(0.05, 0.2, 5, 200, 100) if quick else cls(0.1, 0.5, 10, 500, 300)
        return cls(0.0, 0.2, 3, 20, 20) if quick else cls(0.1, 1.0, 5, 50, 100)


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    steps: int


def summarize(times_ms) -> Timing:
    t = np.asarray(times_ms, dtype=np.float64)
    p20, median, p80 = np.percentile(t, [20, 50, 80])
    return Timing(float(median), float(p20), float(p80), int(t.size))


def _warm_up(step: Callable[[int], None], settings: TimingSettings, sync: Callable[[], None]) -> float:
    """Runs the step once (compilation, autotuning, caches), then at least twice more and for
    warmup_s; returns the seconds per step of the latter, which sizes the timed run."""
    step(0)
    sync()
    start = time.perf_counter()
    i = 0
    while i < 2 or time.perf_counter() - start < settings.warmup_s:
        step(i + 1)
        sync()
        i += 1
    return (time.perf_counter() - start) / i


def _step_count(per_step_s: float, settings: TimingSettings) -> int:
    wanted = int(settings.measure_s / max(per_step_s, 1e-9))
    return max(settings.min_steps, min(settings.max_steps, wanted))


def time_cuda(step: Callable[[int], None], device: torch.device, settings: TimingSettings) -> Timing:
    """Per-step times from CUDA events around each step, after an L2 flush outside the events."""
    sync = lambda: torch.cuda.synchronize(device)  # noqa: E731
    steps = _step_count(_warm_up(step, settings, sync), settings)
    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(steps)]
    for i in range(steps):
        flush.zero_()
        starts[i].record()
        step(i)
        ends[i].record()
    sync()
    del flush
    return summarize([s.elapsed_time(e) for s, e in zip(starts, ends)])


def time_cpu(step: Callable[[int], None], settings: TimingSettings) -> Timing:
    """Per-step wall times from time.perf_counter."""
    steps = _step_count(_warm_up(step, settings, lambda: None), settings)
    times = []
    for i in range(steps):
        start = time.perf_counter()
        step(i)
        times.append((time.perf_counter() - start) * 1e3)
    return summarize(times)


def time_step(step: Callable[[int], None], device: torch.device, settings: TimingSettings) -> Timing:
    if device.type == "cuda":
        return time_cuda(step, device, settings)
    return time_cpu(step, settings)


def host_time_us(step: Callable[[int], None], device: torch.device, calls: int) -> float:
    """The host's time to issue one step, in microseconds: `calls` steps back to back with the device
    synchronised only before and after them, so that on a GPU it is the Python, dispatch and launch cost and
    not the kernels' (as long as the kernels keep up with the host: on a launch-bound workload they do). On
    the CPU the work itself runs on the host, and this is the step's time."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    step(0)
    sync()
    start = time.perf_counter()
    for i in range(calls):
        step(i)
    elapsed = time.perf_counter() - start
    sync()
    return elapsed / calls * 1e6


def peak_memory_mb(step: Callable[[int], None], device: torch.device, baseline_bytes: int) -> Optional[float]:
    """Peak allocated memory during one step, minus `baseline_bytes` (allocated before the provider
    was built: inputs and reference results), in MiB; so it counts the provider's weights, persistent
    workspaces and the step's activations and grads. None off CUDA (no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    step(0)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - baseline_bytes) / 2 ** 20
