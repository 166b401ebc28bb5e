"""The ReLU masks of a run, so that its float64 reference differentiates the same piecewise-linear function.

A gradient through ReLU jumps where a pre-activation within rounding of zero comes out with the other
sign: one such unit changes grad_x by a whole gradient contribution over its footprint, far beyond any
rounding bound (see resaspp_ops.bench.correctness). So the suite records, for each run it judges, which
elements each nn.ReLU passed (out > 0), and computes that run's float64 reference with those masks in
place of float64's own ReLUs.

    recorder = ReluMaskRecorder(module)      # names every nn.ReLU of `module`
    with recorder.attached():                # eager modules: hooks for this call only
        module(x).backward(g)
    outputs = recorder.take()                # {name: the ReLU's output}; its mask is output > 0
    with ReluMaskRecorder.apply(float64_module, masks_of(outputs)):   # its ReLUs use the masks
        ...

A compiled module gets its hooks before torch.compile (`attach()`), and keeps them: Dynamo traces them
into the graph (the ReLU outputs become extra outputs of the graph, activations its backward keeps in any
case), and hooks added or removed later would not be seen by the compiled code.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor, nn


def relu_modules(module: nn.Module) -> dict[str, nn.ReLU]:
    """{qualified name: module} for every nn.ReLU inside `module` (the same names in a deepcopy of it)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, nn.ReLU)}


class ReluMaskRecorder:
    """Records the output of every nn.ReLU of a module on its calls; `take()` turns the last ones into masks."""

    def __init__(self, module: nn.Module) -> None:
        self._relus = relu_modules(module)
        self._outputs: dict[str, Tensor] = {}
        self._handles: list = []

    def __bool__(self) -> bool:
        return bool(self._relus)

    def attach(self) -> None:
        """Registers the hooks (idempotent). They overwrite one entry per ReLU a call: nothing accumulates."""
        if self._handles:
            return
        outputs = self._outputs
        for name, relu in self._relus.items():
            def hook(_module, _inputs, out, name=name):
                outputs[name] = out
            self._handles.append(relu.register_forward_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    @contextlib.contextmanager
    def attached(self):
        """The hooks for the duration of the block (for eager modules; see the module docstring)."""
        was_attached = bool(self._handles)
        self.attach()
        try:
            yield self
        finally:
            if not was_attached:
                self.detach()

    def clear(self) -> None:
        """Drops the recorded outputs (a compiled module's hooks hold the last call's until the next)."""
        self._outputs.clear()

    def take(self) -> dict[str, Tensor]:
        """{name: output} of every ReLU in the last call (detached copies; the masks are output > 0);
        ValueError if some ReLU did not run."""
        missing = sorted(set(self._relus) - set(self._outputs))
        if missing:
            raise ValueError(f"no ReLU output recorded for {', '.join(missing)}: the run's masks are unknown")
        outputs = {name: out.detach().clone() for name, out in self._outputs.items()}
        self.clear()
        return outputs

    @staticmethod
    @contextlib.contextmanager
    def apply(module: nn.Module, masks: dict[str, Tensor]):
        """Within the block, each nn.ReLU of `module` returns its input times the recorded mask: the same
        function as the recorded run's wherever a ReLU agrees, and that run's branch of the kink where not."""
        relus = relu_modules(module)
        if set(relus) != set(masks):
            raise ValueError(f"the masks name ReLUs {sorted(masks)}, the module has {sorted(relus)}")
        handles = []
        try:
            for name, relu in relus.items():
                mask = masks[name]

                def hook(_module, inputs, out, mask=mask):
                    z = inputs[0]
                    if mask.shape != z.shape:
                        raise ValueError(f"a recorded mask of shape {tuple(mask.shape)} for an input of "
                                         f"shape {tuple(z.shape)}")
                    return z * mask.to(device=z.device, dtype=z.dtype)
                if relu.inplace:  # the hook reads the pre-activation: it must survive the ReLU
                    relu.inplace = False
                handles.append(relu.register_forward_hook(hook))
            yield module
        finally:
            for handle in handles:
                handle.remove()


def masks_of(relu_outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """{name: output > 0}: which elements each ReLU passed."""
    return {name: out > 0 for name, out in relu_outputs.items()}


def same_masks(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
