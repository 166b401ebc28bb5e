"""Triton backend (issue #3): fused multi-rate forward, dgrad and wgrad kernels.

    forward_kernel.py  the 1x1 + atrous branches in one pass, shared centre read, padding taps skipped
    dgrad.py           grad_x from the grads of all branches in one pass, no atomics, same skipping
    wgrad.py           grad_w1x1 / grad_w3x3, one GEMM a tap over the valid pixels only, fixed-order split-K
    tiles.py           the 2-D tiles and the tap loop the forward and dgrad share
    configs.py         autotuning lists, the heuristic default, the switches

Runs CUDA tensors, and CPU tensors through Triton's interpreter when TRITON_INTERPRET=1 (for tests). The
kernels are imported on first use, never at package import; Triton fixes compiled-or-interpreted when they
are, so the first use in a process decides.

Debug: `with count_tap_tiles() as counter:` makes the kernels count the tap-tiles they process (atomic adds
into an int32 counter, compiled out otherwise: COUNT is a constexpr); see TapTileCounter.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import zlib
from types import SimpleNamespace

import torch

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except ImportError as exc:  # an old or broken triton counts as missing
        return f"triton cannot be imported ({exc})"
    return None


@functools.lru_cache(maxsize=None)
def _interpreter_numpy_conflict() -> str | None:
    """Triton before 3.7 turns a one-element array into an int in its interpreter in a way NumPy 2.4 made an
    error (triton-lang/triton#9171): every kernel would fail with an opaque InterpreterError."""
    import numpy
    import triton

    def release(text: str) -> tuple:
        return tuple(int(part) for part in text.split("+")[0].split(".")[:2])

    if release(triton.__version__) < (3, 7) and release(numpy.__version__) >= (2, 4):
        return (f"Triton {triton.__version__}'s interpreter fails with NumPy {numpy.__version__} "
                "(triton-lang/triton#9171): install numpy<2.4 or a newer Triton")
    return None


_KERNELS = None


def _kernels() -> SimpleNamespace:
    """The kernel modules, imported (and so compiled-or-interpreted) on first use."""
    global _KERNELS
    if _KERNELS is None:
        from triton.runtime.interpreter import InterpretedFunction

        # forward_kernel, not forward: importing a submodule sets it as an attribute of this package,
        # which would shadow the backend's forward().
        from resaspp_ops.backend.triton import configs, dgrad, forward_kernel, wgrad

        interpreted = isinstance(forward_kernel._forward_kernel, InterpretedFunction)
        _KERNELS = SimpleNamespace(configs=configs, forward=forward_kernel, dgrad=dgrad, wgrad=wgrad,
                                   interpreted=interpreted)
    return _KERNELS


def kernels_mode() -> str | None:
    """"interpreted" or "compiled" once the kernels are loaded in this process, else None."""
    if _KERNELS is None:
        return None
    return "interpreted" if _KERNELS.interpreted else "compiled"


def _interpret_requested() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    if dtype == torch.float64:
        return False, ("float64 is not supported: tl.dot has no fp64 tensor-core path "
                       "(the reference and cuda backends run float64)")
    if dtype not in _DTYPES:
        return False, f"{dtype} is not supported (float16, bfloat16 and float32 are)"
    why = _triton_import_error()
    if why:
        return False, why
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "no CUDA device is visible"
        if dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) < (8, 0):
            return False, "bfloat16 tl.dot needs compute capability 8.0 or newer"
        if kernels_mode() == "interpreted":
            return True, "Triton kernels, interpreted (TRITON_INTERPRET=1 was set when they were loaded)"
        return True, "Triton kernels"
    if device.type == "cpu":
        if not _interpret_requested():
            return False, "CPU tensors run only through Triton's interpreter: set TRITON_INTERPRET=1 (slow, for tests)"
        conflict = _interpreter_numpy_conflict()
        if conflict:
            return False, conflict
        if kernels_mode() == "compiled":
            return False, ("the Triton kernels were loaded for the GPU in this process before TRITON_INTERPRET=1 "
                           "was set; set it before their first use")
        return True, "Triton kernels through Triton's interpreter (TRITON_INTERPRET=1)"
    return False, f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {device.type}"


# ---------------------------------------------------------------------------------------------- debug counter

class TapTileCounter:
    """What the kernels did while count_tap_tiles() was active: one record a launch.

    forward / dgrad record: kernel, tap_tiles (centre taps of every branch + live off-centre taps, summed over
    programs), programs, n_img, h, w, tile_h, tile_w, rates (of the launch), branches (accumulated branches).
    wgrad record: kernel, centre_tiles and tap_tiles (pixel tiles the centre job and the off-centre jobs walked,
    summed over programs), and the launch's shape and pixel tile.
    """

    def __init__(self):
        self.records: list[dict] = []

    def total(self, kernel: str, field: str = "tap_tiles") -> int:
        return sum(r[field] for r in self.records if r["kernel"] == kernel)


_COUNTER: TapTileCounter | None = None


