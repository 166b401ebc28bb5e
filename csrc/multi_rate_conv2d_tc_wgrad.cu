// Tensor-core weight gradient of the fused multi-rate convolution (DESIGN.md section 4):
//   dw[t, co, c] = sum over the pixels p where tap t reads inside the image of
//                  grad[n, p, b_t*Co + co] * x[n, p + (dy_t, dx_t), c]
// a GEMM with M = Co, N = C and K = the tap's valid pixels. One CTA owns a (tap, Co block, C block)
// and walks all of the tap's valid pixels in one fixed order: no split-K, no atomics, so the
// result is bitwise reproducible. A tap that is padding everywhere has no valid pixel and gets
// exact zeros.
#include "tc_common.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace resaspp {
namespace tc {
namespace {

// CTA = 8 warps, tile 64 (Co) x 128 (C), K-chunk = 32 pixels. Warp (wm, wn), wm in 0..1, wn in 0..3,
// owns co 32wm .. 32wm+31 and c 32wn .. 32wn+31 (2 x 2 fragments).
constexpr int kWgM = 64;
constexpr int kWgN = 128;
constexpr int kWgK = 32;
constexpr int kLdG = kWgM + kPad;  // 72: grad tile [32 px][64 co], read as col-major A (m = co, k = px)
constexpr int kLdX = kWgN + kPad;  // 136: x tile [32 px][128 c], row-major B (k = px, n = c)
constexpr int kLdD = kWgN + 4;     // 132 floats: epilogue staging
constexpr int kGTile = kWgK * kLdG;
constexpr int kXTile = kWgK * kLdX;
constexpr int kWgStage = kGTile + kXTile;
constexpr int kWgSmem = kStages * kWgStage * 2 > kWgM * kLdD * 4 ? kStages * kWgStage * 2 : kWgM * kLdD * 4;
static_assert((kLdG * 2) % 16 == 0 && (16 * kLdG * 2) % 32 == 0, "G rows");
static_assert((kLdX * 2) % 16 == 0 && (16 * kLdX * 2) % 32 == 0, "X rows");
static_assert((kGTile * 2) % 32 == 0 && (kWgStage * 2) % 32 == 0, "stage layout");
static_assert((16 * kLdD * 4) % 32 == 0, "D rows");
static_assert(kWgK * (kWgM / kVec) == kThreads, "G tile = 1 vector per thread");
static_assert(kWgK * (kWgN / kVec) == 2 * kThreads, "X tile = 2 vectors per thread");

template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_tc_kernel(
    const T* __restrict__ grad,  // [N, H, W, g_cstride = (1+B)*Co] NHWC
    const T* __restrict__ x,     // [N, H, W, C] NHWC
    float* __restrict__ dw,      // [T, Co, C]
    const TapTable taps, const int64_t N, const int H, const int W, const int C, const int Co,
    const int64_t g_cstride) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;
  const int c0 = blockIdx.x * kWgN;
  const int co0 = blockIdx.y * kWgM;
  const int t = blockIdx.z;
  const int dy = taps.dy[t], dx = taps.dx[t];
  const int64_t g_off = static_cast<int64_t>(taps.branch[t]) * Co;

  // Output pixels whose tap input lies inside the image: rows [hv0, hv1) x cols [wv0, wv1).
  const int hv0 = max(0, -dy), hv1 = min(H, H - dy);
  const int wv0 = max(0, -dx), wv1 = min(W, W - dx);
  const int rows = max(0, hv1 - hv0), cols = max(0, wv1 - wv0);
  const int64_t per_image = static_cast<int64_t>(rows) * cols;
  const int64_t P = N * per_image;
  const int64_t num_steps = (P + kWgK - 1) / kWgK;

  const int64_t shift = static_cast<int64_t>(dy) * W + dx;  // the tap's input is `shift` pixels away

  // The valid pixels are numbered p = 0 .. P-1 in (n, row, col) order; step s covers p = 32s .. 32s+31.
  // Each thread copies rows r of every step: one grad row (tid / 8) and two x rows (tid / 16 and
  // tid / 16 + 16). A cursor per row walks p = r, r + 32, r + 64, ... without a division per step:
  // load_step is called for s = 0, 1, 2, ... in that order, once each.
  struct Cursor {
    int64_t p, n;  // flat index, image
    int hr, wr;    // row and column inside the valid window
  };
  const int step_h = cols > 0 ? kWgK / cols : 0, step_w = cols > 0 ? kWgK % cols : 0;
  auto make_cursor = [&](int r) {
    Cursor c{r, 0, 0, 0};
    if (per_image > 0) {
      c.n = r / per_image;
      const int rem = static_cast<int>(r - c.n * per_image);  // r < 32
      c.hr = rem / cols;
      c.wr = rem % cols;
    }
    return c;
  };
  auto advance = [&](Cursor& c) {
    c.p += kWgK;
    c.wr += step_w;
    c.hr += step_h;
    if (c.wr >= cols) {
      c.wr -= cols;
      ++c.hr;
    }
    while (c.hr >= rows) {  // at most 33 rounds (rows >= 1 whenever a step exists)
      c.hr -= rows;
      ++c.n;
    }
  };
  auto offset = [&](const Cursor& c) {  // NHWC pixel offset of the output pixel, in pixels
    return (c.n * H + hv0 + c.hr) * W + wv0 + c.wr;
  };
  Cursor cur[3] = {make_cursor(tid / (kWgM / kVec)), make_cursor(tid / (kWgN / kVec)),
                   make_cursor(tid / (kWgN / kVec) + kThreads / (kWgN / kVec))};

