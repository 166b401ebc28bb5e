"""Deployment of converted models (resaspp_ops.export): ONNX with nothing passed by the user, run by ONNX
Runtime; TorchScript refused at once with the ways out."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models.segmentation import deeplabv3_resnet50
from torchvision.models.segmentation.deeplabv3 import ASPP

import resaspp_ops
from resaspp_ops import FusedASPP, convert_aspp, revert_aspp
from resaspp_ops.export import TORCHSCRIPT_MESSAGE
from utils import randomize_batchnorm

onnx = pytest.importorskip("onnx", reason="the test extra installs onnx (pip install -e '.[test]')")
ort = pytest.importorskip("onnxruntime", reason="the test extra installs onnxruntime")
pytest.importorskip("onnxscript", reason="the test extra installs onnxscript")

STANDARD_ONNX = {"Conv", "Concat", "Mul", "Add", "Relu", "ReduceMean", "Sqrt", "Div", "Reshape", "Sub",
                 "MaxPool", "Resize", "Shape", "Gather", "Slice", "Unsqueeze", "Cast", "Expand", "Identity",
                 "Constant", "Squeeze", "Concat", "Reciprocal", "GlobalAveragePool"}


# PyTorch 2.11's ONNX exporter cannot keep the batch dynamic from a batch-1 example once a convolution reads a
# channels_last tensor (the fused ops hand back channels_last): its fake convolution guards the batch <= 1, and
# the dims it then suggests are invalid ("Invalid ranges [2:1]"); 2.14's can. docs/deploy.md says so.
BATCH1_DYNAMIC_EXPORT = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14)
EXAMPLE_BATCH = 1 if BATCH1_DYNAMIC_EXPORT else 2  # the example batch of the whole-model exports


def export_and_run(model, x, dynamic=True, min_size=4):
    """The ONNX program of `model` (eval) for x, checked by onnx.checker; a function that runs it in ONNX Runtime.
    dynamic: batch and map size dynamic (the map from min_size up)."""
    dims = ({0: torch.export.Dim("n", max=64), 2: torch.export.Dim("h", min=min_size, max=1024),
             3: torch.export.Dim("w", min=min_size, max=1024)},) if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dims, verbose=False)
    onnx.checker.check_model(program.model_proto, full_check=True)
    session = ort.InferenceSession(program.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])

    def run(inp):
        return session.run(None, {session.get_inputs()[0].name: inp.numpy()})
    return program, run


def assert_fp32_close(actual: np.ndarray, expected: torch.Tensor):
    expected = expected.detach().numpy()
    err = np.abs(actual - expected).max()
    assert err <= 1e-5 * max(np.abs(expected).max(), 1e-30), f"max error {err:.3e} of max |ref| {np.abs(expected).max():.3e}"


def test_fused_aspp_with_four_rates_exports_as_standard_onnx():
    torch.manual_seed(0)
    fused = randomize_batchnorm(FusedASPP(16, (1, 2, 3, 5), 8)).eval()
    x = torch.randn(2, 16, 9, 11)
    program, run = export_and_run(fused, x)
    nodes = program.model_proto.graph.node
    assert {n.op_type for n in nodes} <= STANDARD_ONNX and all(n.domain in ("", "ai.onnx") for n in nodes)
    dilations = sorted(tuple(a.ints)[0] for n in nodes if n.op_type == "Conv" for a in n.attribute
                       if a.name == "dilations" and tuple(a.ints) != (1, 1))
    assert dilations == [1, 2, 3, 5][1:]  # the atrous convs (rate 1 is plain)
    with torch.no_grad():
        for shape in [(2, 16, 9, 11), (3, 16, 13, 7), (1, 16, 4, 4)]:  # dynamic batch and map size
            xi = torch.randn(shape)
            assert_fp32_close(run(xi)[0], fused(xi))


def test_converted_deeplabv3_resnet50_exports_and_matches_eager():
    torch.manual_seed(0)
    model = convert_aspp(deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)).eval()
    assert isinstance(model.classifier[0], FusedASPP)
    x = torch.randn(EXAMPLE_BATCH, 3, 96, 96)
    program, run = export_and_run(model, x)
    with torch.no_grad():
        for shape in [(1, 3, 96, 96), (2, 3, 64, 80)]:
            xi = torch.randn(shape)
            assert_fp32_close(run(xi)[0], model(xi)["out"])


@pytest.mark.skipif(BATCH1_DYNAMIC_EXPORT, reason="PyTorch >= 2.14 exports it; the test above uses a batch of 1")
@pytest.mark.xfail(raises=torch.onnx.OnnxExporterError, strict=True,
                   reason="PyTorch 2.11's exporter: a dynamic batch from a batch-1 example (see BATCH1_DYNAMIC_EXPORT)")
def test_dynamic_batch_from_a_batch_of_one_fails_in_pytorch_2_11():
    """Keeps the version limit honest: strict, so a PyTorch that exports it fails this test until the limit
    (BATCH1_DYNAMIC_EXPORT, docs/deploy.md) is moved."""
    torch.manual_seed(0)
    model = convert_aspp(deeplabv3_resnet50(weights=None, weights_backbone=None, aux_loss=False)).eval()
    export_and_run(model, torch.randn(1, 3, 96, 96))


def test_onnx_export_of_a_training_fused_aspp_says_it_is_out_of_scope():
    fused = FusedASPP(8, (1, 2), 4).train()
    with pytest.warns(UserWarning, match=r"FusedASPP is exported to ONNX in training mode.*model\.eval\(\)"):
        torch.onnx.export(fused, (torch.randn(2, 8, 5, 5),), dynamo=True, verbose=False)


def test_the_onnx_decomposition_leaves_compile_and_export_alone():
    """Registered in torch._decomp.decomposition_table, which only the ONNX exporter reads: torch.export's
    own run_decompositions() keeps the fused op (and torch.compile keeps calling it: test_compile_export)."""
    assert torch.ops.resaspp_ops.multi_rate_conv2d.default in torch._decomp.decomposition_table
    fused = FusedASPP(8, (1, 2), 4).eval()
    program = torch.export.export(fused, (torch.randn(2, 8, 5, 5),)).run_decompositions()
    assert any("resaspp_ops" in str(node.target) for node in program.graph.nodes)


@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_of_a_converted_model_fails_at_once_with_the_ways_out(how):
    model = convert_aspp(nn.Sequential(ASPP(8, [1, 2], 4))).eval()
    x = torch.randn(2, 8, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError) as info:
            torch.jit.script(model) if how == "script" else torch.jit.trace(model, (x,))
    assert str(info.value) == TORCHSCRIPT_MESSAGE or TORCHSCRIPT_MESSAGE in str(info.value)
    for way in ("revert_aspp", "torch.export", "torch.onnx.export"):
        assert way in TORCHSCRIPT_MESSAGE
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    # The way out works: torchvision's ASPP back, then TorchScript as usual.
    reverted = revert_aspp(model)
    scripted = torch.jit.script(reverted)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), reverted(x))


def test_tracing_the_bare_op_is_refused_too():
    x, w1, w3 = torch.randn(1, 4, 5, 5), torch.randn(3, 4, 1, 1), torch.randn(1, 3, 4, 3, 3)
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.jit.trace(lambda a: resaspp_ops.multi_rate_conv2d(a, w1, w3, (2,)), (x,))
