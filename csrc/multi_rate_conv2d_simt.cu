// SIMT kernels for the fused multi-rate convolution: forward, dgrad and wgrad, and their launchers
// (multi_rate_conv2d_simt.h).
//
// Straightforward and exact (fp32 FMAs for fp16/bf16/fp32, fp64 for fp64): the path for fp64, for fp32
// when TF32 is off, for shapes the tensor-core kernels do not take, and the baseline they are checked
// against on the GPU. It already follows DESIGN.md section 4's structure: NHWC, 2-D spatial output
// tiles, one block owns an (image, tile, channel block) for every branch, and taps that land wholly in
// zero padding are skipped per tile (the test is uniform across the block: no divergence).
//
// Includes only c10/cuda headers: ATen/cuda/CUDAContext.h pulls cusparse.h, which a CUDA toolkit without
// the math libraries lacks.
#include "multi_rate_conv2d_simt.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <limits>

namespace resaspp {
namespace {

constexpr int kTileH = 8;
constexpr int kTileW = 8;
constexpr int kTilePix = kTileH * kTileW;  // output pixels per block
constexpr int kBlockM = 64;                // output channels per block
constexpr int kBlockK = 16;                // reduction channels per step
constexpr int kThreads = 256;
constexpr int kPixPerThread = 4;           // 16 pixel groups x 4 = 64 pixels
constexpr int kChPerThread = 4;            // 16 channel lanes x 4 = 64 channels

// Tap (dy, dx) reads only zero padding for every output pixel of [h0,h1) x [w0,w1).
__device__ __forceinline__ bool tap_is_padding(int h0, int h1, int w0, int w1, int dy, int dx, int H,
                                               int W) {
  return h1 + dy <= 0 || h0 + dy >= H || w1 + dx <= 0 || w0 + dx >= W;
}

// out[n, p, ob*out_branch_off + m] = epilogue( sum over taps t of branch ob (or of all taps when
//   kSumBranches) and k of in[n, p + (dy_t, dx_t), b_t*in_branch_off + k] * wpk[t, k, m] )
// Forward: in = x, one output branch per tap branch. Dgrad: in = grad, every tap summed into one output.
template <typename scalar_t, typename acc_t, bool kSumBranches>
__global__ void __launch_bounds__(kThreads) multi_tap_conv_kernel(
    const scalar_t* __restrict__ in,   // [N, H, W, in_cstride] NHWC
    const scalar_t* __restrict__ wpk,  // [T, K, M] packed weights: tap t maps K -> M channels
    scalar_t* __restrict__ out,        // [N, H, W, out_cstride] NHWC
    const acc_t* __restrict__ scale,   // [out_cstride] per-channel epilogue, or nullptr
    const acc_t* __restrict__ shift,   // [out_cstride] or nullptr
    const bool relu, const TapTable taps, const int H, const int W, const int K, const int M,
    const int tiles_w, const int tiles_per_image, const int64_t in_cstride,
    const int64_t in_branch_off, const int64_t out_cstride, const int64_t out_branch_off) {
  __shared__ acc_t s_in[kBlockK][kTilePix];
  __shared__ acc_t s_w[kBlockK][kBlockM];

  const int tid = threadIdx.x;
  const int64_t n = blockIdx.x / tiles_per_image;
  const int tile = blockIdx.x % tiles_per_image;
  const int h0 = (tile / tiles_w) * kTileH;
  const int w0 = (tile % tiles_w) * kTileW;
  const int h1 = min(h0 + kTileH, H);
  const int w1 = min(w0 + kTileW, W);
  const int m0 = blockIdx.y * kBlockM;
  const int ch_lane = tid % 16;    // this thread's channels: m0 + ch_lane + 16*j (coalesced stores)
  const int pix_group = tid / 16;  // this thread's pixels: pix_group*4 + i

  acc_t acc[kPixPerThread][kChPerThread];
  auto zero_acc = [&]() {
#pragma unroll
    for (int i = 0; i < kPixPerThread; ++i)
#pragma unroll
      for (int j = 0; j < kChPerThread; ++j) acc[i][j] = acc_t(0);
  };
  auto store_acc = [&](int out_branch) {
#pragma unroll
    for (int i = 0; i < kPixPerThread; ++i) {
      const int p = pix_group * kPixPerThread + i;
      const int h = h0 + p / kTileW, w = w0 + p % kTileW;
      if (h >= H || w >= W) continue;
      scalar_t* out_px = out + ((n * H + h) * W + w) * out_cstride + out_branch * out_branch_off;
#pragma unroll
      for (int j = 0; j < kChPerThread; ++j) {
        const int m = m0 + ch_lane + 16 * j;
        if (m >= M) continue;
        const int64_t c_out = out_branch * out_branch_off + m;
        acc_t v = acc[i][j];
        if (scale != nullptr) v *= scale[c_out];
        if (shift != nullptr) v += shift[c_out];
        if (relu) v = v < acc_t(0) ? acc_t(0) : v;  // NaN stays NaN, as in torch.relu
        out_px[m] = static_cast<scalar_t>(v);
      }
    }
  };

  zero_acc();
  for (int t = 0; t < taps.num_taps; ++t) {
    const int b = taps.branch[t], dy = taps.dy[t], dx = taps.dx[t];
    if (!tap_is_padding(h0, h1, w0, w1, dy, dx, H, W)) {
      const scalar_t* in_b = in + b * in_branch_off;
      const scalar_t* w_t = wpk + static_cast<int64_t>(t) * K * M;
      for (int k0 = 0; k0 < K; k0 += kBlockK) {
        for (int e = tid; e < kBlockK * kTilePix; e += kThreads) {
          const int k = e % kBlockK, p = e / kBlockK;
          const int h = h0 + p / kTileW + dy, w = w0 + p % kTileW + dx;
          acc_t v = acc_t(0);
          if (k0 + k < K && h >= 0 && h < H && w >= 0 && w < W)
            v = static_cast<acc_t>(in_b[((n * H + h) * W + w) * in_cstride + k0 + k]);
          s_in[k][p] = v;
        }
        for (int e = tid; e < kBlockK * kBlockM; e += kThreads) {
          const int m = e % kBlockM, k = e / kBlockM;
          acc_t v = acc_t(0);
          if (k0 + k < K && m0 + m < M) v = static_cast<acc_t>(w_t[static_cast<int64_t>(k0 + k) * M + m0 + m]);
          s_w[k][m] = v;
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < kBlockK; ++k) {
          acc_t a[kPixPerThread], bw[kChPerThread];
#pragma unroll
          for (int i = 0; i < kPixPerThread; ++i) a[i] = s_in[k][pix_group * kPixPerThread + i];
#pragma unroll
          for (int j = 0; j < kChPerThread; ++j) bw[j] = s_w[k][ch_lane + 16 * j];
#pragma unroll
          for (int i = 0; i < kPixPerThread; ++i)
#pragma unroll
            for (int j = 0; j < kChPerThread; ++j) acc[i][j] += a[i] * bw[j];
        }
        __syncthreads();
      }
    }
    if (!kSumBranches && (t + 1 == taps.num_taps || taps.branch[t + 1] != b)) {
      store_acc(b);
      zero_acc();
    }
  }
  if (kSumBranches) store_acc(0);
}

// dw[t, co, c] = sum over the pixels p where tap t is valid of
//   grad[n, p, b_t*Co + co] * x[n, p + (dy_t, dx_t), c]
// One block per (tap, Co block, C block) loops over every valid pixel in a fixed order:
// no atomics, bitwise reproducible. A tap that is padding everywhere gets exact zeros.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(
    const scalar_t* __restrict__ grad,  // [N, H, W, g_cstride = (1+B)*Co] NHWC
    const scalar_t* __restrict__ x,     // [N, H, W, C] NHWC
    acc_t* __restrict__ dw,             // [T, Co, C]
    const TapTable taps, const int64_t N, const int H, const int W, const int C, const int Co,
    const int64_t g_cstride) {
  constexpr int kBlockP = 16;  // pixels per step
  __shared__ acc_t s_g[kBlockP][kBlockM];
  __shared__ acc_t s_x[kBlockP][kBlockM];

  const int tid = threadIdx.x;
  const int c0 = blockIdx.x * kBlockM;
  const int co0 = blockIdx.y * kBlockM;
  const int t = blockIdx.z;
  const int b = taps.branch[t], dy = taps.dy[t], dx = taps.dx[t];
  const int c_lane = tid % 16;    // channels c0 + c_lane + 16*j (coalesced stores)
  const int co_group = tid / 16;  // output channels co0 + co_group*4 + i

  // Output pixels whose tap input lies inside the image.
  const int hv0 = max(0, -dy), hv1 = min(H, H - dy);
  const int wv0 = max(0, -dx), wv1 = min(W, W - dx);
  const int rows = max(0, hv1 - hv0), cols = max(0, wv1 - wv0);
  const int64_t P = N * rows * cols;

  acc_t acc[kChPerThread][kChPerThread];
#pragma unroll
  for (int i = 0; i < kChPerThread; ++i)
#pragma unroll
    for (int j = 0; j < kChPerThread; ++j) acc[i][j] = acc_t(0);

  for (int64_t p0 = 0; p0 < P; p0 += kBlockP) {
    for (int e = tid; e < kBlockP * kBlockM; e += kThreads) {
      const int m = e % kBlockM, pp = e / kBlockM;
      const int64_t p = p0 + pp;
      acc_t gv = acc_t(0), xv = acc_t(0);
      if (p < P) {
        const int64_t n = p / (static_cast<int64_t>(rows) * cols);
        const int rem = static_cast<int>(p % (static_cast<int64_t>(rows) * cols));
        const int h = hv0 + rem / cols, w = wv0 + rem % cols;
        if (co0 + m < Co) gv = static_cast<acc_t>(grad[((n * H + h) * W + w) * g_cstride + b * Co + co0 + m]);
        if (c0 + m < C) xv = static_cast<acc_t>(x[((n * H + h + dy) * W + w + dx) * C + c0 + m]);
      }
      s_g[pp][m] = gv;
      s_x[pp][m] = xv;
    }
    __syncthreads();
#pragma unroll
    for (int pp = 0; pp < kBlockP; ++pp) {
      acc_t gv[kChPerThread], xv[kChPerThread];
#pragma unroll
      for (int i = 0; i < kChPerThread; ++i) gv[i] = s_g[pp][co_group * kChPerThread + i];
#pragma unroll
      for (int j = 0; j < kChPerThread; ++j) xv[j] = s_x[pp][c_lane + 16 * j];
#pragma unroll
      for (int i = 0; i < kChPerThread; ++i)
#pragma unroll
        for (int j = 0; j < kChPerThread; ++j) acc[i][j] += gv[i] * xv[j];
    }
    __syncthreads();
  }
#pragma unroll
  for (int i = 0; i < kChPerThread; ++i) {
    const int co = co0 + co_group * kChPerThread + i;
    if (co >= Co) continue;
#pragma unroll
    for (int j = 0; j < kChPerThread; ++j) {
      const int c = c0 + c_lane + 16 * j;
      if (c < C) dw[(static_cast<int64_t>(t) * Co + co) * C + c] = acc[i][j];
    }
  }
}

// Taps in branch order: t = 0 is the 1x1; t = 1 + 9b + 3ky + kx is branch b+1 at (ky, kx).
// sign = +1 for the forward and wgrad (read x at p + d), -1 for dgrad (read grad at p - d). Rates are
// clamped to kMaxRate (job_geometry.h) before the int conversion (2^32 + 1 would otherwise wrap to 1).
TapTable make_tap_table(const std::vector<int64_t>& rates, int sign) {
  TapTable taps{};
  taps.num_taps = 1 + 9 * static_cast<int>(rates.size());
  taps.branch[0] = 0;
  taps.dy[0] = taps.dx[0] = 0;
  for (size_t b = 0; b < rates.size(); ++b) {
    const int r = static_cast<int>(std::min<int64_t>(rates[b], kMaxRate));
    for (int ky = 0; ky < 3; ++ky)
      for (int kx = 0; kx < 3; ++kx) {
        const int t = 1 + 9 * static_cast<int>(b) + 3 * ky + kx;
        taps.branch[t] = static_cast<int>(b) + 1;
        taps.dy[t] = sign * (ky - 1) * r;
        taps.dx[t] = sign * (kx - 1) * r;
      }
  }
  return taps;
}

// Packed weights [T, K, M]: forward maps C -> Co per tap, dgrad maps Co -> C (the transpose). The SIMT
// kernels read one contiguous slice a tap; they are the exact baseline, not the fast path.
at::Tensor pack_weights(const at::Tensor& w1x1, const at::Tensor& w3x3, bool transpose) {
  const int64_t Co = w1x1.size(0), C = w1x1.size(1), B = w3x3.size(0);
  at::Tensor w1 = w1x1.reshape({Co, C});
  if (transpose) {  // [1, Co, C] and [B, 3, 3, Co, C] -> [9B, Co, C]
    return at::cat({w1.unsqueeze(0), w3x3.permute({0, 3, 4, 1, 2}).reshape({9 * B, Co, C})}, 0).contiguous();
  }
  // [1, C, Co] and [B, 3, 3, C, Co] -> [9B, C, Co]
  return at::cat({w1.t().unsqueeze(0), w3x3.permute({0, 3, 4, 2, 1}).reshape({9 * B, C, Co})}, 0).contiguous();
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace

namespace simt {

void forward(const at::Tensor& x, const at::Tensor& w1x1, const at::Tensor& w3x3, const std::vector<int64_t>& rates,
             at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = w1x1.size(0), Ct = out.size(1);
  const at::Tensor wpk = pack_weights(w1x1, w3x3, /*transpose=*/false);
  const TapTable taps = make_tap_table(rates, +1);
  const int tiles_w = ceil_div(W, kTileW);
  const int tiles_per_image = ceil_div(H, kTileH) * tiles_w;
  const int64_t grid_x = N * tiles_per_image;
  TORCH_CHECK(grid_x <= std::numeric_limits<int>::max(), "resaspp_ops._C: too many output tiles");
  TORCH_CHECK(ceil_div(Co, kBlockM) <= 65535, "resaspp_ops._C: too many output channels (", Co, ")");
  const dim3 grid(static_cast<unsigned>(grid_x), ceil_div(Co, kBlockM));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_rate_conv2d_forward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_tap_conv_kernel<scalar_t, acc_t, false><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), wpk.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
        scale.defined() ? scale.const_data_ptr<acc_t>() : nullptr,
        shift.defined() ? shift.const_data_ptr<acc_t>() : nullptr, relu, taps, static_cast<int>(H),
        static_cast<int>(W), static_cast<int>(C), static_cast<int>(Co), tiles_w, tiles_per_image,
        /*in_cstride=*/C, /*in_branch_off=*/0, /*out_cstride=*/Ct, /*out_branch_off=*/Co);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dgrad(const at::Tensor& grad, const at::Tensor& w1x1, const at::Tensor& w3x3, const std::vector<int64_t>& rates,
           at::Tensor& grad_x) {
  const int64_t N = grad_x.size(0), C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  const int64_t Co = w1x1.size(0), Ct = grad.size(1);
  const at::Tensor wpk_t = pack_weights(w1x1, w3x3, /*transpose=*/true);
  const TapTable taps = make_tap_table(rates, -1);
  const int tiles_w = ceil_div(W, kTileW);
  const int tiles_per_image = ceil_div(H, kTileH) * tiles_w;
  const int64_t grid_x = N * tiles_per_image;
  TORCH_CHECK(grid_x <= std::numeric_limits<int>::max(), "resaspp_ops._C: too many input tiles");
  TORCH_CHECK(ceil_div(C, kBlockM) <= 65535, "resaspp_ops._C: too many input channels (", C, ")");
  const dim3 grid(static_cast<unsigned>(grid_x), ceil_div(C, kBlockM));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "multi_rate_conv2d_dgrad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    multi_tap_conv_kernel<scalar_t, acc_t, true><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), wpk_t.const_data_ptr<scalar_t>(), grad_x.mutable_data_ptr<scalar_t>(),
        nullptr, nullptr, false, taps, static_cast<int>(H), static_cast<int>(W), static_cast<int>(Co),
        static_cast<int>(C), tiles_w, tiles_per_image, /*in_cstride=*/Ct, /*in_branch_off=*/Co,
        /*out_cstride=*/C, /*out_branch_off=*/0);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void wgrad(const at::Tensor& grad, const at::Tensor& x, const std::vector<int64_t>& rates, at::Tensor& dw) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = dw.size(1), Ct = grad.size(1);
  const TapTable taps = make_tap_table(rates, +1);
  TORCH_CHECK(ceil_div(Co, kBlockM) <= 65535, "resaspp_ops._C: too many output channels (", Co, ")");
  const dim3 grid(ceil_div(C, kBlockM), ceil_div(Co, kBlockM), taps.num_taps);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "multi_rate_conv2d_wgrad", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    wgrad_kernel<scalar_t, acc_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), dw.mutable_data_ptr<acc_t>(), taps, N,
        static_cast<int>(H), static_cast<int>(W), static_cast<int>(C), static_cast<int>(Co), /*g_cstride=*/Ct);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace simt
}  // namespace resaspp
