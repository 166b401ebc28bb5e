"""The Triton launches compiled for sm_90 without a GPU (resaspp_ops.backend.triton.lowering): the backend's real
host code on fake CUDA tensors, each launch compiled by Triton for Hopper. Catches before any GPU time what the
interpreter cannot: a constexpr combination that does not compile, shared memory past the limit, spills, tl.dot
not lowered to warpgroup MMA.

Runs in a fresh process: Triton fixes compiled-or-interpreted when the kernels load, and tests/test_triton.py
loads them interpreted.
"""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton.backends.nvidia")

_SCRIPT = r"""
import dataclasses, json, sys, torch
from resaspp_ops.backend.triton import lowering
name, n, c, co, h, w, rates, dtype, autotune = json.loads(sys.argv[1])
launches = lowering.lower(n, c, co, h, w, tuple(rates), getattr(torch, dtype), autotune=autotune)
print(json.dumps([dataclasses.asdict(l) for l in launches]))
"""


def _lower(name, n, c, co, h, w, rates, dtype, autotune=False, version="v2", dgrad_segments="registers"):
    """The launches' reports (lowering.Launch as dicts); the same case is compiled once a test session."""
    return json.loads(_lowered(name, n, c, co, h, w, tuple(rates), dtype, autotune, version, dgrad_segments))


@functools.lru_cache(maxsize=None)
def _lowered(name, n, c, co, h, w, rates, dtype, autotune, version, dgrad_segments):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESASPP_TRITON_AUTOTUNE")}
    env["RESASPP_TRITON_KERNEL"] = version
    env["RESASPP_TRITON_DGRAD_SEGMENTS"] = dgrad_segments
    args = json.dumps([name, n, c, co, h, w, list(rates), dtype, autotune])
    done = subprocess.run([sys.executable, "-c", _SCRIPT, args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def _triton_version() -> str:
    """Which Triton compiled (for the assertion messages only: every Triton must pass the same checks)."""
    import triton

    return triton.__version__


def _kernels(launches):
    return [launch["kernel"] for launch in launches]


def _sound(launch):
    """Compiles, fits, warpgroup MMA on a pipelined K loop, nothing spilled."""
    assert launch["error"] is None and not launch["problems"], launch
    assert launch["wgmma"] and launch["pipelined"] and launch["spills"] == 0, launch
    assert launch["shared"] <= 232448, launch


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_voc_os16_second_design_lowers_to_wgmma_n256(dtype):
    """The benchmark's main case on the second design: one job a (tile, branch) with all 256 channels, so the
    forward and dgrad run wgmma m64n256 (the first design: m64n32); wgrad's grid is exactly the 896 programs
    with work (the first design's had 3,200, 2,304 of them idle)."""
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], dtype)
    assert _kernels(launches) == ["_forward_v2_kernel", "_dgrad_v2_kernel", "_wgrad_kernel"], launches
    for launch in launches:
        _sound(launch)
    forward, dgrad, wgrad = launches
    assert forward["mma"] == "m64n256k16" and dgrad["mma"] == "m64n256k16", (forward["mma"], dgrad["mma"])
    assert forward["meta"]["BLOCK_N"] == 256 and forward["programs"] == 8 * 9 * 4  # 9 tiles of 11x11 x 4 branches
    assert wgrad["meta"]["WORKLIST"] and wgrad["programs"] == 16 * 8 + 24 * 16 * 2, wgrad["programs"]
    # operand bytes from the work list: every job reads the weights of its live taps, [C, Co] each
    assert forward["b_bytes"] % (2048 * 256 * 2) == 0 and forward["a_bytes"] > 0


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dgrad_gets_the_forwards_pipeline_depth(dtype):
    """dgrad_v2's K loop picks each step's segment code and rate from registers loaded before the loop, so the
    software pipeline gives its operands as many shared-memory buffers as the forward's (3 = STAGES; the loop
    that loaded them every step got 2: a chained load costs a stage). The depth is the leading dimension of the
    operand buffers' local_alloc in the TTGIR (lowering._operand_buffers)."""
    forward, dgrad, _ = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], dtype)
    assert dgrad["kernel"] == "_dgrad_v2_kernel" and dgrad["meta"]["PRELOAD_SEGMENTS"], dgrad["meta"]
    assert forward["meta"]["STAGES"] == dgrad["meta"]["STAGES"] == 3
    assert forward["buffers"] == dgrad["buffers"] == 3, (_triton_version(), forward["buffers"], dgrad["buffers"])
    assert dgrad["spills"] == 0 and not dgrad["warnings"], (_triton_version(), dgrad)


def test_the_earlier_dgrad_loop_stays_selectable():
    """RESASPP_TRITON_DGRAD_SEGMENTS=loads: the loop with a code and a rate loaded a step, kept until a GPU
    compares the two; it compiles to the same MMA (its pipeline depth is the report's to show)."""
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], "bfloat16", dgrad_segments="loads")
    dgrad = launches[1]
    assert dgrad["kernel"] == "_dgrad_v2_kernel" and not dgrad["meta"]["PRELOAD_SEGMENTS"], dgrad["meta"]
    assert dgrad["error"] is None and not dgrad["problems"] and dgrad["mma"] == "m64n256k16", dgrad
    assert dgrad["buffers"] is not None and dgrad["pipelined"], dgrad


