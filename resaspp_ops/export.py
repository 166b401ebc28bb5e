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
Inductor reads it as well: an op with an entry there becomes an implicit fallback, which Inductor refuses
wherever the CI environment variable is set (GitHub Actions and most CI services set it: "make_fallback(...): a
decomposition exists"). So the ops tell Inductor, once its lowering module is loaded, that they are fallback
kernels of their own (declare_inductor_fallbacks, called where the ops are traced): compiled models keep the
fused kernels, in CI and out of it.
The decomposition computes every tap (ONNX Conv pads with zeros), valid for any batch and
map size, so dynamic shapes export. ONNX export is for inference: the fused modules warn when exported in
training mode (out of scope: batch statistics, nothing checked against ONNX Runtime).
The exporter needs onnxscript (`pip install resaspp_ops[onnx]`).

TorchScript cannot compile the fused modules (their forward is Python: caches, routing, the custom op's Python
autograd) and a trace would freeze their cached weights and routing: both are refused at once with a message
that names the ways to deploy (TORCHSCRIPT_MESSAGE).
"""
from __future__ import annotations

import sys

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

    declare_inductor_fallbacks()  # symbolic sizes trace the op through this composition, not its fake kernel
    out = multi_rate_conv2d_reference(x, w1x1, w3x3, tuple(rates), scale, shift, relu)
    return out.contiguous(memory_format=torch.channels_last)  # the op's layout (see the module docstring)


def _multi_rate_separable_conv2d_composition(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift,
                                              relu, backend):
    from resaspp_ops.ops_separable import multi_rate_separable_conv2d_reference

    declare_inductor_fallbacks()
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


_INDUCTOR_TOLD = False


def declare_inductor_fallbacks() -> None:
    """Registers the fused ops with Inductor as fallback kernels (the op itself runs), as its implicit fallback
    would, but without the CI-only refusal that their ONNX decomposition in torch._decomp.decomposition_table
    triggers (see the module docstring). Does nothing until Inductor's lowering module is loaded (it never imports
    Inductor: plain eager use costs nothing), then once; called from the ops' fake kernels and compositions, which
    every compile traces before it lowers."""
    global _INDUCTOR_TOLD
    lowering = sys.modules.get("torch._inductor.lowering")
    if _INDUCTOR_TOLD or lowering is None:
        return
    from torch._library.utils import get_layout_constraint_tag

    for op in onnx_decompositions():
        if op not in lowering.lowerings:
            constraint = lowering.tag_to_layout_constraint(get_layout_constraint_tag(op, with_default=True))
            lowering.make_fallback(op, layout_constraint=constraint, warn=False, override_decomp=True)
    _INDUCTOR_TOLD = True
