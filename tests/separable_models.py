"""Unfused separable ASPPs the separable tests compare against, written from their sources' public structure
(neither package is installed here):

    MMSegASPP    mmsegmentation's DepthwiseSeparableASPPHead up to its bottleneck (image_pool, aspp_modules,
                 bottleneck), with mmcv's ConvModule / DepthwiseSeparableConvModule attribute names, so its
                 state_dict keys are mmsegmentation's: a BatchNorm and ReLU between depthwise and pointwise
    VainFASPP    VainF/DeepLabV3Plus-Pytorch's ASPP after convert_to_separable_conv: its atrous branches are
                 Sequential(AtrousSeparableConvolution(body = Sequential(depthwise, pointwise)), BN, ReLU)

smp's separable ASPP is imported from segmentation_models_pytorch itself (the test extra installs it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn



class ConvModule(nn.Module):
    """mmcv's ConvModule with norm_cfg=dict(type="BN") and act_cfg=dict(type="ReLU"): conv, bn, activate."""

    def __init__(self, cin, cout, k, padding=0, dilation=1, groups=1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, padding=padding, dilation=dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvModule(nn.Module):
    """mmcv's DepthwiseSeparableConvModule: depthwise_conv then pointwise_conv, each a ConvModule."""

    def __init__(self, cin, cout, k, padding, dilation):
        super().__init__()
        self.depthwise_conv = ConvModule(cin, cin, k, padding, dilation, groups=cin)
        self.pointwise_conv = ConvModule(cin, cout, 1)

    def forward(self, x):
        return self.pointwise_conv(self.depthwise_conv(x))


class MMSegASPP(nn.Module):
    """DepthwiseSeparableASPPHead's ASPP: dilations (1, *rates), image pooling first in the concatenation."""

    def __init__(self, cin, rates, channels):
        super().__init__()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(cin, channels, 1))
        self.aspp_modules = nn.ModuleList(
            [ConvModule(cin, channels, 1)] + [DepthwiseSeparableConvModule(cin, channels, 3, r, r) for r in rates])
        self.bottleneck = ConvModule((len(rates) + 2) * channels, channels, 3, padding=1)

    def forward(self, x):
        outs = [F.interpolate(self.image_pool(x), size=x.shape[2:], mode="bilinear", align_corners=False)]
        outs += [m(x) for m in self.aspp_modules]
        return self.bottleneck(torch.cat(outs, dim=1))


class AtrousSeparableConvolution(nn.Module):
    """VainF's: body = Sequential(depthwise Conv2d(groups=in), pointwise Conv2d 1x1)."""

    def __init__(self, cin, cout, k, padding, dilation):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(cin, cin, k, padding=padding, dilation=dilation, groups=cin, bias=False),
                                  nn.Conv2d(cin, cout, 1, bias=False))

    def forward(self, x):
        return self.body(x)


class VainFPooling(nn.Sequential):
    def __init__(self, cin, cout):
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))

    def forward(self, x):
        size = x.shape[-2:]
        return F.interpolate(super().forward(x), size=size, mode="bilinear", align_corners=False)


class VainFASPP(nn.Module):
    """VainF's ASPP (three rates; out_channels 256 in VainF, smaller here for speed), separable branches."""

    def __init__(self, cin, rates, cout=256):
        super().__init__()
        modules = [nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))]
        for r in rates:
            modules.append(nn.Sequential(AtrousSeparableConvolution(cin, cout, 3, r, r), nn.BatchNorm2d(cout),
                                         nn.ReLU(inplace=True)))
        modules.append(VainFPooling(cin, cout))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(nn.Conv2d(5 * cout, cout, 1, bias=False), nn.BatchNorm2d(cout),
                                     nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x):
        return self.project(torch.cat([conv(x) for conv in self.convs], dim=1))


def smp_separable_aspp(cin, rates, cout, dropout=0.0):
    """segmentation_models_pytorch's ASPP(separable=True) (smp.DeepLabV3Plus's decoder.aspp[0])."""
    from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP

    return ASPP(cin, cout, rates, separable=True, dropout=dropout)
