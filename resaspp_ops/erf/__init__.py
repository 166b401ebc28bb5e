"""Effective receptive field (ERF) analysis of Kim et al. (DESIGN.md section 2).

    effective_receptive_field(model, images)   the paper's Eq. 1 -> [H, W]
    fit_gaussian_2d(erf)                       centre, sigmas, amplitude, r2 of a 2-D Gaussian fit
    star_points(rates, output_stride, center)  the 1 + 8B predicted star positions (x, y)
    measure_star(erf, rates, output_stride)    measured vs predicted outer-point distance
    render_erf(erf, path, rates=..., output_stride=...)   a PNG heatmap with the star overlaid

scipy (fit) and matplotlib (render) are imported only when those functions run.
"""
from resaspp_ops.erf.field import effective_receptive_field
from resaspp_ops.erf.fit import GaussianFit, fit_gaussian_2d
from resaspp_ops.erf.render import render_erf
from resaspp_ops.erf.star import StarMeasurement, measure_star, star_points

__all__ = ["GaussianFit", "StarMeasurement", "effective_receptive_field", "fit_gaussian_2d", "measure_star",
           "render_erf", "star_points"]
