"""Launch configurations of the Triton kernels: autotuning lists, the heuristic default and the switches.

Switches (read at call time):
    TRITON_INTERPRET=1           run on CPU tensors through Triton's interpreter (tiny blocks, never autotuned)
    RESASPP_TRITON_AUTOTUNE=0/1  opt in to autotuning on CUDA (default 0: the heuristic config of each kernel,
                                 one compile a kernel and shape). With 1 the second design times at most
                                 len(V2_TUNED) = 6 candidates a kernel, keyed without the batch size, the choice
                                 kept on disk (cache_results); the first design its old lists (~28 candidates)
    RESASPP_TRITON_DGRAD_SEGMENTS=registers|loads
                                 dgrad_v2's K loop: the tile's segment table in registers before the loop (default)
                                 or the earlier loop's two chained loads a step (dgrad_preload_segments), until a
                                 GPU compares the two (benchmarks/NOTES.md)
    RESASPP_TRITON_SEPARABLE_TAPS=loop|unrolled
                                 the separable forward's depthwise taps: a loop over a job's live taps (default),
                                 or unrolled where C is a multiple of 16, so that its K loop pipelines
                                 (separable_unroll_taps), until a GPU compares the two

Block shapes (Hopper): BLOCK_M = TILE_H * TILE_W output pixels >= 64 and warps a multiple of 4, so tl.dot
can lower to warpgroup MMA. The forward keeps one fp32 accumulator per branch live at once, so configs
whose accumulators would pass ~128 registers a thread are pruned.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Optional

import torch
import triton

from resaspp_ops.backend.precision import tf32_convolutions

_TRUE = ("1", "true", "on", "yes")


def interpreting() -> bool:
    """Whether TRITON_INTERPRET asks for the interpreter now (Triton's own parse of the variable)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def autotune_enabled(device: torch.device) -> bool:
    """RESASPP_TRITON_AUTOTUNE=1 on a CUDA device (never under the interpreter); off by default, so that a
    new shape costs one compile a kernel and not tens of seconds of timing before the first step."""
    if device.type != "cuda" or interpreting():
        return False
    return os.environ.get("RESASPP_TRITON_AUTOTUNE", "0").strip().lower() in _TRUE


def dgrad_preload_segments() -> bool:
    """RESASPP_TRITON_DGRAD_SEGMENTS: "registers" (unset: the default) puts dgrad_v2's segment table in registers
    before its K loop, "loads" keeps the earlier loop (a code and a rate loaded every step)."""
    choice = os.environ.get("RESASPP_TRITON_DGRAD_SEGMENTS", "registers").strip().lower() or "registers"
    if choice not in ("registers", "loads"):
        raise ValueError(f"RESASPP_TRITON_DGRAD_SEGMENTS={choice!r}: choose registers or loads")
    return choice == "registers"


SEPARABLE_TAP_WALKS = ("loop", "unrolled")
_separable_taps_override: Optional[str] = None


def separable_taps() -> str:
    """The separable forward's walk over a job's taps: use_separable_taps's inside its block, else
    RESASPP_TRITON_SEPARABLE_TAPS, "loop" (unset: the default) or "unrolled"."""
    if _separable_taps_override is not None:
        return _separable_taps_override
    choice = os.environ.get("RESASPP_TRITON_SEPARABLE_TAPS", "loop").strip().lower() or "loop"
    if choice not in SEPARABLE_TAP_WALKS:
        raise ValueError(f"RESASPP_TRITON_SEPARABLE_TAPS={choice!r}: choose loop or unrolled")
    return choice


@contextlib.contextmanager
def use_separable_taps(choice: str):
    """Run the separable forwards inside the block with this tap walk (process-wide, as use_kernel_version): the
    benchmark's fused-triton-unrolled provider."""
    global _separable_taps_override
    if choice not in SEPARABLE_TAP_WALKS:
        raise ValueError(f"unknown separable tap walk {choice!r}; choose loop or unrolled")
    previous, _separable_taps_override = _separable_taps_override, choice
    try:
        yield
    finally:
        _separable_taps_override = previous


def separable_unroll_taps(c: int) -> bool:
    """Whether the separable forward unrolls its nine taps for C input channels: the "unrolled" walk, and C a
    multiple of 16. Triton then knows every pixel's channels 16-byte aligned and loads vectors; at other C each
    element has its own address registers, nine taps' worth unrolled, and the unrolled forward spilled 0.3-1.4
    KiB at the tests' awkward C (sm_90a, benchmarks/NOTES.md), so there the loop runs."""
    return separable_taps() == "unrolled" and c % 16 == 0


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: TF32 for fp32 only where PyTorch's conv would use it (backend/precision.py)."""
    if dtype == torch.float32 and not tf32_convolutions():
        return "ieee"
    return "tf32"  # the default; fp16 / bf16 operands ignore it


@functools.lru_cache(maxsize=None)
def sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def config_dict(cfg: triton.Config) -> dict:
    """A config's meta-parameters and launch options as one dict (what a kernel launch takes)."""
    return {**cfg.kwargs, "num_warps": cfg.num_warps, "num_stages": cfg.num_stages}


def needs_int64(*numels: int) -> bool:
    return max(numels) >= 2 ** 31


def _live_lines(length: int, tile: int, offset: int) -> int:
    """Tiles along one axis whose span [t0, t1) shifted by offset still overlaps [0, length)."""
    return sum(1 for t0 in range(0, length, tile) if min(t0 + tile, length) + offset > 0 and t0 + offset < length)


def tap_tiles(h: int, w: int, tile_h: int, tile_w: int, rates: tuple, branches: int) -> int:
    """Tap-tiles a forward launch processes on one image and Co block: every tile does the centre of each of
    `branches` accumulators, plus each off-centre tap of each rate that is not wholly padding there.

    On a grid of tiles a tap is live iff its row shift and its column shift both are, so the count factorises.
    """
    n_rows, n_cols = triton.cdiv(h, tile_h), triton.cdiv(w, tile_w)
    live = 0
    for r in rates:
        rows = [_live_lines(h, tile_h, d * r) for d in (-1, 0, 1)]
        cols = [_live_lines(w, tile_w, d * r) for d in (-1, 0, 1)]
        live += sum(rows) * sum(cols) - rows[1] * cols[1]
    return n_rows * n_cols * branches + live


@functools.lru_cache(maxsize=4096)
def tile_width(h: int, w: int, block_m: int, rates: tuple = ()) -> int:
    """The TILE_W (TILE_H = block_m // TILE_W) that does the least MMA work on an h x w map.

    Work = tap-tiles x block_m: fewer tiles waste fewer slots at the map's edges (a 33x33 map takes 11x11
    tiles of a 128-pixel block, 95% of the slots used, where 8x16 uses 57%), and with rates the tile shape
    also decides how many taps fall wholly in padding. Ties go to the squarer tile.
    """
    best = None
    for tw in range(1, min(block_m, max(w, 1)) + 1):
        th = block_m // tw
        if th * tw < (3 * block_m) // 4:  # keep the block at least 3/4 full
            continue
        if rates:
            work = tap_tiles(h, w, th, tw, tuple(rates), 1 + len(rates))
        else:
            work = triton.cdiv(h, th) * triton.cdiv(w, tw)
        score = (work, abs(th - tw), -tw)
        if best is None or score < best[0]:
            best = (score, tw)
    return best[1]  # tw = 1 always qualifies


def _pow2_width(block_m: int) -> int:
    """The plain power-of-two tile of block_m pixels, twice as wide as high (8x16, 8x8, 4x4)."""
    tw = 1
    while tw * tw < block_m:
        tw *= 2
    return tw


def _cfg(bm, bn, bk, warps, stages, flat=True):
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "FLAT": flat}, num_warps=warps,
                         num_stages=stages)


