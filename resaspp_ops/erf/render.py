"""A PNG heatmap of an ERF map, with the predicted star overlaid."""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from resaspp_ops.erf.fit import _as_array
from resaspp_ops.erf.star import star_points


def _panel(fig, ax, z: np.ndarray, log_scale: bool, decades: float, star: np.ndarray | None, label: str) -> None:
    """One heatmap of z [H, W] on ax, with its colour bar and the star's points (x, y) [P, 2] if given."""
    from matplotlib.colors import LogNorm, Normalize

    h, w = z.shape
    peak = float(z.max())
    if log_scale and peak > 0:
        floor = peak * 10.0 ** -decades
        norm = LogNorm(vmin=floor, vmax=peak, clip=True)
        z = np.where(z > floor, z, floor)  # LogNorm masks zeros; show them as the floor
    else:
        norm = Normalize(vmin=min(float(z.min()), 0.0), vmax=peak if peak > 0 else 1.0)
    im = ax.imshow(z, cmap="inferno", norm=norm, interpolation="antialiased")
    fig.colorbar(im, ax=ax, shrink=0.8, label="ERF (log scale)" if log_scale else "ERF")
    if star is not None:
        ax.scatter(star[:, 0], star[:, 1], s=90, facecolors="none", edgecolors="cyan", linewidths=1.2, label=label)
        ax.legend(loc="upper right", fontsize=8, framealpha=0.7)
        ax.set_xlim(-0.5, w - 0.5)
        ax.set_ylim(h - 0.5, -0.5)
    ax.set_xlabel("x (px)")
    ax.set_ylabel("y (px)")


def render_erf(erf, path: str | os.PathLike, *, rates: Sequence[int] | None = None,
               output_stride: int | None = None, log_scale: bool | str = True,
               center: tuple[float, float] | None = None, title: str | None = None, smooth: float = 0.0,
               decades: float = 3.0, dpi: int = 100) -> str:
    """Write `erf` [H, W] (tensor or array) as a PNG heatmap to `path`; returns the path.

    rates, output_stride: overlay the 1 + 8B predicted star points (hollow circles) around
        `center` (x, y), default the central pixel (W // 2, H // 2).
    log_scale: True: colour by log10 over the top `decades` decades below the peak (the star's
        outer points are much weaker than its centre); False: linear; "both": the two side by side
        (linear shows a star whose points merge into arms best, log shows faint outer points).
    smooth: blur the picture with a Gaussian of this sigma (px) first. A randomly initialised deep
        network's ERF is pixel noise around the star (each pixel's gradient has a random sign);
        a blur of about OS / 2 averages that away and leaves the star's points, which are OS wide.
    """
    # A bare Figure on the Agg canvas: no pyplot, so the caller's matplotlib backend and figures are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if rates is not None and output_stride is None:
        raise ValueError("render_erf: overlaying the star needs output_stride as well as rates")
    if log_scale not in (True, False, "both"):
        raise ValueError(f"log_scale must be True, False or 'both', got {log_scale!r}")
    z = _as_array(erf)
    if smooth > 0:
        from scipy.ndimage import gaussian_filter

        z = gaussian_filter(z, sigma=float(smooth), mode="constant")
    h, w = z.shape
    star, label = None, ""
    if rates is not None:
        star = star_points(rates, output_stride, (w // 2, h // 2) if center is None else center)
        label = f"predicted star, rates {tuple(rates)}, OS {output_stride}"
    scales = [False, True] if log_scale == "both" else [bool(log_scale)]
    size = 8.0
    # "compressed" packs fixed-aspect images and their colour bars without gaps, titles included
    fig = Figure(figsize=(size * 1.15 * len(scales), size * h / w), layout="compressed")
    FigureCanvasAgg(fig)
    for i, log in enumerate(scales):
        _panel(fig, fig.add_subplot(1, len(scales), i + 1), z, log, decades, star, label)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(os.fspath(path), dpi=dpi)
    return os.fspath(path)
