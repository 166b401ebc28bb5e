// The separable multi-rate convolution (multi_rate_separable_conv2d, DESIGN.md section 4 "Separable
// branches"): CUDA entry points (separable.cpp) and the kernel launchers (separable_forward.cu,
// separable_backward.cu). The operands are those of resaspp_ops/backend/separable_plan.py, every branch
// alike (branch 0 = the 1x1, its depthwise the identity centre tap, no mid stage):
//   x          [N, C, H, W] channels_last (NHWC in memory)
//   dw         [1+B, 9, C] in the accumulation dtype (fp32; fp64 for fp64 x), tap ky * 3 + kx
//   pw         [1+B, C, Co] in x's dtype, K-major (row c holds the Co output channels)
//   mid_scale, mid_shift  [(1+B) C] accumulation dtype or undefined (branch 0: ones / zeros)
//   out        [N, (1+B) Co, H, W] channels_last, branch b at channel offset b Co
// Kernel families: "mma" (ldmatrix + mma.sync m16n8k16 fp16 / bf16, m16n8k8 TF32 for fp32; C and Co
// multiples of 8) and "simt" (FMAs in the accumulation dtype: fp16 / bf16 / fp32 / fp64, any shape).
#pragma once

#include <ATen/core/Tensor.h>

#include "job_geometry.h"

#include <optional>
#include <string>
#include <vector>

namespace resaspp {
namespace separable {

constexpr int kBlockM = 128;  // pixel rows of a forward job (resaspp_ops/backend/cuda_separable.py BLOCK_M)
constexpr int kBlockN = 128;  // output channels of an mma forward CTA
constexpr int kSimtN = 64;    // output channels of a simt forward CTA
constexpr int kSimtK = 16;    // channels of a simt K chunk
constexpr int kChunkPixels = 256;  // pixels of one fixed-order partial sum of the backward reductions

// The per-pixel geometry of the backward's depthwise passes: branch `rate`, its taps (bit ky * 3 + kx).
struct PixelGeometry {
  int N, H, W, C, rate, taps;
};

// Launchers (separable_forward.cu). jobs int32 [J, 4] (image, tile, branch, taps), g its geometry.
void forward_mma(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& mid_scale,
                 const at::Tensor& mid_shift, bool mid_relu, const at::Tensor& scale, const at::Tensor& shift,
                 bool relu, at::Tensor& out, const at::Tensor& jobs, const JobGeometry& g);
void forward_simt(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& mid_scale,
                  const at::Tensor& mid_shift, bool mid_relu, const at::Tensor& scale, const at::Tensor& shift,
                  bool relu, at::Tensor& out, const at::Tensor& jobs, const JobGeometry& g);

// Launchers (separable_backward.cu); dw_b, ms_b, mt_b are branch b's rows ([9, C], [C]) or undefined.
// a[P, C] = mid_b(depthwise_b(x)) cast to x's dtype (the pointwise A operand, recomputed).
void activation(const at::Tensor& x, const at::Tensor& dw_b, const at::Tensor& ms_b, const at::Tensor& mt_b,
                bool mid_relu, const PixelGeometry& g, at::Tensor& a);
// buf[P, C]: dA in, dD = dM * s out (dM = dA where m = D s + t > 0 or no mid ReLU); part_scale / part_shift
// [chunks, C] (or undefined): per chunk of kChunkPixels pixels, sum dM D and sum dM.
void mid_backward(const at::Tensor& x, const at::Tensor& dw_b, const at::Tensor& ms_b, const at::Tensor& mt_b,
                  bool mid_relu, const PixelGeometry& g, at::Tensor& buf, at::Tensor& part_scale,
                  at::Tensor& part_shift);
// gx[P, C] (accumulation dtype) += the depthwise transpose of dd[P, C]: sum over taps of dd[p - d] w[tap].
void dgrad_stencil(const at::Tensor& dd, const at::Tensor& dw_b, const PixelGeometry& g, at::Tensor& gx);
// part[chunks, 9, C] = per chunk, sum over its pixels of dd[p, c] x[p + d, c] (0 for taps not in g.taps).
void wgrad_dw(const at::Tensor& dd, const at::Tensor& x, const PixelGeometry& g, at::Tensor& part);

// Python entry points (separable.cpp): checks, layouts and the launch.
at::Tensor forward_cuda(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw,
                        const std::optional<at::Tensor>& mid_scale, const std::optional<at::Tensor>& mid_shift,
                        bool mid_relu, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                        bool relu, const std::vector<int64_t>& rates, const std::string& kernel,
                        const at::Tensor& jobs, const std::vector<int64_t>& tile);
at::Tensor activation_cuda(const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& mid_scale,
                           const std::optional<at::Tensor>& mid_shift, bool mid_relu, int64_t branch, int64_t rate,
                           at::Tensor& out);
std::vector<at::Tensor> mid_backward_cuda(const at::Tensor& x, const at::Tensor& dw,
                                          const std::optional<at::Tensor>& mid_scale,
                                          const std::optional<at::Tensor>& mid_shift, bool mid_relu, int64_t branch,
                                          int64_t rate, at::Tensor& buf, bool need_mid);
void dgrad_stencil_cuda(const at::Tensor& dd, const at::Tensor& dw, int64_t branch, int64_t rate,
                        const std::vector<int64_t>& shape, at::Tensor& gx);
at::Tensor wgrad_dw_cuda(const at::Tensor& dd, const at::Tensor& x, int64_t rate);
// The backward's pointwise GEMMs on the mma.sync kernels of multi_rate_conv2d_mma.h (fp16 / bf16 / fp32 as
// TF32, C and Co multiples of 8). grad [N, (1+B) Co, H, W] channels_last, its branch's channels:
//   pointwise_dgrad: out[P, C] = G_b pw[branch]^T over the jobs (centre-only jobs of the plan's tiles)
//   pointwise_wgrad: returns [Co, C] fp32 = G_b^T a, a [P, C] (A_b, or x for the 1x1): split over groups of
//                    whole images (fixed split points), each walked in one fixed pixel order, summed in order
void pointwise_dgrad_cuda(const at::Tensor& grad, int64_t branch, const at::Tensor& pw, at::Tensor& out,
                          const at::Tensor& jobs, const std::vector<int64_t>& tile);
at::Tensor pointwise_wgrad_cuda(const at::Tensor& grad, int64_t branch, const at::Tensor& a, int64_t Co);

}  // namespace separable
}  // namespace resaspp
