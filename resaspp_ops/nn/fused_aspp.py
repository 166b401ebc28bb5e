"""FusedASPP: torchvision's ASPP with the 1x1 and atrous branches in one fused op."""
from __future__ import annotations

import weakref
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resaspp_ops import backend as _backend
from resaspp_ops.ops import check_rates, multi_rate_conv2d


def _memory_format_of(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class FusedASPP(nn.Module):
    """Drop-in replacement for torchvision.models.segmentation.deeplabv3.ASPP.

    Same constructor arguments, same submodules and the same state_dict keys, so a torchvision
    ASPP's state_dict loads into it and back:

        convs.0            Sequential(Conv2d 1x1, BatchNorm2d, ReLU)
        convs.1 .. convs.B Sequential(Conv2d 3x3 with dilation = padding = rate, BatchNorm2d, ReLU)
        convs.B+1          Sequential(AdaptiveAvgPool2d(1), Conv2d 1x1, BatchNorm2d, ReLU)  (image pooling)
        project            Sequential(Conv2d 1x1, BatchNorm2d, ReLU, Dropout)

    The convolutions of convs.0 .. convs.B run as one `multi_rate_conv2d`. When their BatchNorms
    are in eval mode (running statistics), the BatchNorms and ReLUs are folded into the op's
    epilogue; in training mode the op is followed by each branch's own BatchNorm and ReLU modules,
    so SyncBatchNorm conversion, momentum and running statistics behave exactly as in torchvision.

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
        self._inference_cache: dict = {}  # name -> (weak refs to its inputs, their key, value); see _cached
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
        return tuple(int(branch[0].dilation[0]) for branch in self.convs[1:-1])

    @property
    def in_channels(self) -> int:
        return self.convs[0][0].in_channels

    @property
    def out_channels(self) -> int:
        return self.convs[0][0].out_channels

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, rates={self.rates}, out_channels={self.out_channels}, backend={self.backend!r}"

    def _cacheable(self, inputs: Sequence[Tensor]) -> bool:
        """Whether values derived from `inputs` may be cached: nothing needs their autograd graph, and no
        graph is being traced (under torch.compile the derivation belongs in the graph)."""
        if torch.compiler.is_compiling():
            return False
        return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))

    def _cached(self, name: str, inputs: Sequence[Tensor], build):
        """build(), computed once and reused while none of `inputs` changes, where _cacheable; else build()
        every call.

        Inference would otherwise redo, on every call, work that depends only on weights and BatchNorm
        statistics: at C=2048 the atrous stack is tens of megabytes of copies, and the folded epilogue is
        some twenty tiny kernels (the whole cost on small maps). An entry holds for the same tensor objects
        (weak references: .to() or .half() make new ones, even where the allocator hands back the old
        address), the same storage (`.data = ...` swaps it) and the same version counters (in-place
        updates: load_state_dict, an optimizer step, running statistics).
        """
        if not self._cacheable(inputs):
            return build()
        key = tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in inputs)
        entry = self._inference_cache.get(name)
        if entry is None or entry[1] != key or any(ref() is not t for ref, t in zip(entry[0], inputs)):
            with torch.no_grad():
                entry = ([weakref.ref(t) for t in inputs], key, build())
            self._inference_cache[name] = entry
        return entry[2]

    def __getstate__(self):
        # The cache holds weak references, which do not pickle (torch.save of a whole module); it rebuilds.
        state = self.__dict__.copy()
        state["_inference_cache"] = {}
        return state

    def _branch_weights(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """w1x1 [Co, C, 1, 1] and the atrous weights stacked into [B, Co, C, 3, 3].

        The stack is laid out for the backend that will read it, so that its own re-layout is a view:
        K-major ([B, 3, 3, C, Co] underneath, and w1x1 as [C, Co] when cached) for the Triton kernels, each
        branch channels_last for the others (cuDNN's and oneDNN's NHWC convolutions; the cuda backend's
        packing reads either). For inference it is cached (_cached); under torch.compile it is a plain stack
        in the graph.
        """
        w1x1 = self.convs[0][0].weight
        weights = [branch[0].weight for branch in self.convs[1:-1]]
        if torch.compiler.is_compiling():
            return w1x1, torch.stack(weights)
        k_major = _backend.resolve(self.backend, x.device, x.dtype) == "triton"

        def stack_k_major() -> Tensor:  # [B, 3, 3, C, Co]
            return torch.stack([w.permute(2, 3, 1, 0) for w in weights])

        if not self._cacheable([w1x1] + weights):
            # Training: the stack is a copy either way; made K-major, it is the only one (the Triton backend's
            # re-layout is then a view).
            return w1x1, stack_k_major().permute(0, 4, 3, 1, 2) if k_major else torch.stack(weights)
        if k_major:
            co, c = w1x1.shape[:2]
            w1_kc, w3_kc = self._cached("weights:k-major", [w1x1] + weights,
                                        lambda: (w1x1.reshape(co, c).t().contiguous(), stack_k_major()))
            return w1_kc.t()[:, :, None, None], w3_kc.permute(0, 4, 3, 1, 2)
        return w1x1, self._cached("weights:channels-last", weights, lambda: torch.stack(
            [w.permute(0, 2, 3, 1) for w in weights]).permute(0, 1, 4, 2, 3))

    def _folded_epilogue(self) -> tuple[Tensor, Tensor]:
        """Per-channel scale and shift [(1+B)*Co] of the branch BatchNorms in eval mode (differentiable;
        cached for inference)."""
        bns = [branch[1] for branch in self.convs[:-1]]

        def fold() -> tuple[Tensor, Tensor]:
            scales, shifts = [], []
            for bn in bns:
                dtype = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
                inv_std = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
                scale = inv_std * bn.weight.to(dtype) if bn.weight is not None else inv_std
                shift = -bn.running_mean.to(dtype) * scale
                if bn.bias is not None:
                    shift = shift + bn.bias.to(dtype)
                scales.append(scale)
                shifts.append(shift)
            return torch.cat(scales), torch.cat(shifts)

        # eps is a plain attribute, not a tensor: part of the key through the entry's name.
        inputs = [t for bn in bns for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]
        return self._cached("epilogue:" + ",".join(str(bn.eps) for bn in bns), inputs, fold)

    def _can_fold(self) -> bool:
        return all(not branch[1].training and branch[1].running_var is not None for branch in self.convs[:-1])

    def _check_batch(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"FusedASPP expects a 4-D input [N, C, H, W], got shape {tuple(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(f"FusedASPP was built for {self.in_channels} input channels, got {x.shape[1]}")
        pool_bn = self.convs[-1][2]
        if pool_bn.training and x.shape[0] == 1:
            index = len(self.convs) - 1
            raise ValueError(
                f"FusedASPP got a batch of 1 in training mode: the image-pooling branch's BatchNorm "
                f"(convs.{index}.2) sees one value per channel and cannot compute batch statistics. "
                f"Train with batch size >= 2, or put that BatchNorm in eval mode to use its running "
                f"statistics (aspp.convs[{index}][2].eval(), or model.eval() for inference).")

    def forward(self, x: Tensor) -> Tensor:
        self._check_batch(x)
        w1x1, w3x3 = self._branch_weights(x)
        if self._can_fold():
            scale, shift = self._folded_epilogue()
            parts = [multi_rate_conv2d(x, w1x1, w3x3, self.rates, scale, shift, relu=True, backend=self.backend)]
        else:
            fused = multi_rate_conv2d(x, w1x1, w3x3, self.rates, backend=self.backend)
            parts = [branch[2](branch[1](y)) for branch, y in zip(self.convs[:-1], fused.split(self.out_channels, 1))]
        branches = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        pooled = self.convs[-1](x).to(branches.dtype)  # [N, Co, 1, 1], constant over H x W
        # Hand back x's memory format, as torchvision's ASPP does (the fused op works in channels_last).
        projected = self._project_conv(branches, pooled).contiguous(memory_format=_memory_format_of(x))
        return self.project[1:](projected)

    def _project_conv(self, branches: Tensor, pooled: Tensor) -> Tensor:
        """project[0] applied to cat(branches, pooled broadcast to H x W), without building the cat.

        torchvision upsamples the pooled branch to H x W and concatenates; a 1x1 conv of a spatially
        constant block is a per-image bias, so the concatenated tensor is never materialised.
        """
        weight = self.project[0].weight  # [Co, (2+B)*Co, 1, 1]
        k = branches.shape[1]
        # The two column blocks as dense tensors (a convolution copies a strided weight on every call).
        w_branches, w_pooled = self._cached("project", [weight], lambda: (weight[:, :k].contiguous(),
                                                                           weight[:, k:].contiguous()))
        bias = F.conv2d(pooled, w_pooled)  # [N, Co, 1, 1]
        return F.conv2d(branches, w_branches) + bias
