"""FusedDepthwiseSeparableASPP: the ASPP of mmsegmentation's DepthwiseSeparableASPPHead (BatchNorm + ReLU between
depthwise and pointwise) on the separable fused op."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resaspp_ops import backend as _backend
from resaspp_ops.export import TORCHSCRIPT_MESSAGE, refuse_torchscript
from resaspp_ops.nn.conv_modules import ConvBNReLU, DepthwiseSeparableConvBNReLU
from resaspp_ops.nn.inference_cache import (InferenceCache, batchnorm_eps, batchnorm_tensors, fold_into_conv, folds,
                                            has_hooks)
from resaspp_ops.nn.module_access import children, memory_format_of
from resaspp_ops.nn.pool_and_project import broadcast_pooled, check_pool_batch
from resaspp_ops.nn.separable_branches import SeparableBranches, epilogue_folds, run_separable_branches
from resaspp_ops.op_common import check_rates


class FusedDepthwiseSeparableASPP(nn.Module):
    """The ASPP of mmsegmentation's DepthwiseSeparableASPPHead (DeepLabV3+ as in TensorFlow's DeepLab and
    detectron2: a BatchNorm and ReLU between depthwise and pointwise), with mmsegmentation's submodule names and
    state_dict keys (so the head's image_pool.*, aspp_modules.* and bottleneck.* entries load into it):

        image_pool           Sequential(AdaptiveAvgPool2d(1), ConvBNReLU 1x1)
        aspp_modules.0       ConvBNReLU 1x1 (mmsegmentation's dilation 1)
        aspp_modules.1 .. B  DepthwiseSeparableConvBNReLU: depthwise_conv (3x3, groups=C, dilation = padding =
                             rate, BN, ReLU), pointwise_conv (1x1, BN, ReLU)
        bottleneck           ConvBNReLU 3x3 (padding 1) over cat(image pool, aspp_modules): (2+B)*Co channels

    forward(x [N, C, H, W]) -> [N, Co, H, W], the head's features before its c1/sep bottlenecks and classifier.
    The 1x1, depthwise and pointwise convolutions run as one `multi_rate_separable_conv2d`, the mid BatchNorms and
    ReLUs as its mid stage (folded in eval mode; in training, batch statistics from a statistics pass over the
    depthwise outputs, running statistics updated as BatchNorm does: nn/mid_batchnorm.py), the branch BatchNorms
    and ReLUs as its epilogue in eval mode or as modules on its pre-BN outputs in training. In eval mode the
    image pooling's and the bottleneck's BatchNorms fold into cached weights (the 3x3 bottleneck reads the
    pooled branch through zero padding at the border, so it is broadcast, not a bias). A forward hook on a mid
    BatchNorm or ReLU runs the branches as plain modules; one on a head module keeps the head's modules called.

    Args:
        in_channels: C of the input.
        atrous_rates: the B dilation rates of the separable branches (mmsegmentation's dilations without the 1).
        out_channels: Co, mmsegmentation's `channels` (512 in its DeepLabV3+ configs).
        backend: "auto" or "reference" (see resaspp_ops.backends(op="multi_rate_separable_conv2d")).
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 512, *,
                 backend: str = "auto") -> None:
        super().__init__()
        rates = check_rates(tuple(atrous_rates))
        if backend != "auto":
            _backend.get(backend, _backend.SEPARABLE)  # ValueError / NotImplementedError now, not at the first call
        self.backend = backend
        self._inference_cache = InferenceCache()
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvBNReLU(in_channels, out_channels, 1))
        self.aspp_modules = nn.ModuleList([ConvBNReLU(in_channels, out_channels, 1)] +
                                          [DepthwiseSeparableConvBNReLU(in_channels, out_channels, r) for r in rates])
        self.bottleneck = ConvBNReLU((2 + len(rates)) * out_channels, out_channels, 3, padding=1)

    @property
    def rates(self) -> tuple[int, ...]:
        return self._branches(children(self.aspp_modules)).rates

    @property
    def dilations(self) -> tuple[int, ...]:
        """mmsegmentation's dilations: 1 for the 1x1 branch, then the rates."""
        return (1, *self.rates)

    @property
    def in_channels(self) -> int:
        return self.aspp_modules[0].conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.aspp_modules[0].conv.out_channels

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, rates={self.rates}, out_channels={self.out_channels}, "
                f"backend={self.backend!r}")

    def __prepare_scriptable__(self):
        raise RuntimeError(TORCHSCRIPT_MESSAGE)

    @staticmethod
    def _branches(branches: list) -> SeparableBranches:
        """The op's submodules, read through _modules (the hot path builds no container)."""
        first = children(branches[0])                                    # conv, bn, activate
        depthwise = [children(children(b)[0]) for b in branches[1:]]     # depthwise_conv: conv, bn, activate
        pointwise = [children(children(b)[1]) for b in branches[1:]]     # pointwise_conv: conv, bn, activate
        return SeparableBranches(
            conv1x1=first[0], depthwise=[d[0] for d in depthwise], pointwise=[p[0] for p in pointwise],
            bns=[first[1]] + [p[1] for p in pointwise], relus=[first[2]] + [p[2] for p in pointwise],
            mid_bns=[d[1] for d in depthwise], mid_relus=[d[2] for d in depthwise])

    def forward(self, x: Tensor) -> Tensor:
        refuse_torchscript()
        if self.training and torch.onnx.is_in_onnx_export():
            warnings.warn("FusedDepthwiseSeparableASPP is exported to ONNX in training mode: the graph normalises "
                          "with batch statistics. ONNX export is meant for inference (call model.eval() first).",
                          stacklevel=2)
        branches = children(self.aspp_modules)
        pool = children(self.image_pool)        # AdaptiveAvgPool2d, ConvBNReLU
        pool_layers = children(pool[1])         # conv, bn, activate
        bottleneck = children(self.bottleneck)  # conv, bn, activate
        self._check_input(x, branches, pool_layers[1])
        separable = self._branches(branches)
        if has_hooks(separable.mid_modules()):  # the mid modules must run: the plain composition
            parts = [branch(x) for branch in branches]
        else:
            head_kept = [self.image_pool, pool[0], pool[1], pool_layers[1], pool_layers[2], self.bottleneck,
                         bottleneck[1], bottleneck[2]]
            if (epilogue_folds(separable) and folds(pool_layers[1]) and folds(bottleneck[1])
                    and not has_hooks(head_kept)):
                return self._forward_folded(x, separable, pool_layers, bottleneck)
            parts = run_separable_branches(x, separable, self._inference_cache, self.backend)
        pooled = broadcast_pooled(self.image_pool(x).to(parts[0].dtype), x)
        out = bottleneck[0](torch.cat([pooled] + parts, dim=1)).contiguous(memory_format=memory_format_of(x))
        return bottleneck[2](bottleneck[1](out))

    def _forward_folded(self, x: Tensor, separable: SeparableBranches, pool_layers: list, bottleneck: list) -> Tensor:
        """Every BatchNorm in eval mode: the op with mid stage and epilogue folded, then the image pooling and the
        bottleneck as plain convolutions with their BNs folded into weights and a bias (cached)."""
        y, = run_separable_branches(x, separable, self._inference_cache, self.backend)
        pool_conv, pool_bn = pool_layers[0], pool_layers[1]
        conv, bn = bottleneck[0], bottleneck[1]
        w_pool, b_pool, w_bottleneck, b_bottleneck = self._inference_cache.get(
            "head", [pool_conv.weight, conv.weight] + batchnorm_tensors(pool_bn) + batchnorm_tensors(bn),
            lambda: (*fold_into_conv(pool_conv.weight, pool_bn), *fold_into_conv(conv.weight, bn)),
            batchnorm_eps([pool_bn, bn]))
        pooled = F.conv2d(F.adaptive_avg_pool2d(x, 1), w_pool, b_pool).relu_()  # [N, Co, 1, 1]
        cat = torch.cat([broadcast_pooled(pooled.to(y.dtype), x), y], dim=1)
        out = F.conv2d(cat, w_bottleneck, b_bottleneck, padding=conv.padding, dilation=conv.dilation).relu_()
        return out.contiguous(memory_format=memory_format_of(x))

    def _check_input(self, x: Tensor, branches: list, pool_bn) -> None:
        if x.dim() != 4:
            raise ValueError(f"FusedDepthwiseSeparableASPP expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        conv1x1 = children(branches[0])[0]
        if x.shape[1] != conv1x1.in_channels:
            raise ValueError(f"FusedDepthwiseSeparableASPP was built for {conv1x1.in_channels} input channels, "
                             f"got {x.shape[1]}")
        check_pool_batch("FusedDepthwiseSeparableASPP", x, pool_bn, "image_pool.1.bn", "aspp.image_pool[1].bn.eval()")
