"""mmcv's ConvModule and DepthwiseSeparableConvModule (as mmsegmentation builds them with norm_cfg=BN and
act_cfg=ReLU) in plain PyTorch: the containers of FusedDepthwiseSeparableASPP, with their attribute names, so
that the state_dict keys are mmsegmentation's (`conv.weight`, `bn.running_mean`, `depthwise_conv.conv.weight`,
`pointwise_conv.bn.weight`, ...). Real Conv2d / BatchNorm2d / ReLU submodules: SyncBatchNorm-convertible.
"""
from __future__ import annotations

from torch import Tensor, nn


class ConvBNReLU(nn.Module):
    """conv (Conv2d, no bias: a BatchNorm follows), bn (BatchNorm2d), activate (ReLU): mmcv's ConvModule."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, padding: int = 0,
                 dilation: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                              groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


class DepthwiseSeparableConvBNReLU(nn.Module):
    """depthwise_conv (ConvBNReLU 3x3, groups=C, dilation = padding = rate), then pointwise_conv (ConvBNReLU 1x1):
    mmcv's DepthwiseSeparableConvModule with a BatchNorm and ReLU between depthwise and pointwise."""

    def __init__(self, in_channels: int, out_channels: int, rate: int) -> None:
        super().__init__()
        self.depthwise_conv = ConvBNReLU(in_channels, in_channels, 3, padding=rate, dilation=rate, groups=in_channels)
        self.pointwise_conv = ConvBNReLU(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))
