"""A small forward and backward through every GPU kernel path, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/gpu/sanitize_case.py [BACKEND ...]
    compute-sanitizer --tool racecheck python benchmarks/gpu/sanitize_case.py [BACKEND ...]

BACKEND: cuda, triton (the Triton kernels' second design) and/or triton-v1 (the first); default: all three.
One backend a run keeps a report on one from being mistaken for the other (racecheck may not model Triton's
asynchronous copies and warpgroup MMAs).
Exits non-zero if the cuda backend cannot run here or a backend name is unknown.
"""
import contextlib
import sys

import torch

import resaspp_ops
from resaspp_ops import backend as backend_registry
from resaspp_ops.backend import triton as triton_backend

# Odd sizes on purpose: partial tiles, channel counts off the block sizes, rates past the map. The first two
# take the cuda backend's tensor-core kernels in fp16/bf16 (C and Co multiples of 8), the third its SIMT ones.
PROBLEMS = [(2, 24, 16, 11, 13, (1, 3, 17)), (1, 64, 32, 9, 9, (2, 4, 6, 8)), (1, 13, 6, 7, 10, (1, 5))]


def main(argv) -> int:
    names = argv or ["cuda", "triton", "triton-v1"]
    if any(n not in ("cuda", "triton", "triton-v1") for n in names):
        print(f"unknown backend in {names}; choose cuda, triton and/or triton-v1", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    failures = 0
    for label in names:
        name, version = ("triton", "v1") if label == "triton-v1" else (label, "v2")
        design = triton_backend.use_kernel_version(version) if name == "triton" else contextlib.nullcontext()
        with design:
            failures += _run(name, label, device)
    return 1 if failures else 0


def _run(name: str, label: str, device: torch.device) -> int:
    """Every problem in every dtype through backend `name`; the failures (a cuda backend that cannot run)."""
    failures = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        status = backend_registry.status(name, device, dtype)
        if not status.available:
            print(f"skip {label} {dtype}: {status.reason}")
            failures += name == "cuda"
            continue
        for n, c, co, h, w, rates in PROBLEMS:
            x = torch.randn(n, c, h, w, device=device, dtype=dtype, requires_grad=True)
            w1 = torch.randn(co, c, 1, 1, device=device, dtype=dtype, requires_grad=True)
            w3 = torch.randn(len(rates), co, c, 3, 3, device=device, dtype=dtype, requires_grad=True)
            scale = torch.rand((1 + len(rates)) * co, device=device)
            shift = torch.randn((1 + len(rates)) * co, device=device)
            y = resaspp_ops.multi_rate_conv2d(x, w1, w3, rates, scale, shift, relu=True, backend=name)
            y.float().square().sum().backward()
            torch.cuda.synchronize()
            print(f"ok {label} {dtype} {(n, c, co, h, w, rates)}")
    return failures


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
