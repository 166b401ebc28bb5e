"""backend="auto" that measures and verifies (issue 23), on CPU tensors with RESASPP_AUTO=measure: planted
candidates (tests/auto_candidates.py) that are wrong, slow, raising or fast; forward and backward chosen apart;
what the user gets; when nothing is measured."""
import threading
import warnings

import pytest
import torch

import auto_candidates as planted
import resaspp_ops
from resaspp_ops import autotune
from resaspp_ops import backend as backend_registry
from resaspp_ops.autotune import selection
from resaspp_ops.autotune import decision as D
from resaspp_ops.autotune import timing
from resaspp_ops.ops import multi_rate_conv2d, multi_rate_conv2d_reference
from utils import Problem, make_problem

# Big enough that PyTorch's convolutions take far longer than the fast candidate's copy of a stored result.
P = Problem(2, 32, 16, 24, 24, (1, 2, 3))


@pytest.fixture
def measure(tmp_path, monkeypatch):
    """RESASPP_AUTO=measure, a cache directory of the test's own, no decision or planted candidate before or
    after."""
    monkeypatch.setenv("RESASPP_AUTO", "measure")
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path / "cache"))
    autotune.reset()
    yield tmp_path / "cache"
    planted.clear()
    planted.clear(backend_registry.SEPARABLE)
    autotune.reset()


@pytest.fixture
def costs(monkeypatch):
    """Virtual timing: each candidate's time in ms is costs[name] (1.0 unless set), its run still made once, so
    that a decision by time does not hang on this shared machine's load; timing.py's own test uses the clock."""
    table: dict = {}

    def time_candidates(runs, device, budget_s=None):
        for run in runs.values():
            run()
        return {name: [table.get(name, 1.0)] for name in runs}

    monkeypatch.setattr(selection, "time_candidates", time_candidates)
    return table


def _leaves(p=P, seed=0, epilogue=False):
    x, w1, w3, scale, shift = make_problem(p, seed=seed, epilogue=epilogue)
    return [t.requires_grad_(True) if t is not None else None for t in (x, w1, w3)] + [scale, shift]


def test_a_wrong_candidate_is_excluded_with_one_warning_and_never_returned(measure, costs):
    planted.plant("wrong", planted.wrong_forward())
    costs["wrong"] = 0.1  # the fastest: only its verification keeps it out
    x, w1, w3, _, _ = _leaves()
    with pytest.warns(UserWarning, match=r"excluded wrong for multi_rate_conv2d forward float32 N2 C32 24x24 .*"
                                         r"wrong result, out err .* \(bound .*\)") as caught:
        y = multi_rate_conv2d(x, w1, w3, P.rates)
    assert sum("excluded wrong" in str(w.message) for w in caught) == 1
    torch.testing.assert_close(y, multi_rate_conv2d_reference(x, w1, w3, P.rates), rtol=1e-5, atol=1e-5)
    decision = planted.decision_for("forward")
    assert decision.chosen != "wrong" and planted.trial(decision, "wrong").status == D.WRONG
    assert "out err" in planted.trial(decision, "wrong").detail
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the key is decided
        multi_rate_conv2d(x, w1, w3, P.rates)


def test_a_wrong_input_grad_is_excluded_for_the_backward_alone(measure):
    """The backward is verified on the call's own grad: a candidate right forward but wrong in grad_x is
    excluded for the input grad, and the user's grad is right."""
    planted.plant("bad_dgrad", planted.wrong_input_grad())
    x, w1, w3, _, _ = _leaves()
    y = multi_rate_conv2d(x, w1, w3, P.rates)
    g = torch.randn_like(y)
    with pytest.warns(UserWarning, match=r"excluded bad_dgrad for multi_rate_conv2d input_grad .*grad_x err"):
        y.backward(g)
    ref = [t.detach().clone().requires_grad_(True) for t in (x, w1, w3)]
    multi_rate_conv2d_reference(*ref, P.rates).backward(g)
    for got, want in zip((x, w1, w3), ref):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-4)
    assert planted.trial(planted.decision_for("input_grad"), "bad_dgrad").status == D.WRONG
    assert planted.trial(planted.decision_for("weight_grad"), "bad_dgrad").status in (D.CHOSEN, D.SLOWER)


def test_a_raising_candidate_is_excluded_with_a_warning(measure):
    planted.plant("broken", planted.raising())
    x, w1, w3, _, _ = _leaves()
    with pytest.warns(UserWarning, match="excluded broken for .* it raised RuntimeError: planted failure"):
        y = multi_rate_conv2d(x, w1, w3, P.rates)
    torch.testing.assert_close(y, multi_rate_conv2d_reference(x, w1, w3, P.rates), rtol=1e-5, atol=1e-5)
    assert planted.trial(planted.decision_for("forward"), "broken").status == D.RAISED