# Forward and dgrad: BLOCK_M output pixels x BLOCK_N output channels, K chunks of BLOCK_K channels; FLAT picks
# the tap loop (tiles.branch_taps).
CONV_CONFIGS = [
    _cfg(128, 64, 64, 8, 3),
    _cfg(128, 64, 32, 8, 4),
    _cfg(64, 64, 64, 4, 3),
    _cfg(64, 64, 64, 8, 3),
    _cfg(64, 64, 64, 4, 2),   # smaller shared-memory footprints: two programs an SM, so one's loads and the
    _cfg(64, 64, 32, 4, 4),   # pipeline refills between taps hide behind the other's MMAs
    _cfg(128, 128, 64, 8, 3),  # the wide ones fit one or two accumulators (dgrad, a single rate)
    _cfg(64, 128, 64, 4, 3),
    _cfg(128, 256, 64, 8, 3),
    # the loop-a-tap variant of the taps (tiles.off_centre_taps), so the tuner can pick between the two
    _cfg(128, 64, 64, 8, 3, flat=False),
    _cfg(64, 64, 64, 4, 3, flat=False),
    _cfg(128, 128, 64, 8, 3, flat=False),
]


def _tile_candidates(h: int, w: int, block_m: int, rates: tuple) -> list[int]:
    """The least-work tile width, plus the plain power-of-two one where it does nearly as little (<= 10% more)."""
    best, plain = tile_width(h, w, block_m, rates), _pow2_width(block_m)
    if plain == best:
        return [best]
    work = (lambda tw: tap_tiles(h, w, block_m // tw, tw, rates, 1 + len(rates))) if rates else \
        (lambda tw: triton.cdiv(h, block_m // tw) * triton.cdiv(w, tw))  # noqa: E731
    return [best, plain] if work(plain) <= 1.1 * work(best) else [best]


SHARED_BYTES = 220 * 1024  # Hopper: 227 KiB a block, less a margin for the epilogue's scratch


def _acc_regs(n_acc: int, cfg: triton.Config) -> float:
    return n_acc * cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] / (32 * cfg.num_warps)


# The dgrad kernel gets its rates through a tensor; its pruner finds them here by the key it is tuned on.
RATES_BY_KEY: dict[int, tuple] = {}


def conv_prune(kind: str):
    """early_config_prune for the forward (kind "forward": one accumulator a branch) and dgrad (one).

    Drops configs over the register budget, and gives each survivor the tile shapes worth timing for this map
    (_tile_candidates): autotuning so covers tile_h and tile_w without compiling hopeless shapes.
    """
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        h, w = args["H"], args["W"]
        if kind == "forward":
            n_acc, n_out = args["NR"] + int(args["HAS_1X1"]), args["CO"]
            rates = tuple(args[f"R{i + 1}"] for i in range(args["NR"]))
            elem = args["x_ptr"].element_size()
        else:
            n_acc, n_out = 1, args["C"]
            rates = RATES_BY_KEY.get(args["RATES_KEY"], ())
            elem = args["g_ptr"].element_size()
        out, seen = [], set()
        for cfg in configs:
            if _acc_regs(n_acc, cfg) > 128:
                continue
            bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
            if cfg.num_stages * (bm * bk + n_acc * bk * bn) * elem > SHARED_BYTES:
                continue  # the centre loop buffers the input tile and one weight block a branch
            if cfg.kwargs["BLOCK_N"] > 2 * triton.next_power_of_2(max(n_out, 16)):
                continue  # a block mostly past the last channel
            for tw in _tile_candidates(h, w, bm, rates):
                key = (bm, tw, bn, bk, cfg.kwargs["FLAT"], cfg.num_warps, cfg.num_stages)
                if key not in seen:
                    seen.add(key)
                    out.append(triton.Config({**cfg.kwargs, "TILE_W": tw}, num_warps=cfg.num_warps,
                                             num_stages=cfg.num_stages))
        if not out:  # nothing fits: the smallest Hopper-shaped block
            out = [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "FLAT": True,
                                  "TILE_W": tile_width(h, w, 64)}, num_warps=8, num_stages=3)]
        return out
    return prune


# The heuristic's tap loop (tiles.branch_taps): one pipelined loop over a branch's live (tap, K chunk) pairs.
FLAT_DEFAULT = True

# Under the interpreter each Triton op costs about the same whatever its size, so fewer, larger blocks run
# faster; 32 pixels still makes several tiles of the tests' maps, which the skipping test needs.
INTERP_BLOCK_M = 32


def conv_heuristic(h: int, w: int, n_out: int, n_acc: int, dtype: torch.dtype, n_pixels: int,
                   device: torch.device, rates: tuple = ()) -> dict:
    """The forward / dgrad launch config without autotuning (and the only one under the interpreter)."""
    if device.type != "cuda":
        # Interpreter: the smallest blocks tl.dot takes, so CPU tests stay fast.
        return dict(BLOCK_M=INTERP_BLOCK_M, TILE_W=tile_width(h, w, INTERP_BLOCK_M, rates), BLOCK_N=32, BLOCK_K=32,
                    FLAT=FLAT_DEFAULT, num_warps=4, num_stages=1)
    block_m = 128 if n_pixels >= 16 * 1024 else 64
    block_n = 128 if n_acc <= 2 and n_out > 64 else 64
    block_k = 32 if dtype == torch.float32 else 64
    # fp32 operands double the registers of the dot's fragments: 4 warps spill there
    warps = 4 if n_acc * block_m * block_n / (32 * 4) <= 64 and dtype != torch.float32 else 8
    while n_acc * block_m * block_n / (32 * warps) > 128 and block_m > 64:
        block_m //= 2
    return dict(BLOCK_M=block_m, TILE_W=tile_width(h, w, block_m, rates), FLAT=FLAT_DEFAULT, BLOCK_N=block_n, BLOCK_K=block_k,
                num_warps=warps, num_stages=3)


# Wgrad: BLOCK_C input channels x BLOCK_N output channels, K = pixels. The pixel tile (BLOCK_P, TILE_W) fixes
# the order of the sums, so it is chosen by the heuristic only and never tuned: the weight grads stay bitwise
# equal whichever config wins.
WGRAD_CONFIGS = [
    triton.Config({"BLOCK_C": 128, "BLOCK_N": 128}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_C": 128, "BLOCK_N": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_C": 64, "BLOCK_N": 128}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_C": 128, "BLOCK_N": 256}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_C": 64, "BLOCK_N": 64}, num_warps=4, num_stages=3),
]


