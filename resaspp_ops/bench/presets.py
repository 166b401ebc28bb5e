"""Benchmark presets: the seeds' ASPP settings of DESIGN.md section 5, and their CPU-sized versions."""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Preset:
    """One ASPP workload: input x [n, c, h, w], branch width co, and named atrous rate sets.

    rate_sets maps "default" (DeepLab's rates) and, where the seed paper gives one, "paper" (the
    resolution-aware rates) to a tuple of rates. launch_bound: a workload whose kernels take microseconds,
    so that the host's time to issue a call is its cost; the suite reports that host time for it.
    family: "aspp" (torchvision's ASPP, multi_rate_conv2d) or "separable" (DeepLabV3+'s separable ASPP as in
    segmentation_models_pytorch, multi_rate_separable_conv2d; see bench/separable.py).
    """

    name: str
    crop: str
    output_stride: int
    n: int
    c: int
    co: int
    h: int
    w: int
    rate_sets: dict
    launch_bound: bool = False
    family: str = "aspp"

    def shape(self) -> tuple[int, int, int, int]:
        return (self.n, self.c, self.h, self.w)


PRESETS = {p.name: p for p in (
    Preset("voc-os16", "513", 16, 8, 2048, 256, 33, 33, {"default": (6, 12, 18), "paper": (5, 10, 15)}),
    Preset("voc-os8", "513", 8, 4, 2048, 256, 65, 65, {"default": (12, 24, 36), "paper": (10, 20, 30)}),
    Preset("cityscapes-os8", "769", 8, 2, 2048, 256, 97, 97, {"default": (12, 24, 36), "paper": (15, 30, 45)}),
    Preset("cityscapes-wide", "512x1024", 8, 2, 2048, 256, 64, 128, {"default": (12, 24, 36)}),
    Preset("isaid-os8", "896", 8, 2, 2048, 256, 112, 112, {"default": (12, 24, 36), "paper": (18, 36, 54)}),
    Preset("unet-stare", "128", 16, 4, 64, 16, 8, 8, {"default": (12, 24, 36), "paper": (1, 2, 3)}, launch_bound=True),
    # DeepLabV3+ (separable ASPP); smp's DeepLabV3Plus uses rates (12, 24, 36) at both strides.
    Preset("v3plus-os16", "512", 16, 8, 2048, 256, 32, 32, {"default": (12, 24, 36), "paper": (5, 10, 15)},
           family="separable"),
    Preset("v3plus-os8", "512", 8, 4, 2048, 256, 64, 64, {"default": (12, 24, 36), "paper": (10, 20, 30)},
           family="separable"),
)}

# --quick without --presets: the smallest seed setting and the one where padding dominates.
QUICK_PRESETS = ("voc-os16", "unet-stare")

# CPU mode keeps every preset's map size and rates (so the share of padding taps, the thing the fused
# op exploits, is the GPU preset's) and shrinks the batch and channels so that a run takes seconds:
# N = 2 (the smallest batch training-mode BatchNorm accepts), C / 32 and Co / 8, at least 16 and 8.
# The separable presets halve their channels once more (C / 64, Co / 16): the CPU's depthwise convolutions,
# their backward above all, are slow enough that at C / 32 they alone would push the default CPU run past
# its time budget.
CPU_BATCH = 2
CPU_CHANNEL_DIVISOR = {"aspp": 32, "separable": 64}
CPU_BRANCH_DIVISOR = {"aspp": 8, "separable": 16}


def cpu_sized(preset: Preset) -> Preset:
    """The preset with CPU-mode batch and channels (same map and rates)."""
    return replace(preset, n=CPU_BATCH, c=max(16, preset.c // CPU_CHANNEL_DIVISOR[preset.family]),
                   co=max(8, preset.co // CPU_BRANCH_DIVISOR[preset.family]))


def select(names, device_type: str, rate_set_names, quick: bool) -> list[tuple[Preset, str, tuple]]:
    """[(preset, rate set name, rates)] for the requested preset names (None: all, or the quick ones)."""
    if names is None:
        names = list(QUICK_PRESETS if quick else PRESETS)
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise ValueError(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    out = []
    for name in names:
        preset = PRESETS[name] if device_type == "cuda" else cpu_sized(PRESETS[name])
        for set_name in rate_set_names:
            if set_name in preset.rate_sets:
                out.append((preset, set_name, preset.rate_sets[set_name]))
    return out
