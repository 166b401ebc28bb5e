"""CUDA C++ backend of the separable op (multi_rate_separable_conv2d): the kernels of csrc/separable_*.cu in
resaspp_ops._C. The contract is backend/reference_separable.py's; the operands and jobs are the shared
host planning's (backend/separable_plan.py pack_weights, backend/jobs.py job_plan).

Forward (csrc/separable_forward.cu): one CTA per job (a tile's branch, all Co in CTA-wide blocks), the K
loop over chunks of C: the job's live taps of x (per-pixel zero fill at the borders), the depthwise taps
multiply-added in fp32 registers, the mid stage (scale, shift, ReLU; the identity for the 1x1), cast,
stored to shared memory as the A operand of the pointwise GEMM; the depthwise output never reaches
global memory; then the epilogue into the concatenated channels_last output. Two kernel families:

    mma   ldmatrix + mma.sync m16n8k16 (fp16 / bf16), m16n8k8 TF32 for fp32 where PyTorch's cuDNN switch
          allows TF32 (torch.backends.cudnn.allow_tf32); C and Co multiples of 8; 128 x 128 CTAs
    simt  FMAs in the accumulation dtype (fp32, fp64 for fp64): any shape, exact fp32 when TF32 is off

RESASPP_CUDA_KERNEL (read at every call, shared with the multi_rate_conv2d backend, as is cuda.use_kernel)
picks "auto" (mma where it can run, else simt), "mma" or "simt"; "sm90" raises (no sm_90a separable kernels
yet), and so does a named family that cannot run the call, with the reason: never a silent stand-in.

Backward (recompute: the forward stores no depthwise output), branch by branch with one [N H W, C]
temporary in x's dtype reused by every branch:

    A_b  = mid_b(depthwise_b(x)) cast          separable_activation (CUDA)      only for the weight grads
    grad Wpw_b = G_b^T A_b                     separable_pointwise_wgrad (mma) / torch.mm (simt)
    dA_b = G_b Wpw_b^T                         separable_pointwise_dgrad (mma) / torch.mm (simt), into the temporary
    dM = dA (0 where m <= 0 under the mid ReLU), dD = dM s, per-chunk sums of dM D and dM   separable_mid_backward (CUDA)
    grad_x += depthwise transpose of dD_b       separable_dgrad_stencil (CUDA, fp32 / fp64 accumulator)
    grad w_dw_b = per-chunk sum_p dD x[p + d]   separable_wgrad_dw (CUDA)

The pixel reductions are per-chunk partials (fixed pixel order inside a chunk) summed over the chunks by
torch.sum: bitwise reproducible, no float atomics. Where the mma family runs, the two pointwise GEMMs are
the multi_rate_conv2d mma.sync kernels with one 1x1 branch (csrc/multi_rate_conv2d_mma_*.cu: dA over the
plan's tiles, separable_plan.branch_jobs; the weight grad walking all pixels in one fixed order per output
block, no split-K); with simt they run on torch.mm (cuBLAS, deterministic; fp32 follows
torch.backends.cuda.matmul.allow_tf32, exact by default).

`_forward` and `_backward` take the kernels as an argument: tests/separable_emulation.py runs this very
host logic with NumPy emulations of the kernels on the CPU.
"""
from __future__ import annotations

import functools

import torch

from resaspp_ops.backend import cuda as _cuda
from resaspp_ops.backend import jobs as J
from resaspp_ops.backend.reference_separable import depthwise_moments as _reference_moments
from resaspp_ops.backend.separable_plan import branch_jobs, pack_weights
from resaspp_ops.op_common import accumulation_dtype

BLOCK_M = 128  # pixel rows of a job (csrc/separable.h kBlockM): the tile size the plan is built for
KERNELS = ("auto", "mma", "simt")


def availability(device: torch.device, dtype: torch.dtype) -> tuple[bool, str]:
    ok, why = _cuda.availability(device, dtype)
    if not ok:
        return ok, why
    if not hasattr(_cuda.extension(), "separable_forward"):
        return False, "resaspp_ops._C was built without the separable kernels (rebuild it)"
    return True, "resaspp_ops._C separable kernels (mma / simt, chosen per call: RESASPP_CUDA_KERNEL)"