@pytest.mark.parametrize("case", [("voc-os8", 4, 2048, 256, 65, 65, [12, 24, 36]),
                                  ("cityscapes-os8", 2, 2048, 256, 97, 97, [12, 24, 36])], ids=lambda c: c[0])
def test_the_large_maps_lower_to_wide_wgmma(case):
    launches = _lower(*case, "bfloat16")
    for launch in launches:
        _sound(launch)
    for launch in launches[:2]:
        n = int(launch["mma"].split("n")[1].split("k")[0])
        assert n >= 128, launch["mma"]


def test_the_first_design_stays_selectable_and_compiles():
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], "bfloat16", version="v1")
    assert _kernels(launches) == ["_forward_kernel", "_dgrad_kernel", "_wgrad_kernel"], launches
    for launch in launches:
        _sound(launch)
    assert launches[0]["meta"]["NR"] == 3 and launches[0]["meta"]["HAS_1X1"]
    assert not launches[2]["meta"]["WORKLIST"]


def test_five_rates_take_one_launch_on_the_second_design_and_two_on_the_first():
    v2 = _lower("five-rates", 1, 64, 32, 9, 9, [1, 2, 3, 4, 5], "bfloat16")
    assert _kernels(v2).count("_forward_v2_kernel") == 1
    v1 = _lower("five-rates", 1, 64, 32, 9, 9, [1, 2, 3, 4, 5], "bfloat16", version="v1")
    forwards = [launch["meta"] for launch in v1 if launch["kernel"] == "_forward_kernel"]
    assert [(m["NR"], m["HAS_1X1"]) for m in forwards] == [(4, True), (1, False)]
    assert all(launch["error"] is None and not launch["problems"] for launch in v1 + v2)


def test_past_2_31_elements_compiles_the_64_bit_offsets():
    """x of 1 x 2048 x 1040 x 1040 (2.2e9 elements): shapes only, nothing is allocated."""
    launches = _lower("past-2^31", 1, 2048, 16, 1040, 1040, [6, 12, 18], "bfloat16")
    assert all(launch["meta"]["IDX64"] for launch in launches if "IDX64" in launch["meta"])
    assert all(launch["error"] is None and not launch["problems"] for launch in launches), launches


def test_float32_and_small_maps_compile_within_shared_memory():
    """fp32 (TF32 dots, BLOCK_K 32, 128-wide blocks) on the tests' voc miniature and the 8x8 unet-stare map
    (two images stacked a job)."""
    for case in (("tests-voc-mini", 2, 256, 64, 33, 33, [6, 12, 18], "float32"),
                 ("unet-stare", 4, 64, 16, 8, 8, [12, 24, 36], "float32")):
        launches = _lower(*case)
        for launch in launches:
            assert launch["error"] is None and not launch["problems"] and not launch["spills"], (case, launch)
    assert launches[0]["meta"]["STACK"] == 2


def test_a_new_shape_compiles_one_config_a_kernel_by_default():
    """What a GPU run does with RESASPP_TRITON_AUTOTUNE unset (autotune=None: the real switch): one compile of
    the heuristic config a kernel, no candidates timed before the first step."""
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], "bfloat16", autotune=None)
    assert _kernels(launches) == ["_forward_v2_kernel", "_dgrad_v2_kernel", "_wgrad_kernel"], _kernels(launches)


def test_every_opt_in_autotuning_candidate_compiles():
    """RESASPP_TRITON_AUTOTUNE=1 times at most six candidates a kernel: each must compile (an error would end
    the tuning and the call); at voc-os16 bf16 all six survive the pruning."""
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], "bfloat16", autotune=True)
    for kernel in ("_forward_v2_kernel", "_dgrad_v2_kernel"):
        tried = {(l["meta"]["BLOCK_N"], l["meta"]["STAGES"], l["num_warps"]) for l in launches if l["kernel"] == kernel}
        assert len(tried) == 6, (kernel, tried)  # each compiled once, then the winner launched
    for launch in launches:
        assert launch["error"] is None and not launch["problems"], launch
        assert launch["wgmma"], launch


_SEPARABLE_SCRIPT = r"""
import dataclasses, json, sys, torch
from resaspp_ops.backend.triton import lowering
n, c, co, h, w, rates, dtype, backward, mid = json.loads(sys.argv[1])
launches = lowering.lower_separable(n, c, co, h, w, tuple(rates), getattr(torch, dtype), backward=backward, mid=mid)
print(json.dumps([dataclasses.asdict(l) for l in launches]))
"""


