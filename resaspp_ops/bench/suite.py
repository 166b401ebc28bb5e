"""The benchmark loop: for each case, check every provider against float64, then time the correct ones."""
from __future__ import annotations

import gc
import os
import shlex
import sys
import time
from typing import Callable, Optional

import torch

from resaspp_ops import autotune
from resaspp_ops.bench import options as _options
from resaspp_ops.bench.ceiling import bf16_matmul_tflops
from resaspp_ops.bench.correctness import Judged, check, flipped_units
from resaspp_ops.bench.environment import metadata
from resaspp_ops.bench.presets import select
from resaspp_ops.bench.providers import (DEFAULT_COMPILE_MODE, FUSED_BACKENDS, YARDSTICK, auto_choice_note, build,
                                         is_baseline, is_compiled, providers_of, skip_reason)
from resaspp_ops.bench.timing import TimingSettings, host_time_us, peak_memory_mb, time_step
from resaspp_ops.bench.workloads import (Case, Float64References, Result, laid_out_like, make_inputs,
                                         make_output_grad, make_source, run_once)

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
    return [p for p in providers_of(case.level, case.family) if requested is None or p in requested]


def empty_row(case: Case, provider: str) -> dict:
    return {"level": case.level, "preset": case.preset.name, "rates": list(case.rates), "provider": provider,
            "dtype": case.dtype_name, "mode": case.mode, "median_ms": None, "p20_ms": None, "p80_ms": None,
            "peak_mem_mb": None, "tflops_dense": None, "tflops_useful": None, "speedup_vs_best_baseline": None,
            "host_us": None, "correct": None, "note": ""}


def make_step(runner, xs: list, grad_out, train: bool) -> Callable[[int], None]:
    """One timed step on input xs[i % len(xs)]: forward under no_grad, or forward + backward of
    sum(out * grad_out) with every grad cleared first (nothing accumulates across steps)."""
    forward = runner.fn

    if not train:
        def step(i: int) -> None:
            with torch.no_grad(), runner.step_context():
                forward(xs[i % len(xs)])
        return step

    def step(i: int) -> None:
        x = xs[i % len(xs)]
        x.grad = None
        for p in runner.params:
            p.grad = None
        with runner.step_context():  # the backward too: it runs the same backend
            forward(x).backward(grad_out)
    return step


