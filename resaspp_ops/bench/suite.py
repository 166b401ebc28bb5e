"""The benchmark loop: for each case, check every provider against float64, then time the correct ones."""
from __future__ import annotations

import gc
import shlex
import sys
import time
from typing import Callable, Optional

import torch

from resaspp_ops.bench import options as _options
from resaspp_ops.bench.ceiling import bf16_matmul_tflops
from resaspp_ops.bench.correctness import check
from resaspp_ops.bench.environment import metadata
from resaspp_ops.bench.presets import select
from resaspp_ops.bench.providers import YARDSTICK, build, is_baseline, providers_of, skip_reason
from resaspp_ops.bench.timing import TimingSettings, peak_memory_mb, time_step
from resaspp_ops.bench.workloads import (Case, float64_reference, laid_out_like, make_inputs, make_output_grad,
                                         make_source, run_once)

# Distinct input buffers a timed run cycles through (on top of the L2 flush): no step reuses the
# previous step's input.
INPUT_BUFFERS = {"cuda": 4, "cpu": 2}


def plan(args, device: torch.device) -> list[Case]:
    """The cases in run order: preset-major, so a time budget that runs out still leaves every level
    and dtype measured on the first presets."""
    cases = []
    for preset, rate_set, rates in select(args.presets, device.type, args.rate_sets, args.quick):
        for level in args.levels:
            for dtype_name in args.dtypes:
                for mode in args.modes:
                    cases.append(Case(level, preset, rate_set, tuple(rates), dtype_name, mode))
    return cases


def providers_for(case: Case, requested: Optional[list]) -> list[str]:
    return [p for p in providers_of(case.level) if requested is None or p in requested]


def empty_row(case: Case, provider: str) -> dict:
    return {"level": case.level, "preset": case.preset.name, "rates": list(case.rates), "provider": provider,
            "dtype": case.dtype_name, "mode": case.mode, "median_ms": None, "p20_ms": None, "p80_ms": None,
            "peak_mem_mb": None, "tflops_dense": None, "tflops_useful": None, "speedup_vs_best_baseline": None,
            "correct": None, "note": ""}


