// The geometry of a work list (resaspp_ops/backend/jobs.py): the problem, the spatial tile and how many
// images a job stacks, the rates; and the tile arithmetic both kernel families share (the sm_90a kernels
// and the mma.sync ones). Host and device code, free of torch and CuTe.
#pragma once

#include "tap_table.h"

#if defined(__CUDACC__)
#define RESASPP_HD __host__ __device__ __forceinline__
#else
#define RESASPP_HD inline
#endif

namespace resaspp {

// Rates are clamped to this in the tap offsets; H and W are checked below it, so a clamped rate still puts
// every off-centre tap wholly in padding, and h + dy stays far from int overflow.
constexpr int kMaxRate = 1 << 29;

// Passed by value to the kernels.
struct JobGeometry {
  int N, H, W, C, Co, num_branches;  // num_branches = 1 + B
  int tile_h, tile_w, tiles_w, stack;
  int k_chunks;                      // K blocks of a tap (kernel-specific: C or Co over the block)
  int rates[kMaxBranches + 1];       // rates[0] = 0 (the 1x1), rates[b] the rate of branch b, clamped
};

RESASPP_HD void tile_origin(const JobGeometry& g, int tile, int& h0, int& w0) {
  h0 = (tile / g.tiles_w) * g.tile_h;
  w0 = (tile % g.tiles_w) * g.tile_w;
}

// The pixel (n, h, w) of pixel row m of a job at (image, tile); false where the row stores nothing (past
// the tile's rows times its stacked images, or a tile / stacked image hanging over the tensor's edge).
RESASPP_HD bool row_pixel(const JobGeometry& g, int image, int tile, int m, int& n, int& h, int& w) {
  const int per_image = g.tile_h * g.tile_w;
  if (m >= per_image * g.stack) return false;
  int h0, w0;
  tile_origin(g, tile, h0, w0);
  const int dn = m / per_image, rem = m % per_image;
  n = image + dn;
  h = h0 + rem / g.tile_w;
  w = w0 + rem % g.tile_w;
  return n < g.N && h < g.H && w < g.W;
}

}  // namespace resaspp