def test_a_fast_candidate_wins_a_slow_one_loses_and_the_user_gets_the_winner(measure, costs):
    planted.plant("slow", planted.slow())
    fast = planted.fast()
    planted.plant("fast", fast)
    costs.update(slow=2.0, fast=0.5)
    x, w1, w3, _, _ = _leaves()
    with torch.no_grad():
        y = multi_rate_conv2d(x, w1, w3, P.rates)
    decision = planted.decision_for("forward")
    assert decision.chosen == "fast", decision.summary()
    assert planted.trial(decision, "slow").status == D.SLOWER and planted.trial(decision, "slow").median_ms == 2.0
    assert decision.reason.startswith("2.00x the reference")
    calls = fast.calls["forward"]
    with torch.no_grad():
        y2 = multi_rate_conv2d(x, w1, w3, P.rates)
    assert fast.calls["forward"] == calls + 1  # the user's call runs the chosen candidate
    assert torch.equal(y, y2)
    torch.testing.assert_close(y, multi_rate_conv2d_reference(x, w1, w3, P.rates), rtol=1e-5, atol=1e-5)


def test_a_slow_candidate_loses_on_the_real_clock(measure):
    planted.plant("slow", planted.slow(delay_s=0.3))
    x, w1, w3, _, _ = _leaves()
    with torch.no_grad():
        multi_rate_conv2d(x, w1, w3, P.rates)
    decision = planted.decision_for("forward")
    assert decision.chosen == "reference", decision.summary()
    assert planted.trial(decision, "slow").median_ms >= 300


def test_timing_screens_then_times_the_contenders_in_rounds(monkeypatch):
    """Every candidate is screened twice; only those within CONTENDER_RATIO of the best get the extra rounds."""
    clock = {"a": 1.0, "b": 1.2, "c": 10.0}
    ran = []
    runs = {name: (lambda name=name: ran.append(name)) for name in clock}
    monkeypatch.setattr(timing, "time_once", lambda run, device: (run(), clock[ran[-1]])[1])
    times = timing.time_candidates(runs, torch.device("cpu"), budget_s=0.0)
    assert len(times["c"]) == timing.SCREENING_ROUNDS
    assert len(times["a"]) == len(times["b"]) == timing.SCREENING_ROUNDS + timing.MIN_ROUNDS
    assert ran[:3] == ["a", "b", "c"]  # interleaved


def test_timing_reads_the_clock():
    real = timing.time_candidates({"sleep": lambda: __import__("time").sleep(0.02), "none": lambda: None},
                                  torch.device("cpu"))
    assert timing.median_ms(real["sleep"]) >= 20 > timing.median_ms(real["none"])


def test_forward_and_backward_are_chosen_apart(measure, monkeypatch):
    """A candidate fast forward but slow backward wins the forward only; the backward runs the reference."""
    fast_forward = planted.fast(backward=False)
    planted.plant("fwd_only", fast_forward)
    calls = {"n": 0}

    def time_candidates(runs, device, budget_s=None):  # fwd_only is fast in the forward only
        calls["n"] += 1
        for run in runs.values():
            run()
        return {name: [0.5 if name == "fwd_only" and calls["n"] == 1 else 1.0 + (name == "fwd_only")]
                for name in runs}

    monkeypatch.setattr(selection, "time_candidates", time_candidates)
    x, w1, w3, _, _ = _leaves()
    y = multi_rate_conv2d(x, w1, w3, P.rates)
    assert type(y.grad_fn).__name__ == "_EagerMultiRateConv2dBackward"
    y.sum().backward()
    assert planted.decision_for("forward").chosen == "fwd_only"
    assert planted.decision_for("input_grad").chosen == "reference"
    assert planted.decision_for("weight_grad").chosen == "reference"
    assert autotune.plan(autotune.MultiRateProblem(x, w1, w3, P.rates), True, True) == \
        "fwd_only|reference|reference"
    calls = dict(fast_forward.calls)
    multi_rate_conv2d(x, w1, w3, P.rates).sum().backward()  # decided: no measuring, each direction its own
    assert fast_forward.calls == {"forward": calls["forward"] + 1, "backward": calls["backward"]}


def test_the_rule_keeps_pytorch_unless_a_kernel_is_a_few_percent_faster():
    assert D.pick({"reference": 1.0, "triton:v2": 0.97}) == ("reference", D.pick({"reference": 1.0,
                                                                                  "triton:v2": 0.97})[1])
    assert D.pick({"reference": 1.0, "triton:v2": 0.97})[0] == "reference"
    assert D.pick({"reference": 1.0, "triton:v2": 0.9, "cuda:mma": 0.8})[0] == "cuda:mma"
    assert D.pick({"reference": 1.0, "cuda:mma": 1.2})[0] == "reference"
    assert "1.25x" in D.pick({"reference": 1.0, "cuda:mma": 0.8})[1]


