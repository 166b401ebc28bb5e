"""convert_aspp / revert_aspp: swap ASPP modules for the fused ones and back, in place.

    torchvision's ASPP structure (torchvision, smp's non-separable ASPP)  <-> FusedASPP (here)
    separable ASPP (smp's DeepLabV3Plus default, VainF's AtrousSeparableConvolution branches)
                                                                          <-> FusedSeparableASPP (convert_separable.py)

The swap adopts the original submodules (no copies): parameters keep their identity, so an
optimizer built before the swap still updates them, and weights, buffers, BatchNorm settings,
train/eval state, device and dtype all carry over. Which modules match: nn/structure.py. A model that declares
itself scriptable (segmentation_models_pytorch's `_is_torch_scriptable`) says it is not while it holds a fused
module, and says what it said before once reverted (nn/scriptable_flag.py).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from resaspp_ops.nn import convert_separable
from resaspp_ops.nn.fused_aspp import FusedASPP
from resaspp_ops.nn.scriptable_flag import update_scriptable_flags
from resaspp_ops.nn.separable_aspp import FusedSeparableASPP
from resaspp_ops.nn.structure import aspp_rates

__all__ = ["aspp_rates", "convert_aspp", "fused_from_aspp", "revert_aspp"]


def _adopt(target: nn.Module, source: nn.Module) -> nn.Module:
    """Give `target` (built on the meta device) the submodules of `source`, index by index."""
    for i, (dst, src) in enumerate(zip(target.convs, source.convs)):
        for j, child in enumerate(src.children()):
            dst._modules[str(j)] = child
    for j, child in enumerate(source.project.children()):
        target.project._modules[str(j)] = child
    target.training = source.training  # not .train(): that would reset the children's own modes
    return target


def fused_from_aspp(aspp: nn.Module, *, backend: str = "auto") -> FusedASPP:
    """A FusedASPP that adopts the submodules of `aspp` (torchvision's ASPP structure)."""
    rates = aspp_rates(aspp)
    if rates is None:
        raise TypeError(f"{type(aspp).__name__} does not have torchvision's ASPP structure")
    conv1 = aspp.convs[0][0]
    with torch.device("meta"):
        fused = FusedASPP(conv1.in_channels, rates, conv1.out_channels, backend=backend)
    return _adopt(fused, aspp)


def _swap(model: nn.Module, make, matches) -> tuple[nn.Module, int]:
    if matches(model):
        return make(model), 1
    count = 0
    for name, child in list(model.named_children()):
        new_child, n = _swap(child, make, matches)
        if new_child is not child:
            setattr(model, name, new_child)
        count += n
    return model, count


def _fuse(module: nn.Module, backend: str) -> nn.Module:
    if convert_separable.convertible(module):
        return convert_separable.fused_from_separable_aspp(module, backend=backend)
    return fused_from_aspp(module, backend=backend)


def _matches(module: nn.Module) -> bool:
    if isinstance(module, (FusedASPP, FusedSeparableASPP)):
        return False
    return aspp_rates(module) is not None or convert_separable.convertible(module)


def convert_aspp(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace every ASPP in `model` by its fused module, in place; returns the model.

    torchvision's ASPP and any module with its structure (see `aspp_rates`) become FusedASPP; smp's separable
    ASPP (smp.DeepLabV3Plus's default) and VainF/DeepLabV3Plus-Pytorch's ASPP with AtrousSeparableConvolution
    branches become FusedSeparableASPP (see `structure.separable_aspp_rates`). If `model` is itself an ASPP,
    the new module is returned. Warns when nothing was converted. A module that carries smp's
    `_is_torch_scriptable` flag and now holds a fused module has it set to False (TorchScript refuses them).
    """
    model, count = _swap(model, lambda m: _fuse(m, backend), _matches)
    update_scriptable_flags(model)
    if count == 0:
        warnings.warn("convert_aspp found no module with torchvision's ASPP structure or a separable ASPP "
                      "structure; nothing was converted", stacklevel=2)
    return model


def revert_aspp(model: nn.Module) -> nn.Module:
    """Replace every FusedASPP in `model` by torchvision's ASPP and every FusedSeparableASPP by the module it was
    converted from (smp's or VainF's separable ASPP; smp's for one built directly), in place (the export path);
    returns the model. The `_is_torch_scriptable` flags that convert_aspp set get their earlier values back."""
    def make(fused: nn.Module) -> nn.Module:
        if isinstance(fused, FusedSeparableASPP):
            return convert_separable.separable_aspp_from_fused(fused)
        from torchvision.models.segmentation.deeplabv3 import ASPP

        with torch.device("meta"):
            aspp = ASPP(fused.in_channels, fused.rates, fused.out_channels)
        return _adopt(aspp, fused)

    model, _ = _swap(model, make, lambda m: isinstance(m, (FusedASPP, FusedSeparableASPP)))
    update_scriptable_flags(model)
    return model