  auto load_step = [&](int stage) {
    T* sg = smem + stage * kWgStage;
    T* sx = sg + kGTile;
    {
      const int row = tid / (kWgM / kVec), v = tid % (kWgM / kVec);
      const int co = co0 + v * kVec;
      const bool valid = cur[0].p < P && co < Co;
      const T* src = valid ? grad + offset(cur[0]) * g_cstride + g_off + co : grad;
      cp_async16(sg + row * kLdG + v * kVec, src, valid);
      advance(cur[0]);
    }
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int q = tid + i * kThreads;
      const int row = q / (kWgN / kVec), v = q % (kWgN / kVec);
      const int c = c0 + v * kVec;
      const bool valid = cur[1 + i].p < P && c < C;
      const T* src = valid ? x + (offset(cur[1 + i]) + shift) * C + c : x;
      cp_async16(sx + row * kLdX + v * kVec, src, valid);
      advance(cur[1 + i]);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  // Same pipeline as multi_tap_tc_kernel: one commit group per step, step s in stage s % kStages.
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

    const T* sg = smem + static_cast<int>(s % kStages) * kWgStage;
    const T* sx = sg + kGTile;
#pragma unroll
    for (int kk = 0; kk < kWgK; kk += 16) {
      // A(m = co, k = px) = grad tile [px][co]: column-major with leading dimension kLdG.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sg + kk * kLdG + wm * 32 + i * 16, kLdG);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], sx + kk * kLdX + wn * 32 + j * 16, kLdX);
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the epilogue's staging tile

  float* sd = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(sd + (wm * 32 + i * 16) * kLdD + wn * 32 + j * 16, acc[i][j], kLdD,
                              wmma::mem_row_major);
  __syncthreads();
  // 64 x 128 floats as float4: 2048 vectors, 8 per thread. C % 8 == 0, so a vector is all in or out.
#pragma unroll
  for (int i = 0; i < kWgM * kWgN / 4 / kThreads; ++i) {
    const int q = tid + i * kThreads;
    const int row = q / (kWgN / 4), v = q % (kWgN / 4);
    const int co = co0 + row, c = c0 + v * 4;
    if (co < Co && c < C)
      *reinterpret_cast<float4*>(dw + (static_cast<int64_t>(t) * Co + co) * C + c) =
          *reinterpret_cast<const float4*>(sd + row * kLdD + v * 4);
  }
#endif
}

template <typename T>
void launch_wgrad(const T* grad, const T* x, float* dw, const TapTable& taps, int64_t N, int64_t H, int64_t W,
                  int64_t C, int64_t Co, int64_t g_cstride) {
  const int64_t grid_y = (Co + kWgM - 1) / kWgM;
  TORCH_CHECK(grid_y <= 65535, "resaspp_ops._C: too many output channels (", Co, ")");
  const dim3 grid(static_cast<unsigned>((C + kWgN - 1) / kWgN), static_cast<unsigned>(grid_y), taps.num_taps);
  auto kernel = wgrad_tc_kernel<T>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kWgSmem));
  kernel<<<grid, kThreads, kWgSmem, c10::cuda::getCurrentCUDAStream()>>>(
      grad, x, dw, taps, N, static_cast<int>(H), static_cast<int>(W), static_cast<int>(C), static_cast<int>(Co),
      g_cstride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void wgrad(const at::Tensor& grad, const at::Tensor& x, at::Tensor& dw, const TapTable& taps) {
  TORCH_CHECK(dw.scalar_type() == at::kFloat && dw.is_contiguous(), "resaspp_ops._C: dw must be contiguous fp32");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = dw.size(1), Ct = grad.size(1);
  if (x.scalar_type() == at::kHalf) {
    using T = CudaType<c10::Half>::type;
    launch_wgrad<T>(reinterpret_cast<const T*>(grad.const_data_ptr<c10::Half>()),
                    reinterpret_cast<const T*>(x.const_data_ptr<c10::Half>()), dw.mutable_data_ptr<float>(), taps,
                    N, H, W, C, Co, Ct);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "resaspp_ops._C: tensor-core wgrad needs fp16 or bf16");
    using T = CudaType<c10::BFloat16>::type;
    launch_wgrad<T>(reinterpret_cast<const T*>(grad.const_data_ptr<c10::BFloat16>()),
                    reinterpret_cast<const T*>(x.const_data_ptr<c10::BFloat16>()), dw.mutable_data_ptr<float>(),
                    taps, N, H, W, C, Co, Ct);
  }
}

}  // namespace tc
}  // namespace resaspp
