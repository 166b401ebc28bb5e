"""The `resaspp` command: rates, info, bench, erf, tune.

    resaspp rates --input-size 769 --output-stride 8     the guideline's rates and the star's extent
    resaspp info                                         versions, the build, the backends, auto's decisions
    resaspp bench ...                                    the benchmark suite (resaspp_ops.bench)
    resaspp erf ...                                      effective receptive field (resaspp_ops.erf)
    resaspp tune ...                                     fill backend="auto"'s cache (resaspp_ops.autotune.tune)
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

from resaspp_ops.cli_args import size_arg


def cmd_rates(args) -> int:
    from resaspp_ops.rates import effective_size, fov_size, resolution_aware_rate, resolution_aware_rates

    try:
        r_star = resolution_aware_rate(args.input_size, args.output_stride)
        rates = resolution_aware_rates(args.input_size, args.output_stride)
    except ValueError as exc:
        print(f"resaspp rates: error: {exc}", file=sys.stderr)
        return 2
    size = effective_size(args.input_size)
    if isinstance(args.input_size, tuple):
        print(f"crop {args.input_size[0]}x{args.input_size[1]}: FusedASPP takes one rate per branch for both "
              f"axes, so the guideline uses the shorter side S = {size}")
    print(f"input size S = {size}, output stride OS = {args.output_stride}")
    print(f"rate r* = (S - 32) / (6 * OS) = {r_star:.2f}")
    print(f"rates   = {rates}")
    print(f"FOV     = 6 * r * OS + 32 = {fov_size(rates[0], args.output_stride)} px "
          f"(unrounded: {fov_size(r_star, args.output_stride):.0f} px)")
    return 0


def cmd_info(args) -> int:
    import torch

    import resaspp_ops
    from resaspp_ops import backend as B
    from resaspp_ops.backend import cuda as cuda_backend

    print(f"resaspp_ops {resaspp_ops.__version__}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    try:
        import triton

        print(f"triton {triton.__version__}")
    except ImportError:
        print("triton: not installed")
    gpu = torch.cuda.is_available()
    print(f"CUDA device: {torch.cuda.get_device_name() if gpu else 'none visible'}")
    ext = cuda_backend.extension()
    BUILD_CONFIG = cuda_backend.build_record()
    if ext is not None and BUILD_CONFIG:
        code = f"; code: {', '.join(BUILD_CONFIG['code'])}" if "code" in BUILD_CONFIG else ""
        print(f"resaspp_ops._C: built for TORCH_CUDA_ARCH_LIST={BUILD_CONFIG['arch_list']}{code} "
              f"with {BUILD_CONFIG['cuda_home']} (torch {BUILD_CONFIG['torch']})")
    elif ext is not None:
        print("resaspp_ops._C: built (no build record)")
    else:
        print(f"resaspp_ops._C: not available: {cuda_backend.availability(torch.device('cuda'), torch.float32)[1]}")
    if ext is not None:
        print(cuda_backend.kernel_status())
    for family, title in ((B.MULTI_RATE, "backends"), (B.SEPARABLE, f"{B.SEPARABLE} (separable ASPP) backends")):
        for device in ("cpu", "cuda"):
            print(f"{title} for {device} tensors:")
            for name in B.NAMES:
                ok, reason = B.status(name, device, family=family)
                print(f"  {name:10s} {'available' if ok else 'unavailable'}: {reason}")
    for dtype, short in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        choice, why = B.auto_choice("cuda", dtype)
        print(f"auto for a CUDA {short} tensor: {choice} ({why})")
    choice, why = B.auto_choice("cuda", torch.bfloat16, B.SEPARABLE)
    print(f"auto for a CUDA bf16 tensor, separable op: {choice} ({why})")
    print_auto_decisions()
    print(f"ONNX export (torch.onnx.export(..., dynamo=True)): {onnx_export_status()}")
    return 0


def print_auto_decisions() -> None:
    """backend="auto"'s mode, its cache file and the decisions there for this environment (docs/auto.md)."""
    from resaspp_ops.autotune import auto_choices
    from resaspp_ops.autotune.cache import cache_path
    from resaspp_ops.autotune.key import environment
    from resaspp_ops.autotune.policy import describe_mode

    print(f"backend='auto' measures: {describe_mode()}")
    print(f"auto decisions file: {cache_path()}")
    decisions = auto_choices()
    if not decisions:
        print(f"auto decisions for {environment()}: none yet (`resaspp tune` makes them ahead of time)")
        return
    print(f"auto decisions for {environment()} ({len(decisions)}):")
    for decision in sorted(decisions, key=lambda d: d.key.text()):
        print(f"  {decision.summary()}")


def onnx_export_status() -> str:
    """Whether torch.onnx.export(dynamo=True) can run here, and if not, what to install."""
    import importlib.util

    missing = [m for m in ("onnxscript", "onnx") if importlib.util.find_spec(m) is None]
    if missing:
        return f"needs {', '.join(missing)}: pip install 'resaspp_ops[onnx]'"
    return "available (the fused ops export as standard ONNX Conv/Concat/Mul/Add/Relu nodes)"


# Subcommands with parsers of their own: `main` hands them the rest of the command line untouched
# (argparse.REMAINDER would refuse a first argument that starts with "--").
DELEGATES = {"bench": "resaspp_ops.bench", "erf": "resaspp_ops.erf.cli", "tune": "resaspp_ops.autotune.tune"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resaspp", description="resaspp_ops: fused ASPP kernels and tools")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("rates", help="the resolution-aware atrous rates for a crop size and output stride")
    p.add_argument("--input-size", type=size_arg, required=True, help="crop size S, or HxW")
    p.add_argument("--output-stride", type=int, required=True, help="backbone output stride (8 or 16)")
    p.set_defaults(func=cmd_rates)
    p = sub.add_parser("info", help="versions, the CUDA build and the available backends")
    p.set_defaults(func=cmd_info)
    sub.add_parser("bench", help="the benchmark suite (resaspp bench --help)")
    sub.add_parser("erf", help="effective receptive field of a model (resaspp erf --help)")
    sub.add_parser("tune", help="measure backend='auto''s choices for a model ahead of time (resaspp tune --help)")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in DELEGATES:
        return importlib.import_module(DELEGATES[argv[0]]).main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `resaspp info | head`: the reader has what it wanted
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes stdout at exit
        return 0


if __name__ == "__main__":
    sys.exit(main())
