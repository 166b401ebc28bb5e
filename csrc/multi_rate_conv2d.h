// The fused multi-rate convolution of DESIGN.md section 3, CUDA entry points (multi_rate_conv2d.cpp).
//
// Layout conventions (all tensors NHWC in memory, i.e. channels_last):
//   x      [N, C, H, W]              channels_last
//   w1x1   [Co, C, 1, 1]             the 1x1 branch
//   w3x3   [B, Co, C, 3, 3]          the atrous branches, rates[b] for w3x3[b]
//   out    [N, (1+B)*Co, H, W]       channels_last, channels ordered 1x1, r1..rB
//
// A "tap" is one (branch, kernel position) pair: T = 1 + 9B of them, tap t reading x shifted by (dy, dx).
// Taps whose shifted tile lies wholly in zero padding are skipped (no loads, no MMAs).
//
// Which kernels run is the caller's choice (resaspp_ops/backend/cuda.py), passed as `kernel`:
//   "sm90"  warpgroup MMA fed by TMA (sm_90a, fp16 / bf16); tables = the plan's [jobs, queues, masks,
//           tap_offsets, tap_entries] (sm90_plan.py), tile = [tile_h, tile_w, stack]
//   "mma"   ldmatrix + mma.sync (sm_80+, fp16 / bf16, fp32 as TF32); forward tables = [jobs], dgrad
//           tables = [jobs, masks] (jobs.py), tile likewise; wgrad takes none
//   "simt"  exact fp32 / fp64 FMAs, any shape; no tables
// The tensor-core paths read the weights where C is innermost with 16-byte rows (FusedASPP hands them
// over so: each branch channels_last); other layouts are copied once into that layout.
#pragma once

#include <ATen/core/Tensor.h>

#include "tap_table.h"

#include <optional>
#include <string>
#include <vector>

namespace resaspp {

// Forward: returns out [N, (1+B)*Co, H, W] channels_last.
// scale/shift: optional [(1+B)*Co] per-channel epilogue, then ReLU if relu.
at::Tensor multi_rate_conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& w1x1, const at::Tensor& w3x3,
                                          const std::vector<int64_t>& rates, const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, bool relu, const std::string& kernel,
                                          const std::vector<at::Tensor>& tables, const std::vector<int64_t>& tile);

// Backward of the pre-epilogue output. grad [N, (1+B)*Co, H, W].
// Returns {grad_x, grad_w1x1, grad_w3x3}, each in its own storage; an undefined tensor where not requested.
std::vector<at::Tensor> multi_rate_conv2d_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& w1x1, const at::Tensor& w3x3,
    const std::vector<int64_t>& rates, bool need_x, bool need_w, const std::string& kernel,
    const std::vector<at::Tensor>& dgrad_tables, const std::vector<int64_t>& dgrad_tile,
    const std::vector<at::Tensor>& wgrad_tables, const std::vector<int64_t>& wgrad_tile);

}  // namespace resaspp
