"""Deployment: what the exporters need to know about the fused ops.

ONNX. `torch.onnx.export(model, args, dynamo=True)` captures the model with torch.export, then decomposes
every op that its ONNX registry cannot translate, using `torch._decomp.decomposition_table`. The fused ops
register their plain-PyTorch composition there when resaspp_ops is imported (register_onnx_decompositions):
one Conv per branch with the branch's dilation and padding (for the separable op a depthwise Conv with
group = C, then the pointwise Conv), Concat, Mul/Add for the folded epilogue and mid stage, Relu:
standard ONNX nodes, no custom domain, so ONNX Runtime and TensorRT run the graph as it is.
torch.compile and ExportedProgram.run_decompositions() keep the op (tests/test_deploy.py checks both), but
FakeTensorMode reads that table too: with symbolic sizes (torch.compile(dynamic=True), dynamic export) it
prefers a decomposition there to the op's fake kernel to derive the output's metadata. So each composition
hands back what the op does, layout included (channels_last): with the reference's plain concatenation the
traced metadata said NCHW where the op gives channels_last, and Inductor's stride check failed (issue 26).
The decomposition computes every tap (ONNX Conv pads with zeros), valid for any batch and
map size, so dynamic shapes export. ONNX export is for inference: the fused modules warn when exported in
training mode (out of scope: batch statistics, nothing checked against ONNX Runtime).
The exporter needs onnxscript (`pip install resaspp_ops[onnx]`).

TorchScript cannot compile the fused modules (their forward is Python: caches, routing, the custom op's Python
autograd) and a trace would freeze their cached weights and routing: both are refused at once with a message
that names the ways to deploy (TORCHSCRIPT_MESSAGE).
"""
from __future__ import annotations

import torch
import torch._decomp

TORCHSCRIPT_MESSAGE = (
    "resaspp_ops's fused ASPP cannot be compiled or traced by TorchScript. To deploy a model that holds it: "
    "torch.onnx.export(model.eval(), args, dynamo=True) (the fused op exports as standard ONNX Conv/Concat/Relu "
    "nodes), torch.export.export(model, args) (AOTInductor: torch._inductor.aoti_compile_and_package), or "
    "resaspp_ops.revert_aspp(model) first, which puts the original ASPP back (torchvision's, or the separable ASPP "
    "it was converted from) for torch.jit.script / trace.")


def refuse_torchscript() -> None:
    """Raises RuntimeError(TORCHSCRIPT_MESSAGE) while torch.jit traces or scripts (before any input check
    could print TracerWarnings)."""
    if torch.jit.is_tracing() or torch.jit.is_scripting():
        raise RuntimeError(TORCHSCRIPT_MESSAGE)


def _multi_rate_conv2d_composition(x, w1x1, w3x3, rates, scale, shift, relu, backend):
    from resaspp_ops.ops import multi_rate_conv2d_reference

    out = multi_rate_conv2d_reference(x, w1x1, w3x3, tuple(rates), scale, shift, relu)
    return out.contiguous(memory_format=torch.channels_last)  # the op's layout (see the module docstring)


def _multi_rate_separable_conv2d_composition(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift,
                                              relu, backend):
    from resaspp_ops.ops_separable import multi_rate_separable_conv2d_reference

    out = multi_rate_separable_conv2d_reference(x, w1x1, w_dw, w_pw, tuple(rates), mid_scale, mid_shift, mid_relu,
                                                scale, shift, relu)
    return out.contiguous(memory_format=torch.channels_last)  # the op's layout (see the module docstring)


def onnx_decompositions() -> dict:
    """{registered op: its plain-PyTorch composition} for the ONNX exporter."""
    return {torch.ops.resaspp_ops.multi_rate_conv2d.default: _multi_rate_conv2d_composition,
            torch.ops.resaspp_ops.multi_rate_separable_conv2d.default: _multi_rate_separable_conv2d_composition}


def register_onnx_decompositions() -> None:
    """Puts onnx_decompositions() into torch._decomp.decomposition_table (idempotent)."""
    table = torch._decomp.decomposition_table
    for op, composition in onnx_decompositions().items():
        table.setdefault(op, composition)