def make_step(runner, xs: list, grad_out, train: bool) -> Callable[[int], None]:
    """One timed step on input xs[i % len(xs)]: forward under no_grad, or forward + backward of
    sum(out * grad_out) with every grad cleared first (nothing accumulates across steps)."""
    forward = runner.fn

    if not train:
        def step(i: int) -> None:
            with torch.no_grad():
                forward(xs[i % len(xs)])
        return step

    def step(i: int) -> None:
        x = xs[i % len(xs)]
        x.grad = None
        for p in runner.params:
            p.grad = None
        forward(x).backward(grad_out)
    return step


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, providers: list, requested: Optional[list], device: torch.device,
             settings: TimingSettings, out_of_time: Callable[[], bool], progress) -> list[dict]:
    """Rows of every provider of one case; fused rows carry their speedup over the best baseline."""
    rows = [empty_row(case, p) for p in providers]
    reasons = {p: skip_reason(p, device, case.dtype, requested is not None and p in requested) for p in providers}
    if out_of_time() or all(reasons.values()):  # nothing will run: spare the setup and the float64 reference
        for row in rows:
            row["note"] = f"skipped: {reasons[row['provider']] or 'time budget spent'}"
        progress.update(len(rows))
        return rows
    try:
        source = make_source(case)
        xs = make_inputs(case, device, INPUT_BUFFERS.get(device.type, 2))
        xs_cl = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(case.train) for x in xs]
        grad = make_output_grad(case, device) if case.train else None
        ref64 = float64_reference(case, source, xs[0], grad, device)
        yard_runner = build(case.level, YARDSTICK[case.level], source, case.rates, device, case.train)
        yardstick = run_once(yard_runner.fn, yard_runner.module, xs[0], grad, case.train)
        del yard_runner
    except Exception as exc:  # noqa: BLE001 - one broken case must not end the run
        for row in rows:
            row["note"] = f"case setup failed: {type(exc).__name__}: {str(exc)[:200]}"
        progress.update(len(rows))
        _release(device)
        return rows

    macs = case.macs()
    for row in rows:
        provider = row["provider"]
        progress.set_postfix_str(f"{case.label()} {provider}", refresh=False)
        reason = reasons[provider]
        if reason is None and out_of_time():
            reason = "time budget spent"
        if reason is not None:
            row["note"] = f"skipped: {reason}"
            progress.update(1)
            continue
        runner = step = result = None
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            baseline_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            runner = build(case.level, provider, source, case.rates, device, case.train)
            inputs = xs_cl if runner.channels_last else xs
            result = run_once(runner.fn, runner.module, inputs[0], grad, case.train)
            if provider == YARDSTICK[case.level]:
                correct, detail = True, "yardstick of the error rule"
            else:
                verdict = check(result, ref64, yardstick, case.dtype)
                correct, detail = verdict.correct, verdict.detail
            row["correct"] = correct
            row["note"] = "; ".join(t for t in (runner.note, detail) if t)
            if correct:
                grad_laid_out = None if grad is None else laid_out_like(grad, result.out)
                result = None
                step = make_step(runner, inputs, grad_laid_out, case.train)
                timing = time_step(step, device, settings)
                row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                           peak_mem_mb=peak_memory_mb(step, device, baseline_bytes),
                           tflops_dense=2 * macs.dense / (timing.median_ms * 1e-3) / 1e12,
                           tflops_useful=2 * macs.useful / (timing.median_ms * 1e-3) / 1e12)
        except Exception as exc:  # noqa: BLE001 - report the failure, go on with the next provider
            row["correct"] = False
            first_line = (str(exc).strip().splitlines() or [""])[0]
            row["note"] = f"raised {type(exc).__name__}: {first_line[:200]}"
        finally:
            runner = step = result = None
            if row["provider"].endswith("-compile"):
                torch._dynamo.reset()
            _release(device)
        progress.update(1)
    add_speedups(rows)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_best_baseline = best correct baseline's median / the row's median (baselines too)."""
    baseline_times = [r["median_ms"] for r in rows
                      if is_baseline(r["provider"]) and r["correct"] and r["median_ms"] is not None]
    if not baseline_times:
        return
    best = min(baseline_times)
    for row in rows:
        if row["median_ms"] is not None:
            row["speedup_vs_best_baseline"] = best / row["median_ms"]


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but no CUDA device is visible (use --device cpu)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def run(argv) -> int:
    """Runs the suite for command-line arguments `argv`; prints the table, writes the files; exit status."""
    from tqdm import tqdm

    from resaspp_ops.bench.report import write_all

    args = _options.parse(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as exc:
        print(f"resaspp bench: error: {exc}", file=sys.stderr)
        return 2
    args = _options.fill_defaults(args, device.type)
    settings = TimingSettings.for_run(device.type, args.quick)
    cases = plan(args, device)
    start = time.perf_counter()
    budget = args.time_budget

    def out_of_time() -> bool:
        return budget is not None and time.perf_counter() - start > budget

    command = "resaspp bench " + shlex.join(list(argv))
    meta = metadata(device, command)
    meta["presets"] = {c.preset.name: {"n": c.preset.n, "c": c.preset.c, "co": c.preset.co, "h": c.preset.h,
                                       "w": c.preset.w} for c in cases}
    ceiling = {"bf16_matmul_tflops": bf16_matmul_tflops(device, settings)}
    rows = []
    total = sum(len(providers_for(c, args.providers)) for c in cases)
    with tqdm(total=total, desc="resaspp bench", unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        for case in cases:
            rows += run_case(case, providers_for(case, args.providers), args.providers, device, settings,
                             out_of_time, progress)
    rows.sort(key=lambda row: args.levels.index(row["level"]))  # the report reads level by level (stable)
    meta["elapsed_s"] = round(time.perf_counter() - start, 1)
    doc = {"meta": meta, "ceiling": ceiling, "rows": rows}
    table, paths = write_all(doc, args.out_dir, device)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    wrong = [r for r in rows if r["correct"] is False]
    return 1 if wrong else 0
