// The K-step walks of the sm_90a kernels' jobs: the TMA box origins a job's steps load, in order, and the
// pixel each accumulator row stores to. Host and device code (the producer warp runs the walks; the
// bindings run them on the host as _C.sm90_steps, which tests/test_sm90_plan.py compares with
// resaspp_ops/backend/sm90_plan.py, whose NumPy emulation reproduces F.conv2d). Free of CuTe and torch.
//
// Tensor maps, dimensions innermost first (see sm90_plan.py):
//   x [C, W, H, N], grad [Co, 1+B, W, H, N], w1 [C, Co], w3 [C, 3 (kx), 3 (ky), Co, B]
// (strides growing outwards, as TMA expects: w3 is each branch channels_last, [B, Co, 3, 3, C] in memory).
#pragma once

#include "job_geometry.h"

namespace resaspp {
namespace sm90 {

constexpr int kBlockM = 128;   // pixel rows of a forward / dgrad job (2 consumer warpgroups x wgmma M 64)
constexpr int kBlockN = 256;   // forward: output channels (Co <= 256); dgrad: input channels of a job
constexpr int kBlockK = 64;    // channels per K step: one 128-byte swizzled row per pixel
constexpr int kWgradPix = 64;  // pixel rows (K) of a wgrad step
constexpr int kWgradM = 128;   // output channels of a wgrad job
constexpr int kWgradN = 256;   // input channels of a wgrad job
constexpr int kStages = 4;     // mbarrier ring depth (48 KiB stages)

enum Map : int { kMapW1 = 0, kMapW3 = 1, kMapX = 2 };
enum Centre : int { kCentreTap = 4 };

using Geometry = JobGeometry;  // k_chunks: ceil(C / 64) (forward), ceil(Co / 64) (dgrad); wgrad: unused

// One K step: the A box origin, the map B comes from, the B box origin (unused coordinates 0).
struct Step {
  int a[5];
  int b_map;
  int b[5];
};

RESASPP_HD int popcount9(int mask) {
  int n = 0;
  for (int k = 0; k < 9; ++k) n += (mask >> k) & 1;
  return n;
}

// The lowest tap bit of `mask` at or above `from`; 9 when none.
RESASPP_HD int next_tap(int mask, int from) {
  while (from < 9 && !((mask >> from) & 1)) ++from;
  return from;
}

// Forward job (image, tile, branch, taps): for each live tap (ascending bit), for each 64-channel chunk
// of C: A = x box at (c, w0 + dx, h0 + dy, image); B = that tap's weights at (c, 0) (w1) or
// (c, kx, ky, 0, branch - 1) (w3).
struct ForwardWalk {
  int image, branch, mask, h0, w0, rate, tap, kc, k_chunks;
  RESASPP_HD ForwardWalk(const Geometry& g, const int* job)
      : image(job[0]), branch(job[2]), mask(job[3]), rate(g.rates[job[2]]), tap(next_tap(job[3], 0)), kc(0),
        k_chunks(g.k_chunks) {
    tile_origin(g, job[1], h0, w0);
  }
  RESASPP_HD static int count(const Geometry& g, const int* job) { return popcount9(job[3]) * g.k_chunks; }
  RESASPP_HD bool done() const { return tap >= 9; }
  RESASPP_HD void next() {
    if (++kc == k_chunks) {
      kc = 0;
      tap = next_tap(mask, tap + 1);
    }
  }
  RESASPP_HD Step step() const {
    const int ky = tap / 3, kx = tap % 3;
    const int c = kc * kBlockK;
    Step s{{c, w0 + (kx - 1) * rate, h0 + (ky - 1) * rate, image, 0}, branch == 0 ? kMapW1 : kMapW3,
           {c, branch == 0 ? 0 : kx, branch == 0 ? 0 : ky, 0, branch == 0 ? 0 : branch - 1}};
    return s;
  }
};

// Dgrad job (image, tile, c_block, live taps): for each branch, each of its live dgrad taps (`masks`,
// mirrored), each 64-channel chunk of Co: A = grad box at (co, branch, w0 - dx, h0 - dy, image);
// B = the tap's weights at (256 c_block, co) (w1) or (256 c_block, kx, ky, co, branch - 1) (w3), loaded as
// four 64 x 64 boxes.
struct DgradWalk {
  const int* masks;  // [num_branches] of this tile
  int image, cblock, h0, w0, branch, num_branches, mask, tap, kc, k_chunks;
  const int* rates;
  RESASPP_HD DgradWalk(const Geometry& g, const int* job, const int* tile_masks)
      : masks(tile_masks + job[1] * g.num_branches), image(job[0]), cblock(job[2]), branch(0),
        num_branches(g.num_branches), kc(0), k_chunks(g.k_chunks), rates(g.rates) {
    tile_origin(g, job[1], h0, w0);
    mask = masks[0];
    tap = next_tap(mask, 0);
    skip_empty_branches();
  }
  RESASPP_HD static int count(const Geometry& g, const int* job) { return job[3] * g.k_chunks; }
  RESASPP_HD void skip_empty_branches() {
    while (tap >= 9 && ++branch < num_branches) {
      mask = masks[branch];
      tap = next_tap(mask, 0);
    }
  }
  RESASPP_HD bool done() const { return branch >= num_branches; }
  RESASPP_HD void next() {
    if (++kc == k_chunks) {
      kc = 0;
      tap = next_tap(mask, tap + 1);
      skip_empty_branches();
    }
  }
  RESASPP_HD Step step() const {
    const int ky = tap / 3, kx = tap % 3, rate = rates[branch];
    const int co = kc * kBlockK;
    const int c = cblock * kBlockN;
    Step s{{co, branch, w0 - (kx - 1) * rate, h0 - (ky - 1) * rate, image}, branch == 0 ? kMapW1 : kMapW3,
           {c, branch == 0 ? co : kx, branch == 0 ? 0 : ky, branch == 0 ? 0 : co, branch == 0 ? 0 : branch - 1}};
    return s;
  }
};

// Wgrad job (tap, co_block, c_block, steps): for each (image, tile) where the tap is live (tap_entries
// [tap_offsets[t], tap_offsets[t + 1])): A = grad boxes at (128 co_block, branch, w0, h0, image), two at
// co + 64 i; B = x boxes at (256 c_block, w0 + dx, h0 + dy, image), four at c + 64 i.
struct WgradWalk {
  const int* entries;  // [E, 2] (image, tile)
  const Geometry* g;
  int e, e_end, branch, coblock, cblock, dy, dx;
  RESASPP_HD WgradWalk(const Geometry& geo, const int* job, const int* tap_offsets, const int* tap_entries)
      : entries(tap_entries), g(&geo), e(tap_offsets[job[0]]), e_end(tap_offsets[job[0] + 1]),
        coblock(job[1]), cblock(job[2]) {
    const int t = job[0];
    const int tap = t == 0 ? kCentreTap : (t - 1) % 9;
    branch = t == 0 ? 0 : 1 + (t - 1) / 9;
    dy = (tap / 3 - 1) * geo.rates[branch];
    dx = (tap % 3 - 1) * geo.rates[branch];
  }
  RESASPP_HD static int count(const Geometry&, const int* job) { return job[3]; }
  RESASPP_HD bool done() const { return e >= e_end; }
  RESASPP_HD void next() { ++e; }
  RESASPP_HD Step step() const {
    const int image = entries[2 * e], tile = entries[2 * e + 1];
    int h0, w0;
    tile_origin(*g, tile, h0, w0);
    Step s{{coblock * kWgradM, branch, w0, h0, image}, kMapX, {cblock * kWgradN, w0 + dx, h0 + dy, image, 0}};
    return s;
  }
};

}  // namespace sm90
}  // namespace resaspp
