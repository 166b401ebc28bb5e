"""Command-line options of `resaspp bench` (and benchmarks/run.py)."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from resaspp_ops.bench.presets import PRESETS
from resaspp_ops.bench.providers import ALL_PROVIDERS, LEVELS
from resaspp_ops.bench.workloads import DTYPES, MODES

RATE_SETS = ("default", "paper")
# CPU mode runs unattended in CI: a budget keeps it bounded even when asked for everything.
DEFAULT_CPU_BUDGET_S = 300.0


def _choices(allowed):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown value(s) {', '.join(unknown) or repr(text)}; choose from {', '.join(allowed)}")
        return names
    return parse


def _tag(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+-]*", text):
        raise argparse.ArgumentTypeError(f"tag {text!r}: use letters, digits and . _ + - only")
    return text


def default_out_dir() -> Path:
    """benchmarks/results of the checkout the package runs from, else ./benchmarks/results."""
    from resaspp_ops.bench.environment import SOURCE_TREE

    if (SOURCE_TREE / "benchmarks").is_dir() and (SOURCE_TREE / "resaspp_ops").is_dir():
        return SOURCE_TREE / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="resaspp bench",
        description="Time FusedASPP / multi_rate_conv2d against PyTorch on DeepLab's ASPP presets, check their "
                    "results against float64 first, and write <date>_<device>.json/.md/.png.")
    p.add_argument("--device", choices=("cuda", "cpu"), default=None,
                   help="cuda (the default when a GPU is visible) or cpu (scaled-down presets, a smoke test)")
    p.add_argument("--presets", type=_choices(tuple(PRESETS)), default=None,
                   help=f"comma-separated, from {', '.join(PRESETS)} (default: all; with --quick: voc-os16,unet-stare)")
    p.add_argument("--rate-sets", type=_choices(RATE_SETS), default=None,
                   help="default (DeepLab's rates) and/or paper (resolution-aware); default: both, --quick: default")
    p.add_argument("--providers", type=_choices(ALL_PROVIDERS), default=None,
                   help=f"comma-separated, from {', '.join(ALL_PROVIDERS)} (default: all; on the CPU the "
                        "-compile ones only when named here)")
    p.add_argument("--dtypes", type=_choices(tuple(DTYPES)), default=None,
                   help="comma-separated (default: all three on cuda, float32 on cpu; --quick on cuda: bfloat16)")
    p.add_argument("--modes", type=_choices(MODES), default=list(MODES), help="fwd and/or fwd+bwd (default: both)")
    p.add_argument("--levels", type=_choices(LEVELS), default=list(LEVELS),
                   help="module (whole ASPP) and/or branches (the branch convolutions alone); default: both")
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the .json/.md/.png go (default: benchmarks/results of this checkout)")
    p.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help=f"stop starting providers after this long; the rest are reported as skipped "
                        f"(default: none on cuda, {DEFAULT_CPU_BUDGET_S:.0f} s on cpu)")
    p.add_argument("--tag", type=_tag, default=None,
                   help="appended to the file names, <date>_<device>_<tag>.*: keeps apart the files of several "
                        "runs on one day (say, successive calls on a lent GPU)")
    p.add_argument("--compile-mode", default="max-autotune",
                   choices=("max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead", "default"),
                   help="torch.compile mode of the -compile baselines (default: max-autotune, recorded in meta)")
    p.add_argument("--check-only", action="store_true",
                   help="check every provider against float64 and time nothing: a correctness sweep that also "
                        "fills Triton's and Inductor's on-disk compile caches for a timed run after it")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of every case's weights (SEED), inputs (SEED+1) and output grad (SEED+2); default 0")
    p.add_argument("--quick", action="store_true",
                   help="shorter timing, and unless given: presets voc-os16,unet-stare, default rates, "
                        "bfloat16 on cuda")
    return p


def parse(argv) -> argparse.Namespace:
    """Parsed options with the device-dependent defaults filled in (the device is resolved by the caller)."""
    return build_parser().parse_args(list(argv))


def fill_defaults(args: argparse.Namespace, device_type: str) -> argparse.Namespace:
    if args.rate_sets is None:
        args.rate_sets = ["default"] if args.quick else list(RATE_SETS)
    if args.dtypes is None:
        if device_type == "cpu":
            args.dtypes = ["float32"]
        else:
            args.dtypes = ["bfloat16"] if args.quick else list(DTYPES)
    if args.time_budget is None and device_type == "cpu":
        args.time_budget = DEFAULT_CPU_BUDGET_S
    if args.out_dir is None:
        args.out_dir = default_out_dir()
    return args
