"""Backends of the fused ops, and the choice between them.

The ops come in families (FAMILIES): multi_rate_conv2d (ASPP's 1x1 and atrous 3x3 branches) and
multi_rate_separable_conv2d (DeepLabV3+'s depthwise-separable branches). A backend implements a family with
one module; FAMILIES maps each family to {backend name: module}, and a backend not listed there for a family
does not implement it yet (a named call raises NotImplementedError, "auto" passes it over). A kernel backend
declares a family by adding its module there. The separable contract is in backend/reference_separable.py.

Every multi_rate_conv2d backend is a module with the same three functions (the contract the ops layer relies on):

    availability(device: torch.device, dtype: torch.dtype) -> (bool, str)
        whether it can run tensors of that device and dtype here, and if not, why not.
    forward(x, w1x1, w3x3, rates, scale, shift, relu) -> out
        x [N, C, H, W], w1x1 [Co, C, 1, 1], w3x3 [B, Co, C, 3, 3], rates: tuple of B ints,
        scale/shift: None or [(1+B)*Co] in the accumulation dtype (fp32, or fp64 for fp64 x);
        out [N, (1+B)*Co, H, W] channels_last in x's dtype.
    backward(grad, x, w1x1, w3x3, rates, need_x, need_w) -> (grad_x, grad_w1x1, grad_w3x3)
        grad of the pre-epilogue output [N, (1+B)*Co, H, W]; None where not requested.

Inputs reach a backend already validated by resaspp_ops.ops (shapes, dtypes, devices, rates). A backend
whose forward is made of differentiable PyTorch ops says so with DIFFERENTIABLE = True: in plain eager mode
PyTorch's autograd then differentiates it directly, and backward() serves the registered op.

What runs a call is a plan (the ops' `backend` argument, resolved by the public functions):

    plan := spec | spec "|" part "|" part | "auto"        forward | input grad | weight grad
    spec := NAME | NAME ":" VARIANT                        "reference", "triton:v1", "cuda:mma" (VARIANTS)
    part := spec | "auto" | "measure"

A spec alone runs every direction; "auto" (a whole plan or a part) is decided when that direction runs, from
backend="auto"'s decisions (resaspp_ops/autotune), else the static order below, never measured; "measure"
(plain eager mode only) measures there if nothing is decided. A spec's variant is selected around the one
backend call (implementation), in the calling thread only.
"""
from __future__ import annotations

import contextlib
import importlib
import warnings
from typing import ContextManager, NamedTuple

import torch

from resaspp_ops.backend import precision

NAMES = ("reference", "cuda", "triton")
# The order "auto" tries on a CUDA device by default, among the backends that implement the family
# (auto_order refines it per arch and dtype); the CPU always gets the reference (oneDNN) path.
AUTO_ORDER_CUDA = ("cuda", "triton", "reference")
# On Hopper, for fp16 / bf16 / TF32: Triton first until GPU numbers decide (benchmarks/NOTES.md: the CUDA
# backend's WMMA kernels are modelled at 0.3-0.7x cuDNN, the Triton second design at or above it).
AUTO_ORDER_SM90 = ("triton", "cuda", "reference")

MULTI_RATE = "multi_rate_conv2d"
SEPARABLE = "multi_rate_separable_conv2d"
FAMILIES = {
    MULTI_RATE: {"reference": "reference", "cuda": "cuda", "triton": "triton"},
    SEPARABLE: {"reference": "reference_separable", "cuda": "cuda_separable", "triton": "triton.separable"},
}


# The kernel variants of a backend that backend="auto" measures apart (the backend's own switch picks one
# otherwise): Triton's two designs (RESASPP_TRITON_KERNEL), the CUDA kernel families (RESASPP_CUDA_KERNEL).
VARIANTS = {
    ("triton", MULTI_RATE): ("v2", "v1"),
    ("cuda", MULTI_RATE): ("sm90", "mma", "simt"),
    ("cuda", SEPARABLE): ("mma", "simt"),
}
# Backends added at run time under a name of their own (the test hook of backend="auto": tests plant a wrong,
# a slow or a raising candidate here, never in a real backend): (name, family) -> module with the contract.
_EXTRA: dict = {}

