"""Dense and useful multiply-accumulate (MAC) counts of ASPP (DESIGN.md section 2), and of DeepLabV3+'s
separable ASPP (separable_branch_macs, separable_module_macs).

Dense counts every tap of every kernel at every output pixel, as a plain convolution computes it.
Useful counts only the taps that read inside the image: a 3x3 tap at offset (dy, dx) is useful at
output (h, w) iff 0 <= h+dy < H and 0 <= w+dx < W. The counts are exact per pixel (no tiling), so
the useful count is a lower bound on the work any kernel must do.

All branch convolutions have stride 1 and padding = dilation = rate, so the output map is H x W.
One MAC is one multiply and one add: FLOPs = 2 * MACs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

# The backward of a convolution is two more convolutions of the same size: the input grad (dgrad)
# and the weight grad (wgrad). Each reads the same taps as the forward, so a tap that is padding
# in the forward is padding in both, and dense and useful counts both scale by 3 for fwd+bwd.
FWD_BWD_FACTOR = 3


@dataclass(frozen=True)
class MacCount:
    """MACs of one forward pass: `dense` (every tap) and `useful` (taps inside the image)."""

    dense: int
    useful: int

    @property
    def useful_fraction(self) -> float:
        return self.useful / self.dense if self.dense else 1.0

    def __add__(self, other: "MacCount") -> "MacCount":
        return MacCount(self.dense + other.dense, self.useful + other.useful)

    def scaled(self, factor: int) -> "MacCount":
        return MacCount(self.dense * factor, self.useful * factor)


def valid_positions(length: int, offset: int) -> int:
    """How many of the `length` output positions of one axis read inside [0, length) at `offset`."""
    return max(0, length - abs(offset))


def atrous_tap_pixels(h: int, w: int, rate: int) -> int:
    """(output pixel, tap) pairs of one 3x3 kernel with dilation `rate` that read inside an h x w map.

    The 3x3 taps are the product of offsets {-rate, 0, rate} on each axis, so the count factors:
    (h + 2 * valid(h, rate)) * (w + 2 * valid(w, rate)).
    """
    rows = sum(valid_positions(h, dy) for dy in (-rate, 0, rate))
    cols = sum(valid_positions(w, dx) for dx in (-rate, 0, rate))
    return rows * cols


def branch_macs(n: int, c: int, co: int, h: int, w: int, rates: Sequence[int]) -> MacCount:
    """MACs of the 1x1 branch and the len(rates) atrous 3x3 branches on x [n, c, h, w] -> [n, (1+B)*co, h, w].

    This is the work of `multi_rate_conv2d` (and of the 1+B separate convolutions it replaces).
    """
    per_channel_pair = n * c * co
    pixels = h * w
    dense = per_channel_pair * pixels * (1 + 9 * len(rates))
    useful = per_channel_pair * (pixels + sum(atrous_tap_pixels(h, w, r) for r in rates))
    return MacCount(dense, useful)


def module_macs(n: int, c: int, co: int, h: int, w: int, rates: Sequence[int]) -> MacCount:
    """MACs of torchvision's whole ASPP: the branches, the image-pooling 1x1 conv and the projection.

    The pooling conv maps the pooled [n, c, 1, 1] to [n, co, 1, 1] (n*c*co MACs); the projection is a
    1x1 conv over the concatenation of all 2+B branches, [n, (2+B)*co, h, w] -> [n, co, h, w], as
    torchvision computes it. Neither has padding taps, so their useful count equals their dense one.
    The average pooling and BatchNorms are not MACs and are not counted.
    """
    pooling = n * c * co
    projection = n * h * w * (2 + len(rates)) * co * co
    rest = MacCount(pooling + projection, pooling + projection)
    return branch_macs(n, c, co, h, w, rates) + rest


def separable_branch_macs(n: int, c: int, co: int, h: int, w: int, rates: Sequence[int]) -> MacCount:
    """MACs of the 1x1 branch and the len(rates) depthwise-separable branches on x [n, c, h, w]: per branch a
    3x3 depthwise conv (c channels, dilation = rate; its taps in padding are not useful) and a 1x1 pointwise
    conv c -> co. This is the work of `multi_rate_separable_conv2d`."""
    pointwise = n * h * w * c * co * (1 + len(rates))  # the 1x1 branch and every pointwise conv
    dense = pointwise + n * c * h * w * 9 * len(rates)
    useful = pointwise + n * c * sum(atrous_tap_pixels(h, w, r) for r in rates)
    return MacCount(dense, useful)


def separable_module_macs(n: int, c: int, co: int, h: int, w: int, rates: Sequence[int]) -> MacCount:
    """MACs of smp's whole separable ASPP: the branches, the image-pooling 1x1 conv and the projection (as
    module_macs)."""
    pooling = n * c * co
    projection = n * h * w * (2 + len(rates)) * co * co
    return separable_branch_macs(n, c, co, h, w, rates) + MacCount(pooling + projection, pooling + projection)
