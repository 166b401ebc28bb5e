"""What one benchmark case runs on: weights, rotated inputs, the output grad, the float64 reference."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from resaspp_ops.bench import separable
from resaspp_ops.bench.presets import Preset
from resaspp_ops.bench.providers import BranchConvs, set_dropout
from resaspp_ops.bench.relu_masks import ReluMaskRecorder, masks_of, same_masks
from resaspp_ops.flops import (FWD_BWD_FACTOR, MacCount, branch_macs, module_macs, separable_branch_macs,
                               separable_module_macs)

MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Case:
    """One row group of the report: every provider runs the same case."""

    level: str
    preset: Preset
    rate_set: str
    rates: tuple
    dtype_name: str
    mode: str

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_name]

    @property
    def train(self) -> bool:
        return self.mode == "fwd+bwd"

    @property
    def family(self) -> str:
        return self.preset.family

    def macs(self) -> MacCount:
        """MACs of one step: forward, times FWD_BWD_FACTOR with the backward."""
        p = self.preset
        counts = {("aspp", "module"): module_macs, ("aspp", "branches"): branch_macs,
                  ("separable", "module"): separable_module_macs, ("separable", "branches"): separable_branch_macs}
        count = counts[(self.family, self.level)](p.n, p.c, p.co, p.h, p.w, self.rates)
        return count.scaled(FWD_BWD_FACTOR) if self.train else count

    def label(self) -> str:
        return f"{self.level} {self.preset.name} r{','.join(map(str, self.rates))} {self.dtype_name} {self.mode}"


def make_source(case: Case, seed: int = 0) -> nn.Module:
    """The case's weights on the CPU, rounded to its dtype: a torchvision ASPP or a conv2d BranchConvs (for the
    separable family: bench/separable.py's).

    BatchNorm statistics and affine parameters are randomised so that folding them is exercised.
    """
    from torchvision.models.segmentation.deeplabv3 import ASPP

    p = case.preset
    if case.family == "separable":
        return separable.make_source(case.level, (p.n, p.c, p.co), case.rates, case.dtype, seed)
    torch.manual_seed(seed)
    if case.level == "module":
        module = ASPP(p.c, case.rates, p.co)
        with torch.no_grad():
            for m in module.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.normal_(0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.1)
    else:
        w1x1 = torch.randn(p.co, p.c, 1, 1) / p.c ** 0.5
        w3x3 = torch.randn(len(case.rates), p.co, p.c, 3, 3) / (9 * p.c) ** 0.5
        module = BranchConvs(w1x1, w3x3, case.rates, "conv2d")
    return module.to(case.dtype)


def make_inputs(case: Case, device: torch.device, count: int, seed: int = 1) -> list[Tensor]:
    """`count` distinct inputs x [N, C, H, W] (NCHW) in the case's dtype, rotated through while timing."""
    g = torch.Generator(device=device).manual_seed(seed)
    xs = [torch.randn(case.preset.shape(), generator=g, device=device, dtype=case.dtype) for _ in range(count)]
    for x in xs:
        x.requires_grad_(case.train)
    return xs


def output_shape(case: Case) -> tuple[int, int, int, int]:
    """[N, Co, H, W] for the module, [N, (1+B)*Co, H, W] for the branches."""
    p = case.preset
    channels = p.co if case.level == "module" else (1 + len(case.rates)) * p.co
    return (p.n, channels, p.h, p.w)


