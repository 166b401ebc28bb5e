"""backend="auto" under torch.compile and torch.export: nothing is timed; the op decides where it runs, from this
process's decisions or the cache file, else the static order (RESASPP_AUTO=measure on CPU tensors)."""
import pytest
import torch

import auto_candidates as planted
from resaspp_ops import autotune
from resaspp_ops.autotune.decision import STATIC
from resaspp_ops.ops import multi_rate_conv2d, multi_rate_conv2d_reference
from utils import Problem, make_problem

P = Problem(2, 8, 4, 9, 7, (1, 2))
NOTHING = {"measurements": 0, "candidate_runs": 0, "timed_runs": 0}


@pytest.fixture
def measure(tmp_path, monkeypatch):
    monkeypatch.setenv("RESASPP_AUTO", "measure")
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))
    autotune.reset()
    torch._dynamo.reset()
    yield
    planted.clear()
    autotune.reset()
    torch._dynamo.reset()


def _inputs():
    x, w1, w3, _, _ = make_problem(P, seed=3)
    return [t.requires_grad_(True) for t in (x, w1, w3)]


def _op(x, w1, w3):
    return multi_rate_conv2d(x, w1, w3, P.rates)


def test_a_compiled_model_times_nothing_and_runs_the_static_order_without_a_decision(measure):
    fast = planted.fast()
    planted.plant("fast", fast)
    x, w1, w3 = _inputs()
    compiled = torch.compile(_op, backend="aot_eager", fullgraph=True)
    y = compiled(x, w1, w3)
    y.sum().backward()
    assert autotune.COUNTS == NOTHING
    assert fast.calls == {"forward": 0, "backward": 0}
    decisions = autotune.auto_choices()
    assert {d.key.direction for d in decisions} == {"forward", "input_grad", "weight_grad"}
    assert all(d.source == STATIC and d.chosen == "reference" and "compiled" in d.reason for d in decisions)
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w1, w3)]
    multi_rate_conv2d_reference(*ref, P.rates).sum().backward()
    torch.testing.assert_close(y, multi_rate_conv2d_reference(*ref, P.rates))
    for got, want in zip((x, w1, w3), ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)


def test_a_compiled_model_runs_the_decision_made_in_eager_mode(measure, monkeypatch):
    """Decided in eager mode (the planted fast candidate wins), the compiled graph runs it without timing."""
    from resaspp_ops.autotune import selection

    def time_candidates(runs, device, budget_s=None):  # virtual time: fast wins
        for run in runs.values():
            run()
        return {name: [0.1 if name == "fast" else 1.0] for name in runs}

    monkeypatch.setattr(selection, "time_candidates", time_candidates)
    fast = planted.fast()
    planted.plant("fast", fast)
    x, w1, w3 = _inputs()
    _op(x, w1, w3).sum().backward()
    measured = dict(autotune.COUNTS)
    assert measured["measurements"] == 3
    before = dict(fast.calls)
    compiled = torch.compile(_op, backend="aot_eager", fullgraph=True)
    y = compiled(x, w1, w3)
    y.sum().backward()
    assert autotune.COUNTS == measured  # nothing more measured
    assert fast.calls["forward"] == before["forward"] + 1 and fast.calls["backward"] == before["backward"] + 1
    torch.testing.assert_close(y, multi_rate_conv2d_reference(x, w1, w3, P.rates))


def test_an_export_times_nothing_and_leaves_the_decision_to_where_it_runs(measure):
    class Branches(torch.nn.Module):
        def __init__(self, w1, w3):
            super().__init__()
            self.w1, self.w3 = torch.nn.Parameter(w1.detach()), torch.nn.Parameter(w3.detach())

        def forward(self, x):
            return multi_rate_conv2d(x, self.w1, self.w3, P.rates)

    x, w1, w3 = _inputs()
    module = Branches(w1, w3).eval()
    exported = torch.export.export(module, (x.detach(),))
    assert autotune.COUNTS == NOTHING
    calls = [n for n in exported.graph.nodes if n.target == torch.ops.resaspp_ops.multi_rate_conv2d.default]
    assert len(calls) == 1 and calls[0].args[-1] == "auto"
    with torch.no_grad():
        y = exported.module()(x.detach())
    assert autotune.COUNTS == NOTHING
    torch.testing.assert_close(y, multi_rate_conv2d_reference(x, w1, w3, P.rates))
