"""A 2-D Gaussian fitted to an ERF map (the paper fits one with LMfit; we use scipy's least squares).

    model(x, y) = amplitude * exp(-(x - cx)^2 / (2 sigma_x^2) - (y - cy)^2 / (2 sigma_y^2))

x is the column index and y the row index of a pixel (pixel centres at integer coordinates).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class GaussianFit:
    """An axis-aligned 2-D Gaussian in pixel coordinates; r2 is the coefficient of determination of the fit."""

    cx: float
    cy: float
    sigma_x: float
    sigma_y: float
    amplitude: float
    r2: float

    def as_dict(self) -> dict:
        return asdict(self)


def _as_array(erf) -> np.ndarray:
    """A float64 numpy [H, W] array from a tensor or array."""
    if hasattr(erf, "detach"):
        erf = erf.detach().cpu().double().numpy()
    arr = np.asarray(erf, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D map [H, W], got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("the map has NaN or infinite values")
    return arr


def _moments(z: np.ndarray, xs: np.ndarray, ys: np.ndarray) -> tuple[float, float, float, float]:
    """Centre and standard deviations of the non-negative part of z, taken as a distribution."""
    w = np.clip(z, 0, None)
    total = w.sum()
    if total <= 0:
        h, wd = z.shape
        return (wd - 1) / 2, (h - 1) / 2, wd / 4, h / 4
    px, py = w.sum(0) / total, w.sum(1) / total  # marginals [W], [H]
    cx, cy = float(px @ xs), float(py @ ys)
    sx = float(np.sqrt(max(px @ (xs - cx) ** 2, 0.25)))
    sy = float(np.sqrt(max(py @ (ys - cy) ** 2, 0.25)))
    return cx, cy, sx, sy


def fit_gaussian_2d(erf) -> GaussianFit:
    """Fit an axis-aligned 2-D Gaussian to `erf` [H, W] (tensor or array) by Levenberg-Marquardt.

    The initial guess comes from the map's moments; the model is separable, so residuals and the
    analytic Jacobian cost O(H W) per iteration even for 1024 x 1024 maps.
    """
    from scipy.optimize import least_squares

    z = _as_array(erf)
    h, w = z.shape
    scale = float(np.abs(z).max())
    if scale == 0:
        raise ValueError("cannot fit a Gaussian to an all-zero map")
    z = z / scale  # fit in units of the peak: ERF values can be tiny
    xs, ys = np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64)
    cx0, cy0, sx0, sy0 = _moments(z, xs, ys)
    target = z.ravel()

    def parts(p):
        a, cx, cy, sx, sy = p
        gx = np.exp(-0.5 * ((xs - cx) / sx) ** 2)  # [W]
        gy = np.exp(-0.5 * ((ys - cy) / sy) ** 2)  # [H]
        return a, cx, cy, sx, sy, gx, gy

    def residuals(p):
        a, _, _, _, _, gx, gy = parts(p)
        return (a * np.outer(gy, gx)).ravel() - target

    def jacobian(p):
        a, cx, cy, sx, sy, gx, gy = parts(p)
        g = np.outer(gy, gx)  # [H, W]
        dx, dy = (xs - cx) / sx, (ys - cy) / sy
        cols = [g, a * g * (dx / sx)[None, :], a * g * (dy / sy)[:, None],
                a * g * (dx ** 2 / sx)[None, :], a * g * (dy ** 2 / sy)[:, None]]
        return np.stack([c.ravel() for c in cols], axis=1)  # [H*W, 5]

    p0 = np.array([z.max(), cx0, cy0, sx0, sy0])
    res = least_squares(residuals, p0, jac=jacobian, method="lm", x_scale="jac")
    a, cx, cy, sx, sy = res.x
    ss_res = float(res.fun @ res.fun)
    ss_tot = float(((target - target.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    return GaussianFit(cx=float(cx), cy=float(cy), sigma_x=float(abs(sx)), sigma_y=float(abs(sy)),
                       amplitude=float(a * scale), r2=r2)
