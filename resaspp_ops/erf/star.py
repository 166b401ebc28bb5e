"""The star of an ASPP's ERF: predicted point positions and a measurement of the star's size.

One output unit of the branch convolutions reads the centre and, per rate r, the 8 feature-map
positions at r * (+-1, 0), (0, +-1), (+-1, +-1) (DESIGN.md section 2). In input pixels those lie
r * OS apart, so the two outer points on an axis are 2 * max(rates) * OS pixels apart (576 px for
rates (6, 12, 18) at OS 16).

Coordinates are (x, y) = (column, row) in pixels, pixel centres at integer coordinates.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from resaspp_ops.erf.fit import _as_array

# Order of the 8 offsets per rate, in units of r * OS: the axis points first, then the diagonals.
_OFFSETS = ((1, 0), (-1, 0), (0, 1), (0, -1), (1, 1), (1, -1), (-1, 1), (-1, -1))


def _check(rates: Sequence[int], output_stride: int) -> tuple[tuple[int, ...], int]:
    rates = tuple(int(r) for r in rates)
    if not rates or any(r <= 0 for r in rates):
        raise ValueError(f"rates must be positive integers, got {rates!r}")
    if int(output_stride) <= 0:
        raise ValueError(f"output_stride must be positive, got {output_stride!r}")
    return rates, int(output_stride)


def star_points(rates: Sequence[int], output_stride: int, center: tuple[float, float]) -> np.ndarray:
    """The 1 + 8B predicted star positions [1 + 8B, 2] as (x, y) pixels.

    Row 0 is `center` (x, y); then per rate r, in the order of `rates`, the 8 points
    center + r * OS * (+1, 0), (-1, 0), (0, +1), (0, -1), (+1, +1), (+1, -1), (-1, +1), (-1, -1).
    """
    rates, stride = _check(rates, output_stride)
    cx, cy = float(center[0]), float(center[1])
    points = [(cx, cy)]
    for r in rates:
        points.extend((cx + r * stride * ox, cy + r * stride * oy) for ox, oy in _OFFSETS)
    return np.asarray(points, dtype=np.float64)


@dataclass(frozen=True)
class StarMeasurement:
    """The measured star against the prediction, in pixels.

    measured: the mean of the horizontal and vertical distances between the outer points (NaN when
        a peak was not found); predicted: 2 * max(rates) * OS; agree: both axes within tolerance.
    contrast: the weakest outer peak's rise above its surroundings over its value (detrended):
        near 1 for distinct points, near 0 when the points merge into arms or noise.
    outer: the measured outer points, {"left", "right", "top", "bottom": (x, y)} (NaN when not found).
    per_rate: {rate: (horizontal, vertical)} distances between the opposite axis points of each rate.
    """

    measured: float
    predicted: float
    agree: bool
    tolerance: float
    measured_horizontal: float
    measured_vertical: float
    center: tuple[float, float]
    contrast: float = 0.0
    outer: dict = field(default_factory=dict)
    per_rate: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["per_rate"] = {str(k): v for k, v in self.per_rate.items()}
        return d


def _peak(profile: np.ndarray, lo: int, hi: int, min_contrast: float) -> tuple[float, float]:
    """(centre, contrast) of the peak of `profile` in [lo, hi); the centre is NaN if there is none.

    The window is first detrended by the line through the means of its two ends, which removes the
    slope of a broad ERF around the star. The peak is the region around the detrended argmax that
    lies above a level between zero and the peak's height (half-way first; 3/4 and 9/10 of the way
    when the half-way region runs into the window's edge); its weighted centroid is robust to
    plateaus (stride blocks of equal gradient). No peak (NaN) when the argmax sits on the window's
    edge or the peak rises less than `min_contrast` of the profile's value there (texture or noise).
    The contrast is that rise over the value: about 1 for a clear point, near 0 for none.
    """
    lo, hi = max(lo, 0), min(hi, len(profile))
    n = hi - lo
    if n < 5:
        return math.nan, 0.0
    win = profile[lo:hi]
    k = max(1, n // 8)
    idx = np.arange(n, dtype=np.float64)
    left_mean, right_mean = float(win[:k].mean()), float(win[-k:].mean())
    x0, x1 = (k - 1) / 2, n - 1 - (k - 1) / 2
    d = win - (left_mean + (right_mean - left_mean) * (idx - x0) / (x1 - x0))  # [n], detrended
    top = int(np.argmax(d))
    height = float(d[top])
    contrast = max(height, 0.0) / abs(float(win[top])) if win[top] != 0 else 0.0
    if top in (0, n - 1) or height <= 0 or contrast < min_contrast:
        return math.nan, contrast
    for level in (0.5, 0.75, 0.9):
        cut = level * height
        left = top
        while left > 0 and d[left - 1] > cut:
            left -= 1
        right = top
        while right < n - 1 and d[right + 1] > cut:
            right += 1
        if left > 0 and right < n - 1:  # isolated inside the window
            weights = d[left:right + 1]
            return lo + float((idx[left:right + 1] * weights).sum() / weights.sum()), contrast
    return math.nan, contrast


def measure_star(erf, rates: Sequence[int], output_stride: int, *, center: tuple[float, float] | None = None,
                 tolerance: float | None = None, smooth: float | None = None,
                 min_contrast: float = 0.05) -> StarMeasurement:
    """Measure the distance between the star's opposite outer points in `erf` [H, W].

    Along each axis through `center` (default: the central pixel (W // 2, H // 2), where the
    central output unit sits), the ERF is summed over a band of rows (columns) OS either side,
    about the height of a star point, smoothed, and each predicted axis point is located as the
    centroid of its peak in a window around the prediction. The window's half-width is half the
    smallest spacing between neighbouring star points, so it holds one star point. Distances
    between opposite points do not depend on `center`.

    tolerance: allowed |measured - predicted| per axis, in pixels (default: OS / 2).
    smooth: Gaussian sigma (px) for the profiles (default OS / 2): it removes the stride-periodic
        texture and the pixel noise of a randomly initialised network without moving a symmetric peak.
    min_contrast: a peak must rise this fraction of its value above its window's detrended baseline
        to count (the result's `contrast` is the weakest outer point's rise).
    """
    rates, stride = _check(rates, output_stride)
    z = _as_array(erf)
    h, w = z.shape
    cx, cy = (w // 2, h // 2) if center is None else (float(center[0]), float(center[1]))
    tol = stride / 2 if tolerance is None else float(tolerance)
    sigma = stride / 2 if smooth is None else float(smooth)
    steps = sorted({0, *rates})
    half = max(1, min(b - a for a, b in zip(steps, steps[1:])) * stride // 2)
    icx, icy = int(round(cx)), int(round(cy))
    band = min(half, stride)
    row_profile = z[max(icy - band, 0):icy + band + 1].sum(0)  # [W], the horizontal arm
    col_profile = z[:, max(icx - band, 0):icx + band + 1].sum(1)  # [H], the vertical arm
    if sigma > 0:
        from scipy.ndimage import gaussian_filter1d

        row_profile = gaussian_filter1d(row_profile, sigma, mode="nearest")
        col_profile = gaussian_filter1d(col_profile, sigma, mode="nearest")

    def locate(profile, c, offset):
        p = int(round(c + offset))
        return _peak(profile, p - half, p + half + 1, min_contrast)

    per_rate = {}
    outer, contrast = {}, 0.0
    for r in rates:
        d = r * stride
        (left, c_l), (right, c_r) = locate(row_profile, cx, -d), locate(row_profile, cx, d)
        (top, c_t), (bottom, c_b) = locate(col_profile, cy, -d), locate(col_profile, cy, d)
        per_rate[r] = (right - left, bottom - top)
        if r == max(rates):
            outer = {"left": (left, cy), "right": (right, cy), "top": (cx, top), "bottom": (cx, bottom)}
            contrast = min(c_l, c_r, c_t, c_b)
    mh, mv = per_rate[max(rates)]
    predicted = 2.0 * max(rates) * stride
    agree = all(abs(m - predicted) <= tol for m in (mh, mv))  # False for NaN
    return StarMeasurement(measured=(mh + mv) / 2, predicted=predicted, agree=bool(agree), tolerance=tol,
                           measured_horizontal=mh, measured_vertical=mv, center=(float(cx), float(cy)),
                           contrast=contrast, outer=outer, per_rate=per_rate)
