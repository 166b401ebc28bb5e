// Host helpers shared by the op families' entry points (multi_rate_conv2d.cpp, separable.cpp), defined in
// multi_rate_conv2d.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include "job_geometry.h"

#include <cstdint>
#include <vector>

namespace resaspp {

// t itself where its data starts on a 16-byte boundary, else a channels_last copy (the kernels copy
// 16-byte vectors).
at::Tensor aligned16(const at::Tensor& t);

// out [N, Ct, H, W] = the epilogue of an empty sum: ReLU?(0 * scale + shift) per channel, in scale's / shift's
// (the accumulation) dtype, cast to out's; scale, shift [Ct] or undefined. What a problem with no input
// channels computes, written without a launch.
void fill_epilogue_of_zero(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, bool relu);

// The geometry of a plan: x [N, C, H, W], Co, the rates, tile = [tile_h, tile_w, stack] (checked).
JobGeometry geometry(const at::Tensor& x, int64_t Co, const std::vector<int64_t>& rates,
                     const std::vector<int64_t>& tile, int k_chunks);

}  // namespace resaspp
