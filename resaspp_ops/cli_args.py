"""What the `resaspp` subcommands share: the user-facing error, argument types, and the model a command works
on (`--model NAME_OR_module:factory`). Used by cli.py (rates), erf/cli.py (erf) and autotune/tune.py (tune)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 2."""


def size_arg(text: str):
    """S or HxW (also H,W) -> S, or (H, W)."""
    parts = text.lower().replace("x", ",").split(",")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected S or HxW, got {text!r}") from None
    if len(sizes) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected S or HxW, got {text!r}")
    return sizes[0] if len(sizes) == 1 else tuple(sizes)


def hw_arg(text: str) -> tuple[int, int]:
    """S or HxW -> (H, W), both positive."""
    size = size_arg(text)
    size = (size, size) if isinstance(size, int) else size
    if min(size) <= 0:
        raise argparse.ArgumentTypeError(f"sizes must be positive, got {text!r}")
    return size


def positive_int_arg(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_model(spec: str, num_classes: int):
    """The nn.Module `--model spec` names: a torchvision segmentation builder (built with weights=None,
    weights_backbone=None: nothing is downloaded) or module:factory, a callable taking no arguments (imported with
    the current directory on sys.path); CommandError with the reason otherwise."""
    from torch import nn

    if ":" in spec:
        module_name, _, attr = spec.partition(":")
        if "" not in sys.path and str(Path.cwd()) not in sys.path:  # the console script leaves cwd out
            sys.path.insert(0, str(Path.cwd()))
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise CommandError(f"cannot load --model {spec!r}: {exc}") from None
        model = factory()
    else:
        try:
            from torchvision.models import segmentation
        except ImportError:
            raise CommandError("torchvision is needed for --model NAME (or use module:factory)") from None
        builder = getattr(segmentation, spec, None)
        if not callable(builder) or spec.startswith("_"):
            raise CommandError(f"unknown torchvision segmentation model {spec!r} (e.g. deeplabv3_resnet50, "
                               f"deeplabv3_resnet101, deeplabv3_mobilenet_v3_large), or give module:factory")
        model = builder(weights=None, weights_backbone=None, num_classes=num_classes)
    if not isinstance(model, nn.Module):
        raise CommandError(f"--model {spec!r} did not return an nn.Module (got {type(model).__name__})")
    return model