def make_output_grad(case: Case, device: torch.device, seed: int = 2) -> Tensor:
    """The grad of the scalar loss sum(out * g): a fixed random g [output_shape] in the case's dtype, NCHW."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(output_shape(case), generator=g, device=device, dtype=case.dtype)


def laid_out_like(grad: Tensor, out: Tensor) -> Tensor:
    """grad in out's dtype and memory format, as a loss computed from out would hand it back."""
    channels_last = out.dim() == 4 and out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    return grad.to(dtype=out.dtype).contiguous(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@dataclass
class Result:
    """A provider's output and (fwd+bwd) input grad on one input, detached; relu_outputs (fwd+bwd, a module
    with ReLUs): {name: output} of each nn.ReLU in that run, whose masks (output > 0) the run's float64
    reference takes (see resaspp_ops.bench.relu_masks) and which the gate judges as activations."""

    out: Tensor
    grad_x: Tensor | None
    relu_outputs: dict | None = None
    # The masks the run's ReLUs applied: its outputs > 0, or for a float64 reference the masks it was given
    # (where a run passed a pre-activation that float64 has below zero, the reference's output there is
    # that small negative value, so its mask cannot be read back from the output).
    relu_masks: dict | None = None

    def __post_init__(self) -> None:
        if self.relu_masks is None and self.relu_outputs is not None:
            self.relu_masks = masks_of(self.relu_outputs)


def run_once(fn, module: nn.Module, x: Tensor, grad_out: Tensor | None, train: bool,
             recorder: ReluMaskRecorder | None = None) -> Result:
    """One check step: forward (and backward of sum(out * grad_out) in train mode), with the module's
    dropout switched off, where it stays for the timing that follows (see set_dropout). In train mode,
    `recorder` (hooks on the module's ReLUs, attached for this step if they are not already) gives the
    run's ReLU outputs."""
    set_dropout(module, False)
    x = x.detach().requires_grad_(train)
    if not train:
        with torch.no_grad():
            return Result(fn(x).detach().clone(), None)
    with recorder.attached() if recorder is not None else contextlib.nullcontext():
        out = fn(x)
    relu_outputs = recorder.take() if recorder is not None else None
    out.backward(laid_out_like(grad_out, out))
    return Result(out.detach().clone(), x.grad.detach().clone(), relu_outputs)


def float64_reference(case: Case, source: nn.Module, x: Tensor, grad_out: Tensor | None, device,
                      relu_masks: dict | None = None) -> Result:
    """The ground truth: the case's source module and input (already rounded to its dtype) in float64.

    relu_masks (fwd+bwd): a judged run's ReLU masks, which the float64 module's ReLUs then use in place of
    their own, so that its grad is the derivative of the same piecewise-linear function as that run's. In
    fwd+bwd the result's relu_outputs are the float64 ReLUs' outputs (with those masks, if given)."""
    module = copy.deepcopy(source).to(device=device, dtype=torch.float64).train(case.train)
    g64 = None if grad_out is None else grad_out.to(torch.float64)
    x64 = x.detach().to(torch.float64)
    recorder = ReluMaskRecorder(module) if case.train else None
    with ReluMaskRecorder.apply(module, relu_masks) if relu_masks is not None else contextlib.nullcontext():
        # Registered after the masks' hooks, the recorder sees the masked outputs.
        result = run_once(module, module, x64, g64, case.train, recorder if recorder else None)
    if relu_masks is not None:
        result.relu_masks = relu_masks
    return result


class Float64References:
    """The float64 references of one case, one per distinct set of ReLU masks among the runs judged on it.

    Most runs agree with float64 on every ReLU and share its reference; a run that put some unit on the other
    side of a kink gets (and shares with any run of the same masks) a reference computed with its masks.
    """

    def __init__(self, case: Case, source: nn.Module, x: Tensor, grad_out: Tensor | None, device) -> None:
        self._args = (case, source, x, grad_out, device)
        self.own = float64_reference(case, source, x, grad_out, device)  # with float64's own masks
        self._by_masks = [self.own]

    def for_run(self, result: Result) -> Result:
        """The reference that `result` is judged against."""
        masks = result.relu_masks
        if masks is None:
            return self.own
        for reference in self._by_masks:
            if same_masks(reference.relu_masks, masks):
                return reference
        reference = float64_reference(*self._args, relu_masks=masks)
        self._by_masks.append(reference)
        return reference
