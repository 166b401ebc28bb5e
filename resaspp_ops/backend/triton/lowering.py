"""The Triton launches of a call, compiled for a GPU that is not here (default sm_90), and what they came to.

Runs the backend's own host code (config choice, weight packing, grouping of branches, 64-bit switch, split-K)
on fake CUDA tensors (torch's FakeTensorMode: shapes, no memory), and turns each kernel launch into Triton's
own argument binding and specialisation followed by a compile for the target. Per launch it reports the
meta-parameters, the shared memory, registers and spills, whether tl.dot became warpgroup MMA with
pipelined K loops, and the pipeline depth the compiler allocated (the operand buffers' ring). It catches before any GPU time what the interpreter cannot: a constexpr combination that
does not compile, shared memory past the target's per-block limit, spills.

    python -m resaspp_ops.backend.triton.lowering [--quick]   # the benchmark presets x dtypes, fwd + bwd
                                                             # (the separable presets: the separable kernels)

Needs a process whose Triton kernels are not interpreted (TRITON_INTERPRET unset when they load). Uses
Triton's launcher internals (JITFunction's binder and _pack_args, as of Triton 3.6-3.8).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from resaspp_ops.backend import triton as triton_backend

# Hopper: the opt-in maximum of dynamic shared memory a block (227 KiB); H100 SXM and H200 have 132 SMs.
SHARED_LIMIT = {90: 232448, 80: 166912, 89: 101376}
SM_COUNT = {90: 132, 80: 108, 89: 128}


@dataclass
class Launch:
    kernel: str
    meta: dict
    num_warps: int
    num_stages: int
    programs: Optional[int] = None
    shared: Optional[int] = None
    registers: Optional[int] = None
    spills: Optional[int] = None
    wgmma: Optional[bool] = None
    mma: Optional[str] = None          # the wgmma instruction shape(s) in the PTX, e.g. "m64n256k16"
    pipelined: Optional[bool] = None
    buffers: Optional[int] = None      # shared-memory buffers a dot operand gets: the pipeline depth (_operand_buffers)
    a_bytes: Optional[int] = None      # operand bytes the launch loads (second design: from its work list)
    b_bytes: Optional[int] = None
    error: Optional[str] = None
    problems: list = field(default_factory=list)   # it would fail: no compile, shared memory past the limit
    warnings: list = field(default_factory=list)   # it would run slowly: spills, an unpipelined K loop


class _PointerArg:
    """What Triton's specialisation reads of a tensor argument: its dtype and a 16-byte aligned address."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype

    def data_ptr(self) -> int:
        return 0