@functools.lru_cache(maxsize=None)
def _lower_separable_v3plus_os16(dtype, backward=True, mid=True, taps="loop"):
    """The separable op's launches at smp's DeepLabV3+ default (C = 2048, Co = 256, 32x32, rates 12, 24, 36), with
    the mid stage (mmseg's BN and ReLU between) or without (smp's), and the forward's tap walk `taps`."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "RESASPP_TRITON_AUTOTUNE")}
    env["RESASPP_TRITON_SEPARABLE_TAPS"] = taps
    args = json.dumps([8, 2048, 256, 32, 32, [12, 24, 36], dtype, backward, mid])
    done = subprocess.run([sys.executable, "-c", _SEPARABLE_SCRIPT, args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_separable_kernels_lower_at_v3plus_os16(dtype):
    """The separable op's forward and backward at v3plus-os16: every launch compiles within the shared memory,
    nothing spills, the forward's pointwise MMA is one warpgroup MMA over all 256 channels (bf16), the MMA
    kernels lower to wgmma."""
    launches = _lower_separable_v3plus_os16(dtype)
    kernels = _kernels(launches)
    assert kernels[0] == "_separable_forward_kernel"
    assert {"_separable_dgrad_kernel", "_depthwise_dgrad_kernel", "_depthwise_wgrad_kernel",
            "_pointwise_wgrad_kernel"} <= set(kernels)
    for launch in launches:
        assert launch["error"] is None and not launch["problems"], launch
        assert launch["spills"] == 0, (_triton_version(), launch)
        if launch["kernel"] in ("_separable_forward_kernel", "_separable_dgrad_kernel", "_pointwise_wgrad_kernel"):
            assert launch["wgmma"], launch
    if dtype == "bfloat16":
        assert launches[0]["mma"] == "m64n256k16" and launches[0]["programs"] == 288, launches[0]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_separable_forward_at_v3plus_os16_spills_nothing(dtype):
    """The forward's 128 x 256 fp32 accumulator (128 registers a thread) with the epilogue's scale, shift and
    ReLU: no spill with either 16-bit dtype on any Triton (3.6 spilled 72 B while the epilogue took all 256
    columns at once: tiles.epilogue_store_halves), and still wgmma m64n256k16."""
    (forward,) = _lower_separable_v3plus_os16(dtype, backward=False)
    assert forward["kernel"] == "_separable_forward_kernel" and forward["meta"]["BLOCK_N"] == 256, forward
    assert forward["error"] is None and not forward["problems"], forward
    assert forward["spills"] == 0 and forward["mma"] == "m64n256k16", (_triton_version(), forward)


@pytest.mark.parametrize("mid", [False, True], ids=["smp", "mid-stage"])
def test_the_separable_forward_pipelines_its_weight_chunk(mid):
    """RESASPP_TRITON_SEPARABLE_TAPS=unrolled (at C = 2048) leaves no inner loop, so Triton's pipeliner takes the K
    loop: the [32, 256] pointwise weight chunk in a ring as deep as the loop's stages, filled by cp.async,
    nothing spilled, the same wgmma. The default loop over the live taps: its K loop not pipelined (the report
    says so)."""
    (forward,) = _lower_separable_v3plus_os16("bfloat16", backward=False, mid=mid, taps="unrolled")
    assert forward["kernel"] == "_separable_forward_kernel" and forward["meta"]["UNROLL_TAPS"], forward["meta"]
    assert forward["pipelined"] and forward["buffers"] == forward["meta"]["STAGES"] == 3, (_triton_version(), forward)
    assert forward["spills"] == 0 and forward["mma"] == "m64n256k16" and not forward["warnings"], forward
    (loop,) = _lower_separable_v3plus_os16("bfloat16", backward=False, mid=mid)
    assert not loop["meta"]["UNROLL_TAPS"] and loop["error"] is None and not loop["problems"], loop
    assert not loop["pipelined"] and "K loop not pipelined" in loop["warnings"], loop


def test_the_pipeline_depth_is_read_from_the_operand_buffers():
    """lowering._operand_buffers: the leading dimension of a ring of operand tiles; a single tile counts 1; rings
    of vectors (a prefetched per-channel scale) and integer buffers (barriers) do not count."""
    from resaspp_ops.backend.triton.lowering import _operand_buffers

    ring = "%b = ttg.local_alloc : () -> !ttg.memdesc<3x32x256xbf16, #shared1, #smem, mutable>"
    vectors = "%d = ttg.local_alloc : () -> !ttg.memdesc<2x32xf32, #shared, #smem, mutable>"
    single = "%a = ttg.local_alloc %x : (tensor<128x32xbf16>) -> !ttg.memdesc<128x32xbf16, #shared, #smem>"
    barriers = "%e = ttg.local_alloc : () -> !ttg.memdesc<3xi64, #shared2, #smem, mutable>"
    assert _operand_buffers("\n".join([ring, vectors, barriers])) == 3
    assert _operand_buffers("\n".join([ring, single])) == 1
    assert _operand_buffers("\n".join([vectors, barriers])) is None