def kernel_choice(device: torch.device, dtype: torch.dtype, c: int, co: int) -> tuple[str, str]:
    """(kernel family, why) for tensors of this device, dtype and channel counts; RuntimeError where
    cuda.use_kernel or RESASPP_CUDA_KERNEL names a family that cannot run them."""
    env = _cuda.requested_kernel()  # use_kernel's choice, else RESASPP_CUDA_KERNEL
    if env == "sm90":
        raise RuntimeError("RESASPP_CUDA_KERNEL=sm90 cannot run multi_rate_separable_conv2d: it has no sm_90a "
                           "kernels (mma or simt)")
    capability = _cuda._capability(device.index if device.index is not None else torch.cuda.current_device())
    if env != "auto":
        why = _cuda._why_not(env, capability, dtype, c, co)
        if why is not None:
            raise RuntimeError(f"RESASPP_CUDA_KERNEL={env} cannot run these tensors: {why}")
        return env, "RESASPP_CUDA_KERNEL"
    why = _cuda._why_not("mma", capability, dtype, c, co)
    return ("mma", "tensor cores") if why is None else ("simt", f"mma: {why}")


def plan(n: int, h: int, w: int, rates: tuple) -> J.JobPlan:
    """The forward's work list: jobs.job_plan on the tiles of BLOCK_M pixel rows (jobs.choose_tile)."""
    th, tw, stack = J.choose_tile(n, h, w, BLOCK_M)
    return J.job_plan(n, h, w, tuple(rates), th, tw, stack)


@functools.lru_cache(maxsize=256)
def _centre_jobs(p: J.JobPlan, device: torch.device) -> torch.Tensor:
    """int32 [T, 4] on `device`: the 1x1 branch's jobs of the plan (every tile once, centre tap only), the work
    list of the dA GEMM (separable_plan.branch_jobs)."""
    return torch.from_numpy(branch_jobs(p)[0].copy()).to(device)


