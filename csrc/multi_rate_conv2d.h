// The fused multi-rate convolution of DESIGN.md section 3, CUDA entry points.
//
// Layout conventions (all tensors NHWC in memory, i.e. channels_last):
//   x      [N, C, H, W]              channels_last
//   w1x1   [Co, C, 1, 1]             the 1x1 branch
//   w3x3   [B, Co, C, 3, 3]          the atrous branches, rates[b] for w3x3[b]
//   out    [N, (1+B)*Co, H, W]       channels_last, channels ordered 1x1, r1..rB
//
// A "tap" is one (branch, kernel position) pair. The forward is a sum over
// T = 1 + 9B taps; tap t reads x shifted by (dy, dx) and maps C -> Co with a
// [C, Co] slice of the packed weights. Taps whose shifted tile lies wholly in
// zero padding are skipped (no loads, no FMAs).
#pragma once

#include <ATen/core/Tensor.h>

#include "tap_table.h"

#include <optional>
#include <string>
#include <vector>

namespace resaspp {

// Forward: returns out [N, (1+B)*Co, H, W] channels_last.
// scale/shift: optional [(1+B)*Co] per-channel epilogue, then ReLU if relu.
at::Tensor multi_rate_conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& w1x1,
                                          const at::Tensor& w3x3, const std::vector<int64_t>& rates,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, bool relu);

// Backward of the pre-epilogue output. grad [N, (1+B)*Co, H, W].
// Returns {grad_x, grad_w1x1, grad_w3x3}; an undefined tensor where the mask is false.
std::vector<at::Tensor> multi_rate_conv2d_backward_cuda(const at::Tensor& grad, const at::Tensor& x,
                                                        const at::Tensor& w1x1, const at::Tensor& w3x3,
                                                        const std::vector<int64_t>& rates, bool need_x,
                                                        bool need_w);

}  // namespace resaspp
