"""The 1x1 branch and the depthwise-separable atrous branches of a separable ASPP, run as one
multi_rate_separable_conv2d: what FusedSeparableASPP and FusedDepthwiseSeparableASPP share.

A branch i is depthwise conv (groups=C, dilation = padding = rate) -> [mid BatchNorm -> mid ReLU] ->
pointwise 1x1 conv -> BatchNorm -> ReLU; the 1x1 branch is conv -> BatchNorm -> ReLU. The convolutions always
run inside the op (their own forward and hooks never do). The mid BatchNorms (where the structure has them)
become the op's mid stage (nn/mid_batchnorm.py: folded running statistics, or batch statistics in training).
The branch BatchNorms and ReLUs become the op's epilogue when every one of them folds (eval mode, no hooks);
otherwise the op hands back the pre-BN outputs and the branch BatchNorm and ReLU modules run on them, as in
FusedASPP's training path.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from resaspp_ops.nn.inference_cache import (InferenceCache, batchnorm_eps, batchnorm_tensors, fold_batchnorm, folds,
                                            has_hooks)
from resaspp_ops.nn.mid_batchnorm import mid_affine
from resaspp_ops.ops_separable import multi_rate_separable_conv2d


@dataclass(frozen=True)
class SeparableBranches:
    """The submodules of one call, read off the module (a plain record: no nn.Module is built)."""

    conv1x1: nn.Conv2d                  # [Co, C, 1, 1]
    depthwise: list                     # B Conv2d(C, C, 3, groups=C, dilation=padding=rate)
    pointwise: list                     # B Conv2d(C, Co, 1)
    bns: list                           # 1+B BatchNorm2d(Co): the 1x1 branch's, then each branch's after pointwise
    relus: list                         # 1+B ReLU after them
    mid_bns: Optional[list] = None      # B BatchNorm2d(C) between depthwise and pointwise (None: no mid stage)
    mid_relus: Optional[list] = None    # B ReLU after them

    @property
    def rates(self) -> tuple[int, ...]:
        return tuple(int(conv.dilation[0]) for conv in self.depthwise)

    @property
    def out_channels(self) -> int:
        return self.conv1x1.out_channels

    def mid_modules(self) -> list:
        return (self.mid_bns or []) + (self.mid_relus or [])


def _stacked_weights(branches: SeparableBranches, cache: InferenceCache) -> tuple[Tensor, Tensor, Tensor]:
    """(w1x1 [Co, C, 1, 1], w_dw [B, C, 1, 3, 3], w_pw [B, Co, C, 1, 1]); the stacks cached for inference
    (a copy of the weights each call otherwise: under autograd the stack is part of the graph)."""
    w1x1 = branches.conv1x1.weight
    dw = [conv.weight for conv in branches.depthwise]   # each [C, 1, 3, 3]
    pw = [conv.weight for conv in branches.pointwise]   # each [Co, C, 1, 1]
    w_dw, w_pw = cache.get("separable-weights", dw + pw, lambda: (torch.stack(dw), torch.stack(pw)))
    return w1x1, w_dw, w_pw


def _folded_epilogue(bns: list, cache: InferenceCache) -> tuple[Tensor, Tensor]:
    """[(1+B)*Co] scale and shift of eval-mode branch BatchNorms (cached for inference)."""
    def fold() -> tuple[Tensor, Tensor]:
        scales, shifts = zip(*(fold_batchnorm(bn) for bn in bns))
        return torch.cat(scales), torch.cat(shifts)

    inputs = [t for bn in bns for t in batchnorm_tensors(bn)]
    return cache.get("epilogue", inputs, fold, batchnorm_eps(bns))


def epilogue_folds(branches: SeparableBranches) -> bool:
    """Whether the branch BatchNorms and ReLUs can be the op's epilogue (eval-mode BNs, no hooks to keep)."""
    return all(folds(bn) for bn in branches.bns) and not has_hooks(branches.bns + branches.relus)


def run_separable_branches(x: Tensor, branches: SeparableBranches, cache: InferenceCache, backend: str) -> list:
    """The 1+B branches after their BatchNorms and ReLUs, concatenated in the op's order (1x1, rates...):
    [one tensor [N, (1+B)*Co, H, W]] where the epilogue folds, else the 1+B tensors [N, Co, H, W]."""
    w1x1, w_dw, w_pw = _stacked_weights(branches, cache)
    rates = branches.rates
    mid_scale = mid_shift = None
    if branches.mid_bns is not None:
        mid_scale, mid_shift = mid_affine(x, w_dw, rates, branches.mid_bns, cache, backend)
    mid_relu = branches.mid_relus is not None
    if epilogue_folds(branches):
        scale, shift = _folded_epilogue(branches.bns, cache)
        return [multi_rate_separable_conv2d(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift,
                                            relu=True, backend=backend)]
    fused = multi_rate_separable_conv2d(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, backend=backend)
    # Each branch contiguous before its BatchNorm (a channel slice of a channels_last tensor takes BatchNorm's
    # strided path, several times slower than the copy: see FusedASPP._forward_modules).
    return [relu(bn(y.contiguous(memory_format=torch.channels_last)))
            for bn, relu, y in zip(branches.bns, branches.relus, fused.split(branches.out_channels, 1))]