@contextlib.contextmanager
def count_tap_tiles():
    """Count the tap-tiles the kernels process (debug; adds a sync a launch, and never autotunes)."""
    global _COUNTER
    previous, _COUNTER = _COUNTER, TapTileCounter()
    try:
        yield _COUNTER
    finally:
        _COUNTER = previous


# ---------------------------------------------------------------------------------------------- host side

def _nhwc(t: torch.Tensor) -> torch.Tensor:
    """[N, C, H, W] in any memory format -> a dense [N, H, W, C] tensor (no copy when already channels_last)."""
    return t.permute(0, 2, 3, 1).contiguous()


def _device_guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _rates_key(rates) -> int:
    return zlib.crc32(",".join(map(str, rates)).encode()) & 0x7FFFFFFF


@functools.lru_cache(maxsize=256)
def _rates_tensor(rates: tuple, device: torch.device) -> torch.Tensor:
    return torch.tensor(rates, dtype=torch.int32, device=device)


def _upcast(k, x) -> bool:
    """Interpreter only: its tl.dot cannot multiply bf16, so bf16 tiles are widened to fp32 first."""
    return k.interpreted and x.dtype == torch.bfloat16


def _conv_config(k, t, h, w, n_out, n_acc, rates):
    """None (autotune) or the heuristic config of a forward / dgrad launch."""
    if _COUNTER is None and k.configs.autotune_enabled(t.device):
        return None
    return k.configs.conv_heuristic(h, w, n_out, n_acc, t.dtype, t.shape[0] * h * w, t.device, tuple(rates))


def forward(x, w1x1, w3x3, rates, scale, shift, relu):
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    out_c = (1 + b) * co
    out_nhwc = torch.empty((n, h, w, out_c), dtype=x.dtype, device=x.device)
    out = out_nhwc.permute(0, 3, 1, 2)  # channels_last [N, (1+B)*Co, H, W]
    if out.numel() == 0:
        return out
    k = _kernels()
    xh = _nhwc(x)
    w1p = w1x1.reshape(co, c).t().contiguous()                               # [C, Co]
    w3p = w3x3.permute(0, 3, 4, 2, 1).reshape(b, 9, c, co).contiguous()     # [B, 9, C, Co]
    scale = None if scale is None else scale.to(torch.float32).contiguous()
    shift = None if shift is None else shift.to(torch.float32).contiguous()
    idx64 = k.configs.needs_int64(h * w * max(c, out_c))
    precision = k.configs.dot_precision(x.dtype)
    step = k.forward.MAX_ATROUS
    with _device_guard(x):
        for g0 in range(0, b, step):
            group = tuple(rates[g0:g0 + step])
            has_1x1 = g0 == 0
            n_acc = len(group) + int(has_1x1)
            config = _conv_config(k, x, h, w, co, n_acc, group)
            counter = None if _COUNTER is None else torch.zeros(1, dtype=torch.int32, device=x.device)
            used = k.forward.run(xh, w1p, w3p[g0:g0 + len(group)], out_nhwc, scale, shift, relu, counter,
                                 ch_atrous=(1 + g0) * co, rates=group, has_1x1=has_1x1, idx64=idx64,
                                 precision=precision, upcast=_upcast(k, x), config=config)
            if counter is not None:
                _record("forward", counter, used, n, h, w, co, group, n_acc)
    return out


def _record(kernel, counter, used, n, h, w, n_out, rates, branches):
    cdiv = _kernels().configs.cdiv
    tile_w = used["TILE_W"]
    tile_h = used["BLOCK_M"] // tile_w
    programs = n * cdiv(h, tile_h) * cdiv(w, tile_w) * cdiv(n_out, used["BLOCK_N"])
    _COUNTER.records.append(dict(kernel=kernel, tap_tiles=int(counter[0].item()), programs=programs, n_img=n,
                                 h=h, w=w, tile_h=tile_h, tile_w=tile_w, rates=tuple(rates), branches=branches))