def _aligned16(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy in its layout where its data does not start on a 16-byte boundary (a sliced view)."""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _forward(kernels, kernel, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu):
    n, c, h, w = x.shape
    if n * h * w * w1x1.shape[0] == 0:  # nothing to compute; the plan has no tiles to cover (H = 0 or W = 0)
        return x.new_empty((n, (1 + len(rates)) * w1x1.shape[0], h, w)).contiguous(memory_format=torch.channels_last)
    ops = pack_weights(w1x1, w_dw, w_pw, mid_scale, mid_shift, dtype=accumulation_dtype(x.dtype))
    p = plan(n, h, w, tuple(rates))
    return kernels.separable_forward(x.contiguous(memory_format=torch.channels_last), ops.dw, ops.pw, ops.mid_scale,
                                     ops.mid_shift, mid_relu, scale, shift, relu, list(rates), kernel,
                                     J.device_jobs(p, x.device), [p.tile_h, p.tile_w, p.stack])


def forward(x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale, shift, relu):
    kernel, _ = kernel_choice(x.device, x.dtype, x.shape[1], w1x1.shape[0])
    return _forward(_cuda.extension(), kernel, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, scale,
                    shift, relu)


def _no_pixel_grads(x, w1x1, w_dw, w_pw, mid_scale, mid_shift, need_x, need_w, need_mid):
    """The grads of a problem without pixels (N, H or W = 0): an empty grad_x, zeros for the rest, None where not
    requested (or, for mid_scale / mid_shift, not given)."""
    def zeros(t, wanted):
        return torch.zeros_like(t, memory_format=torch.contiguous_format) if wanted and t is not None else None
    grad_x = torch.empty_like(x, memory_format=torch.channels_last) if need_x else None
    return (grad_x, zeros(w1x1, need_w), zeros(w_dw, need_w), zeros(w_pw, need_w), zeros(mid_scale, need_mid),
            zeros(mid_shift, need_mid))


def _backward(kernels, kernel, grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid):
    if x.shape[0] * x.shape[2] * x.shape[3] == 0:
        return _no_pixel_grads(x, w1x1, w_dw, w_pw, mid_scale, mid_shift, need_x, need_w, need_mid)
    x = x.contiguous(memory_format=torch.channels_last)
    grad = grad.contiguous(memory_format=torch.channels_last)
    n, c, h, w = x.shape
    co, b = w1x1.shape[0], len(rates)
    acc = accumulation_dtype(x.dtype)
    ops = pack_weights(w1x1, w_dw, w_pw, mid_scale, mid_shift, dtype=acc)
    pixels = n * h * w
    x_rows = x.permute(0, 2, 3, 1).reshape(pixels, c)          # views: channels_last is NHWC in memory
    g_rows = grad.permute(0, 2, 3, 1).reshape(pixels, (1 + b) * co)
    has_mid = ops.mid_scale is not None or ops.mid_shift is not None or mid_relu
    buf = x.new_empty((pixels, c))                              # A_b, then dA_b -> dD_b, branch by branch
    gx = torch.zeros((pixels, c), dtype=acc, device=x.device) if need_x else None
    gpw = [None] * (1 + b)                                      # [Co, C] each
    gdw = torch.zeros((b, 9, c), dtype=acc, device=x.device) if need_w else None
    grad_scales, grad_shifts = [], []
    mma = kernel == "mma"
    if mma:
        p = plan(n, h, w, tuple(rates))
        jobs, tile = _centre_jobs(p, x.device), [p.tile_h, p.tile_w, p.stack]
        grad, x_rows = _aligned16(grad), _aligned16(x_rows)     # the kernels copy 16-byte vectors
    for br in range(1 + b):
        rate = 1 if br == 0 else int(rates[br - 1])
        g_b = g_rows[:, br * co:(br + 1) * co]
        if need_w:
            a = x_rows if br == 0 else kernels.separable_activation(x, ops.dw, ops.mid_scale, ops.mid_shift,
                                                                    mid_relu, br, rate, buf)
            gpw[br] = kernels.separable_pointwise_wgrad(grad, br, a, co) if mma else torch.mm(g_b.t(), a)
        if not (need_x or (br > 0 and (need_w or need_mid))):
            continue
        if mma:                                                 # dA_b
            kernels.separable_pointwise_dgrad(grad, br, ops.pw, buf, jobs, tile)
        else:
            torch.mm(g_b, ops.pw[br].t(), out=buf)
        if br > 0 and has_mid:                                  # dA_b -> dD_b, the mid-stage grads
            ps, pt = kernels.separable_mid_backward(x, ops.dw, ops.mid_scale, ops.mid_shift, mid_relu, br, rate, buf,
                                                    need_mid)
            if need_mid and ops.mid_scale is not None:
                grad_scales.append(ps.sum(dim=0))
            if need_mid and ops.mid_shift is not None:
                grad_shifts.append(pt.sum(dim=0))
        if need_x:
            kernels.separable_dgrad_stencil(buf, ops.dw, br, rate, [n, c, h, w], gx)
        if need_w and br > 0:
            gdw[br - 1] = kernels.separable_wgrad_dw(buf, x, rate).sum(dim=0)
    grad_x = grad_w1x1 = grad_w_dw = grad_w_pw = None
    if need_x:
        grad_x = gx.to(x.dtype).view(n, h, w, c).permute(0, 3, 1, 2)
    if need_w:
        grad_w1x1 = gpw[0].to(w1x1.dtype).reshape(co, c, 1, 1).contiguous()
        grad_w_pw = torch.stack(gpw[1:]).to(w_pw.dtype).reshape(b, co, c, 1, 1).contiguous()
        grad_w_dw = gdw.permute(0, 2, 1).reshape(b, c, 1, 3, 3).to(w_dw.dtype).contiguous()
    grad_mid_scale = torch.cat(grad_scales).to(mid_scale.dtype) if grad_scales else None
    grad_mid_shift = torch.cat(grad_shifts).to(mid_shift.dtype) if grad_shifts else None
    return grad_x, grad_w1x1, grad_w_dw, grad_w_pw, grad_mid_scale, grad_mid_shift


def backward(grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x, need_w, need_mid):
    kernel, _ = kernel_choice(x.device, x.dtype, x.shape[1], w1x1.shape[0])
    return _backward(_cuda.extension(), kernel, grad, x, w1x1, w_dw, w_pw, rates, mid_scale, mid_shift, mid_relu, need_x,
                     need_w, need_mid)


def depthwise_moments(x, w_dw, rates):
    """(sum, sum of squares) [B*C] of the depthwise outputs over (N, H, W), in the accumulation dtype: the
    reference backend's PyTorch composition (backend/reference_separable.py depthwise_moments, cuDNN's depthwise
    convolutions on the GPU), not a kernel of ours; differentiable, as the contract asks."""
    return _reference_moments(x, w_dw, rates)
