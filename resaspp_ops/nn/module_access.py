"""How the modules' hot paths read their submodules, and the memory format they hand back.

Indexing or slicing a ModuleList or Sequential builds containers, which cost more host time than a small
map's whole computation: the forwards read submodules through `_modules` (dict lookups) instead.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn


def children(container: nn.Module) -> list:
    """The direct submodules of `container`, in registration order, without building any module."""
    return list(container._modules.values())


def memory_format_of(x: Tensor) -> torch.memory_format:
    """channels_last for a 4-D channels_last (and not also contiguous) tensor, else contiguous_format."""
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