AUTO = "auto"
MEASURE = "measure"


class BackendStatus(NamedTuple):
    available: bool
    reason: str


_MODULES: dict = {}


def implements(name: str, family: str = MULTI_RATE) -> bool:
    """Whether backend `name` implements the op family."""
    return name in FAMILIES[family]


def not_implemented_reason(name: str, family: str) -> str:
    return (f"backend {name!r} does not implement {family} yet; implemented by: "
            f"{', '.join(n for n in NAMES if implements(n, family))}")


def add_extra(name: str, module, family: str = MULTI_RATE) -> None:
    """Makes `module` (a backend with the contract above) a backend named `name` for the family, and so a
    candidate of backend="auto" (see autotune/candidates.py). A test hook: remove it with remove_extra."""
    if name in NAMES or name in (AUTO, MEASURE) or ":" in name or "|" in name:
        raise ValueError(f"{name!r} cannot name an extra backend")
    _EXTRA[(name, family)] = module


def remove_extra(name: str, family: str = MULTI_RATE) -> None:
    _EXTRA.pop((name, family), None)


def extras(family: str = MULTI_RATE) -> tuple[str, ...]:
    """The names of the extra backends of the family (add_extra), in the order they were added."""
    return tuple(n for n, f in _EXTRA if f == family)


def get(name: str, family: str = MULTI_RATE):
    """The module of backend `name` (one of NAMES, or an extra) for the op family, imported on first use;
    NotImplementedError where the backend does not implement the family."""
    module = _MODULES.get((name, family))
    if module is None:
        if (name, family) in _EXTRA:
            return _EXTRA[(name, family)]
        if name not in NAMES:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(NAMES)} or 'auto'")
        if not implements(name, family):
            raise NotImplementedError(not_implemented_reason(name, family))
        module = _MODULES[(name, family)] = importlib.import_module(f"{__name__}.{FAMILIES[family][name]}")
    return module


def plan_parts(plan: str) -> tuple[str, str, str]:
    """(forward, input grad, weight grad) parts of a plan (see the module's docstring)."""
    if "|" not in plan:
        return plan, plan, plan
    parts = plan.split("|")
    if len(parts) != 3:
        raise ValueError(f"a plan has one part or three (forward|input grad|weight grad), got {plan!r}")
    return parts[0], parts[1], parts[2]


def join_plan(forward: str, input_grad: str, weight_grad: str) -> str:
    """The plan of three parts, written as one spec when they are the same."""
    if forward == input_grad == weight_grad:
        return forward
    return f"{forward}|{input_grad}|{weight_grad}"


def split_spec(spec: str) -> tuple[str, str | None]:
    """(backend name, variant or None) of a spec such as "triton:v1"."""
    name, _, variant = spec.partition(":")
    return name, (variant or None)


def use_variant(name: str, variant: str | None, family: str = MULTI_RATE) -> ContextManager:
    """A context in which this thread's calls of backend `name` run its kernel variant `variant` (VARIANTS);
    a null context for None."""
    if variant is None:
        return contextlib.nullcontext()
    if variant not in VARIANTS.get((name, family), ()):
        raise ValueError(f"backend {name!r} has no variant {variant!r} for {family}; its variants: "
                         f"{', '.join(VARIANTS.get((name, family), ())) or 'none'}")
    if name == "triton":
        return get("triton", MULTI_RATE).thread_kernel_version(variant)
    return get("cuda", MULTI_RATE).use_kernel(variant)


def implementation(spec: str, family: str = MULTI_RATE):
    """(backend module, the context that selects the spec's variant) of a concrete spec."""
    name, variant = split_spec(spec)
    return get(name, family), use_variant(name, variant, family)


