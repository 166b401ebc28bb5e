"""A small forward and backward of every fused kernel, for compute-sanitizer (benchmarks/gpu/validate.sh):

    compute-sanitizer --tool memcheck  python benchmarks/gpu/sanitize_case.py [BACKEND ...]
    compute-sanitizer --tool racecheck python benchmarks/gpu/sanitize_case.py [BACKEND ...]

BACKEND: cuda (every kernel family of the cuda backend in turn: sm90, mma, simt), cuda:sm90, cuda:mma,
cuda:simt, triton (the Triton kernels' second design), triton-v1 (the first), triton-separable and/or
cuda-separable (the separable op's kernels, mid stage on); default: all but cuda's explicit families. One backend a run keeps a report on one from being mistaken for the other (racecheck may not model
Triton's asynchronous copies and warpgroup MMAs). A cuda family that cannot run a case here (no sm_90 GPU, a
dtype it does not take) is reported as skipped with the reason. Exits non-zero if the cuda backend cannot run
here, if a family named explicitly runs nothing, or if a name is unknown.
"""
import contextlib
import os
import sys

import torch

import resaspp_ops
from resaspp_ops import backend as backend_registry
from resaspp_ops.backend import cuda as cuda_backend
from resaspp_ops.backend import triton as triton_backend

# Odd sizes on purpose: partial tiles, channel counts off the block sizes, rates past the map. The first two
# take the tensor-core kernels in fp16/bf16 (C and Co multiples of 8; the second stacks two images a tile
# for the sm90 ones), the third only the SIMT ones.
PROBLEMS = [(2, 24, 16, 11, 13, (1, 3, 17)), (2, 64, 32, 5, 9, (2, 4, 6, 8)), (1, 13, 6, 7, 10, (1, 5))]
CUDA_FAMILIES = ("sm90", "mma", "simt")
KNOWN = ("cuda", *(f"cuda:{f}" for f in CUDA_FAMILIES), "triton", "triton-v1", "triton-separable", "cuda-separable")


def _runs(names):
    """(label, backend, family, context) for each run the names ask for; family: the cuda kernel family,
    "separable" (the separable op's Triton kernels) or None."""
    for name in names:
        if name == "cuda":
            for family in CUDA_FAMILIES:
                yield f"cuda:{family}", "cuda", family, contextlib.nullcontext()
        elif name.startswith("cuda:"):
            yield name, "cuda", name.split(":", 1)[1], contextlib.nullcontext()
        elif name.endswith("-separable"):
            yield name, name.removesuffix("-separable"), "separable", contextlib.nullcontext()
        else:
            version = "v1" if name == "triton-v1" else "v2"
            yield name, "triton", None, triton_backend.use_kernel_version(version)


def main(argv) -> int:
    names = argv or ["cuda", "triton", "triton-v1", "triton-separable", "cuda-separable"]
    if any(n not in KNOWN for n in names):
        print(f"unknown backend in {names}; choose from {', '.join(KNOWN)}", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    failures = 0
    for label, name, family, context in _runs(names):
        if family in CUDA_FAMILIES:
            os.environ["RESASPP_CUDA_KERNEL"] = family  # the cuda backend reads it at every call
        try:
            with context:
                ran, failed = _run(name, label, family, device)
        finally:
            os.environ.pop("RESASPP_CUDA_KERNEL", None)
        failures += failed
        if ran == 0 and label in names and family in CUDA_FAMILIES:
            print(f"{label}: named explicitly but ran nothing here", file=sys.stderr)
            failures += 1
    return 1 if failures else 0


def _separable_case(name, n, c, co, h, w, rates, dtype, device):
    b = len(rates)
    x = torch.randn(n, c, h, w, device=device, dtype=dtype, requires_grad=True)
    w1 = torch.randn(co, c, 1, 1, device=device, dtype=dtype, requires_grad=True)
    w_dw = torch.randn(b, c, 1, 3, 3, device=device, dtype=dtype, requires_grad=True)
    w_pw = torch.randn(b, co, c, 1, 1, device=device, dtype=dtype, requires_grad=True)
    mid_scale = torch.rand(b * c, device=device, requires_grad=True)
    mid_shift = torch.randn(b * c, device=device, requires_grad=True)
    y = resaspp_ops.multi_rate_separable_conv2d(x, w1, w_dw, w_pw, rates, mid_scale, mid_shift, True,
                                                backend=name)
    y.float().square().sum().backward()


def _run(name: str, label: str, family, device: torch.device) -> tuple[int, int]:
    """Every problem in every dtype through backend `name` (family "separable": the separable op): (cases run,
    failures: a cuda backend that cannot run)."""
    ran = failures = 0
    op_family = backend_registry.SEPARABLE if family == "separable" else backend_registry.MULTI_RATE
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        status = backend_registry.status(name, device, dtype, family=op_family)
        if not status.available:
            print(f"skip {label} {dtype}: {status.reason}")
            failures += name == "cuda"
            continue
        for n, c, co, h, w, rates in PROBLEMS:
            if family == "separable":
                _separable_case(name, n, c, co, h, w, rates, dtype, device)
                torch.cuda.synchronize()
                print(f"ok {label} {dtype} {(n, c, co, h, w, rates)}")
                ran += 1
                continue
            if family in CUDA_FAMILIES:
                try:
                    cuda_backend.kernel_choice(device, dtype, c, co)
                except RuntimeError as exc:
                    print(f"skip {label} {dtype} {(n, c, co, h, w, rates)}: {exc}")
                    continue
            x = torch.randn(n, c, h, w, device=device, dtype=dtype, requires_grad=True)
            w1 = torch.randn(co, c, 1, 1, device=device, dtype=dtype, requires_grad=True)
            w3 = torch.randn(len(rates), co, c, 3, 3, device=device, dtype=dtype, requires_grad=True)
            scale = torch.rand((1 + len(rates)) * co, device=device)
            shift = torch.randn((1 + len(rates)) * co, device=device)
            y = resaspp_ops.multi_rate_conv2d(x, w1, w3, rates, scale, shift, relu=True, backend=name)
            y.float().square().sum().backward()
            torch.cuda.synchronize()
            print(f"ok {label} {dtype} {(n, c, co, h, w, rates)}")
            ran += 1
    return ran, failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
