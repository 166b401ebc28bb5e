"""The implementations the suite times, per level, and why one cannot run here.

Level "module" (the whole ASPP):
    torchvision-eager      torchvision's ASPP, NCHW input and weights
    torchvision-eager-cl   the same in channels_last
    torchvision-compile    torch.compile(mode="max-autotune", or --compile-mode) of the channels_last module
    fused-triton / fused-cuda / fused-auto   FusedASPP(backend=...), channels_last input (fused-auto: the measured
                           choice on CUDA, what a user gets; its row's auto_choice records the decisions)
    fused-triton-v1        FusedASPP(backend="triton") on the Triton kernels' first design (RESASPP_TRITON_KERNEL=v1)
    fused-cuda-sm90        FusedASPP(backend="cuda") on the sm_90a warpgroup-MMA kernels (RESASPP_CUDA_KERNEL=sm90),
                           which fused-cuda runs only once a GPU run has validated them
    fused-auto-compile     torch.compile (the baseline's mode) of FusedASPP(backend="auto"): what a user who
                           compiles the model gets (the op stays one kernel; Inductor fuses what is around it)
    fused-triton-unrolled  separable family only: FusedSeparableASPP(backend="triton") with the separable forward's
                           nine taps unrolled (RESASPP_TRITON_SEPARABLE_TAPS=unrolled), beside the default loop

Level "branches" (the 1x1 + B atrous convolutions alone, output [N, (1+B)*Co, H, W]):
    conv2d-eager           1+B F.conv2d calls and the concat, NCHW (what torchvision's ASPP runs)
    conv2d-eager-cl        the same in channels_last
    conv2d-compile         torch.compile(mode="max-autotune") of the channels_last version
    fused-triton / fused-cuda / fused-auto   multi_rate_conv2d(backend=...), channels_last input
    fused-triton-v1        multi_rate_conv2d(backend="triton") on the first kernel design
    fused-cuda-sm90        multi_rate_conv2d(backend="cuda") on the sm_90a kernels
    fused-auto-compile     torch.compile of multi_rate_conv2d(backend="auto")
    fused-triton-unrolled  separable family only: multi_rate_separable_conv2d(backend="triton"), the forward's
                           taps unrolled

The separable family (DeepLabV3+ presets; bench/separable.py) has the same levels and fused provider names:
    smp-eager / smp-eager-cl / smp-compile        segmentation_models_pytorch's separable ASPP (module level),
                                                  against FusedSeparableASPP(backend=...)
    sepconv-eager / sepconv-eager-cl / sepconv-compile   1x1 + per branch depthwise and pointwise F.conv2d, and
                                                  the concat (branch level), against multi_rate_separable_conv2d

Fused providers get channels_last input, the kernels' native layout and the layout of the best
baselines; a fused provider whose backend cannot run here (or does not implement the family's op) is skipped
with the reason, never replaced by another backend.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from resaspp_ops import backend as _backend
from resaspp_ops.autotune.policy import measured_auto
from resaspp_ops.bench import separable
from resaspp_ops.bench.relu_masks import ReluMaskRecorder
from resaspp_ops.nn import FusedASPP
from resaspp_ops.ops import multi_rate_conv2d

LEVELS = ("module", "branches")
# (preset family, level) -> its PyTorch baselines; the first is the yardstick of DESIGN.md section 5's rule (the
# baseline whose error against float64 bounds the others').
BASELINES = {
    ("aspp", "module"): ("torchvision-eager", "torchvision-eager-cl", "torchvision-compile"),
    ("aspp", "branches"): ("conv2d-eager", "conv2d-eager-cl", "conv2d-compile"),
    ("separable", "module"): ("smp-eager", "smp-eager-cl", "smp-compile"),
    ("separable", "branches"): ("sepconv-eager", "sepconv-eager-cl", "sepconv-compile"),
}
FUSED_BACKENDS = {"fused-triton": "triton", "fused-triton-v1": "triton", "fused-triton-unrolled": "triton",
                  "fused-cuda": "cuda", "fused-cuda-sm90": "cuda", "fused-auto": "auto", "fused-auto-compile": "auto"}
# Providers that run another kernel design or family of a backend, so that one run compares them: (backend, the
# variant, the op families it exists for).
KERNEL_VERSIONS = {"fused-triton-v1": ("triton", "v1", ("aspp",)),
                   "fused-triton-unrolled": ("triton", "taps-unrolled", ("separable",)),
                   "fused-cuda-sm90": ("cuda", "sm90", ("aspp",))}


def _variant_context(backend_name: str, variant: str) -> Callable[[], ContextManager]:
    """A context factory that runs the backend's calls on `variant` (the Triton design, the separable forward's
    tap walk, or the CUDA kernel family)."""
    if (backend_name, variant) == ("triton", "taps-unrolled"):
        from resaspp_ops.backend.triton import configs

        return functools.partial(configs.use_separable_taps, "unrolled")
    module = _backend.get(backend_name)
    if backend_name == "triton":
        return functools.partial(module.use_kernel_version, variant)
    return functools.partial(module.use_kernel, variant)


def _variant_note(backend_name: str, variant: str) -> str:
    if (backend_name, variant) == ("triton", "taps-unrolled"):
        return "separable forward: the taps unrolled"
    return f"kernel {'design' if backend_name == 'triton' else 'family'} {variant}"
YARDSTICK = {key: names[0] for key, names in BASELINES.items()}
# The op family each preset family runs (backend.FAMILIES).
OP_FAMILY = {"aspp": _backend.MULTI_RATE, "separable": _backend.SEPARABLE}
ALL_PROVIDERS = tuple(dict.fromkeys(p for key in BASELINES for p in BASELINES[key] + tuple(FUSED_BACKENDS)))


def providers_of(level: str, family: str = "aspp") -> tuple[str, ...]:
    return BASELINES[(family, level)] + tuple(FUSED_BACKENDS)


def is_baseline(provider: str) -> bool:
    return provider not in FUSED_BACKENDS


def is_compiled(provider: str) -> bool:
    return provider.endswith("-compile")


def takes_channels_last(provider: str) -> bool:
    return not provider.endswith("-eager")


def skip_reason(provider: str, device: torch.device, dtype: torch.dtype, explicitly_requested: bool,
                family: str = "aspp", level: str = "branches") -> Optional[str]:
    """Why `provider` is not run for a case of this family and level on tensors of this device and dtype, or
    None if it runs."""
    if family == "separable" and level == "module" and separable.smp_unavailable():
        return separable.smp_unavailable()
    if is_compiled(provider) and device.type == "cpu" and not explicitly_requested:
        return "torch.compile on the CPU is slow; ask for it with --providers"
    backend = FUSED_BACKENDS.get(provider)
    if provider in KERNEL_VERSIONS and family not in KERNEL_VERSIONS[provider][2]:
        ops = " and ".join(OP_FAMILY[f] for f in KERNEL_VERSIONS[provider][2])
        return f"{provider} is a kernel variant of {ops} only"
    if backend is not None and backend != "auto":
        if not _backend.implements(backend, OP_FAMILY[family]):
            return _backend.not_implemented_reason(backend, OP_FAMILY[family])
        available, reason = _backend.status(backend, device, dtype, OP_FAMILY[family])
        if not available:
            return f"backend {backend!r} unavailable: {reason}"
        if provider in KERNEL_VERSIONS and backend == "cuda":
            # The family's own conditions on this GPU and dtype (channel counts: every preset's are multiples of 8).
            why = _backend.get("cuda").kernel_unavailable_reason(KERNEL_VERSIONS[provider][1], device, dtype, 8, 8)
            if why:
                return f"cuda kernel family {KERNEL_VERSIONS[provider][1]!r} cannot run here: {why}"
    return None


def auto_note(device: torch.device, dtype: torch.dtype, family: str = "aspp") -> str:
    """Which concrete backend fused-auto runs, for the report, as far as it is known before a call: the static
    order's backend, or that it is measured per problem (the suite then names the measured choice:
    auto_choice_note)."""
    if measured_auto(device):
        return "auto: measured per problem"
    return f"auto -> {_backend.resolve('auto', device, dtype, OP_FAMILY[family])} (static order)"


def auto_choice_note(decisions: list) -> str:
    """What the fused op ran in each direction, from the decisions a fused-auto run used (autotune.recording):
    "auto -> reference", or per direction where they differ, e.g. "auto -> forward triton:v2, input_grad
    reference, weight_grad cuda:mma"; several problems (the module's calls) are separated by " / "."""
    by_problem: dict = {}
    for d in decisions:
        problem = (d.key.family, d.key.n, d.key.c, d.key.h, d.key.w, d.key.co, d.key.rates)
        by_problem.setdefault(problem, {})[d.key.direction] = d.chosen
    parts = []
    for chosen in by_problem.values():
        specs = set(chosen.values())
        parts.append(specs.pop() if len(specs) == 1 else
                     ", ".join(f"{direction} {spec}" for direction, spec in chosen.items()))
    return "auto -> " + " / ".join(parts)


