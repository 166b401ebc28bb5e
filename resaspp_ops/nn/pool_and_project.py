"""The image-pooling branch and the 1x1 projection of torchvision's ASPP structure, shared by FusedASPP and
FusedSeparableASPP (segmentation_models_pytorch's separable ASPP has the same two):

    pool     Sequential(AdaptiveAvgPool2d(1), Conv2d 1x1, BatchNorm2d, ReLU)          -> [N, Co, 1, 1]
    project  Sequential(Conv2d 1x1 over the (2+B)*Co concatenated channels, BatchNorm2d, ReLU, Dropout)

In eval mode both BatchNorms fold into the convolutions' weights (FoldedHead, built once and cached by the
module); the pooled branch is constant over H x W, so through the 1x1 projection it is a per-image bias and
is never broadcast. Otherwise the modules run as the source module runs them (run_head_modules).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from resaspp_ops.nn.inference_cache import batchnorm_tensors, fold_into_conv
from resaspp_ops.nn.module_access import memory_format_of


@dataclass(frozen=True)
class FoldedHead:
    """The pooling branch and the projection with their BNs folded (w * scale per output channel, computed in
    fp32 and held in the weight's dtype, as the bias)."""

    w_pool: Tensor              # [Co, C, 1, 1]
    b_pool: Tensor              # [Co]
    w_project_branches: Tensor  # [Co, (1+B)*Co, 1, 1]
    w_project_pooled: Tensor    # [Co, Co, 1, 1]
    b_project: Tensor           # [Co]


def head_tensors(pool: list, project: list) -> list[Tensor]:
    """What fold_head's result depends on (the inference cache's key); pool, project: their children."""
    return ([pool[1].weight, project[0].weight] + batchnorm_tensors(pool[2]) + batchnorm_tensors(project[1]))


def fold_head(pool: list, project: list, branch_channels: int) -> FoldedHead:
    """pool, project: the children of the two Sequentials; branch_channels: (1+B)*Co, the projection's input
    channels that come from the fused op (the rest come from the pooled branch)."""
    w_pool, b_pool = fold_into_conv(pool[1].weight, pool[2])
    w_project, b_project = fold_into_conv(project[0].weight, project[1])
    return FoldedHead(w_pool, b_pool, w_project[:, :branch_channels].contiguous(),
                      w_project[:, branch_channels:].contiguous(), b_project)


def run_folded_head(x: Tensor, y: Tensor, head: FoldedHead) -> Tensor:
    """ReLU(BN(project(cat(y, pooled)))) for eval-mode BNs: x [N, C, H, W] the module's input, y [N, (1+B)*Co,
    H, W] the branches after their BNs and ReLUs; out [N, Co, H, W] in x's memory format."""
    pooled = F.conv2d(F.adaptive_avg_pool2d(x, 1), head.w_pool, head.b_pool).relu_()  # [N, Co, 1, 1]
    bias = F.conv2d(pooled.to(y.dtype), head.w_project_pooled, head.b_project)       # [N, Co, 1, 1]
    out = F.conv2d(y, head.w_project_branches).add_(bias).relu_()
    # Hand back x's memory format, as torchvision's ASPP does (the fused ops work in channels_last).
    return out.contiguous(memory_format=memory_format_of(x))


def run_head_modules(x: Tensor, parts: list, pooled: Tensor, project: list) -> Tensor:
    """As torchvision: the pooled branch broadcast and concatenated, one projection conv, then the projection's
    BN, ReLU and dropout modules. parts: the 1+B branch outputs [N, Co, H, W]; pooled: [N, Co, 1, 1] (or
    already H x W); project: the projection's children."""
    cat = torch.cat(parts + [broadcast_pooled(pooled.to(parts[0].dtype), x)], dim=1)
    projected = project[0](cat).contiguous(memory_format=memory_format_of(x))
    return project[3](project[2](project[1](projected)))


def broadcast_pooled(pooled: Tensor, x: Tensor) -> Tensor:
    """The pooled branch [N, Co, 1, 1] (or already H x W) broadcast to x's H x W, laid out channels_last like the
    fused op's output, so that a concatenation with it is too: a mixed one comes out NCHW, and then every branch
    ReLU's backward reads an NCHW grad against a channels_last result (a strided path, 5x slower on the CPU)."""
    n, _, h, w = x.shape
    return pooled.expand(n, pooled.shape[1], h, w).contiguous(memory_format=torch.channels_last)


def check_pool_batch(module_name: str, x: Tensor, pool_bn, where: str, way_out: str) -> None:
    """A training-mode pooling BatchNorm cannot normalise a batch of one (one value per channel): say which
    module it is (`where`, its name in the state_dict) and the way out (`way_out`, the call that freezes it)."""
    if pool_bn.training and x.shape[0] == 1:
        raise ValueError(
            f"{module_name} got a batch of 1 in training mode: the image-pooling branch's BatchNorm "
            f"({where}) sees one value per channel and cannot compute batch statistics. "
            f"Train with batch size >= 2, or put that BatchNorm in eval mode to use its running "
            f"statistics ({way_out}, or model.eval() for inference).")
