"""Tiny segmentation networks of output stride 16 for the ERF tests (and `resaspp erf --model erf_models:tiny`).

    [N, 3, H, W] -> Conv 4x4 stride 4 -> ReLU -> Conv 4x4 stride 4 -> ReLU     [N, C, H/16, W/16]
                 -> FusedASPP(C, rates, Co) -> Conv 1x1 (K classes)           [N, K, H/16, W/16]
                    (FusedSeparableASPP with separable=True)
                 -> bilinear x16 upsampling                                    [N, K, H, W]

The strided convs do not overlap, so each feature unit sees exactly one 16 x 16 pixel block and the
star's points are sharp 32 x 32 px squares (2 x 2 blocks mixed by the upsampling); rates of at
least 3 keep neighbouring squares apart. With `positive=True` every weight is positive and the stem's
biases are large enough that each ReLU passes on inputs in [0, 1] and on ImageNet-normalised ones:
the network is linear, every path to the central output unit has a positive gradient, and the star
shows from a single image.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from resaspp_ops import FusedASPP, FusedSeparableASPP


class TinySegNet(nn.Module):
    """Output stride 16: a two-conv patchify stem, an ASPP, a 1x1 classifier and x16 bilinear upsampling."""

    output_stride = 16

    def __init__(self, rates=(6, 12, 18), channels: int = 4, aspp_channels: int = 4, num_classes: int = 2, *,
                 positive: bool = True, backend: str = "auto", seed: int = 0, separable: bool = False) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, channels, 4, stride=4), nn.ReLU(),
                                  nn.Conv2d(channels, channels, 4, stride=4), nn.ReLU())
        self.aspp = (FusedSeparableASPP if separable else FusedASPP)(channels, rates, aspp_channels, backend=backend)
        self.classifier = nn.Conv2d(aspp_channels, num_classes, 1)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in self.named_parameters():
                if p.dim() > 1:  # conv weights: scaled by fan-in so activations stay O(1)
                    fan_in = p[0].numel()
                    w = torch.rand(p.shape, generator=gen) if positive else torch.randn(p.shape, generator=gen)
                    p.copy_((w + 0.5 if positive else w) / fan_in ** 0.5)
                elif "aspp" not in name:  # conv biases (BatchNorms keep their identity init)
                    p.copy_(torch.rand(p.shape, generator=gen) + 8.0 if positive else
                            torch.randn(p.shape, generator=gen) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.classifier(self.aspp(self.stem(x)))
        return F.interpolate(y, scale_factor=self.output_stride, mode="bilinear", align_corners=False)


def tiny() -> nn.Module:
    """The CLI test's factory: rates (4, 8, 12), so a 512 x 512 input holds the whole star (384 + 32 px)."""
    return TinySegNet(rates=(4, 8, 12))


class DictOut(nn.Module):
    """Wraps a model to return {"out": logits} like torchvision's segmentation models."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"out": self.model(x)}


def tiny_torchvision() -> nn.Module:
    """`tiny` with torchvision's own ASPP in place of FusedASPP (the CLI converts it unless --no-convert)."""
    from resaspp_ops.nn import revert_aspp

    return revert_aspp(tiny())


def tiny_smp_separable() -> nn.Module:
    """`tiny` with segmentation_models_pytorch's separable ASPP (the CLI converts it to FusedSeparableASPP)."""
    from resaspp_ops.nn import revert_aspp

    return revert_aspp(TinySegNet(rates=(4, 8, 12), separable=True))
