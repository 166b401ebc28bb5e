"""The resolution-aware atrous-rate guideline (DESIGN.md section 2)."""
import pytest

from resaspp_ops import fov_size, resolution_aware_rate, resolution_aware_rates
from resaspp_ops.rates import effective_size


@pytest.mark.parametrize("size, stride, rate, rates", [
    (513, 16, 5.01, (5, 10, 15)),
    (769, 8, 15.35, (15, 30, 45)),
    (128, 16, 1.0, (1, 2, 3)),
    (513, 8, 10.02, (10, 20, 30)),
    (896, 8, 18.0, (18, 36, 54)),
    (40, 16, 0.083, (1, 2, 3)),  # rounds to 0: at least 1
])
def test_examples(size, stride, rate, rates):
    assert resolution_aware_rate(size, stride) == pytest.approx(rate, abs=0.005)
    assert resolution_aware_rates(size, stride) == rates


def test_formula():
    for s in (33, 100, 1000, 2049):
        for os_ in (4, 8, 16, 32):
            assert resolution_aware_rate(s, os_) == (s - 32) / (6 * os_)


def test_half_rounds_up():
    # (S - 32) / 48 = 2.5 at S = 152
    assert resolution_aware_rates(152, 8) == (3, 6, 9)


def test_fov_matches_crop_at_the_unrounded_rate():
    for s, os_ in ((513, 16), (769, 8), (1024, 8)):
        assert fov_size(resolution_aware_rate(s, os_), os_) == pytest.approx(s)
    assert fov_size(6, 16) == 6 * 6 * 16 + 32


def test_non_square_crop_uses_the_shorter_side():
    assert effective_size((512, 1024)) == 512
    assert resolution_aware_rates((512, 1024), 8) == resolution_aware_rates(512, 8) == (10, 20, 30)


@pytest.mark.parametrize("size", [32, 0, -5, (512, 32), (1, 2, 3), 100.5, True])
def test_bad_size(size):
    with pytest.raises(ValueError, match="input_size"):
        resolution_aware_rate(size, 8)


@pytest.mark.parametrize("stride", [0, -8, 2.5, None])
def test_bad_stride(stride):
    with pytest.raises(ValueError, match="output_stride"):
        resolution_aware_rates(513, stride)
    with pytest.raises(ValueError, match="output_stride"):
        fov_size(3, stride)


def test_bad_fov_rate():
    with pytest.raises(ValueError, match="rate"):
        fov_size(0, 8)
