"""backend="auto" on a GPU (the default there: measure): every kernel backend and variant that can run the call is a
candidate, verified on the GPU in float64, timed with CUDA events; the user gets a verified result; nothing is
measured while a CUDA graph is captured."""
import pytest
import torch

from resaspp_ops import autotune, multi_rate_conv2d, multi_rate_conv2d_reference
from resaspp_ops.autotune.decision import CHOSEN, MEASURED, SLOWER, STATIC
from resaspp_ops.error_rule import FLOORS, judge
from utils import Problem, make_problem

pytestmark = pytest.mark.cuda

P = Problem(2, 64, 64, 17, 19, (2, 4, 6))


@pytest.fixture
def measured(tmp_path, monkeypatch):
    monkeypatch.delenv("RESASPP_AUTO", raising=False)  # the CUDA default: measure
    monkeypatch.setenv("RESASPP_CACHE_DIR", str(tmp_path))
    autotune.reset()
    yield
    autotune.reset()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_measured_choice_is_verified_and_its_result_right(measured, gpu_device, dtype):
    x, w1, w3, _, _ = make_problem(P, dtype, gpu_device, seed=11)
    for t in (x, w1, w3):
        t.requires_grad_(True)
    y = multi_rate_conv2d(x, w1, w3, P.rates)
    y.float().sum().backward()
    decisions = {d.key.direction: d for d in autotune.auto_choices()}
    assert set(decisions) == {"forward", "input_grad", "weight_grad"}
    for decision in decisions.values():
        assert decision.source == MEASURED and "on " + torch.cuda.get_device_name(gpu_device) in decision.key.text()
        verified = [t for t in decision.trials if t.status in (CHOSEN, SLOWER)]
        assert verified and all(t.median_ms > 0 for t in verified)
        print(decision.summary())
    ref64 = multi_rate_conv2d_reference(*(t.detach().double() for t in (x, w1, w3)), P.rates)
    yardstick = multi_rate_conv2d_reference(x.detach(), w1.detach(), w3.detach(), P.rates)
    ok, detail = judge("out", y.detach(), ref64, [(yardstick, ref64)], FLOORS[dtype])
    assert ok, detail


def test_nothing_is_measured_while_a_cuda_graph_is_captured(measured, gpu_device, monkeypatch):
    x, w1, w3, _, _ = make_problem(P, torch.bfloat16, gpu_device, seed=12)
    stream = torch.cuda.Stream(gpu_device)
    stream.wait_stream(torch.cuda.current_stream(gpu_device))
    with torch.cuda.stream(stream), torch.no_grad():
        monkeypatch.setenv("RESASPP_AUTO", "static")
        multi_rate_conv2d(x, w1, w3, P.rates)  # the static backend's warm-up (compiles, plans) outside the capture
        monkeypatch.setenv("RESASPP_AUTO", "measure")
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            y = multi_rate_conv2d(x, w1, w3, P.rates)
    torch.cuda.current_stream(gpu_device).wait_stream(stream)
    graph.replay()
    torch.cuda.synchronize(gpu_device)
    assert autotune.COUNTS["measurements"] == 0
    forward = [d for d in autotune.auto_choices() if d.key.rates == P.rates]
    assert forward and forward[0].source == STATIC and "CUDA graph" in forward[0].reason
    torch.testing.assert_close(y.float(), multi_rate_conv2d_reference(x, w1, w3, P.rates).float(), rtol=2e-2,
                               atol=2e-2)
