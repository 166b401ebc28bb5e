"""The resolution-aware atrous-rate guideline of Kim et al. (DESIGN.md section 2).

ASPP's receptive field is a star whose end-to-end extent is 6 * r * OS + 32 pixels for rates
(r, 2r, 3r) at output stride OS. Matching that extent to the training crop size S gives

    r* = (S - 32) / (6 * OS),    rates = (r, 2r, 3r) with r = r* rounded, at least 1.

FusedASPP takes one dilation per branch (the same along both axes), so for a non-square crop
(H, W) the guideline is applied to the shorter side min(H, W): the star then fits the crop along
both axes, and along the longer axis it covers less than the whole crop.
"""
from __future__ import annotations

import math
import numbers

# The extent of the star beyond 6 * r * OS: the backbone's own receptive field, per the paper.
STAR_MARGIN_PX = 32


def _check_stride(output_stride) -> int:
    if isinstance(output_stride, bool) or not isinstance(output_stride, numbers.Integral) or output_stride <= 0:
        raise ValueError(f"output_stride must be a positive integer, got {output_stride!r}")
    return int(output_stride)


def effective_size(input_size) -> int:
    """The crop size S the guideline uses: the side of a square crop, min(H, W) of an (H, W) crop."""
    if isinstance(input_size, (tuple, list)):
        if len(input_size) != 2:
            raise ValueError(f"input_size must be an int or (H, W), got {input_size!r}")
        sizes = list(input_size)
    else:
        sizes = [input_size]
    for s in sizes:
        if isinstance(s, bool) or not isinstance(s, numbers.Integral):
            raise ValueError(f"input_size must be an int or (H, W) of ints, got {input_size!r}")
        if s <= STAR_MARGIN_PX:
            raise ValueError(f"input_size must exceed {STAR_MARGIN_PX} pixels (the star's fixed margin), "
                             f"got {input_size!r}")
    return int(min(sizes))


def resolution_aware_rate(input_size, output_stride) -> float:
    """The guideline's base rate r* = (S - 32) / (6 * OS), unrounded.

    input_size: the crop side S, or (H, W) (then S = min(H, W)). output_stride: OS, e.g. 8 or 16.
    Examples: (513, 16) -> 5.01; (769, 8) -> 15.35; (128, 16) -> 1.0.
    """
    stride = _check_stride(output_stride)
    return (effective_size(input_size) - STAR_MARGIN_PX) / (6 * stride)


def resolution_aware_rates(input_size, output_stride) -> tuple[int, int, int]:
    """(r, 2r, 3r) with r the guideline's rate rounded to the nearest integer (halves up), at least 1."""
    r = max(1, math.floor(resolution_aware_rate(input_size, output_stride) + 0.5))
    return (r, 2 * r, 3 * r)


def fov_size(rate, output_stride) -> int | float:
    """The star's end-to-end extent in input pixels, 6 * rate * OS + 32, for rates (rate, 2*rate, 3*rate)."""
    stride = _check_stride(output_stride)
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or rate <= 0:
        raise ValueError(f"rate must be a positive number, got {rate!r}")
    return 6 * rate * stride + STAR_MARGIN_PX