def test_cpu_tensors_are_not_measured_unless_asked(monkeypatch, tmp_path):
    """RESASPP_AUTO unset: CPU tensors run the reference, nothing measured, nothing written; static: also."""
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))
    autotune.reset()
    planted.plant("fast", planted.fast())
    try:
        x, w1, w3, _, _ = _leaves()
        for mode in (None, "static"):
            if mode is None:
                monkeypatch.delenv("RESASPP_AUTO", raising=False)
            else:
                monkeypatch.setenv("RESASPP_AUTO", mode)
            y = multi_rate_conv2d(x, w1, w3, P.rates)
            y.sum().backward()
            assert type(y.grad_fn).__name__ == "CatBackward0"  # the reference, differentiated by PyTorch
        assert autotune.COUNTS == {"measurements": 0, "candidate_runs": 0, "timed_runs": 0}
        assert autotune.auto_choices() == [] and not any(tmp_path.iterdir())
        monkeypatch.setenv("RESASPP_AUTO", "sometimes")
        with pytest.raises(ValueError, match="RESASPP_AUTO must be one of measure, static"):
            multi_rate_conv2d(x, w1, w3, P.rates)
    finally:
        planted.clear()
        autotune.reset()


def test_deterministic_algorithms_take_the_static_order_without_measuring(measure):
    planted.plant("fast", planted.fast())
    x, w1, w3, _, _ = _leaves()
    torch.use_deterministic_algorithms(True)
    try:
        y = multi_rate_conv2d(x, w1, w3, P.rates)
        y.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert autotune.COUNTS["measurements"] == 0
    decision = planted.decision_for("forward")
    assert decision.chosen == "reference" and decision.source == D.STATIC
    assert "use_deterministic_algorithms" in decision.reason


def test_auto_choices_says_why_with_every_candidates_time_and_verdict(measure, costs):
    planted.plant("slow", planted.slow())
    costs["slow"] = 3.0
    planted.plant("broken", planted.raising())
    x, w1, w3, scale, shift = _leaves(epilogue=True)
    with pytest.warns(UserWarning, match="excluded broken"):
        y = multi_rate_conv2d(x, w1, w3, P.rates, scale, shift, relu=True)
    with pytest.warns(UserWarning, match="excluded broken"):
        y.sum().backward()
    choices = resaspp_ops.auto_choices()
    assert {d.key.direction for d in choices} == {"forward", "input_grad", "weight_grad"}
    forward = planted.decision_for("forward")
    assert forward.key.flags[:3] == ("scale", "shift", "relu") and forward.source == D.MEASURED
    assert planted.decision_for("input_grad").key.flags == ("nchw",)  # the backward has no epilogue
    for decision in choices:
        assert {t.candidate for t in decision.trials} == {"reference", "slow", "broken"}
        assert all(t.median_ms > 0 for t in decision.trials if t.status in (D.CHOSEN, D.SLOWER))
        assert "slow slower" in decision.summary() and "broken raised" in decision.summary()


def test_an_empty_batch_is_not_measured(measure):
    p = Problem(0, 4, 3, 5, 5, (1, 2))
    x, w1, w3, _, _ = _leaves(p)
    y = multi_rate_conv2d(x, w1, w3, p.rates)
    y.sum().backward()
    assert y.shape == (0, 9, 5, 5) and autotune.COUNTS["measurements"] == 0


def test_a_variant_selected_for_one_call_does_not_leak_into_other_threads():
    """The kernel variant of a candidate is selected for the calling thread only (the other thread keeps
    RESASPP_TRITON_KERNEL's default), and only inside the block."""
    pytest.importorskip("triton")
    triton_backend = backend_registry.get("triton")
    entered, seen = threading.Event(), []
    release = threading.Event()

    def measuring():
        with backend_registry.use_variant("triton", "v1"):
            seen.append(("measuring", triton_backend.kernel_version()))
            entered.set()
            release.wait(10)

    worker = threading.Thread(target=measuring)
    worker.start()
    entered.wait(10)
    seen.append(("other", triton_backend.kernel_version()))
    release.set()
    worker.join()
    assert seen == [("measuring", "v1"), ("other", "v2")]
    assert triton_backend.kernel_version() == "v2"
    with pytest.raises(ValueError, match="no variant 'v3'"):
        backend_registry.use_variant("triton", "v3")
