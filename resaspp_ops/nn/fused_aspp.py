"""FusedASPP: torchvision's ASPP with the 1x1 and atrous branches in one fused op."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from resaspp_ops import backend as _backend
from resaspp_ops.export import TORCHSCRIPT_MESSAGE, refuse_torchscript
from resaspp_ops.nn.inference_cache import (InferenceCache, batchnorm_eps, batchnorm_tensors, cacheable, fold_batchnorm,
                                            folds, has_hooks)
from resaspp_ops.nn.module_access import children as _children
from resaspp_ops.nn.pool_and_project import (FoldedHead, check_pool_batch, fold_head, head_tensors, run_folded_head,
                                             run_head_modules)
from resaspp_ops.ops import check_rates, multi_rate_conv2d


class FusedASPP(nn.Module):
    """Drop-in replacement for torchvision.models.segmentation.deeplabv3.ASPP.

    Same constructor arguments, same submodules and the same state_dict keys, so a torchvision
    ASPP's state_dict loads into it and back:

        convs.0            Sequential(Conv2d 1x1, BatchNorm2d, ReLU)
        convs.1 .. convs.B Sequential(Conv2d 3x3 with dilation = padding = rate, BatchNorm2d, ReLU)
        convs.B+1          Sequential(AdaptiveAvgPool2d(1), Conv2d 1x1, BatchNorm2d, ReLU)  (image pooling)
        project            Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Dropout)

    The convolutions of convs.0 .. convs.B run as one `multi_rate_conv2d` (their own forward and hooks
    never run). When their BatchNorms are in eval mode (running statistics), the BatchNorms and ReLUs are
    folded into the op's epilogue; when every BatchNorm is, and the dropout is off, inference runs the whole
    module as the op, the pooling branch and the projection with their BatchNorms folded into cached weights
    (a forward hook on any BatchNorm, ReLU, pooling or dropout module keeps those modules called instead).
    In training mode the op is followed by each branch's own BatchNorm and ReLU modules, so SyncBatchNorm
    conversion, momentum and running statistics behave exactly as in torchvision.

    Args:
        in_channels: C of the input [N, C, H, W].
        atrous_rates: the B dilation rates of the 3x3 branches.
        out_channels: Co of every branch and of the projection (256 in DeepLabV3).
        backend: "auto", "reference", "cuda" or "triton" (see resaspp_ops.backends()).
        dropout: the projection's dropout probability (0.5 in torchvision).
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256, *,
                 backend: str = "auto", dropout: float = 0.5) -> None:
        super().__init__()
        rates = check_rates(tuple(atrous_rates))
        if backend != "auto":
            _backend.get(backend)  # ValueError for an unknown name
        self.backend = backend
        self._inference_cache = InferenceCache()  # see _inference_plan and _branch_weights
        modules = [nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                 nn.BatchNorm2d(out_channels), nn.ReLU())]
        for rate in rates:
            modules.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=rate, dilation=rate, bias=False),
                nn.BatchNorm2d(out_channels), nn.ReLU()))
        modules.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU()))
        self.convs = nn.ModuleList(modules)
        self.project = nn.Sequential(nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
                                     nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(dropout))

    @classmethod
    def for_input_size(cls, in_channels: int, input_size, output_stride: int, out_channels: int = 256,
                       **kwargs) -> "FusedASPP":
        """A FusedASPP whose rates follow the resolution-aware guideline for this crop size and stride."""
        from resaspp_ops.rates import resolution_aware_rates

        return cls(in_channels, resolution_aware_rates(input_size, output_stride), out_channels, **kwargs)

    @property
    def rates(self) -> tuple[int, ...]:
        """The atrous rates, read from the 3x3 convolutions."""
        return _rates(_children(self.convs))

    @property
    def in_channels(self) -> int:
        return self.convs[0][0].in_channels

    @property
    def out_channels(self) -> int:
        return self.convs[0][0].out_channels

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, rates={self.rates}, out_channels={self.out_channels}, backend={self.backend!r}"

    # The hot path reads the submodules through _modules (dict lookups): indexing or slicing a ModuleList or
    # Sequential builds containers, which cost more than a small map's whole computation.

    def __prepare_scriptable__(self):
        raise RuntimeError(TORCHSCRIPT_MESSAGE)  # torch.jit.script calls this first: fail at once, with a way out

    def forward(self, x: Tensor) -> Tensor:
        refuse_torchscript()
        if self.training and torch.onnx.is_in_onnx_export():
            warnings.warn("FusedASPP is exported to ONNX in training mode: the graph normalises with batch statistics. "
                          "ONNX export is meant for inference (call model.eval() first); training-mode graphs are "
                          "not checked against ONNX Runtime.", stacklevel=2)
        branches = _children(self.convs)    # [Sequential(conv, bn, relu)] * (1+B) + [Sequential(pool, conv, bn, relu)]
        project = _children(self.project)   # conv, bn, relu, dropout
        self._check_batch(x, branches)
        pool = _children(branches[-1])
        folded = [_children(b)[1] for b in branches[:-1]] + [pool[2], project[1]]
        kept = folded + [_children(b)[2] for b in branches[:-1]] + [pool[0], pool[3], project[2], project[3]]
        dropout_off = not project[3].training or project[3].p == 0
        if all(folds(bn) for bn in folded) and dropout_off and not has_hooks(kept):
            return self._forward_folded(x, branches, project)
        return self._forward_modules(x, branches, project)

    def _forward_folded(self, x: Tensor, branches: list, project: list) -> Tensor:
        """Every BatchNorm in eval mode: the op with the branch BNs and ReLUs as its epilogue, then the pooling
        branch and the projection as plain convolutions with their BNs folded into weights and a bias."""
        plan = self._inference_plan(x, branches, project)
        y = multi_rate_conv2d(x, plan.w1x1, plan.w3x3, _rates(branches), plan.scale, plan.shift, relu=True,
                              backend=self.backend)
        return run_folded_head(x, y, plan.head)

    def _forward_modules(self, x: Tensor, branches: list, project: list) -> Tensor:
        """Training (or frozen branch BNs with a training projection, or hooks): the op, then the modules."""
        w1x1, w3x3 = self._branch_weights(x, branches)
        bns = [_children(b)[1] for b in branches[:-1]]
        if all(folds(bn) for bn in bns) and not has_hooks(bns + [_children(b)[2] for b in branches[:-1]]):
            scale, shift = self._cached_fold("epilogue", bns)
            parts = [multi_rate_conv2d(x, w1x1, w3x3, _rates(branches), scale, shift, relu=True, backend=self.backend)]
        else:
            fused = multi_rate_conv2d(x, w1x1, w3x3, _rates(branches), backend=self.backend)
            # Each branch made contiguous before its BatchNorm: on a channel slice of the channels_last output,
            # BatchNorm's forward and backward take a strided path several times slower than the copy (CPU,
            # voc-os16's CPU size: 6.5 ms against 1.7 ms for the four branches, forward and backward).
            parts = [_children(b)[2](_children(b)[1](y.contiguous(memory_format=torch.channels_last)))
                     for b, y in zip(branches[:-1], fused.split(self.out_channels, 1))]
        pooled = branches[-1](x)  # [N, Co, 1, 1], constant over H x W
        return run_head_modules(x, parts, pooled, project)

    def _check_batch(self, x: Tensor, branches: list) -> None:
        if x.dim() != 4:
            raise ValueError(f"FusedASPP expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        conv1x1 = _children(branches[0])[0]
        if x.shape[1] != conv1x1.in_channels:
            raise ValueError(f"FusedASPP was built for {conv1x1.in_channels} input channels, got {x.shape[1]}")
        index = len(branches) - 1
        check_pool_batch("FusedASPP", x, _children(branches[-1])[2], f"convs.{index}.2",
                         f"aspp.convs[{index}][2].eval()")

    def _branch_weights(self, x: Tensor, branches: list) -> tuple[Tensor, Tensor]:
        """w1x1 [Co, C, 1, 1] and the atrous weights stacked into [B, Co, C, 3, 3].

        The stack is laid out for the backend that will read it, so that its own re-layout is a view:
        K-major ([B, 3, 3, C, Co] underneath, and w1x1 as [C, Co] when cached) for the Triton kernels, each
        branch channels_last for the others (cuDNN's and oneDNN's NHWC convolutions; the cuda backend's
        packing reads either). For inference it is cached; under torch.compile it is a plain stack in the graph.
        """
        w1x1 = _children(branches[0])[0].weight
        weights = [_children(b)[0].weight for b in branches[1:-1]]
        if torch.compiler.is_compiling():
            return w1x1, torch.stack(weights)
        layout = self._weight_layout(x)
        if not cacheable([w1x1] + weights):
            # Training: the stack is a copy either way. Made K-major for the Triton kernels, it is the only
            # one (their re-layout is then a view); the others take the plain stack (one op, where laying
            # it out channels_last would be four more a step, each with its backward).
            return _laid_out(w1x1, weights, layout) if layout == "k-major" else (w1x1, torch.stack(weights))
        return self._inference_cache.get("weights:" + layout, [w1x1] + weights,
                                         lambda: _laid_out(w1x1, weights, layout))

    def _weight_layout(self, x: Tensor) -> str:
        """"k-major" where the call resolves to the Triton backend, else "channels-last" (see _branch_weights)."""
        return "k-major" if _backend.resolve(self.backend, x.device, x.dtype) == "triton" else "channels-last"

    def _cached_fold(self, name: str, bns: list) -> tuple[Tensor, Tensor]:
        """Per-channel scale and shift of these eval-mode BatchNorms, concatenated (differentiable where
        needed, cached for inference; their eps are the entry's settings)."""
        def fold() -> tuple[Tensor, Tensor]:
            scales, shifts = zip(*(fold_batchnorm(bn) for bn in bns))
            return torch.cat(scales), torch.cat(shifts)

        inputs = [t for bn in bns for t in batchnorm_tensors(bn)]
        return self._inference_cache.get(name, inputs, fold, batchnorm_eps(bns))

    def _inference_plan(self, x: Tensor, branches: list, project: list) -> "_InferencePlan":
        """Everything the folded forward needs that depends on weights and statistics only (cached)."""
        w1x1 = _children(branches[0])[0].weight
        weights = [_children(b)[0].weight for b in branches[1:-1]]
        bns = [_children(b)[1] for b in branches[:-1]]
        pool = _children(branches[-1])
        layout = "plain" if torch.compiler.is_compiling() else self._weight_layout(x)

        def build() -> _InferencePlan:
            w1, w3 = (w1x1, torch.stack(weights)) if layout == "plain" else _laid_out(w1x1, weights, layout)
            scales, shifts = zip(*(fold_batchnorm(bn) for bn in bns))
            return _InferencePlan(w1, w3, torch.cat(scales), torch.cat(shifts),
                                  fold_head(pool, project, w1x1.shape[0] * len(bns)))

        folded = bns + [pool[2], project[1]]
        inputs = [w1x1] + weights + [t for bn in bns for t in batchnorm_tensors(bn)] + head_tensors(pool, project)
        return self._inference_cache.get("inference:" + layout, inputs, build, batchnorm_eps(folded))


@dataclass(frozen=True)
class _InferencePlan:
    """The folded forward's weights: the op's inputs, and the pooling branch and projection with their BNs
    folded (pool_and_project.FoldedHead)."""

    w1x1: Tensor                # [Co, C, 1, 1]
    w3x3: Tensor                # [B, Co, C, 3, 3], laid out for the backend (see _branch_weights)
    scale: Tensor               # [(1+B)*Co] the branch BNs
    shift: Tensor               # [(1+B)*Co]
    head: FoldedHead            # the pooling branch and the projection


def _rates(branches: list) -> tuple[int, ...]:
    return tuple(int(_children(b)[0].dilation[0]) for b in branches[1:-1])


def _laid_out(w1x1: Tensor, weights: list, layout: str) -> tuple[Tensor, Tensor]:
    """(w1x1 [Co, C, 1, 1], w3x3 [B, Co, C, 3, 3]) over storage laid out for the backend (see _branch_weights)."""
    if layout == "k-major":
        co, c = w1x1.shape[:2]
        return w1x1.reshape(co, c).t().contiguous().t()[:, :, None, None], _stack_k_major(weights).permute(0, 4, 3, 1, 2)
    return w1x1, _stack_channels_last(weights)


def _stack_k_major(weights: list) -> Tensor:
    """[B, 3, 3, C, Co] from B weights [Co, C, 3, 3]."""
    return torch.stack([w.permute(2, 3, 1, 0) for w in weights])


def _stack_channels_last(weights: list) -> Tensor:
    """[B, Co, C, 3, 3] whose branches are each channels_last."""
    return torch.stack([w.permute(0, 2, 3, 1) for w in weights]).permute(0, 1, 4, 2, 3)
