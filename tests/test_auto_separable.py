"""backend="auto" measures the separable op too: per direction, with its mid stage's grads in the weight-grad
key; a candidate wrong in one direction only is excluded there only (RESASPP_AUTO=measure on CPU tensors)."""
import pytest
import torch

import auto_candidates as planted
from resaspp_ops import autotune
from resaspp_ops import backend as backend_registry
from resaspp_ops import multi_rate_separable_conv2d, multi_rate_separable_conv2d_reference
from resaspp_ops.autotune import selection
from resaspp_ops.autotune.decision import WRONG
from utils import Problem, make_separable_problem

FAMILY = backend_registry.SEPARABLE
P = Problem(2, 6, 4, 8, 7, (1, 3))


@pytest.fixture
def measure(tmp_path, monkeypatch):
    monkeypatch.setenv("RESASPP_AUTO", "measure")
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))

    def time_candidates(runs, device, budget_s=None):  # virtual time: the planted "fast" wins where verified
        for run in runs.values():
            run()
        return {name: [0.1 if name == "fast" else 1.0] for name in runs}

    monkeypatch.setattr(selection, "time_candidates", time_candidates)
    autotune.reset()
    yield
    planted.clear(FAMILY)
    autotune.reset()


def test_each_direction_is_verified_and_chosen_apart(measure):
    fast = planted.fast(FAMILY)
    planted.plant("fast", fast, FAMILY)
    planted.plant("bad_dgrad", planted.wrong_input_grad(FAMILY), FAMILY)
    args = make_separable_problem(P, "mid", seed=5, requires_grad=True)
    y = multi_rate_separable_conv2d(**args)
    g = torch.randn_like(y)
    with pytest.warns(UserWarning, match="excluded bad_dgrad for multi_rate_separable_conv2d input_grad"):
        y.backward(g)
    for direction in ("forward", "input_grad", "weight_grad"):
        assert planted.decision_for(direction, FAMILY).chosen == "fast"
    assert planted.trial(planted.decision_for("input_grad", FAMILY), "bad_dgrad").status == WRONG
    assert planted.trial(planted.decision_for("weight_grad", FAMILY), "bad_dgrad").status != WRONG
    weight_key = planted.decision_for("weight_grad", FAMILY).key
    assert {"mid_scale", "mid_shift", "mid_relu", "weights", "mid_grads"} <= set(weight_key.flags)
    assert "scale" not in weight_key.flags  # the epilogue is the forward's only
    ref = {k: (v.detach().clone().requires_grad_(True) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}
    out = multi_rate_separable_conv2d_reference(**ref)
    out.backward(g)
    torch.testing.assert_close(y, out, rtol=1e-5, atol=1e-5)
    for name, t in args.items():
        if isinstance(t, torch.Tensor):
            torch.testing.assert_close(t.grad, ref[name].grad, rtol=1e-4, atol=1e-4, msg=name)