class BranchConvs(nn.Module):
    """The branch convolutions as a module: x [N, C, H, W] -> [N, (1+B)*Co, H, W].

    impl "conv2d" runs 1+B F.conv2d calls and concatenates, with one 4-D weight [Co, C, 3, 3] per
    atrous branch (so channels_last converts each); any other impl is a multi_rate_conv2d backend
    name, with the op's stacked weight [B, Co, C, 3, 3]. w1x1: [Co, C, 1, 1].
    """

    def __init__(self, w1x1: Tensor, w3x3: Tensor, rates, impl: str) -> None:
        super().__init__()
        self.w1x1 = nn.Parameter(w1x1.detach().clone())
        if impl == "conv2d":
            self.w3x3 = nn.ParameterList([nn.Parameter(w.detach().clone()) for w in w3x3])
        else:
            self.w3x3 = nn.Parameter(w3x3.detach().clone())
        self.rates = tuple(rates)
        self.impl = impl

    def stacked_w3x3(self) -> Tensor:
        """[B, Co, C, 3, 3] whatever the impl."""
        if isinstance(self.w3x3, nn.ParameterList):
            return torch.stack(list(self.w3x3))
        return self.w3x3

    def forward(self, x: Tensor) -> Tensor:
        if self.impl == "conv2d":
            ys = [F.conv2d(x, self.w1x1)]
            ys += [F.conv2d(x, w, padding=r, dilation=r) for w, r in zip(self.w3x3, self.rates)]
            return torch.cat(ys, dim=1)
        return multi_rate_conv2d(x, self.w1x1, self.w3x3, self.rates, backend=self.impl)


