"""`resaspp erf`: the ERF of a segmentation model, its Gaussian fit and star, as a PNG (and JSON).

    resaspp erf --model deeplabv3_resnet50 --input-size 1024 --random 4 --out erf.png --json fit.json
    resaspp erf --model mypkg.models:build --checkpoint ckpt.pth --input-size 769 --images val/ --out erf.png

--model is a torchvision segmentation builder (built with weights=None, weights_backbone=None:
nothing is downloaded) or module:factory, a callable taking no arguments (the module is imported
with the current directory on sys.path). Unless --no-convert, its ASPP modules become FusedASPP
(convert_aspp; separable ASPPs of segmentation_models_pytorch and VainF/DeepLabV3Plus-Pytorch become
FusedSeparableASPP). The ASPP's rates (also of separable ASPPs) and the output stride are read off the model
during the first forward pass (--rates / --output-stride override them). --images and --random images are
ImageNet-normalised as torchvision's models expect (--random: uniform random pixels).
The picture shows the ERF on a linear and a log scale, blurred by OS / 2 px (--smooth): a randomly
initialised network's ERF is pixel noise around the star. The fit and the star measurement use
the unblurred ERF (the measurement smooths its own 1-D profiles by OS / 2).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

from resaspp_ops.cli_args import CommandError, build_model, hw_arg

# torchvision's ImageNet normalisation, which its segmentation models expect.
_MEAN = (0.485, 0.456, 0.406)
_STD = (0.229, 0.224, 0.225)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm"}


def _rates(text: str) -> tuple[int, ...]:
    try:
        rates = tuple(int(r) for r in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError(f"rates must be positive, got {text!r}")
    return rates


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="resaspp erf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="torchvision segmentation builder (e.g. deeplabv3_resnet50) or module:factory")
    p.add_argument("--checkpoint", type=Path, help="state_dict to load (also {'model': ...} / {'state_dict': ...})")
    p.add_argument("--num-classes", type=int, default=21, help="classes of a torchvision model (default 21)")
    p.add_argument("--input-size", type=hw_arg, required=True, help="S or HxW of the input images")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--images", type=Path, help="folder of images (resized and centre-cropped to the input size)")
    src.add_argument("--random", type=int, metavar="N", help="N images of uniform random pixels")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", type=Path, required=True, help="the PNG to write")
    p.add_argument("--json", type=Path, help="write the fit and star measurement here")
    p.add_argument("--save-erf", type=Path, help="also save the ERF map [H, W] here (torch.save)")
    p.add_argument("--smooth", type=float, help="Gaussian blur sigma (px) of the picture only "
                   "(default: OS / 2 when the output stride is known, else none; 0: none)")
    p.add_argument("--backend", default="auto", help="FusedASPP backend: auto, reference, cuda, triton")
    p.add_argument("--no-convert", action="store_true", help="keep the model's own ASPP (no FusedASPP)")
    p.add_argument("--rates", type=_rates, help="atrous rates for the star, e.g. 6,12,18 (default: the model's)")
    p.add_argument("--output-stride", type=int, help="output stride for the star (default: measured)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when visible)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the model's random initialisation (before --checkpoint) and of --random")
    p.add_argument("--scale", choices=("both", "linear", "log"), default="both",
                   help="colour scale of the picture; both: linear and log side by side (default)")
    p.add_argument("--no-progress", action="store_true")
    return p


def _load_checkpoint(model: nn.Module, path: Path) -> None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable file, pickled objects, ...
        raise CommandError(f"cannot read --checkpoint {path}: {exc}") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}  # saved from DistributedDataParallel
    own = model.state_dict()
    # torchvision checkpoints may carry an auxiliary head the model was built without
    state = {k: v for k, v in state.items() if k in own or not k.startswith("aux_classifier.")}
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CommandError(f"--checkpoint {path} does not fit the model: {exc}") from None


class _Batches:
    """Batches [n, 3, H, W] of normalised images from files or of random pixels; has a length for tqdm."""

    def __init__(self, size: tuple[int, int], batch_size: int, files=None, count: int = 0, seed: int = 0):
        self.size, self.batch_size, self.files, self.seed = size, batch_size, files, seed
        self.count = len(files) if files is not None else count

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def _load(self, path: Path) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        h, w = self.size
        with Image.open(path) as im:
            im = im.convert("RGB")
            scale = max(h / im.height, w / im.width)  # cover the crop, then cut its centre
            rw, rh = max(w, round(im.width * scale)), max(h, round(im.height * scale))
            im = im.resize((rw, rh), Image.BILINEAR)
            left, top = (rw - w) // 2, (rh - h) // 2
            im = im.crop((left, top, left + w, top + h))
            return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0).permute(2, 0, 1)  # [3, H, W]

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        mean, std = torch.tensor(_MEAN).view(1, 3, 1, 1), torch.tensor(_STD).view(1, 3, 1, 1)
        for start in range(0, self.count, self.batch_size):
            n = min(self.batch_size, self.count - start)
            if self.files is not None:
                pixels = torch.stack([self._load(f) for f in self.files[start:start + n]])
            else:
                pixels = torch.rand((n, 3, *self.size), generator=gen)
            yield (pixels - mean) / std


def _aspp_modules(model: nn.Module) -> list[nn.Module]:
    """The ASPP modules of the model whose rates can be read off (fused, torchvision-style or separable)."""
    from resaspp_ops.nn.structure import rates_of

    return [m for m in model.modules() if rates_of(m) is not None]


def _finite(value):
    """JSON has no NaN: None instead, recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def run(args) -> int:
    from resaspp_ops.erf import effective_receptive_field, fit_gaussian_2d, measure_star, render_erf
    from resaspp_ops.nn import FusedASPP, FusedDepthwiseSeparableASPP, FusedSeparableASPP, convert_aspp

    from resaspp_ops.nn.structure import rates_of

    FUSED_MODULES = (FusedASPP, FusedSeparableASPP, FusedDepthwiseSeparableASPP)

    if args.batch_size <= 0 or (args.random is not None and args.random <= 0):
        raise CommandError("--batch-size and --random must be positive")
    h, w = args.input_size
    if args.images is not None:
        if not args.images.is_dir():
            raise CommandError(f"--images {args.images} is not a folder")
        files = sorted(f for f in args.images.iterdir() if f.suffix.lower() in _IMAGE_SUFFIXES)
        if not files:
            raise CommandError(f"no images ({', '.join(sorted(_IMAGE_SUFFIXES))}) in {args.images}")
        images = _Batches((h, w), args.batch_size, files=files)
    else:
        images = _Batches((h, w), args.batch_size, count=args.random, seed=args.seed)

    with torch.random.fork_rng(devices=[]):  # seeded: a random-init model is the same run to run
        torch.manual_seed(args.seed)
        model = build_model(args.model, args.num_classes)
    if args.checkpoint is not None:
        _load_checkpoint(model, args.checkpoint)
    if not args.no_convert and not any(isinstance(m, FUSED_MODULES) for m in model.modules()):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = convert_aspp(model, backend=args.backend)
        if caught:
            print("note: no ASPP with torchvision's or a separable ASPP's structure to convert; the model runs as it is")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = model.to(device).eval()

    # Read the ASPP's rates and its input's size (hence the output stride) during the first forward.
    aspps = _aspp_modules(model)
    seen = {}

    def hook(module, inputs):
        seen.setdefault("shape", tuple(inputs[0].shape[2:]))

    handle = aspps[0].register_forward_pre_hook(hook) if aspps else None
    if len(aspps) > 1:
        print(f"note: {len(aspps)} ASPP modules; the star uses the first")
    print(f"ERF of {args.model} on {images.count} {'random' if args.random else 'folder'} image(s) of {h}x{w} "
          f"({device}, ASPP: {type(aspps[0]).__name__ if aspps else 'none found'})")
    try:
        erf = effective_receptive_field(model, images, progress=not args.no_progress)
    finally:
        if handle is not None:
            handle.remove()

    rates = args.rates or (rates_of(aspps[0]) if aspps else None)
    stride = args.output_stride
    if stride is None and "shape" in seen:
        stride = max(1, round(h / seen["shape"][0]))
        print(f"output stride {stride} (the ASPP's input is {seen['shape'][0]}x{seen['shape'][1]})")
    if rates is not None and stride is None:
        print("note: output stride unknown (give --output-stride); no star overlay or measurement")
        rates = None

    fit = fit_gaussian_2d(erf)
    print(f"Gaussian fit: centre (x, y) = ({fit.cx:.1f}, {fit.cy:.1f}) px, sigma_x = {fit.sigma_x:.1f} px, "
          f"sigma_y = {fit.sigma_y:.1f} px, amplitude = {fit.amplitude:.3g}, r2 = {fit.r2:.3f}")
    report = {"model": args.model, "input_size": [h, w], "images": images.count,
              "source": str(args.images) if args.images is not None else "random",
              "rates": list(rates) if rates else None, "output_stride": stride, "fit": fit.as_dict(), "star": None}
    title = f"ERF of {args.model}, {images.count} image(s), {h}x{w}"
    if rates is not None:
        star = measure_star(erf, rates, stride)
        report["star"] = star.as_dict()
        print(f"star: rates {tuple(rates)}, OS {stride}: outer points {star.measured:.1f} px apart "
              f"(horizontal {star.measured_horizontal:.1f}, vertical {star.measured_vertical:.1f}), "
              f"predicted 2 * {max(rates)} * {stride} = {star.predicted:.0f} px: "
              f"{'agree' if star.agree else 'DO NOT agree'} (tolerance {star.tolerance:g} px, "
              f"peak contrast {star.contrast:.2f})")
        if not star.agree and star.contrast < 0.2:
            print("note: the outer points barely stand out (contrast < 0.2): they merge into the star's arms "
                  "(a backbone whose own ERF is wider than the points' spacing, e.g. a randomly initialised "
                  "deep one) or into noise (use more images)")
        title += f", rates {tuple(rates)}, OS {stride}"
    smooth = args.smooth if args.smooth is not None else (stride / 2 if stride else 0.0)
    if smooth > 0:
        title += f", shown blurred (sigma {smooth:g} px)"
    log_scale = {"both": "both", "linear": False, "log": True}[args.scale]
    render_erf(erf, args.out, rates=rates, output_stride=stride, log_scale=log_scale, title=title, smooth=smooth)
    print(f"wrote {args.out}")
    if args.save_erf is not None:
        torch.save(erf, args.save_erf)
        print(f"wrote {args.save_erf}")
    if args.json is not None:
        args.json.write_text(json.dumps(_finite(report), indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    """Entry point of `resaspp erf`; returns the exit status (2 on a usage error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except CommandError as exc:
        print(f"resaspp erf: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
