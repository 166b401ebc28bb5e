"""convert_aspp / revert_aspp: swap torchvision-style ASPP modules for FusedASPP and back, in place.

The swap adopts the original submodules (no copies): parameters keep their identity, so an
optimizer built before the swap still updates them, and weights, buffers, BatchNorm settings,
train/eval state, device and dtype all carry over.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from resaspp_ops.nn.fused_aspp import FusedASPP


def _plain_conv(m, kernel: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel) and m.stride == (1, 1)
            and m.groups == 1 and m.bias is None and m.padding_mode == "zeros")


def _conv_bn_relu(seq, kernel: int) -> bool:
    mods = list(seq.children()) if isinstance(seq, nn.Module) else []
    return (len(mods) == 3 and _plain_conv(mods[0], kernel) and isinstance(mods[1], nn.modules.batchnorm._BatchNorm)
            and type(mods[2]) is nn.ReLU)


def aspp_rates(module: nn.Module):
    """The atrous rates of a module with torchvision's ASPP structure, or None if it has another structure.

    The structure (torchvision's ASPP, and segmentation_models_pytorch's non-separable ASPP):
    convs = [Conv1x1-BN-ReLU, (Conv3x3 dilation=padding=r, no bias)-BN-ReLU per rate,
    AdaptiveAvgPool2d(1)-Conv1x1-BN-ReLU]; project = Conv1x1-BN-ReLU-Dropout; one C and one Co.
    """
    convs, project = getattr(module, "convs", None), getattr(module, "project", None)
    if not isinstance(convs, nn.ModuleList) or not isinstance(project, nn.Sequential) or len(convs) < 3:
        return None
    if not _conv_bn_relu(convs[0], 1):
        return None
    conv1 = convs[0][0]
    c, co = conv1.in_channels, conv1.out_channels
    rates = []
    for branch in convs[1:-1]:
        if not _conv_bn_relu(branch, 3):
            return None
        conv = branch[0]
        if (conv.dilation[0] != conv.dilation[1] or conv.padding != conv.dilation
                or (conv.in_channels, conv.out_channels) != (c, co)):
            return None
        rates.append(conv.dilation[0])
    pool = list(convs[-1].children())
    if (len(pool) != 4 or not isinstance(pool[0], nn.AdaptiveAvgPool2d) or pool[0].output_size not in (1, (1, 1))
            or not _conv_bn_relu(nn.Sequential(*pool[1:]), 1) or (pool[1].in_channels, pool[1].out_channels) != (c, co)):
        return None
    proj = list(project.children())
    if (len(proj) != 4 or not _conv_bn_relu(nn.Sequential(*proj[:3]), 1) or not isinstance(proj[3], nn.Dropout)
            or (proj[0].in_channels, proj[0].out_channels) != (len(convs) * co, co)):
        return None
    return tuple(rates)


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


def convert_aspp(model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Replace every torchvision-style ASPP in `model` by a FusedASPP, in place; returns the model.

    Matches torchvision's ASPP and any module with its structure (see `aspp_rates`). If `model`
    is itself an ASPP, the new FusedASPP is returned. Warns when nothing was converted.
    """
    model, count = _swap(model, lambda m: fused_from_aspp(m, backend=backend),
                         lambda m: not isinstance(m, FusedASPP) and aspp_rates(m) is not None)
    if count == 0:
        warnings.warn("convert_aspp found no module with torchvision's ASPP structure; nothing was converted",
                      stacklevel=2)
    return model


def revert_aspp(model: nn.Module) -> nn.Module:
    """Replace every FusedASPP in `model` by torchvision's ASPP, in place (the export path); returns the model."""
    from torchvision.models.segmentation.deeplabv3 import ASPP

    def make(fused: FusedASPP) -> nn.Module:
        with torch.device("meta"):
            aspp = ASPP(fused.in_channels, fused.rates, fused.out_channels)
        return _adopt(aspp, fused)

    model, _ = _swap(model, make, lambda m: isinstance(m, FusedASPP))
    return model
