"""The Triton launches compiled for sm_90 without a GPU (resaspp_ops.backend.triton.lowering): the backend's real
host code on fake CUDA tensors, each launch compiled by Triton for Hopper. Catches before any GPU time what the
interpreter cannot: a constexpr combination that does not compile, shared memory past the limit, spills, tl.dot
not lowered to warpgroup MMA.

Runs in a fresh process: Triton fixes compiled-or-interpreted when the kernels load, and tests/test_triton.py
loads them interpreted.
"""
from __future__ import annotations

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


def _lower(name, n, c, co, h, w, rates, dtype, autotune=False):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    args = json.dumps([name, n, c, co, h, w, rates, dtype, autotune])
    done = subprocess.run([sys.executable, "-c", _SCRIPT, args], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _kernels(launches):
    return [launch["kernel"] for launch in launches]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_voc_os16_lowers_to_pipelined_wgmma_without_spills(dtype):
    """The benchmark's main case: forward, dgrad and wgrad on warpgroup MMA, pipelined K loops, no spills, and
    more than one program per SM's worth of work."""
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], dtype)
    assert _kernels(launches) == ["_forward_kernel", "_dgrad_kernel", "_wgrad_kernel"], launches
    for launch in launches:
        assert launch["error"] is None and not launch["problems"], launch
        assert launch["wgmma"] and launch["pipelined"] and launch["spills"] == 0, launch
        assert launch["shared"] <= 232448 and launch["programs"] >= 100, launch
    forward = launches[0]["meta"]
    assert forward["NR"] == 3 and forward["HAS_1X1"] and not forward["IDX64"]


def test_five_rates_take_a_second_forward_launch_without_the_1x1():
    launches = _lower("five-rates", 1, 64, 32, 9, 9, [1, 2, 3, 4, 5], "bfloat16")
    forwards = [launch["meta"] for launch in launches if launch["kernel"] == "_forward_kernel"]
    assert [(m["NR"], m["HAS_1X1"]) for m in forwards] == [(4, True), (1, False)]
    assert all(launch["error"] is None and not launch["problems"] for launch in launches), launches


def test_past_2_31_elements_compiles_the_64_bit_offsets():
    """x of 1 x 2048 x 1040 x 1040 (2.2e9 elements): shapes only, nothing is allocated."""
    launches = _lower("past-2^31", 1, 2048, 16, 1040, 1040, [6, 12, 18], "bfloat16")
    assert all(launch["meta"]["IDX64"] for launch in launches if "IDX64" in launch["meta"])
    assert all(launch["error"] is None and not launch["problems"] for launch in launches), launches


def test_float32_and_small_maps_compile_within_shared_memory():
    """fp32 (TF32 dots, BLOCK_K 32) on the tests' voc miniature and the 8x8 unet-stare map."""
    for case in (("tests-voc-mini", 2, 256, 64, 33, 33, [6, 12, 18], "float32"),
                 ("unet-stare", 4, 64, 16, 8, 8, [12, 24, 36], "float32")):
        for launch in _lower(*case):
            assert launch["error"] is None and not launch["problems"], (case, launch)


def test_every_autotuning_candidate_at_voc_os16_compiles():
    """RESASPP_TRITON_AUTOTUNE=1 (the default on a GPU) tries every pruned config: a compile error in one would
    end the tuning and the call. (Past the shared-memory limit is fine there: the autotuner skips it.)"""
    launches = _lower("voc-os16", 8, 2048, 256, 33, 33, [6, 12, 18], "bfloat16", autotune=True)
    kernels = _kernels(launches)
    assert kernels.count("_forward_kernel") > 2 and kernels.count("_dgrad_kernel") > 2, kernels
    assert kernels.count("_wgrad_kernel") > 2, kernels
    for launch in launches:
        assert launch["error"] is None and not launch["problems"], launch
        assert launch["wgmma"], launch