def judged(result: Result, references: Float64References) -> Judged:
    """`result` with the float64 reference it is judged against (that of its own ReLU masks)."""
    return Judged(result, references.for_run(result))


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(case: Case, providers: list, requested: Optional[list], device: torch.device,
             settings: TimingSettings, out_of_time: Callable[[], bool], progress,
             compile_mode: str = DEFAULT_COMPILE_MODE, check_only: bool = False, seed: int = 0) -> list[dict]:
    """Rows of `providers` on one case (speedups are added by the caller, once every provider of the
    case has run: see add_speedups). check_only: the correctness check alone, nothing timed. seed: of the
    case's weights (seed), inputs (seed + 1) and output grad (seed + 2)."""
    rows = [empty_row(case, p) for p in providers]
    reasons = {p: skip_reason(p, device, case.dtype, requested is not None and p in requested, case.family, case.level)
               for p in providers}
    if out_of_time() or all(reasons.values()):  # nothing will run: spare the setup and the float64 reference
        for row in rows:
            row["note"] = f"skipped: {reasons[row['provider']] or 'time budget spent'}"
        progress.update(len(rows))
        return rows
    try:
        source = make_source(case, seed)
        xs = make_inputs(case, device, INPUT_BUFFERS.get(device.type, 2), seed + 1)
        xs_cl = [x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(case.train) for x in xs]
        grad = make_output_grad(case, device, seed + 2) if case.train else None
        references = Float64References(case, source, xs[0], grad, device)
        yardstick_name = YARDSTICK[(case.family, case.level)]
        yard_runner = build(case.level, yardstick_name, source, case.rates, device, case.train, family=case.family)
        yardstick = judged(run_once(yard_runner.fn, yard_runner.module, xs[0], grad, case.train,
                                    yard_runner.relu_recorder), references)
        del yard_runner
    except Exception as exc:  # noqa: BLE001 - one broken case must not end the run
        for row in rows:
            row["note"] = f"case setup failed: {type(exc).__name__}: {str(exc)[:200]}"
        progress.update(len(rows))
        _release(device)
        return rows

    macs = case.macs()
    compiled_yardstick = None  # the compiled baseline's run, once it ran: see correctness.check
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
        runner = step = run = None
        try:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            baseline_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
            runner = build(case.level, provider, source, case.rates, device, case.train, compile_mode=compile_mode,
                           family=case.family)
            inputs = xs_cl if runner.channels_last else xs
            # fused-auto decides (measures) at its first call: record what it chose, and why
            with runner.step_context(), autotune.recording() as used:
                run = judged(run_once(runner.fn, runner.module, inputs[0], grad, case.train, runner.relu_recorder),
                             references)
            if FUSED_BACKENDS.get(provider) == "auto" and used:
                runner.note = auto_choice_note(used)
                row["auto_choice"] = [d.as_dict() for d in used]
            if provider == yardstick_name:
                correct, detail = True, "yardstick of the error rule"
            else:
                compiled_fused = is_compiled(provider) and not is_baseline(provider)
                verdict = check(run, yardstick, case.dtype, compiled_yardstick if compiled_fused else None)
                correct, detail = verdict.correct, verdict.detail
                if compiled_fused and compiled_yardstick is not None:
                    detail += " (bound from the worse of eager and the compiled baseline)"
            flips = flipped_units(run, references.own.relu_masks)
            if flips:
                units = "unit" if flips == 1 else "units"
                detail += f"; judged with its own ReLU masks ({flips} {units} on the other side of the kink from float64)"
            if is_compiled(provider) and is_baseline(provider):
                compiled_yardstick = run
            row["correct"] = correct
            row["note"] = "; ".join(t for t in (runner.note, detail) if t)
            # A fused provider with a wrong result is never timed. A baseline is PyTorch itself, what users
            # get: it is timed (and stays in the best-baseline comparison) whatever its verdict, which the
            # row reports. (In bf16 fwd+bwd, torch.compile's BatchNorm backward rounds at other points than
            # eager and can land past 2x eager's error, so dropping it would flatter the fused rows.)
            if not check_only and (correct or is_baseline(provider)):
                grad_laid_out = None if grad is None else laid_out_like(grad, run.result.out)
                run = None
                step = make_step(runner, inputs, grad_laid_out, case.train)
                timing = time_step(step, device, settings)
                row.update(median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                           peak_mem_mb=peak_memory_mb(step, device, baseline_bytes),
                           tflops_dense=2 * macs.dense / (timing.median_ms * 1e-3) / 1e12,
                           tflops_useful=2 * macs.useful / (timing.median_ms * 1e-3) / 1e12)
                if case.preset.launch_bound:
                    row["host_us"] = host_time_us(step, device, settings.host_calls)
        except Exception as exc:  # noqa: BLE001 - report the failure, go on with the next provider
            row["correct"] = False
            first_line = (str(exc).strip().splitlines() or [""])[0]
            row["note"] = f"raised {type(exc).__name__}: {first_line[:200]}"
        finally:
            runner = step = run = None
            if row["provider"].endswith("-compile"):
                torch._dynamo.reset()
            _release(device)
        progress.update(1)
    return rows


def add_speedups(rows: list[dict]) -> None:
    """speedup_vs_best_baseline = best timed baseline's median / the row's median (baselines too), for
    the rows of one case. Each timed row also gets "speedup_baselines": the baselines that were timed
    (so a speedup measured without, say, the compiled baseline says so). Idempotent."""
    timed = [r for r in rows if is_baseline(r["provider"]) and r["median_ms"] is not None]
    for row in rows:
        row["speedup_vs_best_baseline"] = None
        row.pop("speedup_baselines", None)
    if not timed:
        return
    best = min(r["median_ms"] for r in timed)
    for row in rows:
        if row["median_ms"] is not None:
            row["speedup_vs_best_baseline"] = best / row["median_ms"]
            row["speedup_baselines"] = [r["provider"] for r in timed]


def case_key(row: dict) -> tuple:
    return (row["level"], row["preset"], tuple(row["rates"]), row["dtype"], row["mode"])


def add_all_speedups(rows: list[dict]) -> None:
    """add_speedups on each case's rows."""
    groups: dict = {}
    for row in rows:
        groups.setdefault(case_key(row), []).append(row)
    for group in groups.values():
        add_speedups(group)


class _PlainProgress:
    """Stands in for tqdm where it is not installed: a line on stderr every 10 runs."""

    def __init__(self, total: int, **_) -> None:
        self.total, self.n, self.postfix = total, 0, ""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        print(f"resaspp bench: {self.n}/{self.total} runs", file=sys.stderr, flush=True)

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.n % 10 == 0:
            print(f"resaspp bench: {self.n}/{self.total} runs ({self.postfix})", file=sys.stderr, flush=True)


def resolve_device(name: Optional[str]) -> torch.device:
    if name is None:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda, but no CUDA device is visible (use --device cpu)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# Environment variables that change what is measured; recorded in meta["env"] when set.
