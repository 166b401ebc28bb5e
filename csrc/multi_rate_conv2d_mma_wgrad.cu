// The mma.sync weight gradient (multi_rate_conv2d_mma.h):
//   dw[t, co, c] = sum over the pixels p where tap t reads inside the image of
//                  grad[n, p, b_t Co + co] * x[n, p + (dy_t, dx_t), c]
// a GEMM with M = Co, N = C and K = the tap's valid pixels. One CTA owns a (tap, 128 Co, 128 C) block and
// walks all of the tap's valid pixels in one fixed order: no split-K, no atomics, bitwise reproducible.
// A tap that is padding everywhere has no valid pixel and gets exact zeros. Both operands are pixel rows
// (MN-major): ldmatrix.trans for fp16 / bf16, 32-bit shared loads for TF32.
#include "mma_common.cuh"
#include "multi_rate_conv2d_mma.h"
#include "smem_limit.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

namespace resaspp {
namespace mma {
namespace {

constexpr int kThreads = 128;  // 4 warps, 2 (Co) x 2 (C) warp tiles of 64 x 64

template <typename T>
constexpr int ld_row() {  // bytes of a pixel row of 128 channels
  return kBlockN * static_cast<int>(sizeof(T)) + kPadBytes;
}
template <typename T>
constexpr int wgrad_rows() {  // pixels (K) a stage: 32 fp16 / bf16, 16 fp32
  return chunk_elems<T>();
}
template <typename T>
constexpr int operand_bytes() {
  return wgrad_rows<T>() * ld_row<T>();
}
template <typename T>
constexpr int wgrad_smem() {
  return kStages * 2 * operand_bytes<T>();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_mma_kernel(
    const T* __restrict__ grad,  // [N, H, W, g_cstride = (1+B) Co] NHWC
    const T* __restrict__ x,     // [N, H, W, C] NHWC
    float* __restrict__ dw,      // [T, Co, C]
    const __grid_constant__ JobGeometry g, const int64_t g_cstride) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kE = static_cast<int>(sizeof(T));
  constexpr int kVec = vec_elems<T>();
  constexpr int kRows = wgrad_rows<T>();
  constexpr int kVpr = kBlockN * kE / 16;  // vectors a pixel row
  constexpr int kStepK = 32 / kE;
  static_assert(kRows * kVpr == 4 * kThreads, "each operand = 4 vectors a thread");
  extern __shared__ __align__(128) unsigned char smem[];

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int c0 = blockIdx.x * kBlockN, co0 = blockIdx.y * kBlockM;
  const int t = blockIdx.z;
  const int branch = t == 0 ? 0 : 1 + (t - 1) / 9, tap = t == 0 ? 4 : (t - 1) % 9;
  const int dy = (tap / 3 - 1) * g.rates[branch], dx = (tap % 3 - 1) * g.rates[branch];
  const int64_t g_off = static_cast<int64_t>(branch) * g.Co;

  // Output pixels whose tap input lies inside the image: rows [hv0, hv1) x cols [wv0, wv1).
  const int hv0 = max(0, -dy), hv1 = min(g.H, g.H - dy);
  const int wv0 = max(0, -dx), wv1 = min(g.W, g.W - dx);
  const int rows = max(0, hv1 - hv0), cols = max(0, wv1 - wv0);
  const int64_t per_image = static_cast<int64_t>(rows) * cols;
  const int64_t P = g.N * per_image;
  const int64_t num_steps = (P + kRows - 1) / kRows;
  const int64_t shift = static_cast<int64_t>(dy) * g.W + dx;  // the tap's input is `shift` pixels away

  // The valid pixels are numbered p = 0 .. P-1 in (n, row, col) order; step s covers p = kRows s ..
  // kRows s + kRows - 1. This thread copies stage rows tid / kVpr + (kRows / 4) i, i = 0..3, of both
  // operands; a cursor per row walks p = r, r + kRows, ... without a division a step.
  struct Cursor {
    int64_t p, n;  // flat index, image
    int hr, wr;    // row and column inside the valid window
  };
  const int step_h = cols > 0 ? kRows / cols : 0, step_w = cols > 0 ? kRows % cols : 0;
  auto make_cursor = [&](int r) {
    Cursor c{r, 0, 0, 0};
    if (per_image > 0) {
      c.n = r / per_image;
      const int rem = static_cast<int>(r - c.n * per_image);  // r < kRows
      c.hr = rem / cols;
      c.wr = rem % cols;
    }
    return c;
  };
  auto advance = [&](Cursor& c) {
    c.p += kRows;
    c.wr += step_w;
    c.hr += step_h;
    if (c.wr >= cols) {
      c.wr -= cols;
      ++c.hr;
    }
    while (c.hr >= rows) {  // at most kRows + 1 rounds (rows >= 1 whenever a step exists)
      c.hr -= rows;
      ++c.n;
    }
  };
  Cursor cur[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) cur[i] = make_cursor(tid / kVpr + (kRows / 4) * i);
  const int cv = tid % kVpr;

  auto load_step = [&](int stage) {
    unsigned char* sg = smem + stage * 2 * operand_bytes<T>();
    unsigned char* sx = sg + operand_bytes<T>();
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = tid / kVpr + (kRows / 4) * i;
      const int64_t pix = (cur[i].n * g.H + hv0 + cur[i].hr) * g.W + wv0 + cur[i].wr;
      const int co = co0 + cv * kVec, c = c0 + cv * kVec;
      const bool in_range = cur[i].p < P;
      const bool g_ok = in_range && co < g.Co, x_ok = in_range && c < g.C;
      cp_async16(sg + row * ld_row<T>() + cv * 16, g_ok ? grad + pix * g_cstride + g_off + co : grad, g_ok);
      cp_async16(sx + row * ld_row<T>() + cv * 16, x_ok ? x + (pix + shift) * g.C + c : x, x_ok);
      advance(cur[i]);
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_steps) load_step(s);
    cp_async_commit();
  }
  for (int64_t s = 0; s < num_steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    if (s + kStages - 1 < num_steps) load_step(static_cast<int>((s + kStages - 1) % kStages));
    cp_async_commit();
    const unsigned char* sg = smem + static_cast<int>(s % kStages) * 2 * operand_bytes<T>();
    const unsigned char* sx = sg + operand_bytes<T>();
#pragma unroll
    for (int k = 0; k < kRows; k += kStepK)
      warp_tile_step<T, true, true>(acc, sg + wm * 64 * kE, ld_row<T>(), sx + wn * 64 * kE, ld_row<T>(), k, lane);
  }
  cp_async_wait<0>();

