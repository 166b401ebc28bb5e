"""The CUDA C++ kernels of csrc/ (issue 4): machine code, and results on a GPU.

- test_sass_*: not GPU tests. They disassemble the built resaspp_ops._C with cuobjdump and check
  that it holds sm_90 code whose tensor-core kernels use tensor-core instructions (HMMA/HGMMA) and
  no local memory. Skipped when _C is not built or no cuobjdump is found.
- the rest carry the `cuda` marker: forward and grads of the tensor-core path (fp16/bf16 with C and
  Co multiples of 8 on sm_80+) and of the SIMT path (RESASPP_CUDA_KERNEL=simt, and every shape the
  tensor cores do not take) against float64, by DESIGN.md section 5's error rule.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import resaspp_ops
from resaspp_ops import multi_rate_conv2d
from utils import AWKWARD, Problem, assert_error_rule, float64_reference, make_problem, pytorch_same_dtype

# ----------------------------------------------------------------------------------------------
# Machine code
# ----------------------------------------------------------------------------------------------

# Mangled-name fragments of the tensor-core kernels (csrc/tc_common.cuh, multi_rate_conv2d_tc_wgrad.cu).
TC_KERNELS = ("multi_tap_tc_kernel", "wgrad_tc_kernel")
TC_ELEMENT_TYPES = ("__half", "__nv_bfloat16")


def _built_extension() -> Path | None:
    spec = importlib.util.find_spec("resaspp_ops._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _find_cuobjdump() -> str | None:
    """cuobjdump on PATH, in the CUDA toolkit, or the copy Triton ships (this toolkit has none)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from resaspp_ops._build_config import BUILD_CONFIG
        homes.append((BUILD_CONFIG or {}).get("cuda_home"))
    except ImportError:
        pass
    homes += sorted(str(p) for p in Path("/usr/local").glob("cuda*"))
    candidates = [Path(h) / "bin" / "cuobjdump" for h in homes if h]
    triton = importlib.util.find_spec("triton")
    if triton is not None and triton.submodule_search_locations:
        for loc in triton.submodule_search_locations:
            candidates.append(Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    return None


def _sass_by_function(so: Path, cuobjdump: str) -> dict[tuple[str, str], str]:
    """{(arch, mangled function name): its SASS text} from `cuobjdump -sass`."""
    res = subprocess.run([cuobjdump, "-sass", str(so)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"cuobjdump -sass failed: {res.stderr[-2000:]}"
    out: dict[tuple[str, str], list[str]] = {}
    arch, func = None, None
    for line in res.stdout.splitlines():
        m = re.match(r"\s*arch = (sm_\w+)", line)
        if m:
            arch, func = m.group(1), None
            continue
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            func = m.group(1)
            out.setdefault((arch, func), [])
            continue
        if func is not None:
            out[(arch, func)].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


@pytest.fixture(scope="module")
def sass():
    so = _built_extension()
    if so is None:
        pytest.skip("resaspp_ops._C is not built")
    cuobjdump = _find_cuobjdump()
    if cuobjdump is None:
        pytest.skip("no cuobjdump found (PATH, CUDA_HOME, /usr/local/cuda*, triton's bundled copy)")
    return _sass_by_function(so, cuobjdump)


def _tc_functions(sass, arch="sm_90"):
    return {f: text for (a, f), text in sass.items() if a == arch and any(k in f for k in TC_KERNELS)}


def test_sass_has_sm90_code(sass):
    archs = {a for a, _ in sass}
    assert "sm_90" in archs, f"resaspp_ops._C holds no sm_90 machine code (archs: {sorted(a for a in archs if a)})"


def test_sass_tensor_core_kernels_use_tensor_cores(sass):
    funcs = _tc_functions(sass)
    for kernel in TC_KERNELS:
        for dtype in TC_ELEMENT_TYPES:
            names = [f for f in funcs if kernel in f and dtype in f]
            assert names, f"no sm_90 {kernel} for {dtype} in resaspp_ops._C"
            for name in names:
                count = len(re.findall(r"\b(HMMA|HGMMA)\b", funcs[name]))
                assert count > 0, f"{name}: no HMMA/HGMMA in its sm_90 SASS"


def test_sass_tensor_core_kernels_use_no_local_memory(sass):
    for name, text in _tc_functions(sass).items():
        assert not re.search(r"\b(LDL|STL)\b", text), f"{name}: local-memory loads/stores (spills) in sm_90 SASS"


# ----------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------

HALF_TYPES = (torch.float16, torch.bfloat16)

# Shapes the tensor cores take in fp16/bf16 (C and Co multiples of 8): tile shapes picked per map
# (13x17 -> 13x9, 9x20 -> 9x10, 33x33 -> 11x11, 3x150 -> 3x42, 19x3 -> 19x3 with spare slots), C not
# a multiple of the 32-channel K-chunk, Co over one 64-channel block, 6 and 17 branches (2 and 5
# forward branch groups of up to 4), rates past the map, a single pixel, one rate, N=0.
TC_SHAPES = [
    Problem(2, 64, 32, 13, 17, (1, 6, 30)),
    Problem(1, 40, 72, 9, 20, (2, 3, 4, 5, 6)),
    Problem(2, 24, 16, 33, 33, (6, 12, 18)),
    Problem(1, 16, 8, 7, 7, (12, 24, 36)),
    Problem(3, 8, 16, 5, 11, (6,)),
    Problem(2, 8, 24, 1, 1, (1, 2, 3)),
    Problem(1, 136, 8, 19, 3, (1, 2)),
    Problem(1, 16, 8, 3, 150, (2, 40)),
    Problem(1, 8, 8, 6, 7, tuple(range(1, 17))),  # 16 rates: 17 branches in 5 groups
    Problem(0, 16, 8, 6, 6, (1, 2)),
    Problem(1, 264, 136, 6, 9, (1, 3)),  # several C and Co blocks at once (wgrad: 3 x 3), both with tails
    Problem(37, 8, 8, 2, 3, (1,)),  # wgrad: many images per 32-pixel step (the pixel cursor wraps images)
]
# Shapes they do not take (C or Co not a multiple of 8): these run the SIMT kernels in every dtype.
FALLBACK_SHAPES = [p for p in AWKWARD if p.c % 8 or p.co % 8]


def _floor(dtype):
    return 1e-3 if dtype in HALF_TYPES else 1e-5


@pytest.fixture
def kernel_env(monkeypatch):
    """Sets RESASPP_CUDA_KERNEL for one test (read by _C at every call)."""
    def set_kernel(value):
        if value is None:
            monkeypatch.delenv("RESASPP_CUDA_KERNEL", raising=False)
        else:
            monkeypatch.setenv("RESASPP_CUDA_KERNEL", value)
    return set_kernel


def _needs_sm80(device):
    if torch.cuda.get_device_capability(device)[0] < 8:
        pytest.skip("the tensor-core kernels need sm_80 or newer")


def _poison_allocator(device, numel, dtype):
    """Leaves a NaN-filled block in the caching allocator, so an output that reuses it and misses
    an element shows NaN instead of stale data."""
    torch.full((max(numel, 1) + 1024,), float("nan"), dtype=dtype, device=device)


def _check_forward(problem, dtype, device, channels_last, epilogue, seed=1):
    x, w1, w3, scale, shift = make_problem(problem, dtype, device, channels_last=channels_last, epilogue=epilogue,
                                           seed=seed)
    _poison_allocator(device, problem.n * problem.h * problem.w * (1 + len(problem.rates)) * problem.co, dtype)
    y = multi_rate_conv2d(x, w1, w3, problem.rates, scale, shift, relu=epilogue, backend="cuda")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert not torch.isnan(y).any(), "unwritten output elements"
    ref = float64_reference(x, w1, w3, problem.rates, scale, shift, epilogue)
    same = pytorch_same_dtype(x, w1, w3, problem.rates, scale, shift, epilogue)
    assert_error_rule(y, ref, same, floor=_floor(dtype), what=f"forward {dtype} {problem}")


def _check_grads(problem, dtype, device, channels_last, epilogue, seed=2):
    x, w1, w3, scale, shift = make_problem(problem, dtype, device, channels_last=channels_last, epilogue=epilogue,
                                           seed=seed, requires_grad=True)
    g = torch.randn((problem.n, (1 + len(problem.rates)) * problem.co, problem.h, problem.w),
                    generator=torch.Generator().manual_seed(seed + 1)).to(device=device, dtype=dtype)
    y = multi_rate_conv2d(x, w1, w3, problem.rates, scale, shift, relu=epilogue, backend="cuda")
    grads = torch.autograd.grad(y, (x, w1, w3), g)

    def cpu64(t):
        return None if t is None else t.detach().to("cpu", torch.float64)

    x64, w164, w364 = (cpu64(t).requires_grad_() for t in (x, w1, w3))
    y64 = resaspp_ops.multi_rate_conv2d_reference(x64, w164, w364, problem.rates, cpu64(scale), cpu64(shift),
                                                  epilogue)
    grads64 = torch.autograd.grad(y64, (x64, w164, w364), cpu64(g))
    xs, w1s, w3s = (t.detach().requires_grad_() for t in (x, w1, w3))
    ys = resaspp_ops.multi_rate_conv2d_reference(xs, w1s, w3s, problem.rates, scale, shift, epilogue)
    grads_same = torch.autograd.grad(ys, (xs, w1s, w3s), g)
    for what, a, r, s in zip(("grad_x", "grad_w1x1", "grad_w3x3"), grads, grads64, grads_same):
        assert not torch.isnan(a).any(), f"{what}: NaN (unwritten elements?)"
        assert_error_rule(a, r, s, floor=_floor(dtype), what=f"{what} {dtype} {problem}")


@pytest.mark.cuda
@pytest.mark.parametrize("problem", TC_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_forward_tc_shapes(gpu_device, kernel_env, problem, dtype, channels_last, epilogue, kernel):
    if kernel == "tc":
        _needs_sm80(gpu_device)
    kernel_env(kernel)  # "tc" makes a silent fallback an error, so these really ran on tensor cores
    _check_forward(problem, dtype, gpu_device, channels_last, epilogue)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", TC_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_grads_tc_shapes(gpu_device, kernel_env, problem, dtype, channels_last, epilogue, kernel):
    if kernel == "tc":
        _needs_sm80(gpu_device)
    kernel_env(kernel)
    _check_grads(problem, dtype, gpu_device, channels_last, epilogue)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", FALLBACK_SHAPES + TC_SHAPES[:2], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_TYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
def test_forward_and_grads_auto_dispatch(gpu_device, kernel_env, problem, dtype, channels_last, epilogue):
    """The default dispatch: SIMT for fp32 and for C/Co not multiples of 8, tensor cores otherwise."""
    kernel_env(None)
    _check_forward(problem, dtype, gpu_device, channels_last, epilogue)
    _check_grads(problem, dtype, gpu_device, channels_last, epilogue)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_misaligned_input(gpu_device, kernel_env, dtype):
    """A channels_last x whose data starts 8 bytes off a 16-byte boundary (copied once, then TC)."""
    _needs_sm80(gpu_device)
    kernel_env("tc")
    p = Problem(2, 16, 8, 9, 10, (1, 3))
    x, w1, w3, _, _ = make_problem(p, dtype, gpu_device, seed=4)
    buf = torch.empty(x.numel() + 4, dtype=dtype, device=gpu_device)[4:]
    x_off = buf.view(p.n, p.h, p.w, p.c).permute(0, 3, 1, 2)
    x_off.copy_(x)
    assert x_off.is_contiguous(memory_format=torch.channels_last) and x_off.data_ptr() % 16 != 0
    y = multi_rate_conv2d(x_off, w1, w3, p.rates, backend="cuda")
    ref = float64_reference(x, w1, w3, p.rates)
    assert_error_rule(y, ref, pytorch_same_dtype(x, w1, w3, p.rates), floor=1e-3, what="misaligned x")
    # Backward with a misaligned x and a misaligned grad: the same kernels on aligned copies, so bitwise equal.
    ct = (1 + len(p.rates)) * p.co
    g = torch.randn((p.n, ct, p.h, p.w), device=gpu_device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    gbuf = torch.empty(g.numel() + 4, dtype=dtype, device=gpu_device)[4:]
    g_off = gbuf.view(p.n, p.h, p.w, ct).permute(0, 3, 1, 2)
    g_off.copy_(g)
    assert g_off.is_contiguous(memory_format=torch.channels_last) and g_off.data_ptr() % 16 != 0
    want = resaspp_ops._C.backward(g, x.contiguous(memory_format=torch.channels_last), w1, w3, list(p.rates), True, True)
    got = resaspp_ops._C.backward(g_off, x_off, w1, w3, list(p.rates), True, True)
    for what, a, b in zip(("grad_x", "grad_w1x1", "grad_w3x3"), got, want):
        assert torch.equal(a, b), f"misaligned backward: {what} differs"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_wgrad_bitwise_reproducible(gpu_device, kernel_env, dtype):
    _needs_sm80(gpu_device)
    kernel_env("tc")
    p = Problem(4, 64, 32, 33, 33, (6, 12, 18))
    x, w1, w3, _, _ = make_problem(p, dtype, gpu_device, channels_last=True, seed=5)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), device=gpu_device, dtype=dtype)
    runs = [resaspp_ops._C.backward(g, x, w1, w3, list(p.rates), True, True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b), "tensor-core backward differs between two identical runs"


@pytest.mark.cuda
def test_tc_env_rejects_unsupported(gpu_device, kernel_env):
    p = Problem(1, 20, 12, 5, 5, (1, 2))
    x, w1, w3, _, _ = make_problem(p, torch.float16, gpu_device)
    kernel_env("tc")
    with pytest.raises(RuntimeError, match="multiples of 8"):
        resaspp_ops._C.forward(x, w1, w3, list(p.rates))
    kernel_env("fastest")
    with pytest.raises(RuntimeError, match="RESASPP_CUDA_KERNEL"):
        resaspp_ops._C.forward(x, w1, w3, list(p.rates))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_tc_matches_simt(gpu_device, kernel_env, dtype):
    """Same inputs through both paths: fp32 accumulation in both, so they agree to output rounding."""
    _needs_sm80(gpu_device)
    p = Problem(2, 96, 80, 21, 35, (3, 9, 27))
    x, w1, w3, scale, shift = make_problem(p, dtype, gpu_device, channels_last=True, epilogue=True, seed=6)
    outs = []
    for kernel in ("tc", "simt"):
        kernel_env(kernel)
        outs.append(resaspp_ops._C.forward(x, w1, w3, list(p.rates), scale, shift, True).float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(outs[0], outs[1], rtol=2 * eps, atol=2 * eps * float(outs[1].abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_rate_past_int32_is_not_wrapped(gpu_device, kernel_env, kernel):
    """A rate past 2^31 behaves like any rate past the map (every off-centre tap is padding); it
    must not wrap around in the int tap table (2^32 + 1 would become rate 1)."""
    if kernel == "tc":
        _needs_sm80(gpu_device)
    kernel_env(kernel)
    p = Problem(2, 16, 8, 7, 9, (2, 2**32 + 1))
    x, w1, w3, scale, shift = make_problem(p, torch.float16, gpu_device, channels_last=True, epilogue=True, seed=7)
    g = torch.randn((p.n, 3 * p.co, p.h, p.w), device=gpu_device, dtype=torch.float16)
    huge, past = [2, 2**32 + 1], [2, 1000]
    y_huge = resaspp_ops._C.forward(x, w1, w3, huge, scale, shift, True)
    y_past = resaspp_ops._C.forward(x, w1, w3, past, scale, shift, True)
    assert torch.equal(y_huge, y_past)
    for a, b in zip(resaspp_ops._C.backward(g, x, w1, w3, huge, True, True),
                    resaspp_ops._C.backward(g, x, w1, w3, past, True, True)):
        assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_relu_propagates_nan(gpu_device, kernel_env, kernel):
    """The fused ReLU keeps NaN like torch.relu (a NaN must not turn into 0)."""
    if kernel == "tc":
        _needs_sm80(gpu_device)
    kernel_env(kernel)
    p = Problem(1, 16, 8, 5, 6, (1, 2))
    x, w1, w3, _, _ = make_problem(p, torch.float16, gpu_device, channels_last=True, seed=8)
    x[0, 3, 2, 4] = float("nan")
    y = resaspp_ops._C.forward(x, w1, w3, list(p.rates), None, None, True)
    ref = float64_reference(x, w1, w3, p.rates, None, None, True)
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(ref).cpu())


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["tc", "simt"])
def test_side_stream_and_other_device(gpu_device, kernel_env, kernel):
    """The kernels run on the current stream of the tensors' device (not the default stream, not the
    current device): same bits on a side stream and, with two GPUs, on the other one."""
    if kernel == "tc":
        _needs_sm80(gpu_device)
    kernel_env(kernel)
    p = Problem(2, 24, 16, 11, 13, (1, 4, 12))
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, gpu_device, channels_last=True, epilogue=True, seed=9)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), device=gpu_device, dtype=torch.bfloat16)
    want_y = resaspp_ops._C.forward(x, w1, w3, list(p.rates), scale, shift, True)
    want_g = resaspp_ops._C.backward(g, x, w1, w3, list(p.rates), True, True)
    side = torch.cuda.Stream(device=gpu_device)
    side.wait_stream(torch.cuda.current_stream(gpu_device))
    with torch.cuda.stream(side):
        got_y = resaspp_ops._C.forward(x, w1, w3, list(p.rates), scale, shift, True)
        got_g = resaspp_ops._C.backward(g, x, w1, w3, list(p.rates), True, True)
    side.synchronize()
    assert torch.equal(got_y, want_y)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)
    if torch.cuda.device_count() < 2:
        return
    other = torch.device("cuda", (gpu_device.index + 1) % torch.cuda.device_count())
    if kernel == "tc" and torch.cuda.get_device_capability(other)[0] < 8:
        return
    moved = [t.to(other) for t in (x, w1, w3, scale, shift, g)]
    with torch.cuda.device(gpu_device):  # the current device is not the tensors' device
        y1 = resaspp_ops._C.forward(*moved[:3], list(p.rates), moved[3], moved[4], True)
        g1 = resaspp_ops._C.backward(moved[5], *moved[:3], list(p.rates), True, True)
    torch.cuda.synchronize(other)
    assert y1.device == other
    eps = torch.finfo(torch.bfloat16).eps  # the other GPU may be another model: agree to output rounding
    for a, b in zip((y1, *g1), (want_y, *want_g)):
        b = b.float()
        torch.testing.assert_close(a.to(gpu_device).float(), b, rtol=2 * eps, atol=2 * eps * float(b.abs().max()))
