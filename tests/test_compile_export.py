"""torch.compile and torch.export through FusedASPP (issue 7, CPU part)."""
import copy

import pytest
import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabHead, DeepLabV3

from resaspp_ops import FusedASPP, convert_aspp, revert_aspp


def tiny_deeplabv3(num_classes=3):
    """torchvision's DeepLabV3 with a 2-layer, output-stride-4 backbone: fast to compile on a CPU."""
    body = nn.Sequential()
    body.add_module("stem", nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU()))
    body.add_module("layer4", nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU()))
    backbone = IntermediateLayerGetter(body, return_layers={"layer4": "out"})
    head = DeepLabHead(16, num_classes, atrous_rates=(1, 2, 3))
    head[0] = ASPP(16, [1, 2, 3], 8)
    head[1] = nn.Conv2d(8, 8, 3, padding=1, bias=False)
    head[2] = nn.BatchNorm2d(8)
    head[4] = nn.Conv2d(8, num_classes, 1)
    return DeepLabV3(backbone, head)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph_matches_eager(train, backend):
    torch.manual_seed(0)
    model = convert_aspp(tiny_deeplabv3()).train(train)
    model.classifier[0].project[3].p = 0.0  # dropout off: eager and compiled draw different masks
    assert isinstance(model.classifier[0], FusedASPP)
    compiled_model = copy.deepcopy(model)
    compiled = torch.compile(compiled_model, fullgraph=True, backend=backend)
    x = torch.randn(2, 3, 32, 40)
    y_eager = model(x)["out"]
    y_compiled = compiled(x)["out"]
    torch.testing.assert_close(y_compiled, y_eager, rtol=1e-4, atol=1e-5)
    if train:
        y_eager.square().mean().backward()
        y_compiled.square().mean().backward()
        for (name, p), q in zip(model.named_parameters(), compiled_model.parameters()):
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_export_eval_fused_aspp():
    torch.manual_seed(0)
    fused = FusedASPP(16, [1, 2, 3], 8).eval()
    x = torch.randn(2, 16, 9, 11)
    program = torch.export.export(fused, (x,))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert "resaspp_ops.multi_rate_conv2d.default" in targets
    torch.testing.assert_close(program.module()(x), fused(x))


def test_revert_is_the_portable_export_path():
    """After revert_aspp the exported graph holds only core ATen ops (no resaspp_ops needed to load it)."""
    torch.manual_seed(0)
    model = revert_aspp(convert_aspp(nn.Sequential(ASPP(16, [1, 2], 8)))).eval()
    x = torch.randn(2, 16, 9, 11)
    program = torch.export.export(model, (x,))
    assert not any("resaspp_ops" in str(node.target) for node in program.graph.nodes)
    torch.testing.assert_close(program.module()(x), model(x))


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_compile_fullgraph_with_a_named_backend(backend):
    from resaspp_ops import multi_rate_conv2d

    x, w1, w3 = torch.randn(2, 6, 7, 9), torch.randn(4, 6, 1, 1), torch.randn(2, 4, 6, 3, 3)
    f = torch.compile(lambda *a: multi_rate_conv2d(*a, (1, 3), backend=backend), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(f(x, w1, w3), multi_rate_conv2d(x, w1, w3, (1, 3)))


_INDUCTOR_UNDER_CI = r"""
import torch
from resaspp_ops import FusedASPP, FusedSeparableASPP

torch.manual_seed(0)
modules = ((FusedASPP(8, [1, 2], 4).eval(), False), (FusedSeparableASPP(8, [1, 3], 4, dropout=0.0).train(), True))
for module, dynamic in modules:
    compiled = torch.compile(module, dynamic=dynamic, fullgraph=True)
    for shape in ((2, 8, 9, 11), (3, 8, 7, 6)):
        x = torch.randn(shape).to(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), module(x), rtol=1e-4, atol=1e-5)
        if not dynamic:
            break
import torch._inductor.lowering as lowering
assert torch.ops.resaspp_ops.multi_rate_conv2d.default in lowering.lowerings
print("inductor kept the fused ops")
"""


def test_inductor_compiles_the_fused_ops_where_the_ci_variable_is_set(tmp_path):
    """Inductor refuses an implicit fallback for an op with an entry in torch._decomp.decomposition_table (the
    ops' ONNX compositions) wherever CI is set, as GitHub Actions sets it; the ops register as fallbacks of their
    own. A fresh process with Inductor's caches off, so that a cached graph cannot hide the lowering."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "CI": "true", "TORCHINDUCTOR_FX_GRAPH_CACHE": "0", "TORCHINDUCTOR_AUTOGRAD_CACHE": "0",
           "TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", _INDUCTOR_UNDER_CI], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "inductor kept the fused ops" in done.stdout
