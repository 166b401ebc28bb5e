"""Deployment of separable models (resaspp_ops.export): ONNX with nothing passed by the user, run by ONNX Runtime;
torch.export keeps the op; TorchScript refused at once with the ways out."""
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from resaspp_ops import FusedDepthwiseSeparableASPP, FusedSeparableASPP, convert_aspp, revert_aspp
from resaspp_ops.export import TORCHSCRIPT_MESSAGE
from utils import randomize_batchnorm
from test_deploy import EXAMPLE_BATCH, STANDARD_ONNX, assert_fp32_close, export_and_run

smp = pytest.importorskip("segmentation_models_pytorch", reason="the test extra installs segmentation-models-pytorch")


def _conv_groups(program) -> list[int]:
    return sorted(next((a.i for a in n.attribute if a.name == "group"), 1)
                  for n in program.model_proto.graph.node if n.op_type == "Conv")


def test_converted_smp_deeplabv3plus_exports_and_matches_eager():
    torch.manual_seed(0)
    model = smp.DeepLabV3Plus(encoder_name="resnet18", encoder_weights=None)
    randomize_batchnorm(model.decoder)
    model = convert_aspp(model).eval()
    assert isinstance(model.decoder.aspp[0], FusedSeparableASPP)
    program, run = export_and_run(model, torch.randn(EXAMPLE_BATCH, 3, 64, 64), min_size=32)
    nodes = program.model_proto.graph.node
    assert {n.op_type for n in nodes} <= STANDARD_ONNX and all(n.domain in ("", "ai.onnx") for n in nodes)
    assert _conv_groups(program).count(512) == 3  # the ASPP's three depthwise convs (C = 512), as standard Convs
    with torch.no_grad():
        for shape in [(1, 3, 64, 64), (2, 3, 96, 128)]:  # dynamic batch and map size
            xi = torch.randn(shape)
            assert_fp32_close(run(xi)[0], model(xi))


def test_bn_between_module_exports_as_standard_onnx():
    torch.manual_seed(0)
    fused = randomize_batchnorm(FusedDepthwiseSeparableASPP(8, (1, 2, 3, 5), 4)).eval()
    program, run = export_and_run(fused, torch.randn(2, 8, 9, 11))
    assert {n.op_type for n in program.model_proto.graph.node} <= STANDARD_ONNX
    assert _conv_groups(program).count(8) == 4
    with torch.no_grad():
        for shape in [(2, 8, 9, 11), (3, 8, 13, 7), (1, 8, 4, 4)]:
            xi = torch.randn(shape)
            assert_fp32_close(run(xi)[0], fused(xi))


def test_export_keeps_the_op_and_the_decomposition_is_registered():
    assert torch.ops.resaspp_ops.multi_rate_separable_conv2d.default in torch._decomp.decomposition_table
    fused = FusedSeparableASPP(8, (1, 2, 3), 4).eval()
    program = torch.export.export(fused, (torch.randn(2, 8, 5, 5),)).run_decompositions()
    assert any("multi_rate_separable_conv2d" in str(node.target) for node in program.graph.nodes)


def test_onnx_export_in_training_mode_says_it_is_out_of_scope():
    fused = FusedSeparableASPP(8, (1, 2, 3), 4).train()
    with pytest.warns(UserWarning, match=r"FusedSeparableASPP is exported to ONNX in training mode"):
        torch.onnx.export(fused, (torch.randn(2, 8, 5, 5),), dynamo=True, verbose=False)


@pytest.mark.parametrize("how", ["script", "trace"])
@pytest.mark.parametrize("cls", [FusedSeparableASPP, FusedDepthwiseSeparableASPP])
def test_torchscript_is_refused_at_once_with_the_ways_out(how, cls):
    model = nn.Sequential(cls(8, (1, 2, 3), 4)).eval()
    x = torch.randn(2, 8, 5, 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError) as info:
            torch.jit.script(model) if how == "script" else torch.jit.trace(model, (x,))
    assert TORCHSCRIPT_MESSAGE in str(info.value) and "separable ASPP it was converted from" in TORCHSCRIPT_MESSAGE
    assert not [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]


def test_revert_is_the_torchscript_way_out():
    model = revert_aspp(convert_aspp(nn.Sequential(smp.decoders.deeplabv3.decoder.ASPP(
        8, 4, (1, 2, 3), separable=True, dropout=0.5)))).eval()
    x = torch.randn(2, 8, 5, 5)
    traced = torch.jit.trace(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x))
