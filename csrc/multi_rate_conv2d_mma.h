// The mma.sync kernels (sm_80 and newer: ldmatrix + mma.sync m16n8k16 for fp16 / bf16, m16n8k8 TF32 for
// fp32, 64 x 64 warp tiles, a 4-stage cp.async pipeline): host entry points. The forward and dgrad walk
// the jobs of resaspp_ops/backend/jobs.py (a job: a tile's branch, or a tile's block of input channels
// with every branch's live taps); wgrad walks each tap's valid pixels in one fixed order.
// Tensors are NHWC (channels_last); see multi_rate_conv2d.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "job_geometry.h"

namespace resaspp {
namespace mma {

constexpr int kBlockM = 128;   // pixel rows of a job (forward, dgrad) or output channels (wgrad)
constexpr int kBlockN = 128;   // output channels of a forward job, input channels of a dgrad / wgrad one
constexpr int kStages = 4;

// out[N, H, W, (1+B) Co] (channels_last [N, (1+B) Co, H, W]) = the forward with its epilogue.
//   x       [N, C, H, W] channels_last, 16-byte aligned; fp16 / bf16, or fp32 (TF32 MMAs)
//   w1      [Co, C, 1, 1], w3 [B, Co, C, 3, 3]: C innermost with 16-byte aligned rows (w3: each branch
//           channels_last), x's dtype
//   jobs    int32 [J, 4] (image, tile, branch, taps) on x's device; g: the plan's geometry (k_chunks unused)
//   scale, shift  [(1+B) Co] fp32 or undefined
void forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& out,
             const at::Tensor& scale, const at::Tensor& shift, bool relu, const at::Tensor& jobs,
             const JobGeometry& g);

// grad_x[N, C, H, W] (channels_last) = sum over branches and live taps of grad_b shifted by -d times W^T.
//   grad    [N, (1+B) Co, H, W] channels_last, 16-byte aligned
//   jobs    int32 [J, 4] (image, tile, 128-channel block of C, live taps); masks int32 [tiles, 1+B] (dgrad)
void dgrad(const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& grad_x,
           const at::Tensor& jobs, const at::Tensor& masks, const JobGeometry& g);

// dw[T, Co, C] fp32 = per tap, the sum over its valid pixels (fixed order) of grad_b^T x shifted by d.
//   grad [N, (1+B) Co, H, W], x [N, C, H, W], channels_last and 16-byte aligned; g: rates and sizes
void wgrad(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dw, const JobGeometry& g);

// The separable op's pointwise GEMMs on the same kernels (csrc/separable.cpp), a single 1x1 "branch":
// out[p, m] = sum_k in[p, in_offset + k] w[m, k]: in NHWC with in_cstride elements a pixel (16-byte aligned
// rows and offset), w [M, K] K innermost, out [P, M] contiguous; jobs: centre-only jobs of the plan's tiles,
// g: sizes with g.C = K, g.Co = M, one branch.
void pointwise(const at::Tensor& in, int64_t in_offset, int64_t in_cstride, const at::Tensor& w, at::Tensor& out,
               const at::Tensor& jobs, const JobGeometry& g);
// wgrad with the grad read at `offset` elements into pixel rows of `cstride` elements (g: one branch): dw[1, Co, C].
void wgrad_strided(const at::Tensor& grad, int64_t offset, int64_t cstride, const at::Tensor& x, at::Tensor& dw,
                   const JobGeometry& g);

}  // namespace mma
}  // namespace resaspp