def _resources(ptx: str, arch: int) -> tuple[Optional[int], Optional[int]]:
    """(registers, spill bytes) from the ptxas Triton ships, or (None, None) where it is missing."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return None, None
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        info = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{'a' if arch == 90 else ''}", f.name,
                               "-o", os.devnull], capture_output=True, text=True).stderr
    finally:
        os.unlink(f.name)
    registers = spills = None
    for line in info.splitlines():
        if "Used" in line and "registers" in line:
            registers = int(line.split("Used")[1].split("registers")[0])
        for part in line.split(","):
            if "spill" in part:
                spills = (spills or 0) + int(part.split()[0])
    return registers, spills


def _operand_buffers(ttgir: str) -> Optional[int]:
    """The pipeline depth the compiler allocated: the leading dimension of the floating-point shared-memory
    buffers (ttg.local_alloc of a memdesc stages x rows x columns), the smallest where they differ; 1 where the
    operands are staged in single buffers (rank 2); None without any. Integer buffers (barriers, pipelined
    scalar loads) and rings of vectors (stages x length, stages <= 4: a per-channel vector the pipeliner
    prefetched, never a dot operand, whose sides are 8 or more) do not count."""
    depths = []
    for line in ttgir.splitlines():
        if "ttg.local_alloc" not in line:
            continue
        for shape in re.findall(r"!ttg\.memdesc<([0-9x]+x[a-zA-Z][a-zA-Z0-9]*)", line):
            *dims, element = shape.split("x")
            if not element.startswith(("f", "bf", "tf")) or (len(dims) == 2 and int(dims[0]) <= 4):
                continue
            depths.append(int(dims[0]) if len(dims) >= 3 else 1)
    return min(depths) if depths else None


@contextlib.contextmanager
def _compile_instead_of_launch(arch: int, launches: list):
    """Every JITFunction launch inside compiles for sm_<arch> and records a Launch instead of running."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime import jit

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)

    def run(self, *args, grid, warmup, **kwargs):
        kwargs.setdefault("debug", False)
        args = [_PointerArg(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: _PointerArg(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        binder = jit.create_function_from_signature(self.signature, self.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, specialization, options)
        meta = {name: bound[name] for name, p in zip(self.arg_names, self.params) if p.is_constexpr}
        dims = grid(bound) if callable(grid) else grid
        record = Launch(self.__name__, meta, options.num_warps, options.num_stages,
                        programs=int(np.prod([d for d in dims])))  # every axis: wgrad's are (blocks, jobs, splits)
        try:
            kernel = triton.compile(ASTSource(self, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
        except Exception as exc:  # noqa: BLE001 - the report says which combination failed and why
            record.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1][:300] if str(exc).strip() else ''}"
        else:
            record.shared = kernel.metadata.shared
            record.registers, record.spills = _resources(kernel.asm["ptx"], arch)
            record.wgmma = "wgmma" in kernel.asm["ptx"]
            shapes = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", kernel.asm["ptx"])))
            record.mma = "+".join(shapes) or None
            record.pipelined = "async_copy_global_to_local" in kernel.asm["ttgir"] or "ttng.tma" in kernel.asm["ttgir"]
            record.buffers = _operand_buffers(kernel.asm["ttgir"])
        launches.append(record)
        return None

    saved = jit.JITFunction.run
    jit.JITFunction.run = run
    try:
        yield
    finally:
        jit.JITFunction.run = saved


@contextlib.contextmanager
def _host_without_gpu(arch: int, autotune: bool):
    """The backend's host code on fake CUDA tensors: no device context, the target's SM count; without
    autotune the heuristic configs, with it every config the autotuner would time (each compiled once, the
    first one "wins": nothing can be timed here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from triton.runtime.autotuner import Autotuner

    if triton_backend.kernels_mode() == "interpreted" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("the Triton kernels are (or would be) interpreted in this process: unset TRITON_INTERPRET")
    from resaspp_ops.backend.triton import design_v2, host

    k = triton_backend._kernels()
    saved = (host.device_guard, k.configs.sm_count, k.configs.autotune_enabled)
    saved_tuner = (Autotuner.do_bench, Autotuner.check_disk_cache)
    host.device_guard = lambda t: contextlib.nullcontext()
    k.configs.sm_count = lambda index: SM_COUNT.get(arch, 132)
    if autotune is not None:  # None: what a GPU run would do, by RESASPP_TRITON_AUTOTUNE
        k.configs.autotune_enabled = lambda device: autotune

    def compile_once(kernel_call, quantiles=None):
        kernel_call()
        return [1.0, 1.0, 1.0]

    def no_disk_cache(self, tuning_key, configs, bench_fn):
        bench_fn()
        return False

    Autotuner.do_bench = property(lambda self: compile_once)
    Autotuner.check_disk_cache = no_disk_cache
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            yield
    finally:
        host.device_guard, k.configs.sm_count, k.configs.autotune_enabled = saved
        Autotuner.do_bench, Autotuner.check_disk_cache = saved_tuner
        host.rates_tensor.cache_clear()  # they cached fake tensors
        design_v2._ON_DEVICE.clear()


def lower(n: int, c: int, co: int, h: int, w: int, rates: tuple, dtype: torch.dtype, backward: bool = True,
          epilogue: bool = True, arch: int = 90, autotune: Optional[bool] = False) -> list[Launch]:
    """The launches of one forward (and backward: dgrad + wgrad) on x [n, c, h, w] channels_last, compiled for
    sm_<arch>: Launch.problems says what would fail (no compile, shared memory past the target's limit),
    Launch.warnings what would be slow (spills; a tensor-core kernel whose K loop is not pipelined).

    autotune: every config the autotuner would try instead of the heuristic one (None: as a GPU run would
    choose, by RESASPP_TRITON_AUTOTUNE); there a config past the shared-memory limit is only a warning (the
    autotuner skips what does not fit), a compile error still a problem (it would end the tuning, and the call)."""
    launches: list[Launch] = []
    b = len(rates)
    with _host_without_gpu(arch, autotune), _compile_instead_of_launch(arch, launches):
        dev = torch.device("cuda", 0)
        x = torch.empty((n, c, h, w), dtype=dtype, device=dev).contiguous(memory_format=torch.channels_last)
        w1 = torch.empty((co, c, 1, 1), dtype=dtype, device=dev)
        w3 = torch.empty((b, co, c, 3, 3), dtype=dtype, device=dev)
        scale = torch.empty((1 + b) * co, device=dev) if epilogue else None
        shift = torch.empty((1 + b) * co, device=dev) if epilogue else None
        out = triton_backend.forward(x, w1, w3, list(rates), scale, shift, epilogue)
        if backward:
            triton_backend.backward(torch.empty_like(out), x, w1, w3, list(rates), True, True)
    from resaspp_ops.backend.triton import design_v2

    for launch in launches:
        kind = {"_forward_v2_kernel": "forward_v2", "_dgrad_v2_kernel": "dgrad_v2"}.get(launch.kernel)
        if kind is not None:
            launch.a_bytes, launch.b_bytes = design_v2.operand_bytes(kind, n, c, co, h, w, tuple(rates), dtype,
                                                                     torch.device("cuda", 0))
    return _judged(launches, arch, autotune)


def lower_separable(n: int, c: int, co: int, h: int, w: int, rates: tuple, dtype: torch.dtype,
                    backward: bool = True, mid: bool = True, arch: int = 90) -> list[Launch]:
    """lower() for the separable op's kernels (backend/triton/separable*.py): one forward and one backward of
    multi_rate_separable_conv2d with the mid stage (scale, shift, ReLU) when `mid`, and the epilogue."""
    from resaspp_ops.backend.triton import separable

    launches: list[Launch] = []
    b = len(rates)
    with _host_without_gpu(arch, False), _compile_instead_of_launch(arch, launches):
        dev = torch.device("cuda", 0)
        x = torch.empty((n, c, h, w), dtype=dtype, device=dev).contiguous(memory_format=torch.channels_last)
        w1 = torch.empty((co, c, 1, 1), dtype=dtype, device=dev)
        w_dw = torch.empty((b, c, 1, 3, 3), dtype=dtype, device=dev)
        w_pw = torch.empty((b, co, c, 1, 1), dtype=dtype, device=dev)
        mid_scale = torch.empty(b * c, device=dev) if mid else None
        mid_shift = torch.empty(b * c, device=dev) if mid else None
        scale, shift = torch.empty((1 + b) * co, device=dev), torch.empty((1 + b) * co, device=dev)
        out = separable.forward(x, w1, w_dw, w_pw, list(rates), mid_scale, mid_shift, mid, scale, shift, True)
        if backward:
            separable.backward(torch.empty_like(out), x, w1, w_dw, w_pw, list(rates), mid_scale, mid_shift, mid,
                               True, True, True)
    return _judged(launches, arch, False)


def _judged(launches: list[Launch], arch: int, autotune) -> list[Launch]:
    """The launches with their problems (no compile, shared memory past the limit) and warnings (spills, an
    unpipelined K loop, fewer operand buffers than the loop's stages) filled in."""
    limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[90])
    for launch in launches:
        if launch.error:
            launch.problems.append("does not compile")
            continue
        if launch.shared is not None and launch.shared > limit:
            over = f"{launch.shared} B of shared memory, over sm_{arch}'s {limit}"
            (launch.warnings if autotune else launch.problems).append(over + (" (skipped by the autotuner)"
                                                                              if autotune else ""))
        if launch.spills:
            launch.warnings.append(f"{launch.spills} B spilled")
        if launch.wgmma and not launch.pipelined:
            launch.warnings.append("K loop not pipelined")
        stages = launch.meta.get("STAGES", launch.num_stages)
        if launch.pipelined and launch.buffers is not None and launch.buffers < stages:
            launch.warnings.append(f"operands buffered {launch.buffers} deep for {stages} stages")
    return launches


# Shapes the GPU tests use that the presets do not: channels off every block size, one to five rates (five take
# a second launch without the 1x1 branch), a single pixel, and an input past 2^31 elements (64-bit offsets).
AWKWARD = [
    ("awkward-9x13", 2, 20, 12, 9, 13, (1, 2, 3)),
    ("awkward-one-rate", 3, 8, 16, 5, 11, (6,)),
    ("awkward-four-rates", 2, 33, 7, 12, 4, (1, 2, 3, 5)),
    ("awkward-five-rates", 1, 6, 9, 5, 6, (1, 2, 3, 4, 5)),
    ("awkward-one-pixel", 1, 3, 19, 1, 1, (1, 2, 3)),
    ("tests-voc-mini", 2, 256, 64, 33, 33, (6, 12, 18)),
    ("past-2^31", 1, 2048, 16, 1040, 1040, (6, 12, 18)),
]


def _sweep_cases(quick: bool) -> list[tuple]:
    """(family, name, n, c, co, h, w, rates) of every case to lower."""
    from resaspp_ops.bench.presets import PRESETS

    names = ("voc-os16", "unet-stare", "v3plus-os16") if quick else tuple(PRESETS)
    cases = []
    for name in names:
        p = PRESETS[name]
        for rates in dict.fromkeys(tuple(r) for r in p.rate_sets.values()):
            cases.append((p.family, name, p.n, p.c, p.co, p.h, p.w, rates))
    if quick:
        return cases
    return cases + [("aspp", *case) for case in AWKWARD] + [("separable", *case) for case in AWKWARD[:-1]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m resaspp_ops.backend.triton.lowering", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="voc-os16, unet-stare and v3plus-os16 only (else every preset, "
                        "both rate sets, and the GPU tests' awkward shapes)")
    parser.add_argument("--dtypes", default="bfloat16,float16,float32")
    parser.add_argument("--autotune", action="store_true",
                        help="every config the autotuner would try (RESASPP_TRITON_AUTOTUNE=1, the default on a "
                             "GPU) instead of the heuristic one")
    args = parser.parse_args(argv)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    cases = _sweep_cases(args.quick)
    bad = slow = 0
    print(f"{'case':34s} {'dtype':9s} {'kernel':18s} {'meta':64s} warps stages  smem KiB regs spill "
          f"{'wgmma':11s} pipe  bufs programs   A MiB   B MiB")
    for family, name, n, c, co, h, w, rates in cases:
        for dtype in dtypes:
            if family == "separable":
                launches = lower_separable(n, c, co, h, w, rates, dtype, arch=args.arch)
            else:
                launches = lower(n, c, co, h, w, rates, dtype, arch=args.arch, autotune=args.autotune)
            for launch in launches:
                meta = ",".join(f"{k}={v}" for k, v in launch.meta.items()
                                if k in ("BLOCK_M", "TILE_H", "TILE_W", "STACK", "BLOCK_N", "BLOCK_K", "BLOCK_C",
                                         "BLOCK_P", "NR", "HAS_1X1", "IDX64", "FLAT", "STAGES", "WORKLIST",
                                         "RECOMPUTE"))
                label = f"{name} r{','.join(map(str, rates))}"
                kernel = launch.kernel.strip("_").removesuffix("_kernel")
                mib = lambda v: "-" if v is None else f"{v / 2 ** 20:.1f}"  # noqa: E731
                if launch.error:
                    print(f"{label:34s} {str(dtype)[6:]:9s} {kernel:18s} ERROR {launch.error}")
                else:
                    print(f"{label:34s} {str(dtype)[6:]:9s} {kernel:18s} {meta:64s} {launch.num_warps:5d} "
                          f"{launch.num_stages:6d} {launch.shared / 1024:9.1f} {launch.registers!s:>4s} "
                          f"{launch.spills!s:>5s} {launch.mma or launch.wgmma!s:11s} {launch.pipelined!s:5s}"
                          f"{'-' if launch.buffers is None else launch.buffers:>5}{launch.programs:9d} {mib(launch.a_bytes):>7s} {mib(launch.b_bytes):>7s}"
                          + (f"  <- {'; '.join(launch.problems + launch.warnings)}"
                             if launch.problems or launch.warnings else ""))
                bad += bool(launch.problems)
                slow += bool(launch.warnings)
            sys.stdout.flush()
    print(f"{bad} launch(es) that would fail (no compile, shared memory past the limit); {slow} with warnings")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