def status(name: str, device: torch.device | str, dtype: torch.dtype = torch.float32,
           family: str = MULTI_RATE) -> BackendStatus:
    """Whether backend `name` can run the family's op on tensors of this device and dtype, and if not, why not."""
    if name in NAMES and not implements(name, family):
        return BackendStatus(False, not_implemented_reason(name, family))
    ok, reason = get(name, family).availability(torch.device(device), dtype)
    return BackendStatus(bool(ok), reason)


def auto_order(device: torch.device, dtype: torch.dtype,
               family: str = MULTI_RATE) -> tuple[tuple[str, ...], str]:
    """(the backends "auto" tries in order for the family's op on tensors of this device and dtype, why that
    order); backends that do not implement the family are left out."""
    if device.type != "cuda":
        return ("reference",), f"{device.type} tensors run on the reference backend (PyTorch's own convolutions)"
    if dtype == torch.float32 and not precision.tf32_convolutions():
        return ("reference",), (f"fp32 with TF32 off ({precision.describe()}): no fused kernel is expected to beat "
                                "cuDNN's exact fp32 convolutions, so PyTorch's run")
    if dtype in (torch.float16, torch.bfloat16, torch.float32) and torch.cuda.is_available() \
            and torch.cuda.get_device_capability(device) >= (9, 0):
        order, reason = AUTO_ORDER_SM90, "sm_90: Triton first until the GPU numbers decide"
    else:
        order, reason = AUTO_ORDER_CUDA, "the CUDA kernels first"
    implemented = tuple(n for n in order if implements(n, family))
    missing = ", ".join(n for n in order if n not in implemented)
    if implemented == ("reference",):
        reason = f"{missing}: not implemented for {family} yet, so PyTorch's convolutions run"
    elif missing:
        reason += f"; {missing}: not implemented for {family} yet"
    return implemented, reason


def _auto_pick(device: torch.device, dtype: torch.dtype, family: str = MULTI_RATE) -> str:
    order, _ = auto_order(device, dtype, family)
    for candidate in order:
        if get(candidate, family).availability(device, dtype)[0]:
            return candidate
    return "reference"


_WARNED: set = set()


# A trace-time constant under torch.compile: the backend is fixed when the graph is captured,
# and the module lookup (importlib) stays out of the graph.
@torch.compiler.assume_constant_result
def resolve(name: str, device: torch.device, dtype: torch.dtype, family: str = MULTI_RATE) -> str:
    """The concrete backend that runs the family's op on tensors of this device and dtype.

    "auto" picks the first available backend of auto_order (per arch, dtype and family) on CUDA, and the
    reference elsewhere; on CUDA, when it cannot take the first of those it says why, once per process and reason.
    A named backend that does not implement the family raises NotImplementedError, one that cannot run the
    tensors RuntimeError, each with the reason: never a silent stand-in.
    """
    if name == "auto":
        order, _ = auto_order(device, dtype, family)
        chosen = _auto_pick(device, dtype, family)
        if device.type == "cuda" and chosen != order[0]:
            why = get(order[0], family).availability(device, dtype)[1]
            if (chosen, why) not in _WARNED:
                _WARNED.add((chosen, why))
                warnings.warn(f"resaspp_ops: backend='auto' runs {dtype} CUDA tensors on {chosen!r}, "
                              f"not {order[0]!r}: {why}", stacklevel=3)
        return chosen
    ok, reason = get(name, family).availability(device, dtype)
    if not ok:
        raise RuntimeError(f"resaspp_ops backend {name!r} cannot run {dtype} tensors on {device}: {reason}")
    return name


def auto_choice(device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                family: str = MULTI_RATE) -> tuple[str, str]:
    """(backend, why) that "auto" picks for the family's op on tensors of this device and dtype."""
    device = torch.device(device)
    order, reason = auto_order(device, dtype, family)
    chosen = _auto_pick(device, dtype, family)
    if device.type != "cuda" or order == ("reference",):
        return chosen, reason
    skipped = [f"{n}: {get(n, family).availability(device, dtype)[1]}" for n in order[: order.index(chosen)]]
    why = f"first available in the order {' > '.join(order)} ({reason})"
    return chosen, why + (f" (skipped {'; '.join(skipped)})" if skipped else "")
