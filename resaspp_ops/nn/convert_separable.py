"""The separable half of convert_aspp / revert_aspp: smp's separable ASPP and VainF/DeepLabV3Plus-Pytorch's
ASPP with AtrousSeparableConvolution branches <-> FusedSeparableASPP.

The fused module takes over the source's own `convs` and `project` containers (the very objects: smp's
ASPPSeparableConv and ASPPPooling, VainF's AtrousSeparableConvolution and their submodules), so the state_dict
keys, parameters (identity included), buffers, per-module train/eval state, device and dtype are the source's.
The source module itself is kept aside (not a submodule: invisible to state_dict, .to() and .modules()) and
revert_aspp hands it back with those containers: the source class and structure, whatever attributes it had.
"""
from __future__ import annotations

import torch
from torch import nn

from resaspp_ops.nn.separable_aspp import FusedSeparableASPP
from resaspp_ops.nn.structure import separable_aspp_rates

_SOURCE = "_reverts_to"  # the FusedSeparableASPP's __dict__ entry holding the converted source module


def convertible(module: nn.Module) -> bool:
    """A separable ASPP that holds nothing but its `convs` and `project` (anything else would be lost)."""
    return (not isinstance(module, FusedSeparableASPP) and separable_aspp_rates(module) is not None
            and set(module._modules) == {"convs", "project"} and not module._parameters and not module._buffers)


def fused_from_separable_aspp(aspp: nn.Module, *, backend: str = "auto") -> FusedSeparableASPP:
    """A FusedSeparableASPP over the containers of `aspp` (smp's or VainF's separable ASPP structure)."""
    rates = separable_aspp_rates(aspp)
    if rates is None or not convertible(aspp):
        raise TypeError(f"{type(aspp).__name__} does not have the separable ASPP structure of "
                        "segmentation_models_pytorch or VainF/DeepLabV3Plus-Pytorch")
    conv1 = aspp.convs[0][0]
    with torch.device("meta"):  # a skeleton: its containers are replaced by the source's at once
        fused = FusedSeparableASPP(conv1.in_channels, rates, conv1.out_channels, backend=backend)
    fused.convs = aspp.convs
    fused.project = aspp.project
    fused.training = aspp.training  # not .train(): that would reset the children's own modes
    fused.__dict__[_SOURCE] = aspp
    return fused


def _adopt_leaves(target: nn.Module, source: nn.Module) -> nn.Module:
    """Put every leaf module of `source` at the same qualified name in `target` (the same structure)."""
    for name, leaf in source.named_modules():
        if leaf._modules or not name:
            continue
        parent, _, attr = name.rpartition(".")
        target.get_submodule(parent)._modules[attr] = leaf
    return target


def separable_aspp_from_fused(fused: FusedSeparableASPP) -> nn.Module:
    """The source module back (convert_aspp's), else segmentation_models_pytorch's ASPP(separable=True) over
    the fused module's submodules."""
    source = fused.__dict__.get(_SOURCE)
    if source is not None:
        source.convs, source.project = fused.convs, fused.project  # what the fused module holds now
        source.training = fused.training
        return source
    try:
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP
    except ImportError as exc:
        raise ImportError("revert_aspp of a FusedSeparableASPP built directly (not by convert_aspp) restores "
                          "segmentation_models_pytorch's separable ASPP: pip install segmentation-models-pytorch") from exc
    rates = fused.rates
    if len(rates) != 3:
        raise ValueError(f"segmentation_models_pytorch's ASPP takes three rates; this FusedSeparableASPP has {rates}")
    with torch.device("meta"):
        aspp = ASPP(fused.in_channels, fused.out_channels, rates, separable=True, dropout=fused.project[3].p)
    aspp = _adopt_leaves(aspp, fused)
    aspp.training = fused.training
    return aspp
