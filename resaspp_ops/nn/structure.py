"""Which modules have the structure of an ASPP the package can fuse, and their rates (no module is built).

    aspp_rates(m)            torchvision's ASPP structure (and smp's non-separable ASPP): FusedASPP
    separable_aspp_rates(m)  smp's separable ASPP, or VainF/DeepLabV3Plus-Pytorch's ASPP with
                             AtrousSeparableConvolution branches: FusedSeparableASPP
    rates_of(m)              the rates of any of those, fused or not (None for anything else)
"""
from __future__ import annotations

from torch import nn

from resaspp_ops.nn.depthwise_separable_aspp import FusedDepthwiseSeparableASPP
from resaspp_ops.nn.fused_aspp import FusedASPP
from resaspp_ops.nn.separable_aspp import FusedSeparableASPP


def plain_conv(m, kernel: int) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (kernel, kernel) and m.stride == (1, 1)
            and m.groups == 1 and m.bias is None and m.padding_mode == "zeros")


def conv_bn_relu(seq, kernel: int) -> bool:
    mods = list(seq.children()) if isinstance(seq, nn.Module) else []
    return (len(mods) == 3 and plain_conv(mods[0], kernel) and isinstance(mods[1], nn.modules.batchnorm._BatchNorm)
            and type(mods[2]) is nn.ReLU)


def _pool_and_project(convs, project, c: int, co: int) -> bool:
    """convs[-1] = AdaptiveAvgPool2d(1)-Conv1x1-BN-ReLU and project = Conv1x1-BN-ReLU-Dropout over all branches."""
    pool = list(convs[-1].children())
    if (len(pool) != 4 or not isinstance(pool[0], nn.AdaptiveAvgPool2d) or pool[0].output_size not in (1, (1, 1))
            or not conv_bn_relu(nn.Sequential(*pool[1:]), 1) or (pool[1].in_channels, pool[1].out_channels) != (c, co)):
        return False
    proj = list(project.children())
    return (len(proj) == 4 and conv_bn_relu(nn.Sequential(*proj[:3]), 1) and isinstance(proj[3], nn.Dropout)
            and (proj[0].in_channels, proj[0].out_channels) == (len(convs) * co, co))


def _head(module: nn.Module):
    """(convs, project, C, Co) of a module with torchvision's ASPP head layout, or None."""
    convs, project = getattr(module, "convs", None), getattr(module, "project", None)
    if not isinstance(convs, nn.ModuleList) or not isinstance(project, nn.Sequential) or len(convs) < 3:
        return None
    if not conv_bn_relu(convs[0], 1):
        return None
    conv1 = convs[0][0]
    return convs, project, conv1.in_channels, conv1.out_channels


def _atrous(conv: nn.Conv2d) -> bool:
    return conv.dilation[0] == conv.dilation[1] and conv.padding == conv.dilation


def aspp_rates(module: nn.Module):
    """The atrous rates of a module with torchvision's ASPP structure, or None if it has another structure.

    The structure (torchvision's ASPP, and segmentation_models_pytorch's non-separable ASPP):
    convs = [Conv1x1-BN-ReLU, (Conv3x3 dilation=padding=r, no bias)-BN-ReLU per rate,
    AdaptiveAvgPool2d(1)-Conv1x1-BN-ReLU]; project = Conv1x1-BN-ReLU-Dropout; one C and one Co.
    """
    head = _head(module)
    if head is None:
        return None
    convs, project, c, co = head
    rates = []
    for branch in convs[1:-1]:
        if not conv_bn_relu(branch, 3):
            return None
        conv = branch[0]
        if not _atrous(conv) or (conv.in_channels, conv.out_channels) != (c, co):
            return None
        rates.append(conv.dilation[0])
    return tuple(rates) if _pool_and_project(convs, project, c, co) else None


def separable_parts(separable: nn.Module):
    """(depthwise, pointwise) of smp's SeparableConv2d (Sequential(dw, pw)) or VainF's
    AtrousSeparableConvolution (body = Sequential(dw, pw)), or None."""
    parts = list(separable.children()) if isinstance(separable, nn.Module) else []
    if len(parts) == 1:
        parts = list(parts[0].children())
    if len(parts) != 2 or not all(isinstance(p, nn.Conv2d) for p in parts):
        return None
    return parts[0], parts[1]


def separable_aspp_rates(module: nn.Module):
    """The atrous rates of a separable ASPP (the structure FusedSeparableASPP takes), or None.

    The structure: torchvision's ASPP layout (see aspp_rates) whose atrous branches are
    Sequential(separable, BN, ReLU), separable = smp's SeparableConv2d or VainF's AtrousSeparableConvolution:
    depthwise Conv2d(C, C, 3, groups=C, dilation = padding = r, no bias), then pointwise Conv2d(C, Co, 1, no bias).
    """
    head = _head(module)
    if head is None:
        return None
    convs, project, c, co = head
    rates = []
    for branch in convs[1:-1]:
        mods = list(branch.children())
        if len(mods) != 3 or not isinstance(mods[1], nn.modules.batchnorm._BatchNorm) or type(mods[2]) is not nn.ReLU:
            return None
        parts = separable_parts(mods[0])
        if parts is None:
            return None
        dw, pw = parts
        if not (dw.kernel_size == (3, 3) and dw.stride == (1, 1) and dw.groups == c == dw.in_channels == dw.out_channels
                and dw.bias is None and dw.padding_mode == "zeros" and _atrous(dw)):
            return None
        if not plain_conv(pw, 1) or (pw.in_channels, pw.out_channels) != (c, co):
            return None
        rates.append(dw.dilation[0])
    return tuple(rates) if _pool_and_project(convs, project, c, co) else None


def rates_of(module: nn.Module):
    """The atrous rates of any ASPP the package knows, fused or not, or None (the ERF tool reads them)."""
    if isinstance(module, (FusedASPP, FusedSeparableASPP, FusedDepthwiseSeparableASPP)):
        return module.rates
    return aspp_rates(module) or separable_aspp_rates(module)
