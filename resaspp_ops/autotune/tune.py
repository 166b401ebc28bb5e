"""`resaspp tune`: fill backend="auto"'s cache ahead of time, so that training and inference never measure (and
torch.compile, torch.export and CUDA graphs, which never measure, find the decisions).

    resaspp tune --model deeplabv3_resnet50 --input-size 513 769 --batch-size 8 --dtype bfloat16
    resaspp tune --model mypkg.models:build --input-size 512x1024 --batch-size 2 4 --mode train

--model is a torchvision segmentation builder (built with weights=None, weights_backbone=None) or
module:factory, as `resaspp erf`'s. Its ASPP modules become the fused ones (convert_aspp, backend="auto"), then
for every input size and batch size it runs forward and backward once in training mode (each fused op's forward,
input grad and weight grad) and forward once in eval mode (the folded-BatchNorm epilogue: other keys), under
torch.autocast for float16 / bfloat16, with RESASPP_AUTO=measure. The decisions go to the cache file
(docs/auto.md) and a report to stdout: which candidate won each key, by how much, and what was excluded.
"""
from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import sys
import warnings

from resaspp_ops.cli_args import CommandError, build_model, hw_arg, positive_int_arg

DTYPES = ("float32", "float16", "bfloat16")
MODES = ("train", "eval", "both")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resaspp tune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="torchvision segmentation builder (e.g. deeplabv3_resnet50) or module:factory")
    p.add_argument("--input-size", type=hw_arg, nargs="+", required=True, help="one or more S or HxW")
    p.add_argument("--batch-size", type=positive_int_arg, nargs="+", default=[1], help="one or more (default 1)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="bfloat16 / float16 (under torch.autocast) or float32 (default: bfloat16 on cuda, "
                        "float32 on cpu)")
    p.add_argument("--mode", choices=MODES, default="both",
                   help="train (forward and backward), eval (forward, folded BatchNorm) or both (default)")
    p.add_argument("--device", default=None, help="cuda (default when visible), cuda:1, cpu ...")
    p.add_argument("--num-classes", type=int, default=21, help="classes of a torchvision model (default 21)")
    p.add_argument("--channels-last", action="store_true", help="feed channels_last input (as the model will be)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _progress(total: int, enabled: bool):
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc="resaspp tune", unit="shape", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    return _Lines(total, enabled)


class _Lines:
    """A line on stderr a shape, where tqdm is not installed (or nothing with --no-progress)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.n, self.enabled = total, 0, enabled

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass

    def set_postfix_str(self, text: str, refresh: bool = False) -> None:
        self.postfix = text

    def update(self, k: int = 1) -> None:
        self.n += k
        if self.enabled:
            print(f"resaspp tune: {self.n}/{self.total} {self.postfix}", file=sys.stderr, flush=True)


def _scalar(out) -> "object":
    """A scalar to differentiate from a model's output (a tensor, or a dict / tuple of them, as torchvision's)."""
    import torch

    if isinstance(out, torch.Tensor):
        return out.float().sum()
    values = out.values() if isinstance(out, dict) else out
    return sum(_scalar(v) for v in values if isinstance(v, (torch.Tensor, dict, list, tuple)))


def _step(model, x, train: bool, autocast) -> None:
    import torch

    model.train(train)
    with torch.set_grad_enabled(train), autocast():
        out = model(x)
    if train:
        _scalar(out).backward()
        model.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _measuring():
    """RESASPP_AUTO=measure inside the block, whatever the device, and as it was after it: `resaspp tune` runs
    in-process too (tests, notebooks), where a changed variable would outlive the command."""
    previous = os.environ.get("RESASPP_AUTO")
    os.environ["RESASPP_AUTO"] = "measure"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("RESASPP_AUTO", None)
        else:
            os.environ["RESASPP_AUTO"] = previous


def run(args) -> int:
    with _measuring():
        return _run(args)


def _run(args) -> int:
    import torch

    from resaspp_ops import autotune
    from resaspp_ops.autotune.cache import cache_path
    from resaspp_ops.nn import FusedASPP, FusedDepthwiseSeparableASPP, FusedSeparableASPP, convert_aspp

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CommandError("--device cuda, but no CUDA device is visible")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model = build_model(args.model, args.num_classes)
    with warnings.catch_warnings():  # nothing converted is an error here, said below
        warnings.filterwarnings("ignore", message="convert_aspp found no module")
        convert_aspp(model, backend="auto")
    fused = [m for m in model.modules() if isinstance(m, (FusedASPP, FusedSeparableASPP, FusedDepthwiseSeparableASPP))]
    if not fused:
        raise CommandError(f"--model {args.model!r} has no ASPP that convert_aspp could fuse: nothing to tune")
    model = model.to(device)
    modes = ("train", "eval") if args.mode == "both" else (args.mode,)
    shapes = list(itertools.product(args.input_size, args.batch_size, modes))

    def autocast():
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    failures = []
    gen = torch.Generator().manual_seed(0)
    with autotune.recording() as used, _progress(len(shapes), not args.no_progress) as bar:
        for (h, w), n, mode in shapes:
            bar.set_postfix_str(f"{n}x3x{h}x{w} {mode}", refresh=False)
            x = torch.randn(n, 3, h, w, generator=gen).to(device)
            if args.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            try:
                _step(model, x, mode == "train", autocast)
            except Exception as exc:  # noqa: BLE001 - report the shape, go on with the next
                failures.append(f"{n}x3x{h}x{w} {mode}: {type(exc).__name__}: {exc}")
            bar.update(1)
    print(f"resaspp tune: {len(used)} decisions for {args.model} on {device} ({str(dtype).replace('torch.', '')}); "
          f"cache file {cache_path()}")
    for decision in used:
        print("  " + decision.summary())
    for failure in failures:
        print(f"resaspp tune: failed: {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CommandError as exc:
        print(f"resaspp tune: error: {exc}", file=sys.stderr)
        return 2
