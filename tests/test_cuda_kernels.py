"""The CUDA C++ kernels of csrc/ (issue 13): machine code, host-side layouts, and results on a GPU.

- test_sass_* and test_res_usage_*: not GPU tests. They disassemble the built resaspp_ops._C with cuobjdump:
  the sm_90a kernels run HGMMA (wgmma m64n256k16) fed by UTMALDG (TMA), the mma kernels HMMA from LDSM
  (ldmatrix), none of them touches local memory, and registers stay within the launch bounds. Skipped when
  _C is not built or no cuobjdump is found.
- test_sm90_*_map: not GPU tests either. CuTe's accumulator and shared-memory layouts, evaluated on the
  host, against what the epilogues and the TMA boxes assume.
- the rest carry the `cuda` marker: every kernel family (RESASPP_CUDA_KERNEL=sm90, mma, simt) forward and
  grads against float64 by DESIGN.md section 5's error rule, and the dispatch rules.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

import resaspp_ops
from resaspp_ops import multi_rate_conv2d
from resaspp_ops.backend import cuda as cuda_backend
from resaspp_ops.backend import sm90_plan
import nonfinite
from utils import AWKWARD, Problem, assert_error_rule, float64_reference, make_problem, pytorch_same_dtype

# ----------------------------------------------------------------------------------------------
# Machine code
# ----------------------------------------------------------------------------------------------

# Mangled-name fragments: the sm_90a kernels are persistent_kernel<Op<T>> (csrc/sm90_kernel.cuh).
SM90_OPS = {"ForwardOp": "", "DgradOp": ".tnspB", "WgradOp": ".tnspA.tnspB"}  # the operands read MN-major
SM90_TYPES = ("10bfloat16_t", "6half_t")
SM90_MAX_REGS = 168  # 65536 registers / 384 threads, in steps of 8: what __launch_bounds__(384, 1) allows
MMA_KERNELS = ("multi_tap_mma_kernel", "wgrad_mma_kernel")
MMA_TYPES = {"I6__half": "HMMA.16816.F32", "I13__nv_bfloat16": "HMMA.16816.F32.BF16", "If": "HMMA.1688.F32.TF32"}
MMA_MAX_REGS = 255  # __launch_bounds__(128)


def _built_extension() -> Path | None:
    spec = importlib.util.find_spec("resaspp_ops._C")
    return Path(spec.origin) if spec is not None and spec.origin else None


def _build_config() -> dict:
    try:
        from resaspp_ops._build_config import BUILD_CONFIG
    except ImportError:
        return {}
    return BUILD_CONFIG or {}


def _find_cuobjdump() -> str | None:
    """cuobjdump on PATH, in the CUDA toolkit setup.py used, or the copy Triton ships (this toolkit has none)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    homes = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), _build_config().get("cuda_home")]
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


