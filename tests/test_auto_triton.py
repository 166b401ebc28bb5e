"""With RESASPP_AUTO=measure on CPU tensors every backend available for them is a candidate: the Triton kernels
through Triton's interpreter, both designs of multi_rate_conv2d (v2, v1) and the separable op's, each verified
against float64 in every direction (tiny shapes: the interpreter is slow)."""
import pytest
import torch

from resaspp_ops import autotune, multi_rate_conv2d, multi_rate_separable_conv2d
from resaspp_ops import backend as backend_registry
from resaspp_ops.autotune.decision import CHOSEN, SLOWER
from utils import Problem, make_problem, make_separable_problem

P = Problem(1, 4, 4, 5, 6, (1, 2))
VERIFIED = (CHOSEN, SLOWER)


@pytest.fixture
def measure(triton_interpreter, tmp_path, monkeypatch):
    monkeypatch.setenv("RESASPP_AUTO", "measure")
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("RESASPP_TRITON_KERNEL", raising=False)
    autotune.reset()
    yield
    autotune.reset()


def _trials(family):
    return {d.key.direction: {t.candidate: t.status for t in d.trials}
            for d in autotune.auto_choices() if d.key.family == family}


def test_both_triton_designs_are_measured_and_verified(measure):
    x, w1, w3, scale, shift = make_problem(P, seed=7, epilogue=True)
    for t in (x, w1, w3):
        t.requires_grad_(True)
    multi_rate_conv2d(x, w1, w3, P.rates, scale, shift, relu=True).sum().backward()
    trials = _trials(backend_registry.MULTI_RATE)
    assert set(trials) == {"forward", "input_grad", "weight_grad"}
    for direction, by_candidate in trials.items():
        assert set(by_candidate) == {"reference", "triton:v2", "triton:v1"}, direction
        assert set(by_candidate.values()) <= set(VERIFIED), (direction, by_candidate)


def test_a_pinned_design_is_the_only_one_measured(measure, monkeypatch):
    monkeypatch.setenv("RESASPP_TRITON_KERNEL", "v1")
    x, w1, w3, _, _ = make_problem(P, seed=8)
    with torch.no_grad():
        multi_rate_conv2d(x, w1, w3, P.rates)
    assert set(_trials(backend_registry.MULTI_RATE)["forward"]) == {"reference", "triton:v1"}


def test_the_separable_triton_kernels_are_measured_and_verified(measure):
    args = make_separable_problem(P, "mid", seed=9, requires_grad=True)
    multi_rate_separable_conv2d(**args).sum().backward()
    trials = _trials(backend_registry.SEPARABLE)
    assert set(trials) == {"forward", "input_grad", "weight_grad"}
    for direction, by_candidate in trials.items():
        assert by_candidate.keys() == {"reference", "triton"} and set(by_candidate.values()) <= set(VERIFIED)
