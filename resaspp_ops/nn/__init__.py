"""Modules: FusedASPP and the model converters."""
from resaspp_ops.nn.convert import aspp_rates, convert_aspp, fused_from_aspp, revert_aspp
from resaspp_ops.nn.fused_aspp import FusedASPP

__all__ = ["FusedASPP", "aspp_rates", "convert_aspp", "fused_from_aspp", "revert_aspp"]
