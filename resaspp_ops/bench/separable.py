"""The separable family in the suite (presets with family="separable", DeepLabV3+): what its cases run on.

Level "module": segmentation_models_pytorch's separable ASPP (smp.DeepLabV3Plus's decoder.aspp[0]) is the
source and the baselines (smp-eager, smp-eager-cl, smp-compile); the fused providers run FusedSeparableASPP with
its weights. Without segmentation_models_pytorch these cases are skipped with that reason.
Level "branches": the 1x1 branch and the depthwise-separable branches alone, output [N, (1+B)*Co, H, W]
(SeparableBranchConvs): per branch a depthwise F.conv2d and a pointwise one, and the concat (sepconv-eager,
-eager-cl, -compile), against multi_rate_separable_conv2d per backend.
"""
from __future__ import annotations

import copy
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resaspp_ops.ops_separable import multi_rate_separable_conv2d


def smp_unavailable() -> Optional[str]:
    """Why the module-level separable cases cannot run here (None: they can)."""
    if importlib.util.find_spec("segmentation_models_pytorch") is None:
        return "segmentation_models_pytorch is not installed (pip install segmentation-models-pytorch)"
    return None


class SeparableBranchConvs(nn.Module):
    """The separable branches as a module: x [N, C, H, W] -> [N, (1+B)*Co, H, W].

    impl "conv2d" runs F.conv2d per branch (depthwise [C, 1, 3, 3] with groups=C, then pointwise [Co, C, 1, 1],
    each a 4-D weight, so channels_last converts it) and concatenates; any other impl is a
    multi_rate_separable_conv2d backend name, with the op's stacked w_dw [B, C, 1, 3, 3] and w_pw [B, Co, C, 1, 1].
    """

    def __init__(self, w1x1: Tensor, w_dw: Tensor, w_pw: Tensor, rates, impl: str) -> None:
        super().__init__()
        self.w1x1 = nn.Parameter(w1x1.detach().clone())
        if impl == "conv2d":
            self.w_dw = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in w_dw])
            self.w_pw = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in w_pw])
        else:
            self.w_dw = nn.Parameter(w_dw.detach().clone())
            self.w_pw = nn.Parameter(w_pw.detach().clone())
        self.rates = tuple(rates)
        self.impl = impl

    def stacked(self) -> tuple[Tensor, Tensor, Tensor]:
        """(w1x1, w_dw [B, C, 1, 3, 3], w_pw [B, Co, C, 1, 1]) whatever the impl."""
        if isinstance(self.w_dw, nn.ParameterList):
            return self.w1x1, torch.stack(list(self.w_dw)), torch.stack(list(self.w_pw))
        return self.w1x1, self.w_dw, self.w_pw

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "conv2d":
            c = x.shape[1]
            ys = [F.conv2d(x, self.w1x1)]
            ys += [F.conv2d(F.conv2d(x, dw, padding=r, dilation=r, groups=c), pw)
                   for dw, pw, r in zip(self.w_dw, self.w_pw, self.rates)]
            return torch.cat(ys, dim=1)
        return multi_rate_separable_conv2d(x, self.w1x1, self.w_dw, self.w_pw, self.rates, backend=self.impl)


def make_source(level: str, n_c_co: tuple[int, int, int], rates, dtype: torch.dtype, seed: int) -> nn.Module:
    """The case's weights on the CPU, rounded to its dtype: smp's separable ASPP (BatchNorm statistics and affine
    parameters randomised, so that folding them is exercised) or a conv2d SeparableBranchConvs."""
    _, c, co = n_c_co
    torch.manual_seed(seed)
    if level == "module":
        from segmentation_models_pytorch.decoders.deeplabv3.decoder import ASPP

        module = ASPP(c, co, tuple(rates), separable=True, dropout=0.5)
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    else:
        w1x1 = torch.randn(co, c, 1, 1) / c ** 0.5
        w_dw = torch.randn(len(rates), c, 1, 3, 3) / 3
        w_pw = torch.randn(len(rates), co, c, 1, 1) / c ** 0.5
        module = SeparableBranchConvs(w1x1, w_dw, w_pw, rates, "conv2d")
    return module.to(dtype)


def module_for(level: str, backend: Optional[str], source: nn.Module, rates) -> nn.Module:
    """A baseline (backend None: a copy of the source) or the fused module for `backend`, with the source's
    weights (level "module": FusedSeparableASPP; "branches": SeparableBranchConvs on the op)."""
    if backend is None:
        return copy.deepcopy(source)
    if level == "module":
        from resaspp_ops.nn import FusedSeparableASPP

        conv1x1 = source.convs[0][0]
        module = FusedSeparableASPP(conv1x1.in_channels, rates, conv1x1.out_channels, backend=backend)
        module.load_state_dict(source.state_dict())
        return module.to(next(source.parameters()).dtype)
    return SeparableBranchConvs(*source.stacked(), rates, backend)