  // Rows co0 + 64 wm + 16 i + lane / 4 (+ 8), columns c0 + 64 wn + 8 j + 2 (lane % 4): float2 stores
  // (C is a multiple of 8, so a pair is all in or all out).
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int co = co0 + wm * 64 + 16 * i + lane / 4 + 8 * half;
      if (co >= g.Co) continue;
      float* row = dw + (static_cast<int64_t>(t) * g.Co + co) * g.C;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        const int c = c0 + wn * 64 + 8 * j + 2 * (lane % 4);
        if (c < g.C) store2(row + c, acc[i][j][2 * half], acc[i][j][2 * half + 1]);
      }
    }
#endif
}

}  // namespace

void wgrad(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dw, const JobGeometry& g) {
  wgrad_strided(grad, 0, grad.size(1), x, dw, g);
}

void wgrad_strided(const at::Tensor& grad, int64_t offset, int64_t cstride, const at::Tensor& x, at::Tensor& dw,
                   const JobGeometry& g) {
  TORCH_CHECK(dw.scalar_type() == at::kFloat && dw.is_contiguous(), "resaspp_ops._C: dw must be contiguous fp32");
  const int taps = 1 + 9 * (g.num_branches - 1);
  const int64_t grid_y = (g.Co + kBlockM - 1) / kBlockM;
  TORCH_CHECK(grid_y <= 65535, "resaspp_ops._C: too many output channels (", g.Co, ")");
  const dim3 grid(static_cast<unsigned>((g.C + kBlockN - 1) / kBlockN), static_cast<unsigned>(grid_y), taps);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = wgrad_mma_kernel<T>;
    set_smem_limit(reinterpret_cast<const void*>(kernel), wgrad_smem<T>());
    kernel<<<grid, kThreads, wgrad_smem<T>(), c10::cuda::getCurrentCUDAStream()>>>(
        static_cast<const T*>(grad.const_data_ptr()) + offset, static_cast<const T*>(x.const_data_ptr()),
        dw.mutable_data_ptr<float>(), g, cstride);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (x.scalar_type() == at::kHalf)
    run(__half{});
  else if (x.scalar_type() == at::kBFloat16)
    run(__nv_bfloat16{});
  else {
    TORCH_CHECK(x.scalar_type() == at::kFloat, "resaspp_ops._C: the mma kernels take fp16, bf16 or fp32 (TF32)");
    run(float{});
  }
}

}  // namespace mma
}  // namespace resaspp