def to_channels_last(module: nn.Module) -> nn.Module:
    """Converts the module's 4-D parameters and buffers to channels_last, leaving other ranks alone."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.dim() == 4:
            t.data = t.data.contiguous(memory_format=torch.channels_last)
    return module


@dataclass
class Runner:
    """One provider, built for one case: `fn(x) -> out`, and the leaves whose grads a step clears."""

    provider: str
    fn: Callable[[Tensor], Tensor]
    module: nn.Module
    channels_last: bool
    note: str = ""
    params: list = field(default_factory=list)
    relu_recorder: Optional[ReluMaskRecorder] = None  # fwd+bwd on a module with ReLUs: see bench.relu_masks
    step_context: Callable[[], ContextManager] = contextlib.nullcontext  # entered around each whole step



def _new_step_each_call(compiled: Callable[[Tensor], Tensor], recorder: Optional[ReluMaskRecorder]
                        ) -> Callable[[Tensor], Tensor]:
    """max-autotune replays CUDA graphs; each call is a new step, whose outputs may overwrite the last's
    (every caller here is done with the previous outputs by then). The compiled graph's ReLU hooks (if any)
    hold the last step's ReLU outputs: released here, before the step allocates its own."""
    def call(x: Tensor) -> Tensor:
        if recorder is not None:
            recorder.clear()
        torch.compiler.cudagraph_mark_step_begin()
        return compiled(x)
    return call


def set_dropout(module: nn.Module, enabled: bool) -> None:
    """Dropout's mask is random, so the correctness check runs with it off; the timing keeps it off too
    (the same cheap elementwise op in every provider), because switching it back on between the check
    and the timing would make torch.compile recompile (its guards include each module's training flag),
    a second max-autotune compile per fwd+bwd case."""
    for m in module.modules():
        if isinstance(m, nn.Dropout):
            m.train(enabled and module.training)


DEFAULT_COMPILE_MODE = "max-autotune"


def build(level: str, provider: str, source: nn.Module, rates, device: torch.device, train: bool,
          compile_mode: str = DEFAULT_COMPILE_MODE, family: str = "aspp") -> Runner:
    """A Runner for `provider` from `source`, the case's weights already in the case's dtype (on the CPU).

    source is a torchvision ASPP (level "module") or a BranchConvs with impl "conv2d" (level "branches"); for
    the separable family smp's separable ASPP or a SeparableBranchConvs (bench/separable.py).
    compile_mode: torch.compile's mode for the -compile providers.
    """
    backend = FUSED_BACKENDS.get(provider)
    if family == "separable":
        module = separable.module_for(level, backend, source, rates)
    elif level == "module":
        if backend is None:
            module = copy.deepcopy(source)
        else:
            module = FusedASPP(source.convs[0][0].in_channels, rates, source.convs[0][0].out_channels,
                               backend=backend)
            module.load_state_dict(source.state_dict())
            module = module.to(next(source.parameters()).dtype)
    else:
        module = BranchConvs(source.w1x1, source.stacked_w3x3(), rates, "conv2d" if backend is None else backend)
    channels_last = takes_channels_last(provider)
    module = module.to(device)
    if channels_last:
        module = to_channels_last(module)
    module.train(train)
    recorder = ReluMaskRecorder(module) if train else None
    recorder = recorder if recorder else None  # no ReLU, nothing to record
    fn = module
    if is_compiled(provider):
        torch._dynamo.reset()  # a fresh cache per case: never fall back to eager at the recompile limit
        if recorder is not None:
            recorder.attach()  # before the compile, which traces the hooks in (see bench.relu_masks)
        fn = _new_step_each_call(torch.compile(module, mode=compile_mode), recorder)  # harmless without graphs
    note = auto_note(device, next(module.parameters()).dtype, family) if backend == "auto" else ""
    context = contextlib.nullcontext
    if provider in KERNEL_VERSIONS:
        backend_name, variant, _ = KERNEL_VERSIONS[provider]
        context = _variant_context(backend_name, variant)
        note = _variant_note(backend_name, variant)
    return Runner(provider, fn, module, channels_last, note, list(module.parameters()), recorder, context)
