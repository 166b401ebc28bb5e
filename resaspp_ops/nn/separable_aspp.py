"""FusedSeparableASPP: segmentation_models_pytorch's separable ASPP (DeepLabV3+) on the separable fused op."""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import Tensor, nn

from resaspp_ops import backend as _backend
from resaspp_ops.export import TORCHSCRIPT_MESSAGE, refuse_torchscript
from resaspp_ops.nn.inference_cache import InferenceCache, batchnorm_eps, folds, has_hooks
from resaspp_ops.nn.module_access import children
from resaspp_ops.nn.pool_and_project import check_pool_batch, fold_head, head_tensors, run_folded_head, run_head_modules
from resaspp_ops.nn.separable_branches import SeparableBranches, epilogue_folds, run_separable_branches
from resaspp_ops.op_common import check_rates


def separable_convs(separable: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(depthwise, pointwise) of a separable conv container: smp's SeparableConv2d (Sequential(dw, pw)) or
    VainF/DeepLabV3Plus-Pytorch's AtrousSeparableConvolution (its `body` Sequential(dw, pw))."""
    parts = children(separable)
    if len(parts) == 1:
        parts = children(parts[0])
    return parts[0], parts[1]


class FusedSeparableASPP(nn.Module):
    """Drop-in replacement for segmentation_models_pytorch's ASPP with separable=True (smp.DeepLabV3Plus's
    `decoder.aspp[0]`, its default), with its submodules and state_dict keys:

        convs.0            Sequential(Conv2d 1x1, BatchNorm2d, ReLU)
        convs.1 .. convs.B Sequential(Sequential(Conv2d 3x3 depthwise (groups=C, dilation = padding = rate),
                                                 Conv2d 1x1 pointwise), BatchNorm2d, ReLU)
        convs.B+1          Sequential(AdaptiveAvgPool2d(1), Conv2d 1x1, BatchNorm2d, ReLU)  (image pooling)
        project            Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Dropout)

    (convert_aspp also builds one around VainF/DeepLabV3Plus-Pytorch's AtrousSeparableConvolution branches,
    keeping their `body` keys.) The 1x1, depthwise and pointwise convolutions run as one
    `multi_rate_separable_conv2d` (there is no BatchNorm between depthwise and pointwise in this structure;
    see FusedDepthwiseSeparableASPP for the variant with one). The rest behaves as FusedASPP: in eval mode every
    BatchNorm folds (branch BNs and ReLUs into the op's epilogue, the pooling branch and the projection into
    cached weights; a forward hook on any of those modules keeps them called), in training mode the op's pre-BN
    outputs go through the branches' own BatchNorm and ReLU modules (batch statistics, SyncBatchNorm-convertible).

    Args:
        in_channels: C of the input [N, C, H, W].
        atrous_rates: the B dilation rates (smp: three, (12, 24, 36) by default).
        out_channels: Co of every branch and of the projection (256 in smp).
        backend: "auto" or "reference" (see resaspp_ops.backends(op="multi_rate_separable_conv2d")).
        dropout: the projection's dropout probability (0.5 in smp's DeepLabV3Plus).
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256, *,
                 backend: str = "auto", dropout: float = 0.5) -> None:
        super().__init__()
        rates = check_rates(tuple(atrous_rates))
        if backend != "auto":
            _backend.get(backend, _backend.SEPARABLE)  # ValueError / NotImplementedError now, not at the first call
        self.backend = backend
        self._inference_cache = InferenceCache()
        modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU())]
        for rate in rates:
            separable = nn.Sequential(
                nn.Conv2d(in_channels, in_channels, 3, padding=rate, dilation=rate, groups=in_channels, bias=False),
                nn.Conv2d(in_channels, out_channels, 1, bias=False))
            modules.append(nn.Sequential(separable, nn.BatchNorm2d(out_channels), nn.ReLU()))
        modules.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU()))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(dropout))

    @classmethod
    def for_input_size(cls, in_channels: int, input_size, output_stride: int, out_channels: int = 256,
                       **kwargs) -> "FusedSeparableASPP":
        """A FusedSeparableASPP whose rates follow the resolution-aware guideline for this crop size and stride."""
        from resaspp_ops.rates import resolution_aware_rates

        return cls(in_channels, resolution_aware_rates(input_size, output_stride), out_channels, **kwargs)

    @property
    def rates(self) -> tuple[int, ...]:
        """The atrous rates, read from the depthwise convolutions."""
        return self._branches(children(self.convs)).rates

    @property
    def in_channels(self) -> int:
        return children(self.convs[0])[0].in_channels

    @property
    def out_channels(self) -> int:
        return children(self.convs[0])[0].out_channels

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, rates={self.rates}, out_channels={self.out_channels}, "
                f"backend={self.backend!r}")

    def __prepare_scriptable__(self):
        raise RuntimeError(TORCHSCRIPT_MESSAGE)  # torch.jit.script calls this first: fail at once, with a way out

    @staticmethod
    def _branches(branches: list) -> SeparableBranches:
        """The op's submodules, read through _modules (the hot path builds no container)."""
        convs = [separable_convs(children(b)[0]) for b in branches[1:-1]]
        return SeparableBranches(
            conv1x1=children(branches[0])[0], depthwise=[dw for dw, _ in convs], pointwise=[pw for _, pw in convs],
            bns=[children(b)[1] for b in branches[:-1]], relus=[children(b)[2] for b in branches[:-1]])

    def forward(self, x: Tensor) -> Tensor:
        refuse_torchscript()
        if self.training and torch.onnx.is_in_onnx_export():
            warnings.warn("FusedSeparableASPP is exported to ONNX in training mode: the graph normalises with batch "
                          "statistics. ONNX export is meant for inference (call model.eval() first).", stacklevel=2)
        branches = children(self.convs)
        project = children(self.project)   # conv, bn, relu, dropout
        self._check_input(x, branches)
        separable = self._branches(branches)
        pool = children(branches[-1])      # pool, conv, bn, relu
        head_kept = [branches[-1], pool[0], pool[2], pool[3], project[1], project[2], project[3]]
        dropout_off = not project[3].training or project[3].p == 0
        if (epilogue_folds(separable) and folds(pool[2]) and folds(project[1]) and dropout_off
                and not has_hooks(head_kept)):
            y, = run_separable_branches(x, separable, self._inference_cache, self.backend)
            head = self._inference_cache.get("head", head_tensors(pool, project),
                                             lambda: fold_head(pool, project, y.shape[1]),
                                             batchnorm_eps([pool[2], project[1]]))
            return run_folded_head(x, y, head)
        parts = run_separable_branches(x, separable, self._inference_cache, self.backend)
        return run_head_modules(x, parts, branches[-1](x), project)

    def _check_input(self, x: Tensor, branches: list) -> None:
        if x.dim() != 4:
            raise ValueError(f"FusedSeparableASPP expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        conv1x1 = children(branches[0])[0]
        if x.shape[1] != conv1x1.in_channels:
            raise ValueError(f"FusedSeparableASPP was built for {conv1x1.in_channels} input channels, got {x.shape[1]}")
        index = len(branches) - 1
        check_pool_batch("FusedSeparableASPP", x, children(branches[-1])[2], f"convs.{index}.2",
                         f"aspp.convs[{index}][2].eval()")
