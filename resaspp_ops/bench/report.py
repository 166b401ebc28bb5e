"""The run's outputs: the markdown table (stdout and .md), the JSON document and the plot."""
from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path
from typing import Optional

import torch

from resaspp_ops.bench.environment import device_slug
from resaspp_ops.bench.providers import is_baseline

COLUMNS = ("level", "preset", "rates", "provider", "dtype", "mode", "median ms", "p20-p80 ms", "peak MiB",
           "dense TFLOP/s", "useful TFLOP/s", "vs best baseline", "host us", "correct")


def _num(value, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}" if abs(value) < 10 ** digits else f"{value:.0f}"


def _table_row(row: dict) -> str:
    timed = row["median_ms"] is not None
    cells = [row["level"], row["preset"], ",".join(map(str, row["rates"])), row["provider"], row["dtype"],
             row["mode"], _num(row["median_ms"]),
             f"{_num(row['p20_ms'])}-{_num(row['p80_ms'])}" if timed else "-",
             _num(row["peak_mem_mb"], 4), _num(row["tflops_dense"]), _num(row["tflops_useful"]),
             f"{row['speedup_vs_best_baseline']:.2f}x" if row["speedup_vs_best_baseline"] is not None else "-",
             _num(row.get("host_us"), 4),
             "yes" if row["correct"] else "**NO**" if row["correct"] is False else "-"]
    return "| " + " | ".join(cells) + " |"


def markdown(doc: dict) -> str:
    """The report as markdown: a header with the run's metadata, the table, then skips and failures."""
    meta, rows = doc["meta"], doc["rows"]
    commit = (meta["commit"] or "unknown")[:12] + (" (dirty tree)" if meta.get("dirty") else "")
    lines = [
        f"## resaspp bench: {meta['device']}, {meta['date']}",
        "",
        f"Command: `{meta.get('command', '')}`  ",
        f"torch {meta['torch']}, triton {meta['triton']}, CUDA {meta['cuda']}, commit {commit}  ",
        _ceiling_line(doc),
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += [_table_row(r) for r in rows if r["correct"] is not None]
    auto = sorted({f"{r['dtype']}: {r['note'].split(';')[0]}" for r in rows
                   if r["provider"].startswith("fused-auto") and r["note"].startswith("auto ->")})
    if auto:
        lines += ["", "fused-auto ran " + ", ".join(auto) + "."]
    skipped = Counter(f"{r['provider']}: {r['note'].removeprefix('skipped: ')}" for r in rows if r["correct"] is None)
    if skipped:
        lines += ["", "Skipped (provider: reason, number of cases):", ""]
        lines += [f"- {what} ({count})" for what, count in skipped.items()]
    missing = Counter()
    for key in dict.fromkeys(_case_key(r) for r in rows):
        mine = [r for r in rows if _case_key(r) == key]
        used = next((r["speedup_baselines"] for r in mine if r.get("speedup_baselines")), None)
        if used is not None:  # baselines this run was asked for that were not timed on this case
            missing.update(r["provider"] for r in mine if is_baseline(r["provider"]) and r["provider"] not in used)
    if missing:
        lines += ["", "Speedups measured without some baselines (baseline: number of cases):", ""]
        lines += [f"- {b} ({count})" for b, count in missing.items()]
    if not meta.get("complete", True):
        lines += ["", "**Incomplete run** (a checkpoint: the run was still going, or was stopped)."]
    failed = [r for r in rows if r["correct"] is False]
    if failed:
        lines += ["", "Wrong or failed (fused providers: never timed; PyTorch baselines: timed all the same):", ""]
        lines += [f"- {r['level']} {r['preset']} r{','.join(map(str, r['rates']))} {r['provider']} {r['dtype']} "
                  f"{r['mode']}: {r['note']}" for r in failed]
    return "\n".join(lines) + "\n"


def _ceiling_line(doc: dict) -> str:
    tflops = doc["ceiling"]["bf16_matmul_tflops"]
    if tflops is None:
        return "Correctness check only (--check-only): nothing was timed."
    return (f"Ceiling: bf16 matmul {tflops:.3g} TFLOP/s, measured in this run. TFLOP/s count 2 FLOPs per MAC; "
            "fwd+bwd counts 3x the forward's MACs. Useful = taps inside the image.")


def _case_key(row: dict) -> tuple:
    return (row["level"], row["preset"], tuple(row["rates"]), row["dtype"], row["mode"])


def file_stem(doc: dict, device: torch.device, tag: Optional[str] = None) -> str:
    """<date>_<device>[_<tag>]: file-name safe whatever the device is called (spaces, slashes)."""
    return f"{doc['meta']['date'][:10]}_{device_slug(device)}" + (f"_{tag}" if tag else "")


def write_all(doc: dict, out_dir: Path, device: torch.device, tag: Optional[str] = None,
              plot: bool = True) -> tuple[str, list[Path]]:
    """Writes <stem>.json, .md and (plot) .png under out_dir; returns (the markdown, the paths written).

    The plot needs matplotlib: without it (or if it fails) the .png is left out with a message, and
    the .json and .md, written first, stand."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / file_stem(doc, device, tag)
    table = markdown(doc)
    # with_name, not with_suffix: a tag such as "run.2" must not lose its ".2"
    paths = [stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".md")]
    paths[0].write_text(json.dumps(doc, indent=1) + "\n")
    paths[1].write_text(table)
    if plot:
        png = stem.with_name(stem.name + ".png")
        try:
            from resaspp_ops.bench.plot import plot_speedups

            plot_speedups(doc, png)
            paths.append(png)
        except Exception as exc:  # noqa: BLE001 - the numbers are written; the picture is optional
            print(f"resaspp bench: no plot ({type(exc).__name__}: {exc})", file=sys.stderr)
    return table, paths