RECORDED_ENV = ("RESASPP_AUTO", "RESASPP_CACHE_DIR", "RESASPP_TRITON_AUTOTUNE", "RESASPP_TRITON_KERNEL",
                "RESASPP_TRITON_DGRAD_SEGMENTS", "RESASPP_TRITON_SEPARABLE_TAPS", "RESASPP_CUDA_KERNEL",
                "TRITON_CACHE_AUTOTUNING", "TORCHINDUCTOR_MAX_AUTOTUNE_CONV_BACKENDS",
                "TORCHINDUCTOR_MAX_AUTOTUNE_GEMM_BACKENDS", "TORCHINDUCTOR_COMPILE_THREADS", "CUDA_VISIBLE_DEVICES")


def run(argv) -> int:
    """Runs the suite for command-line arguments `argv`; prints the table, writes the files; exit status.

    Two passes over the cases: every provider except the -compile ones first, then the -compile ones
    (each a max-autotune compile, by far the slowest part), so that a time budget, or a run killed
    from outside, leaves the cheap rows of every case rather than every row of the first cases. The
    .json and .md are rewritten after every case (meta.complete false until the end); the .png at the end.
    """
    try:
        from tqdm import tqdm
    except ImportError:  # a bare image: progress lines instead of a bar
        tqdm = _PlainProgress

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
                                       "w": c.preset.w, "family": c.preset.family} for c in cases}
    meta["compile_mode"] = args.compile_mode
    meta["env"] = {k: os.environ[k] for k in RECORDED_ENV if k in os.environ}
    meta["time_budget_s"] = budget
    meta["complete"] = False
    meta["check_only"] = args.check_only
    meta["seed"] = args.seed
    ceiling = {"bf16_matmul_tflops": None if args.check_only else bf16_matmul_tflops(device, settings)}
    per_case: list[list[dict]] = [[] for _ in cases]
    passes = [lambda p: not is_compiled(p), is_compiled]
    total = sum(len(providers_for(c, args.providers)) for c in cases)

    def document() -> dict:
        rows = [row for case_rows in per_case for row in case_rows]
        add_all_speedups(rows)
        rows.sort(key=lambda row: args.levels.index(row["level"]))  # the report reads level by level (stable)
        meta["elapsed_s"] = round(time.perf_counter() - start, 1)
        return {"meta": meta, "ceiling": ceiling, "rows": rows}

    interrupted = False
    try:
        _run_passes(cases, passes, args, device, settings, out_of_time, per_case, document, tqdm, total)
    except KeyboardInterrupt:  # Ctrl-C, or `timeout --signal=INT`: write what was measured, then stop
        interrupted = True
        meta["interrupted"] = True
        print("resaspp bench: interrupted; writing the rows measured so far", file=sys.stderr)
    meta["complete"] = not interrupted
    doc = document()
    table, paths = write_all(doc, args.out_dir, device, tag=args.tag)
    print(table)
    print("wrote " + ", ".join(str(p) for p in paths))
    if interrupted:
        return 130
    # Exit 1: a fused provider wrong or failed, or a baseline that failed to run (not merely past the rule).
    wrong = [r for r in doc["rows"] if r["correct"] is False
             and (not is_baseline(r["provider"]) or r["note"].startswith("raised"))]
    if any(r["correct"] is False for r in doc["rows"] if is_baseline(r["provider"])):
        print("resaspp bench: some PyTorch baseline failed the error rule (timed anyway; see the table)",
              file=sys.stderr)
    return 1 if wrong else 0


def _run_passes(cases, passes, args, device, settings, out_of_time, per_case, document, tqdm, total) -> None:
    """The cases, pass by pass (see run), with a checkpoint of the .json/.md after every case."""
    from resaspp_ops.bench.report import write_all

    with tqdm(total=total, desc="resaspp bench", unit="run", file=sys.stderr, dynamic_ncols=True) as progress:
        for in_pass in passes:
            for i, case in enumerate(cases):
                all_providers = providers_for(case, args.providers)
                providers = [p for p in all_providers if in_pass(p)]
                if not providers:
                    continue
                per_case[i] += run_case(case, providers, args.providers, device, settings, out_of_time, progress,
                                        compile_mode=args.compile_mode, check_only=args.check_only,
                                        seed=args.seed)
                per_case[i].sort(key=lambda row: all_providers.index(row["provider"]))
                try:  # a checkpoint: what a kill from outside leaves behind
                    write_all(document(), args.out_dir, device, tag=args.tag, plot=False)
                except OSError as exc:
                    print(f"resaspp bench: could not write a checkpoint: {exc}", file=sys.stderr)