def wgrad_prune(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    out = [cfg for cfg in configs
           if cfg.kwargs["BLOCK_C"] <= 2 * triton.next_power_of_2(max(args["C"], 16))
           and cfg.kwargs["BLOCK_N"] <= 2 * triton.next_power_of_2(max(args["CO"], 16))]
    return out or configs[-1:]


def wgrad_heuristic(c: int, co: int, dtype: torch.dtype, device: torch.device) -> dict:
    if device.type != "cuda":
        return dict(BLOCK_C=32, BLOCK_N=64, num_warps=4, num_stages=1)
    block_n = 128 if co > 64 else 64
    block_c = 128 if c > 64 else 64
    return dict(BLOCK_C=block_c, BLOCK_N=block_n, num_warps=8 if block_c * block_n >= 128 * 128 else 4,
                num_stages=3)


def wgrad_pixel_tile(h: int, w: int, dtype: torch.dtype, device: torch.device) -> tuple[int, int]:
    """(BLOCK_P, TILE_W): the pixel tile of the wgrad K loop."""
    block_p = INTERP_BLOCK_M if device.type != "cuda" else (32 if dtype == torch.float32 else 64)
    return block_p, tile_width(h, w, block_p)


# ---------------------------------------------------------------------------------------------- second design

# What the work list is built for: fixed by v2_config, never tuned (the jobs and their order depend on them).
V2_TILE_PARAMS = ("STACK", "TILE_H", "TILE_W", "BLOCK_M", "BLOCK_K")


def v2_prune(configs, named_args, **kwargs):
    """Drop the candidates wider than the channels they cover, and 256-wide fp32 blocks (their operand
    fragments double the registers); keep at least one."""
    args = {**named_args, **kwargs}
    n_out = args["CO"] if "x_ptr" in args else args["C"]
    fp32 = (args["x_ptr"] if "x_ptr" in args else args["g_ptr"]).element_size() == 4
    out = [c for c in configs if c.kwargs["BLOCK_N"] <= max(16, triton.next_power_of_2(n_out))
           and not (fp32 and c.kwargs["BLOCK_N"] > 128)]
    return out or configs[-1:]


# The opt-in candidates (RESASPP_TRITON_AUTOTUNE=1): at most 6 a kernel, over the heuristic's tile.
V2_TUNED = [
    triton.Config({"BLOCK_N": 256, "STAGES": 3}, num_warps=8),
    triton.Config({"BLOCK_N": 256, "STAGES": 4}, num_warps=8),
    triton.Config({"BLOCK_N": 128, "STAGES": 3}, num_warps=8),
    triton.Config({"BLOCK_N": 128, "STAGES": 4}, num_warps=8),
    triton.Config({"BLOCK_N": 128, "STAGES": 3}, num_warps=4),
    triton.Config({"BLOCK_N": 64, "STAGES": 4}, num_warps=4),
]


@functools.lru_cache(maxsize=4096)
def v2_config(n: int, h: int, w: int, n_out: int, dtype: torch.dtype, device: torch.device, rates: tuple) -> dict:
    """The second design's launch config of a forward (n_out = Co) or dgrad (n_out = C) on n images of h x w.

    BLOCK_M output pixels (128 on a GPU: two warpgroups of m64 wgmma) as a TILE_H x TILE_W tile of the least
    work (tile_width); a map of at most half a block is one tile, and STACK images share a job. BLOCK_N = all
    the channels up to 256 (one job a branch at Co = 256: wgmma m64n256), 128 in fp32 (TF32 operands take twice
    the registers). BLOCK_K 64 (32 in fp32), 3 pipeline stages: (128 x 64 + 64 x 256) x 2 B = 48 KiB a stage.
    """
    if device.type != "cuda":  # the interpreter: the smallest blocks tl.dot takes, so CPU tests stay fast
        block_m, block_n, block_k, stages, warps = INTERP_BLOCK_M, 32, 32, 1, 4
    else:
        fp32 = dtype == torch.float32
        block_m = 128
        block_n = min(128 if fp32 else 256, max(16, triton.next_power_of_2(n_out)))
        block_k = 32 if fp32 else 64
        stages, warps = 3, 8
    pixels = h * w
    if 2 * pixels <= block_m:
        tile_h, tile_w, stack = h, w, max(1, min(block_m // pixels, n))
    else:
        tile_w = tile_width(h, w, block_m, rates)
        tile_h, stack = block_m // tile_w, 1
    return dict(STACK=stack, TILE_H=tile_h, TILE_W=tile_w, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                STAGES=stages, num_warps=warps)


def separable_config(kind: str, n: int, h: int, w: int, c: int, co: int, dtype: torch.dtype, device: torch.device,
                     rates: tuple) -> dict:
    """The launch config of a separable kernel (backend/triton/separable_*.py) on n images of h x w.

    kind "forward": v2_config's tile and BLOCK_N = Co (one job a branch), BLOCK_K 32 on a GPU: the depthwise
    block [BLOCK_M, BLOCK_K] is an fp32 register tile beside the [BLOCK_M, BLOCK_N] accumulator.
    kind "dgrad": the same tiles; BLOCK_N = a block of up to 128 input channels, 64 in fp32 (the recomputed
    depthwise block [BLOCK_M, BLOCK_N] is a second fp32 register tile), BLOCK_K = the Co chunk of the grad GEMM.
    kind "stencil": the same tiles, BLOCK_N = 64 channels, 8 warps (no MMA: the depthwise transpose and weight
    grad; with 4 warps they spilled 1-2 KiB on the awkward test shapes).
    kind "pw_wgrad": the same tiles as the GEMM's K walk, BLOCK_C = 64 input channels (the recomputed depthwise
    block [BLOCK_M, BLOCK_C] in fp32 registers beside the accumulator) x BLOCK_N = Co output channels.
    (sm_90a lowering, benchmarks/NOTES.md: BLOCK_C 128 spilled 580 B at Co = 256.)
    """
    base = v2_config(n, h, w, co, dtype, device, rates)
    tile = {key: base[key] for key in ("STACK", "TILE_H", "TILE_W", "BLOCK_M")}
    gpu = device.type == "cuda"
    if kind == "forward":
        return dict(base, BLOCK_K=32 if gpu else base["BLOCK_K"])
    if kind == "dgrad":
        block_n = min(64 if dtype == torch.float32 else 128, max(16, triton.next_power_of_2(c))) if gpu else 32
        return dict(tile, BLOCK_N=block_n, BLOCK_K=64 if gpu else 32, STAGES=3 if gpu else 1,
                    num_warps=8 if gpu else 4)
    if kind == "stencil":
        return dict(tile, BLOCK_N=min(64, max(16, triton.next_power_of_2(c))) if gpu else 32,
                    num_warps=8 if gpu else 4)
    if kind == "pw_wgrad":
        block_n = min(256 if dtype != torch.float32 else 128, max(16, triton.next_power_of_2(co))) if gpu else 32
        block_c = min(64, max(16, triton.next_power_of_2(c))) if gpu else 32
        return dict(tile, BLOCK_C=block_c, BLOCK_N=block_n, num_warps=8 if gpu else 4)
    raise ValueError(f"unknown separable kernel kind {kind!r}")
