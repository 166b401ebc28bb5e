// The sm_90a kernels (warpgroup MMA fed by TMA; sm90_kernel.cuh): host entry points and the helpers
// their launchers share (sm90_host.cpp). Built only when setup.py finds CUTLASS's headers and the arch
// list names 9.0 (RESASPP_WITH_SM90); the plans come from resaspp_ops/backend/sm90_plan.py.
#pragma once

#include <ATen/core/Tensor.h>

#include "sm90_plan.h"
#include "smem_limit.h"

#include <cuda.h>

#include <cstdint>
#include <vector>

namespace resaspp {
namespace sm90 {

enum Kind : int { kForward = 0, kDgrad = 1, kWgrad = 2 };

// One launch's plan (sm90_plan.Sm90Plan): int32 tensors on the inputs' device, and the geometry.
struct LaunchPlan {
  at::Tensor jobs;         // [J, 4] the kind's job rows
  at::Tensor queues;       // [G + 1 + J] the persistent grid's queues
  at::Tensor masks;        // [tiles, 1 + B] live-tap masks (dgrad: mirrored)
  at::Tensor tap_offsets;  // wgrad: [T + 1]
  at::Tensor tap_entries;  // wgrad: [E, 2] (image, tile)
  Geometry g;
  int programs;
  int num_jobs;
};

// Checks the tables and fills the geometry (rates clamped to kMaxRate).
LaunchPlan make_plan(Kind kind, const at::Tensor& jobs, const at::Tensor& queues, const at::Tensor& masks,
                     const at::Tensor& tap_offsets, const at::Tensor& tap_entries, const std::vector<int64_t>& rates,
                     int64_t N, int64_t C, int64_t Co, int64_t H, int64_t W, int64_t tile_h, int64_t tile_w,
                     int64_t stack);

// out [N, (1+B) Co, H, W] channels_last = the branch convolutions with the scale/shift/ReLU epilogue.
//   x      [N, C, H, W], channels innermost (channels_last), fp16/bf16
//   w1     [Co, C, 1, 1] and w3 [B, Co, C, 3, 3], C innermost (w3: each branch channels_last), x's dtype
//   scale, shift  [(1+B) Co] fp32, or undefined
void forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& out,
             const at::Tensor& scale, const at::Tensor& shift, bool relu, const LaunchPlan& plan);

// grad_x [N, C, H, W] channels_last = sum over branches and live taps of grad_b shifted by -d times W^T.
//   grad   [N, (1+B) Co, H, W] channels_last; w1, w3 as for the forward (B read MN-major: no transpose)
void dgrad(const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& grad_x,
           const LaunchPlan& plan);

// grad_w1 [Co, C, 1, 1] and grad_w3 [B, Co, C, 3, 3], contiguous, in x's dtype: per tap, the sum over its
// live tiles (one fixed order) of grad_b^T x shifted by d. grad and x as above.
void wgrad(const at::Tensor& grad, const at::Tensor& x, at::Tensor& grad_w1, at::Tensor& grad_w3,
           const LaunchPlan& plan);

// ---- shared by the launchers (sm90_host.cpp) ----

// Tensor maps over the operands (dimensions innermost first, see sm90_plan.h), boxes from the plan.
CUtensorMap x_map(const at::Tensor& x, const Geometry& g);       // [C, W, H, N]
CUtensorMap grad_map(const at::Tensor& grad, const Geometry& g);  // [Co, 1+B, W, H, N]
CUtensorMap w1_map(const at::Tensor& w1, int box_co);             // [C, Co]
CUtensorMap w3_map(const at::Tensor& w3, int box_co);             // [C, 3 (kx), 3 (ky), Co, B]

// For tests: the (m, n) of each fp32 accumulator value of each consumer thread, int32 [256, values, 2]
// (the per-kernel lists are defined next to each kernel's Op).
at::Tensor accumulator_coords(Kind kind);
std::vector<int> accumulator_coords_forward();
std::vector<int> accumulator_coords_dgrad();
std::vector<int> accumulator_coords_wgrad();

// For tests: the element offsets (swizzle included) of the A or B shared-memory layout the wgmma
// descriptors are built from, int32 [stages, rows, 64].
at::Tensor smem_offsets(Kind kind, bool b_operand);
std::vector<int> smem_offsets_forward(bool b_operand);
std::vector<int> smem_offsets_dgrad(bool b_operand);
std::vector<int> smem_offsets_wgrad(bool b_operand);

// For tests: the host run of the K-step walks (sm90_plan.h) over every job, int32 [steps, 12] rows
// (job, A origin x 5, B map, B origin x 5), and for forward / dgrad the pixel of every accumulator row,
// int32 [J * 128, 5] rows (job, m, n, h, w), (-1, -1, -1) where the row stores nothing.
std::vector<at::Tensor> host_steps(Kind kind, const LaunchPlan& plan);

}  // namespace sm90
}  // namespace resaspp
