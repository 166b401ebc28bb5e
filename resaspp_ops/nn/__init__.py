"""Modules: the fused ASPP layers and the model converters.

    FusedASPP                    torchvision's ASPP on multi_rate_conv2d          (fused_aspp.py)
    FusedSeparableASPP           smp's separable ASPP on multi_rate_separable_conv2d  (separable_aspp.py)
    FusedDepthwiseSeparableASPP  mmsegmentation's, BN + ReLU between depthwise and pointwise
                                                                                  (depthwise_separable_aspp.py)
    convert_aspp / revert_aspp   swap them into a model and back                  (convert.py)
"""
from resaspp_ops.nn.convert import aspp_rates, convert_aspp, fused_from_aspp, revert_aspp
from resaspp_ops.nn.depthwise_separable_aspp import FusedDepthwiseSeparableASPP
from resaspp_ops.nn.fused_aspp import FusedASPP
from resaspp_ops.nn.separable_aspp import FusedSeparableASPP

__all__ = ["FusedASPP", "FusedDepthwiseSeparableASPP", "FusedSeparableASPP", "aspp_rates", "convert_aspp",
           "fused_from_aspp", "revert_aspp"]
