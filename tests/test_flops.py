"""resaspp_ops.flops: useful MACs against a brute-force count and DESIGN.md section 2's table."""
import itertools

import pytest

from resaspp_ops.flops import FWD_BWD_FACTOR, MacCount, atrous_tap_pixels, branch_macs, module_macs


def brute_force_branch_macs(n, c, co, h, w, rates):
    """Loop over every output pixel and every tap of every branch; count the taps inside the image."""
    dense = useful = 0
    kernels = [[(0, 0)]] + [[(dy * r, dx * r) for dy in (-1, 0, 1) for dx in (-1, 0, 1)] for r in rates]
    for taps in kernels:
        for y, x in itertools.product(range(h), range(w)):
            for dy, dx in taps:
                dense += 1
                useful += 0 <= y + dy < h and 0 <= x + dx < w
    return MacCount(dense * n * c * co, useful * n * c * co)


@pytest.mark.parametrize("n, c, co, h, w, rates", [
    (1, 1, 1, 5, 5, (1, 2, 3)),
    (2, 3, 4, 7, 9, (2, 4, 6)),
    (1, 2, 5, 9, 4, (1, 3)),            # H != W, rate between W and H
    (3, 1, 2, 6, 6, (6, 12, 18)),       # every off-centre tap is padding
    (1, 1, 1, 1, 1, (1,)),              # a single pixel
    (2, 2, 2, 11, 13, (1, 2, 5, 10)),   # four rates
    (1, 4, 3, 33, 33, (6, 12, 18)),
])
def test_branch_macs_match_brute_force(n, c, co, h, w, rates):
    assert branch_macs(n, c, co, h, w, rates) == brute_force_branch_macs(n, c, co, h, w, rates)


def test_atrous_tap_pixels_bounds():
    assert atrous_tap_pixels(10, 10, 1) == (10 + 2 * 9) ** 2
    assert atrous_tap_pixels(8, 8, 8) == 64   # only the centre tap remains
    assert atrous_tap_pixels(8, 8, 100) == 64


@pytest.mark.parametrize("size, rates, fraction", [
    (33, (6, 12, 18), 0.60),
    (65, (12, 24, 36), 0.59),
    (97, (12, 24, 36), 0.71),
    (8, (12, 24, 36), 0.14),
])
def test_design_table(size, rates, fraction):
    """DESIGN.md section 2: useful / dense of the 1x1 + three 3x3 branches, to two decimals."""
    counts = branch_macs(1, 2048, 256, size, size, rates)
    assert round(counts.useful_fraction, 2) == fraction


def test_module_macs_adds_pooling_and_projection():
    n, c, co, h, w, rates = 2, 64, 16, 9, 7, (1, 2, 3)
    branches = branch_macs(n, c, co, h, w, rates)
    module = module_macs(n, c, co, h, w, rates)
    extra = n * c * co + n * h * w * 5 * co * co   # pooling conv + projection of 2+B = 5 branches
    assert module.dense == branches.dense + extra
    assert module.useful == branches.useful + extra
    assert module.useful_fraction > branches.useful_fraction


def test_scaled_and_empty():
    counts = branch_macs(2, 3, 4, 5, 6, (1, 2))
    assert counts.scaled(FWD_BWD_FACTOR) == MacCount(3 * counts.dense, 3 * counts.useful)
    assert branch_macs(0, 3, 4, 5, 6, (1,)).useful_fraction == 1.0