def _cuobjdump(flag: str) -> str:
    so = _built_extension()
    if so is None:
        pytest.skip("resaspp_ops._C is not built")
    tool = _find_cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump found (PATH, the build's CUDA_HOME, /usr/local/cuda*, triton's bundled copy)")
    res = subprocess.run([tool, flag, str(so)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"cuobjdump {flag} failed: {res.stderr[-2000:]}"
    return res.stdout


@pytest.fixture(scope="module")
def sass() -> dict[tuple[str, str], str]:
    """{(arch, mangled function name): its SASS text} from `cuobjdump -sass`."""
    out: dict[tuple[str, str], list[str]] = {}
    arch, func = None, None
    for line in _cuobjdump("-sass").splitlines():
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
def res_usage() -> dict[str, dict[str, int]]:
    """{mangled function name: {"REG": n, "STACK": n, "LOCAL": n, ...}} from `cuobjdump -res-usage`."""
    out, func = {}, None
    for line in _cuobjdump("-res-usage").splitlines():
        m = re.match(r"\s*Function (\S+):", line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            out[func] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", line)}
            func = None
    return out


def _needs_sm90_build():
    if not (_build_config().get("sm90") or {}).get("built"):
        pytest.skip(f"_C was built without the sm_90a kernels: {(_build_config().get('sm90') or {}).get('reason')}")


def _sm90_functions(sass, op, dtype):
    return {f: t for (a, f), t in sass.items() if a == "sm_90a" and "persistent_kernel" in f and op in f and dtype in f}


def _mma_functions(sass, kernel, dtype):
    return {f: t for (a, f), t in sass.items() if a == "sm_90a" and f"{kernel}{dtype}" in f}


def test_sass_holds_sm90a_code(sass):
    archs = {a for a, _ in sass}
    assert "sm_90a" in archs, f"resaspp_ops._C holds no sm_90a machine code (archs: {sorted(a for a in archs if a)})"


@pytest.mark.parametrize("dtype", SM90_TYPES)
@pytest.mark.parametrize("op", list(SM90_OPS))
def test_sass_sm90_kernels_run_hgmma_fed_by_tma(sass, op, dtype):
    _needs_sm90_build()
    funcs = _sm90_functions(sass, op, dtype)
    assert len(funcs) == 1, f"expected one sm_90a persistent_kernel<{op}<{dtype}>>, found {list(funcs)}"
    text = next(iter(funcs.values()))
    gmma = re.findall(r"\bHGMMA\.(\S+) .*gdesc\[\w+\](\S*),", text)
    assert gmma, f"{op} {dtype}: no HGMMA"
    want = "64x256x16.F32" + (".BF16" if "bfloat16" in dtype else "")
    assert {shape for shape, _ in gmma} == {want}, f"{op}: HGMMA shapes {set(gmma)}"
    assert {flags for _, flags in gmma} == {SM90_OPS[op]}, f"{op}: operand majors {set(f for _, f in gmma)}"
    assert re.search(r"\bUTMALDG\b", text), f"{op} {dtype}: no TMA loads (UTMALDG)"
    assert re.search(r"\bSYNCS\.", text), f"{op} {dtype}: no mbarrier operations"
    assert not re.search(r"\bHMMA\b", text), f"{op} {dtype}: mma.sync in a warpgroup-MMA kernel"
    assert re.search(r"USETMAXREG\.TRY_ALLOC", text) and re.search(r"USETMAXREG\.DEALLOC", text), \
        f"{op} {dtype}: no setmaxnreg between producer and consumers"


@pytest.mark.parametrize("dtype", SM90_TYPES)
@pytest.mark.parametrize("op", list(SM90_OPS))
def test_res_usage_sm90_kernels_no_local_memory_registers_within_bounds(sass, res_usage, op, dtype):
    _needs_sm90_build()
    (name, text), = _sm90_functions(sass, op, dtype).items()
    assert not re.search(r"\b(LDL|STL)\b", text), f"{op} {dtype}: local-memory loads/stores in its SASS"
    usage = res_usage[name]
    assert usage["STACK"] == 0 and usage["LOCAL"] == 0, f"{op} {dtype}: stack {usage['STACK']} B, local {usage['LOCAL']} B"
    assert usage["REG"] <= SM90_MAX_REGS, f"{op} {dtype}: {usage['REG']} registers > {SM90_MAX_REGS}"


@pytest.mark.parametrize("dtype", list(MMA_TYPES))
@pytest.mark.parametrize("kernel", MMA_KERNELS)
def test_sass_mma_kernels_use_ldmatrix_and_mma_sync(sass, res_usage, kernel, dtype):
    funcs = _mma_functions(sass, kernel, dtype)
    want = 2 if kernel == "multi_tap_mma_kernel" else 1  # forward and dgrad instantiations
    assert len(funcs) == want, f"expected {want} sm_90a {kernel}{dtype}, found {list(funcs)}"
    for name, text in funcs.items():
        mmas = set(re.findall(r"\b(HMMA\.\S+)", text))
        assert mmas == {MMA_TYPES[dtype]}, f"{name}: {mmas}"
        assert re.search(r"\bLDSM\b", text) or dtype == "If", f"{name}: no ldmatrix"
        assert not re.search(r"\bMOVM\b", text), f"{name}: register transposes (MOVM): fragments not from ldmatrix"
        assert not re.search(r"\b(LDL|STL)\b", text), f"{name}: local-memory loads/stores"
        usage = res_usage[name]
        assert usage["STACK"] == 0 and usage["REG"] <= MMA_MAX_REGS, f"{name}: {usage}"


# Every kernel with a ReLU (an epilogue's, or the separable mid stage's), by a fragment of its mangled name.
RELU_KERNELS = ("multi_tap_mma_kernel", "multi_tap_conv_kernel", "ForwardOp", "separable_forward_mma_kernel",
                "separable_forward_simt_kernel", "activation_kernel")


def test_sass_relu_keeps_nan(sass):
    """The ReLUs are `v < 0 ? 0 : v` (NaN in, NaN out, as torch.relu): a compare and a select. fmaxf(v, 0) and
    fmax would compile to a min/max instruction without .NAN, which returns 0 for NaN (issue 22 item 7)."""
    funcs = {f: t for (a, f), t in sass.items() if a == "sm_90a" and any(k in f for k in RELU_KERNELS)}
    # multi_tap_mma 3 dtypes x 2, multi_tap_conv 4 x 2, separable mma 3, simt 4, activation 4 (+ sm90 forward 2)
    assert len(funcs) >= 25, f"found only {len(funcs)} kernels with a ReLU: {list(funcs)}"
    for name, text in funcs.items():
        minmax = re.findall(r"\b([FD]MNMX|HMNMX2)((?:\.[A-Z0-9_]+)*)\s", text)
        dropping = [op + mods for op, mods in minmax if ".NAN" not in mods]
        assert not dropping, f"{name}: {dropping[:4]}: a max that turns NaN into a number"


def _nvcc() -> str | None:
    home = _build_config().get("cuda_home")
    found = Path(home) / "bin" / "nvcc" if home else None
    return str(found) if found is not None and found.is_file() else shutil.which("nvcc")


def test_sm90_kernel_traps_without_the_sm90a_features(tmp_path):
    """Compiled for compute_90 (a "9.0+PTX" build's PTX, or a plain sm_90 one), the persistent kernel has no
    wgmma to run: its body must trap, not return leaving the outputs unwritten (issue 22 item 9). Compiles
    csrc/sm90_kernel.cuh with a stand-in Op to PTX and reads the kernel's body."""
    cutlass = (_build_config().get("sm90") or {}).get("cutlass_dir")
    nvcc = _nvcc()
    if not cutlass or not (Path(cutlass) / "cute").is_dir() or nvcc is None:
        # (an installed wheel records the build machine's CUTLASS directory, which need not exist here)
        pytest.skip("needs nvcc and the CUTLASS headers the sm90 build used")
    csrc = Path(__file__).resolve().parents[1] / "csrc"
    probe = tmp_path / "probe.cu"
    probe.write_text('#include "sm90_kernel.cuh"\n'
                     "struct ProbeOp { struct Params { int unused; }; };\n"
                     "template __global__ void resaspp::sm90::persistent_kernel<ProbeOp>(\n"
                     "    const __grid_constant__ ProbeOp::Params);\n")
    ptx = tmp_path / "probe.ptx"
    res = subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", "-arch=compute_90", "--ptx", f"-I{csrc}",
                          f"-I{cutlass}", str(probe), "-o", str(ptx)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"nvcc failed: {res.stderr[-2000:]}"
    m = re.search(r"\.entry\s+\S*persistent_kernel\S*\((.*?)\n\}", ptx.read_text(), re.S)
    assert m, "no persistent_kernel entry in the PTX"
    assert re.search(r"\btrap;", m.group(1)), f"the compute_90 body does not trap:\n{m.group(0)[-600:]}"


# ----------------------------------------------------------------------------------------------
# CuTe's layouts, evaluated on the host
# ----------------------------------------------------------------------------------------------

def _sm90_extension():
    if _built_extension() is None:
        pytest.skip("resaspp_ops._C is not built")
    _C = cuda_backend.extension()
    if not getattr(_C, "sm90_built", False):
        pytest.skip("resaspp_ops._C was built without the sm_90a kernels")
    return _C


@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad"])
def test_sm90_accumulator_map(kind):
    """What the epilogues assume of the m64n256 accumulators of the two consumer warpgroups: every (m, n)
    of the 128 x 256 tile held once, a thread's values in two rows m and m + 8 of its warpgroup's 64, and
    values 2i, 2i + 1 in adjacent columns of one row (one 32-bit store of a pair)."""
    coords = _sm90_extension().sm90_accumulator_coords(kind).numpy()
    assert coords.shape == (256, 128, 2)
    m, n = coords[..., 0], coords[..., 1]
    flat = m.astype(np.int64) * 256 + n
    assert np.array_equal(np.sort(flat.ravel()), np.arange(128 * 256))
    for t in range(256):
        rows = set(m[t].tolist())
        m0 = m[t, 0]
        assert rows == {m0, m0 + 8} and 64 * (t // 128) <= m0 < 64 * (t // 128) + 64
    assert (m[:, 1::2] == m[:, ::2]).all() and (n[:, 1::2] == n[:, ::2] + 1).all() and (n[:, ::2] % 2 == 0).all()


def _tma_swizzle_128(row, col):
    """Element offset of (row, col) in a box of 128-byte rows written by TMA with CU_TENSOR_MAP_SWIZZLE_128B
    (16-bit elements, box base 1024-byte aligned): the 16-byte chunk index XOR the row index mod 8."""
    return row * 64 + ((col // 8) ^ (row % 8)) * 8 + col % 8


@pytest.mark.parametrize("kind", ["forward", "dgrad", "wgrad"])
def test_sm90_smem_map_matches_the_tma_boxes(kind):
    """The layouts the wgmma descriptors are built from put every operand element where the producer's TMA
    boxes write it: K-major operands (forward A and B, dgrad A) one 128-byte row per M/N index, the box's
    rows in order; MN-major ones (dgrad B, wgrad A and B) one row per K index, 64-wide blocks of M/N one
    8 KiB box apart; stages 16 KiB (A) and 32 KiB (B) apart."""
    _C = _sm90_extension()
    mn_major = {"forward": (False, False), "dgrad": (False, True), "wgrad": (True, True)}[kind]
    for operand, (slot, mn) in enumerate(zip((8192, 16384), mn_major)):
        got = _C.sm90_smem_offsets(kind, bool(operand)).numpy()
        stages, rows, k = got.shape
        assert (stages, k) == (sm90_plan.STAGES, sm90_plan.BLOCK_K) and rows == slot // 64
        s, r, c = np.meshgrid(np.arange(stages), np.arange(rows), np.arange(k), indexing="ij")
        if mn:  # (M or N index r, K index c): box r // 64, row c, column r % 64
            want = s * slot + (r // 64) * 4096 + _tma_swizzle_128(c, r % 64)
        else:   # (M or N index r, K index c): row r, column c
            want = s * slot + _tma_swizzle_128(r, c)
        assert np.array_equal(got, want), f"{kind} {'AB'[operand]}: layout differs from the TMA boxes"


def _ldmatrix_x4(rows, trans):
    """What ldmatrix.x4.b16 hands each lane, from the 32 row addresses the lanes provide (matrix q's row r
    from lane 8q + r): [lane][register] = byte addresses of the register's low and high 16-bit halves."""
    out = []
    for lane in range(32):
        regs = []
        for q in range(4):
            m = rows[8 * q:8 * q + 8]
            if trans:  # the 8 x 8 matrix transposed: elements (2 (lane % 4) [+1], lane / 4)
                regs.append((m[2 * (lane % 4)] + 2 * (lane // 4), m[2 * (lane % 4) + 1] + 2 * (lane // 4)))
            else:      # row lane / 4, elements 2 (lane % 4), + 1
                regs.append((m[lane // 4] + 4 * (lane % 4), m[lane // 4] + 4 * (lane % 4) + 2))
        out.append(regs)
    return out


def _fragment_element(operand, tf32, lane, q, half):
    """The PTX ISA's fragment layouts: (row, column) of the operand (A: (m, k), B: (k, n)) that register q of
    `lane` holds (its 16-bit half `half`); for B, q counts b0, b1 of one n8 tile, then of the next."""
    g, t = lane // 4, lane % 4
    if operand == "a":
        return (g + 8 * (q % 2), (t + 4 * (q // 2)) if tf32 else (2 * t + 8 * (q // 2) + half))
    k = (t + 4 * (q % 2)) if tf32 else (2 * t + 8 * (q % 2) + half)
    return (k, g + 8 * (q // 2))


@pytest.mark.parametrize("operand", ["a", "b"])
@pytest.mark.parametrize("mn_major", [False, True], ids=["k-major", "mn-major"])
@pytest.mark.parametrize("tf32", [False, True], ids=["16-bit", "tf32"])
def test_mma_fragment_addresses_match_the_ptx_layouts(operand, mn_major, tf32):
    """The addresses the mma kernels load their mma.sync fragments from (csrc/mma_fragments.h, the code
    they run), through ldmatrix's documented behaviour or as 32-bit loads, give every lane exactly the
    elements the PTX ISA's m16n8k16 / m16n8k8 fragment layouts assign it."""
    if _built_extension() is None:
        pytest.skip("resaspp_ops._C is not built")
    _C = cuda_backend.extension()
    elem = 4 if tf32 else 2
    ld = (128 * elem + 16) if mn_major else 80
    tile, k = (1, 8 if tf32 else 16) if operand == "a" else (2, 8 if tf32 else 16)
    offsets = _C.mma_fragment_offsets(operand, mn_major, tf32, tile, k, ld, elem).tolist()
    if mn_major and tf32:
        regs = [[(offsets[lane][q], offsets[lane][q] + 2) for q in range(4)] for lane in range(32)]
    else:
        regs = _ldmatrix_x4([offsets[lane][0] for lane in range(32)], trans=mn_major)
    origin = (16 if operand == "a" else 8) * tile  # the tile's first row of M (A) or column of N (B)
    for lane in range(32):
        for q in range(4):
            for half, addr in enumerate(regs[lane][q][: 1 if tf32 else 2]):
                major, minor = addr // ld, (addr % ld) // elem
                assert (addr % ld) % elem == 0
                if operand == "a":
                    m, kk = (minor, major) if mn_major else (major, minor)
                    got = (m - origin, kk - k)
                else:
                    n, kk = (minor, major) if mn_major else (major, minor)
                    got = (kk - k, n - origin)
                want = _fragment_element(operand, tf32, lane, q, half)
                assert got == want, f"lane {lane} register {q} half {half}: {got} != {want}"
            if tf32 and not mn_major:
                assert regs[lane][q][1] == regs[lane][q][0] + 2  # one fp32 element per register


# ----------------------------------------------------------------------------------------------
# Problems without pixels: no plan, no launch (no GPU needed)
# ----------------------------------------------------------------------------------------------

class _NoLaunch:
    """Stands in for resaspp_ops._C: any use is a launch the problem did not need."""

    def __getattr__(self, name):
        raise AssertionError(f"resaspp_ops._C.{name} called for a problem without pixels")


@pytest.mark.parametrize("problem", [Problem(0, 16, 8, 5, 6, (1, 2)), Problem(2, 16, 8, 0, 6, (1, 2)),
                                     Problem(2, 16, 8, 5, 0, (1, 2))], ids=str)
@pytest.mark.parametrize("kernel", ["sm90", "mma", "simt"])
def test_no_pixel_problems_return_before_planning(monkeypatch, problem, kernel):
    """N, H or W = 0: the backend returns the empty output, an empty grad_x and zero weight grads itself; the
    plans (one tile at least) are never built (H = 0 raised ValueError there; issue 22 item 9)."""
    monkeypatch.setattr(cuda_backend, "kernel_choice", lambda *args: (kernel, "chosen by the test"))
    monkeypatch.setattr(cuda_backend, "_sm_count", lambda index: 132)
    monkeypatch.setattr(cuda_backend, "extension", lambda: _NoLaunch())
    p = problem
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, channels_last=True, epilogue=True, seed=11)
    y = cuda_backend.forward(x, w1, w3, p.rates, scale, shift, True)
    assert y.shape == (p.n, (1 + len(p.rates)) * p.co, p.h, p.w) and y.dtype == x.dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.zeros(y.shape, dtype=y.dtype)
    gx, gw1, gw3 = cuda_backend.backward(g, x, w1, w3, p.rates, True, True)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    for got, w in ((gw1, w1), (gw3, w3)):
        assert got.shape == w.shape and got.dtype == w.dtype and got.is_contiguous() and not got.any()
    assert cuda_backend.backward(g, x, w1, w3, p.rates, False, False) == (None, None, None)


# ----------------------------------------------------------------------------------------------
# On a GPU
# ----------------------------------------------------------------------------------------------

HALF_TYPES = (torch.float16, torch.bfloat16)
KERNELS = ("sm90", "mma", "simt")

# Shapes the tensor cores take (C and Co multiples of 8): tiles picked per map (13x17 -> 13x9, 9x20 ->
# 9x10, 33x33 -> 11x11, 3x150 -> 3x42, 19x3 -> 19x3 with spare rows), small maps stacked (5x11 x2, 1x1),
# C not a multiple of a K chunk, Co over one block, 6 and 17 branches, rates past the map, a single
# pixel, one rate, N=0, several C and Co blocks with tails, many images per wgrad pixel step.
TC_SHAPES = [
    Problem(2, 64, 32, 13, 17, (1, 6, 30)),
    Problem(1, 40, 72, 9, 20, (2, 3, 4, 5, 6)),
    Problem(2, 24, 16, 33, 33, (6, 12, 18)),
    Problem(1, 16, 8, 7, 7, (12, 24, 36)),
    Problem(3, 8, 16, 5, 11, (6,)),
    Problem(2, 8, 24, 1, 1, (1, 2, 3)),
    Problem(1, 136, 8, 19, 3, (1, 2)),
    Problem(1, 16, 8, 3, 150, (2, 40)),
    Problem(1, 8, 8, 6, 7, tuple(range(1, 17))),
    Problem(0, 16, 8, 6, 6, (1, 2)),
    Problem(1, 264, 136, 6, 9, (1, 3)),
    Problem(37, 8, 8, 2, 3, (1,)),
]
# Shapes they do not take (C or Co not a multiple of 8): these run the SIMT kernels in every dtype.
FALLBACK_SHAPES = [p for p in AWKWARD if p.c % 8 or p.co % 8]


def _floor(dtype):
    return 1e-3 if dtype in HALF_TYPES else 1e-5


@pytest.fixture
def kernel_env(monkeypatch):
    """Sets RESASPP_CUDA_KERNEL for one test (read at every call)."""
    def set_kernel(value):
        if value is None:
            monkeypatch.delenv("RESASPP_CUDA_KERNEL", raising=False)
        else:
            monkeypatch.setenv("RESASPP_CUDA_KERNEL", value)
    return set_kernel


def _needs(kernel, device):
    cap = torch.cuda.get_device_capability(device)
    if kernel == "sm90":
        if not cuda_backend.sm90_built():
            pytest.skip("resaspp_ops._C was built without the sm_90a kernels")
        if cap != (9, 0):
            pytest.skip(f"the sm90 kernels need an sm_90 GPU, this is sm_{cap[0]}{cap[1]}")
    elif kernel == "mma" and cap < (8, 0):
        pytest.skip("the mma kernels need sm_80 or newer")


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
@pytest.mark.parametrize("kernel", KERNELS)
def test_forward_tc_shapes(gpu_device, kernel_env, problem, dtype, channels_last, epilogue, kernel):
    _needs(kernel, gpu_device)
    kernel_env(kernel)  # a named family that cannot run the call raises: these really ran on it
    _check_forward(problem, dtype, gpu_device, channels_last, epilogue)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", TC_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_grads_tc_shapes(gpu_device, kernel_env, problem, dtype, channels_last, epilogue, kernel):
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    _check_grads(problem, dtype, gpu_device, channels_last, epilogue)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", FALLBACK_SHAPES + TC_SHAPES[:2], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_TYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("epilogue", [False, True], ids=["plain", "epilogue"])
def test_forward_and_grads_auto_dispatch(gpu_device, kernel_env, problem, dtype, channels_last, epilogue):
    """The default dispatch: mma for fp16/bf16 (and fp32 as TF32, PyTorch's default for convolutions)
    with C and Co multiples of 8 on sm_80+, SIMT otherwise."""
    kernel_env(None)
    _check_forward(problem, dtype, gpu_device, channels_last, epilogue)
    _check_grads(problem, dtype, gpu_device, channels_last, epilogue)


@pytest.mark.cuda
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
def test_fp32_follows_the_tf32_switch(gpu_device, kernel_env, monkeypatch, tf32):
    """fp32 runs the TF32 tensor-core kernels when cuDNN may use TF32 and the exact SIMT ones when not,
    each within the error rule against PyTorch under the same switch."""
    _needs("mma", gpu_device)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    kernel_env(None)
    p = Problem(2, 64, 40, 17, 19, (2, 5, 11))
    assert cuda_backend.kernel_choice(gpu_device, torch.float32, p.c, p.co)[0] == ("mma" if tf32 else "simt")
    _check_forward(p, torch.float32, gpu_device, True, True)
    _check_grads(p, torch.float32, gpu_device, True, False)
    if not tf32:
        kernel_env("mma")
        with pytest.raises(RuntimeError, match="TF32"):
            _check_forward(p, torch.float32, gpu_device, True, False)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["sm90", "mma"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_misaligned_input(gpu_device, kernel_env, kernel, dtype):
    """A channels_last x whose data starts 8 bytes off a 16-byte boundary (copied once, then the kernels)."""
    _needs(kernel, gpu_device)
    kernel_env(kernel)
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
    want = cuda_backend.backward(g, x.contiguous(memory_format=torch.channels_last), w1, w3, p.rates, True, True)
    got = cuda_backend.backward(g_off, x_off, w1, w3, p.rates, True, True)
    for what, a, b in zip(("grad_x", "grad_w1x1", "grad_w3x3"), got, want):
        assert torch.equal(a, b), f"misaligned backward: {what} differs"


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_weights_in_any_layout_give_the_same_bits(gpu_device, kernel_env, kernel):
    """FusedASPP's layout (each branch channels_last: read in place), PyTorch's (copied once) and a
    K-major one give bitwise the same results."""
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = Problem(2, 32, 24, 11, 13, (1, 4, 12))
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, gpu_device, channels_last=True, epilogue=True, seed=10)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), device=gpu_device, dtype=torch.bfloat16)
    layouts = [w3, w3.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3),
               w3.permute(0, 3, 4, 2, 1).contiguous().permute(0, 4, 3, 1, 2)]
    runs = [(cuda_backend.forward(x, w1, w, p.rates, scale, shift, True),
             *cuda_backend.backward(g, x, w1, w, p.rates, True, True)) for w in layouts]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", (torch.float32,) + HALF_TYPES, ids=str)
def test_weight_grads_own_their_storage(gpu_device, kernel_env, kernel, dtype):
    """grad_w1x1 and grad_w3x3 each hold exactly their own elements (no view of a larger buffer)."""
    if kernel == "sm90" and dtype == torch.float32:
        pytest.skip("the sm90 kernels take fp16 / bf16")
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = Problem(2, 16, 8, 9, 9, (1, 2))
    x, w1, w3, _, _ = make_problem(p, dtype, gpu_device, channels_last=True, seed=11)
    g = torch.randn((p.n, 3 * p.co, p.h, p.w), device=gpu_device, dtype=dtype)
    _, gw1, gw3 = cuda_backend.backward(g, x, w1, w3, p.rates, False, True)
    for t in (gw1, gw3):
        assert t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size()


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["sm90", "mma"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_wgrad_bitwise_reproducible(gpu_device, kernel_env, kernel, dtype):
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = Problem(4, 64, 32, 33, 33, (6, 12, 18))
    x, w1, w3, _, _ = make_problem(p, dtype, gpu_device, channels_last=True, seed=5)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), device=gpu_device, dtype=dtype)
    runs = [cuda_backend.backward(g, x, w1, w3, p.rates, True, True) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b), "tensor-core backward differs between two identical runs"


@pytest.mark.cuda
def test_kernel_env_rejects_what_cannot_run(gpu_device, kernel_env):
    p = Problem(1, 20, 12, 5, 5, (1, 2))
    x, w1, w3, _, _ = make_problem(p, torch.float16, gpu_device)
    for kernel in ("mma", "sm90"):
        kernel_env(kernel)
        with pytest.raises(RuntimeError, match="multiples of 8|sm_90|without the sm_90a"):
            cuda_backend.forward(x, w1, w3, p.rates, None, None, False)
    kernel_env("sm90")
    x32, w132, w332, _, _ = make_problem(Problem(1, 16, 8, 5, 5, (1, 2)), torch.float32, gpu_device)
    with pytest.raises(RuntimeError, match="float16 or bfloat16|sm_90"):
        cuda_backend.forward(x32, w132, w332, (1, 2), None, None, False)
    kernel_env("fastest")
    with pytest.raises(RuntimeError, match="RESASPP_CUDA_KERNEL"):
        cuda_backend.forward(x, w1, w3, p.rates, None, None, False)


@pytest.mark.cuda
def test_auto_keeps_sm90_off_until_validated(gpu_device, kernel_env, monkeypatch):
    kernel_env(None)
    assert cuda_backend.SM90_VALIDATED == {}
    cap = torch.cuda.get_device_capability(gpu_device)
    kernel, why = cuda_backend.kernel_choice(gpu_device, torch.bfloat16, 64, 256)
    assert kernel == ("mma" if cap >= (8, 0) else "simt")
    if cap == (9, 0) and cuda_backend.sm90_built():
        assert "not validated" in why
        monkeypatch.setitem(cuda_backend.SM90_VALIDATED, ((9, 0), torch.bfloat16), "benchmarks/results/x.json")
        assert cuda_backend.kernel_choice(gpu_device, torch.bfloat16, 64, 256)[0] == "sm90"
        assert cuda_backend.kernel_choice(gpu_device, torch.float16, 64, 256)[0] == "mma"


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", ["sm90", "mma"])
@pytest.mark.parametrize("dtype", HALF_TYPES, ids=str)
def test_tensor_cores_match_simt(gpu_device, kernel_env, kernel, dtype):
    """Same inputs through a tensor-core family and SIMT: fp32 accumulation in both, so they agree to
    output rounding."""
    _needs(kernel, gpu_device)
    p = Problem(2, 96, 80, 21, 35, (3, 9, 27))
    x, w1, w3, scale, shift = make_problem(p, dtype, gpu_device, channels_last=True, epilogue=True, seed=6)
    outs = []
    for k in (kernel, "simt"):
        kernel_env(k)
        outs.append(cuda_backend.forward(x, w1, w3, p.rates, scale, shift, True).float())
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(outs[0], outs[1], rtol=2 * eps, atol=2 * eps * float(outs[1].abs().max()))


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_rate_past_int32_is_not_wrapped(gpu_device, kernel_env, kernel):
    """A rate past 2^31 behaves like any rate past the map (every off-centre tap is padding); it
    must not wrap around in the int tap offsets (2^32 + 1 would become rate 1)."""
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = Problem(2, 16, 8, 7, 9, (2, 2**32 + 1))
    x, w1, w3, scale, shift = make_problem(p, torch.float16, gpu_device, channels_last=True, epilogue=True, seed=7)
    g = torch.randn((p.n, 3 * p.co, p.h, p.w), device=gpu_device, dtype=torch.float16)
    huge, past = (2, 2**32 + 1), (2, 1000)
    assert torch.equal(cuda_backend.forward(x, w1, w3, huge, scale, shift, True),
                       cuda_backend.forward(x, w1, w3, past, scale, shift, True))
    for a, b in zip(cuda_backend.backward(g, x, w1, w3, huge, True, True),
                    cuda_backend.backward(g, x, w1, w3, past, True, True)):
        assert torch.equal(a, b)


# (kernel family, dtype): each family in the dtypes it takes.
NONFINITE_CASES = [("sm90", torch.float16), ("sm90", torch.bfloat16), ("mma", torch.float16), ("mma", torch.bfloat16),
                   ("simt", torch.bfloat16), ("simt", torch.float32), ("simt", torch.float64)]


@pytest.mark.cuda
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
@pytest.mark.parametrize("kernel,dtype", NONFINITE_CASES, ids=lambda v: str(v).replace("torch.", ""))
def test_nan_and_inf_propagate_like_the_reference(gpu_device, kernel_env, kernel, dtype, relu):
    """NaN and +-Inf in x reach exactly the outputs whose window reads them, through scale, shift and the ReLU
    (NaN stays NaN, as in torch.relu; issue 22 item 7): C = 40 leaves a channel tail in a K chunk, 9 x 13 tiles
    over the map's edges, rate 20 leaves only the centre tap."""
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = Problem(2, 40, 24, 9, 13, (1, 3, 20))
    x, w1, w3, scale, shift = make_problem(p, dtype, gpu_device, channels_last=True, epilogue=True, seed=8)
    x = nonfinite.plant(x)
    y = cuda_backend.forward(x, w1, w3, p.rates, scale, shift, relu)
    ref = float64_reference(x, w1, w3, p.rates, scale, shift, relu)
    assert torch.equal(torch.isnan(ref), nonfinite.footprint(torch.isnan(x).any(1), p.rates, p.co))
    nonfinite.assert_same_nonfinite(y, ref, f"{kernel} {dtype}")
    finite = torch.isfinite(ref)
    bound = 64 * torch.finfo(dtype).eps * (1 + float(ref[finite].abs().max()))  # the rest: finite and right
    torch.testing.assert_close(y.cpu().double()[finite], ref[finite], rtol=0, atol=bound)


# Problems without output elements or without a sum: N, H, W = 0 (no pixels), C = 0 (the epilogue of an empty
# sum on every output), Co = 0 (no output channels, grad_x zero).
EMPTY_SHAPES = [Problem(0, 16, 8, 5, 6, (1, 2)), Problem(2, 16, 8, 0, 6, (1, 2)), Problem(2, 16, 8, 5, 0, (1, 2)),
                Problem(2, 0, 8, 5, 6, (1, 2)), Problem(2, 16, 0, 5, 6, (1, 2))]


def _expected_empty(x, w1, w3, scale, shift, relu):
    """(out, grad_x, grad_w1x1, grad_w3x3) of an EMPTY_SHAPES problem: every output the epilogue of an empty sum
    (ReLU(0 * scale + shift), in scale's dtype), grads zero."""
    n, _, h, w = x.shape
    v = torch.zeros_like(scale) * scale + shift
    out = (v.relu() if relu else v).to(x.dtype).view(1, -1, 1, 1).expand(n, -1, h, w)
    return out, torch.zeros_like(x), torch.zeros_like(w1), torch.zeros_like(w3)


@pytest.mark.cuda
@pytest.mark.parametrize("problem", EMPTY_SHAPES, ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_empty_problems(gpu_device, kernel_env, problem, kernel):
    """The right shapes and values for forward and backward, on every family (issue 22 item 9); a kernel
    launched for them would fail, or hang walking a job with no K chunk."""
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = problem
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, gpu_device, channels_last=True, epilogue=True, seed=10)
    want = _expected_empty(x, w1, w3, scale, shift, True)
    y = cuda_backend.forward(x, w1, w3, p.rates, scale, shift, True)
    assert y.shape == want[0].shape and y.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y, want[0])
    g = torch.randn(y.shape, device=gpu_device, dtype=torch.bfloat16)
    grads = cuda_backend.backward(g, x, w1, w3, p.rates, True, True)
    torch.cuda.synchronize(gpu_device)
    for what, got, w in zip(("grad_x", "grad_w1x1", "grad_w3x3"), grads, want[1:]):
        assert got.shape == w.shape and got.dtype == w.dtype and torch.equal(got, w), what


@pytest.mark.cuda
@pytest.mark.parametrize("kernel", KERNELS)
def test_side_stream_and_other_device(gpu_device, kernel_env, kernel):
    """The kernels run on the current stream of the tensors' device (not the default stream, not the
    current device): same bits on a side stream and, with two GPUs, on the other one."""
    _needs(kernel, gpu_device)
    kernel_env(kernel)
    p = Problem(2, 24, 16, 11, 13, (1, 4, 12))
    x, w1, w3, scale, shift = make_problem(p, torch.bfloat16, gpu_device, channels_last=True, epilogue=True, seed=9)
    g = torch.randn((p.n, 4 * p.co, p.h, p.w), device=gpu_device, dtype=torch.bfloat16)
    want_y = cuda_backend.forward(x, w1, w3, p.rates, scale, shift, True)
    want_g = cuda_backend.backward(g, x, w1, w3, p.rates, True, True)
    side = torch.cuda.Stream(device=gpu_device)
    side.wait_stream(torch.cuda.current_stream(gpu_device))
    with torch.cuda.stream(side):
        got_y = cuda_backend.forward(x, w1, w3, p.rates, scale, shift, True)
        got_g = cuda_backend.backward(g, x, w1, w3, p.rates, True, True)
    side.synchronize()
    assert torch.equal(got_y, want_y)
    for a, b in zip(got_g, want_g):
        assert torch.equal(a, b)
    if torch.cuda.device_count() < 2:
        return
    other = torch.device("cuda", (gpu_device.index + 1) % torch.cuda.device_count())
    try:
        _needs(kernel, other)
    except pytest.skip.Exception:
        return
    moved = [t.to(other) for t in (x, w1, w3, scale, shift, g)]
    with torch.cuda.device(gpu_device):  # the current device is not the tensors' device
        y1 = cuda_backend.forward(*moved[:3], p.rates, moved[3], moved[4], True)
        g1 = cuda_backend.backward(moved[5], *moved[:3], p.rates, True, True)
    torch.cuda.synchronize(other)
    assert y1.device == other
    eps = torch.finfo(torch.bfloat16).eps  # the other GPU may be another model: agree to output rounding
    for a, b in zip((y1, *g1), (want_y, *want_g)):
        b = b.float()
        torch.testing.assert_close(a.to(gpu_device).float(), b, rtol=2 * eps, atol=2 * eps * float(b.abs().max()))


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.parametrize("kernel", ["sm90", "mma"])
def test_input_past_2_31_elements(gpu_device, kernel_env, kernel):
    """tests/test_determinism.py's 64-bit offset case (x of 2^31 + a few elements) on each tensor-core family."""
    from test_determinism import _check_corner

    _needs(kernel, gpu_device)
    kernel_env(kernel)
    c, co, r, n, h, w = 2048, 8, 3, 1, 1025, 1025
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w, device=gpu_device, dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(co, c, 1, 1, device=gpu_device, dtype=torch.bfloat16) / c**0.5
    w3 = torch.randn(1, co, c, 3, 3, device=gpu_device, dtype=torch.bfloat16) / (9 * c) ** 0.5
    _check_corner(x, w1, w3, r, "cuda")
    torch.cuda.empty_cache()
