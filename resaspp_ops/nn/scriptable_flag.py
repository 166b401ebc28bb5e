"""The "is this model scriptable?" flag that segmentation_models_pytorch's models carry, kept truthful by
convert_aspp and revert_aspp.

smp's SegmentationModel (and its encoders) declare `_is_torch_scriptable = True` as a class attribute, and smp's
tooling asks it before calling torch.jit.script. A fused ASPP refuses TorchScript (export.TORCHSCRIPT_MESSAGE),
so a module that holds one is not scriptable, whatever its class says. torchvision's and timm's models carry no
such flag (timm's is_scriptable() is a global setting, not a model's).

Every module that has the flag and holds a fused ASPP gets it set to False on the instance, the value it had
saved beside it; once it holds none again (revert_aspp), the saved value comes back: its own, or none at all, so
that the class attribute shows through again.
"""
from __future__ import annotations

from torch import nn

from resaspp_ops.nn.depthwise_separable_aspp import FusedDepthwiseSeparableASPP
from resaspp_ops.nn.fused_aspp import FusedASPP
from resaspp_ops.nn.separable_aspp import FusedSeparableASPP

SCRIPTABLE_FLAG = "_is_torch_scriptable"       # segmentation_models_pytorch's name
_SAVED = "_is_torch_scriptable_before_resaspp"  # (had an instance value, that value) before the flag was set False
_FUSED = (FusedASPP, FusedSeparableASPP, FusedDepthwiseSeparableASPP)


def _holds_fused(module: nn.Module) -> bool:
    return any(isinstance(m, _FUSED) for m in module.modules())


def update_scriptable_flags(model: nn.Module) -> None:
    """Sets the flag to False on every module of `model` that has it and holds a fused ASPP (saving what it
    was), and restores it on those that hold none any more."""
    for module in model.modules():
        if not hasattr(module, SCRIPTABLE_FLAG):
            continue
        saved = module.__dict__.get(_SAVED)
        if _holds_fused(module):
            if saved is None:
                own = SCRIPTABLE_FLAG in module.__dict__
                module.__dict__[_SAVED] = (own, module.__dict__.get(SCRIPTABLE_FLAG))
                setattr(module, SCRIPTABLE_FLAG, False)
        elif saved is not None:
            own, value = module.__dict__.pop(_SAVED)
            if own:
                setattr(module, SCRIPTABLE_FLAG, value)
            else:
                delattr(module, SCRIPTABLE_FLAG)
