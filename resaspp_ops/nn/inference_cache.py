"""What the ASPP modules derive from their weights and statistics for inference, computed once, and the
BatchNorm folding they share.

Inference would otherwise redo, on every call, work that depends only on weights and BatchNorm statistics:
at C=2048 the atrous weight stack is tens of megabytes of copies, and the folded epilogue and projection are
some twenty tiny kernels (the whole cost on small maps).
"""
from __future__ import annotations

import weakref
from typing import Callable, Sequence

import torch
from torch import Tensor, nn


def cacheable(inputs: Sequence[Tensor]) -> bool:
    """Whether values derived from `inputs` may be cached: nothing needs their autograd graph, and no graph
    is being traced (under torch.compile or torch.export the derivation belongs in the graph)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in inputs))


class InferenceCache:
    """name -> a value built from some tensors, reused while none of them changes (where `cacheable`).

    An entry holds for the same tensor objects (weak references: .to() or .half() make new ones, even where
    the allocator hands back the old address), the same storage (`.data = ...` swaps it) and the same version
    counters (in-place updates: load_state_dict, an optimizer step, running statistics), and the same
    `settings`: the plain attributes the value depends on (each BatchNorm's eps), compared by value. They are
    never formatted into the name: under torch.compile with dynamic shapes Dynamo makes float module attributes
    symbolic, and formatting a symbolic float breaks the graph (issue 26). It pickles and copies empty: weak
    references do not pickle, and a copy's tensors are new objects anyway.
    """

    def __init__(self) -> None:
        self._entries: dict = {}

    def get(self, name: str, inputs: Sequence[Tensor], build: Callable[[], object], settings: tuple = ()):
        """build(), computed once and reused while none of `inputs` and `settings` changes; build() every
        call where the inputs are not cacheable (then it is differentiable, and nothing is compared)."""
        if not cacheable(inputs):
            return build()
        key = [(t.data_ptr(), t._version) for t in inputs]
        entry = self._entries.get(name)
        if (entry is None or entry[1] != key or entry[2] != settings
                or any(ref() is not t for ref, t in zip(entry[0], inputs))):
            with torch.no_grad():
                entry = ([weakref.ref(t) for t in inputs], key, settings, build())
            self._entries[name] = entry
        return entry[3]

    def peek(self, prefix: str):
        """The cached value of the first entry whose name starts with `prefix`, or None (tests, debugging)."""
        return next((entry[3] for name, entry in self._entries.items() if name.startswith(prefix)), None)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self._entries = {}


def batchnorm_eps(bns: Sequence[nn.Module]) -> tuple:
    """The eps of each BatchNorm: the `settings` of a cache entry that folds them (InferenceCache)."""
    return tuple(bn.eps for bn in bns)


def batchnorm_tensors(bn: nn.modules.batchnorm._BatchNorm) -> list[Tensor]:
    """The tensors an eval-mode BatchNorm's folded scale and shift depend on."""
    return [t for t in (bn.running_mean, bn.running_var, bn.weight, bn.bias) if t is not None]


def fold_batchnorm(bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(scale, shift) [C] with bn(z) == z * scale + shift in eval mode, in fp32 (fp64 for fp64 statistics)."""
    dtype = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(dtype) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    return scale, shift


def fold_into_conv(weight: Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[Tensor, Tensor]:
    """(weight * scale, shift): bn(conv(x, weight)) == conv(x, weight * scale) + shift for an eval-mode bn,
    computed in fp32 (fp64) and held in weight's dtype (F.conv2d wants one dtype)."""
    scale, shift = fold_batchnorm(bn)
    folded = (weight.to(scale.dtype) * scale.view(-1, 1, 1, 1)).to(weight.dtype)
    return folded, shift.to(weight.dtype)


def folds(bn: nn.Module) -> bool:
    """Whether `bn` normalises with running statistics (eval mode and tracked), so that it can be folded."""
    return not bn.training and bn.running_var is not None


def has_hooks(modules: Sequence[nn.Module]) -> bool:
    """Whether calling these modules would run hooks (theirs or global ones): a path that folds them away
    would silently skip those."""
    from torch.nn.modules import module as _module

    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)
