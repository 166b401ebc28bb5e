// The SIMT kernels (multi_rate_conv2d_simt.cu): exact fp32 / fp64 accumulation, any dtype and shape.
// Tensors are NHWC (channels_last); see multi_rate_conv2d.h.
#pragma once

#include <ATen/core/Tensor.h>

#include "job_geometry.h"

#include <cstdint>
#include <vector>

namespace resaspp {
namespace simt {

// out [N, (1+B) Co, H, W] channels_last = the forward with its epilogue (scale, shift in the acc dtype or
// undefined). x channels_last; the weights in any layout (packed into one [T, C, Co] buffer here).
void forward(const at::Tensor& x, const at::Tensor& w1x1, const at::Tensor& w3x3, const std::vector<int64_t>& rates,
             at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, bool relu);

// grad_x [N, C, H, W] channels_last from grad [N, (1+B) Co, H, W] channels_last.
void dgrad(const at::Tensor& grad, const at::Tensor& w1x1, const at::Tensor& w3x3, const std::vector<int64_t>& rates,
           at::Tensor& grad_x);

// dw [T, Co, C] in the acc dtype, every element written (a dead tap's zeros too).
void wgrad(const at::Tensor& grad, const at::Tensor& x, const std::vector<int64_t>& rates, at::Tensor& dw);

}  // namespace simt
}  // namespace resaspp
