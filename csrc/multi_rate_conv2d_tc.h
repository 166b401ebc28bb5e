// Tensor-core (fp16 / bf16, fp32 accumulate) kernels of the fused multi-rate convolution: host
// entry points, called by the host functions of multi_rate_conv2d_simt.cu when
// tensor_cores_apply() says so. Tensors are NHWC (channels_last); see multi_rate_conv2d.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "tap_table.h"

namespace resaspp {
namespace tc {

// Channels per 16-byte cp.async vector: C and Co must be multiples of it.
constexpr int kVec = 8;

// Whether the tensor-core kernels run for this call. False for fp32/fp64, for C or Co not a
// multiple of kVec, on devices below sm_80, and when RESASPP_CUDA_KERNEL=simt. With
// RESASPP_CUDA_KERNEL=tc, an inapplicable call is an error instead of a silent fallback.
bool tensor_cores_apply(const at::Tensor& x, int64_t C, int64_t Co);

// out[N, H, W, (1+B)*Co] (channels_last [N, (1+B)*Co, H, W]) = the fused forward with epilogue.
//   x     [N, C, H, W] channels_last, 16-byte aligned
//   wpk   [T, C, Co] packed weights (pack_weights(transpose=false)), T = 1 + 9B
//   scale, shift  [(1+B)*Co] fp32 or undefined
void forward(const at::Tensor& x, const at::Tensor& wpk, at::Tensor& out, const at::Tensor& scale,
             const at::Tensor& shift, bool relu, const TapTable& taps, int num_branches);

// grad_x[N, C, H, W] (channels_last) = sum over all taps of grad_b shifted by -d times wpk_t[t].
//   grad   [N, (1+B)*Co, H, W] channels_last, 16-byte aligned
//   wpk_t  [T, Co, C] transposed packed weights; taps hold the negated offsets
void dgrad(const at::Tensor& grad, const at::Tensor& wpk_t, at::Tensor& grad_x, const TapTable& taps);

// dw[T, Co, C] fp32 = per tap, sum over its valid pixels of grad_b^T x_shifted (fixed order).
//   grad [N, (1+B)*Co, H, W], x [N, C, H, W], both channels_last and 16-byte aligned
void wgrad(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dw, const TapTable& taps);

}  // namespace tc
}  // namespace resaspp