def _wgrad_splits(k, x, c, gc, co, b, iters, config) -> int:
    """Split-K factor: enough programs to fill the GPU, each split still a long K loop."""
    if not x.is_cuda:
        return 2 if iters >= 2 else 1  # the interpreter exercises the reduction path
    cdiv = k.configs.cdiv
    blocks = cdiv(c, config["BLOCK_C"]) * (cdiv(gc, config["BLOCK_N"]) + 8 * b * cdiv(co, config["BLOCK_N"]))
    splits = min(cdiv(2 * k.configs.sm_count(x.device.index or 0), blocks), 16, max(1, iters // 8))
    partial_bytes = 4 * c * (gc + 8 * b * co)
    while splits > 1 and splits * partial_bytes > (512 << 20):
        splits -= 1
    return max(splits, 1)


def _dgrad(k, g, x, w1x1, w3x3, rates, rates_t, key):
    """grad_x [N, C, H, W] channels_last from the NHWC pre-epilogue grad g."""
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    gc = (1 + b) * co
    gx_nhwc = torch.empty((n, h, w, c), dtype=x.dtype, device=x.device)
    wc = torch.cat([w1x1.reshape(co, c), w3x3[:, :, :, 1, 1].reshape(b * co, c)]).contiguous()   # [GC, C]
    wd = w3x3.flip(3, 4).permute(0, 3, 4, 1, 2).reshape(b, 9, co, c).contiguous()               # [B, 9, Co, C]
    config = _conv_config(k, x, h, w, c, 1, rates)
    k.configs.RATES_BY_KEY[key] = tuple(rates)
    counter = None if _COUNTER is None else torch.zeros(1, dtype=torch.int32, device=x.device)
    with _device_guard(x):
        used = k.dgrad.run(g, wc, wd, rates_t, gx_nhwc, counter, rates_key=key,
                           idx64=k.configs.needs_int64(h * w * max(c, gc)),
                           precision=k.configs.dot_precision(x.dtype), upcast=_upcast(k, x), config=config)
    if counter is not None:
        _record("dgrad", counter, used, n, h, w, c, rates, 1 + b)
    return gx_nhwc.permute(0, 3, 1, 2)


def _wgrad(k, g, x, rates, rates_t, key, co) -> torch.Tensor:
    """[C, (1+B)*Co + 8*B*Co] fp32: the centre columns of all branches, then each branch's 8 off-centre taps."""
    n, c, h, w = x.shape
    b = len(rates)
    gc = (1 + b) * co
    flat = torch.empty((c, gc + 8 * b * co), dtype=torch.float32, device=x.device)  # every element written
    block_p, tile_w = k.configs.wgrad_pixel_tile(h, w, x.dtype, x.device)
    heuristic = k.configs.wgrad_heuristic(c, co, x.dtype, x.device)
    iters = n * k.configs.cdiv(h, block_p // tile_w) * k.configs.cdiv(w, tile_w)
    splits = _wgrad_splits(k, x, c, gc, co, b, iters, heuristic)
    tune = _COUNTER is None and k.configs.autotune_enabled(x.device)
    counter = None if _COUNTER is None else torch.zeros(2, dtype=torch.int32, device=x.device)
    with _device_guard(x):
        k.wgrad.run(_nhwc(x), g, rates_t, flat, counter, splits=splits, rates_key=key,
                    idx64=k.configs.needs_int64(n * h * w * max(c, gc)), precision=k.configs.dot_precision(x.dtype),
                    upcast=_upcast(k, x), block_p=block_p, tile_w=tile_w, config=None if tune else heuristic)
    if counter is not None:
        _COUNTER.records.append(dict(kernel="wgrad", centre_tiles=int(counter[0].item()),
                                     tap_tiles=int(counter[1].item()), n_img=n, h=h, w=w,
                                     tile_h=block_p // tile_w, tile_w=tile_w, rates=tuple(rates), splits=splits))
    return flat


def backward(grad, x, w1x1, w3x3, rates, need_x, need_w):
    n, c, h, w = x.shape
    b, co = len(rates), w1x1.shape[0]
    gc = (1 + b) * co
    grad_x = grad_w1x1 = grad_w3x3 = None
    if n * h * w == 0:  # nothing to launch: an empty grad_x, zero weight grads
        if need_x:
            grad_x = torch.empty_like(x, memory_format=torch.channels_last)
        if need_w:
            grad_w1x1, grad_w3x3 = torch.zeros_like(w1x1), torch.zeros_like(w3x3)
        return grad_x, grad_w1x1, grad_w3x3
    k = _kernels()
    g = _nhwc(grad.to(x.dtype))
    rates_t = _rates_tensor(tuple(rates), x.device)
    key = _rates_key(rates)
    if need_x:
        grad_x = _dgrad(k, g, x, w1x1, w3x3, rates, rates_t, key)
    if need_w:
        flat = _wgrad(k, g, x, rates, rates_t, key, co)
        # Straight from the fp32 columns into the weights' dtype and layout, one strided copy each: no fp32
        # intermediate of the weights' size (56 MiB at C=2048, Co=256, B=3) at the peak of the backward.
        grad_w1x1 = torch.empty((co, c, 1, 1), dtype=w1x1.dtype, device=x.device)
        grad_w1x1.view(co, c).copy_(flat[:, :co].t())
        grad_w3x3 = torch.empty((b, co, c, 3, 3), dtype=w3x3.dtype, device=x.device)
        by_tap = grad_w3x3.view(b, co, c, 9)                                      # tap ky * 3 + kx
        taps = flat[:, gc:].reshape(c, b, 8, co).permute(1, 3, 0, 2)              # [B, Co, C, 8]: the other taps
        by_tap[..., 4].copy_(flat[:, co:gc].reshape(c, b, co).permute(1, 2, 0))   # [B, Co, C]: the centre tap
        by_tap[..., :4].copy_(taps[..., :4])
        by_tap[..., 5:].copy_(taps[..., 4:])
    return grad_x, grad_w1x1, grad_w3x3
