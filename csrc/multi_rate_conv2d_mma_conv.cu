// The mma.sync forward and dgrad (multi_rate_conv2d_mma.h): one multi-tap implicit-GEMM kernel over the
// jobs of resaspp_ops/backend/jobs.py. Wgrad is in multi_rate_conv2d_mma_wgrad.cu, so the two files
// compile in parallel.
//
// CTA = 4 warps (2 x 2 warp tiles of 64 x 64) = 128 pixel rows x 128 channels; a job's entries are its
// live taps (forward: the branch's; dgrad: every branch's, mirrored), each run over all K chunks of
// 64 bytes; step s of the flat (entry, chunk) loop lives in stage s % 4 of a cp.async pipeline, with
// zero fill for the padding and the tails. A: pixel rows of the shifted input, K-major. B: the tap's
// weight rows as they lie in memory (C innermost): K-major for the forward, MN-major for dgrad.
#include "mma_common.cuh"
#include "multi_rate_conv2d_mma.h"
#include "smem_limit.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

namespace resaspp {
namespace mma {
namespace {

constexpr int kThreads = 128;
constexpr int kLdK = kChunkBytes + kPadBytes;  // bytes of a K-major row: 80

template <typename T>
constexpr int ld_mn() {  // bytes of an MN-major row of 128 elements
  return kBlockN * static_cast<int>(sizeof(T)) + kPadBytes;
}
template <typename T, bool kDgrad>
constexpr int b_bytes() {
  return kDgrad ? chunk_elems<T>() * ld_mn<T>() : kBlockN * kLdK;
}
template <typename T, bool kDgrad>
constexpr int stage_bytes() {
  return kBlockM * kLdK + b_bytes<T, kDgrad>();
}
template <typename T, bool kDgrad>
constexpr int conv_smem() {
  return kStages * stage_bytes<T, kDgrad>();
}

// The branch weights, C innermost (strides in elements).
struct Weights {
  const void* w1;  // [Co, C]
  int64_t w1_co;
  const void* w3;  // [B, Co, C, 3, 3]
  int64_t b, co, ky, kx;
};

static_assert(kBlockM * kChunkBytes / 16 == 4 * kThreads, "A stage = 4 vectors a thread");
static_assert(kBlockN * kChunkBytes / 16 == 4 * kThreads, "B stage = 4 vectors a thread");

// out[n, p, out_branch Co + m] = epilogue(sum over the job's entries and k of
//   in[n, p + (dy, dx), in_branch Co + k] * W_entry[k -> m])
template <typename T, bool kDgrad>
__global__ void __launch_bounds__(kThreads) multi_tap_mma_kernel(
    const T* __restrict__ in,         // [N, H, W, in_cstride] NHWC: x, or grad with in_cstride = (1+B) Co
    const Weights wt,
    T* __restrict__ out,              // [N, H, W, out_cstride] NHWC: out, or grad_x with out_cstride = C
    const float* __restrict__ scale,  // [(1+B) Co] or nullptr (forward only)
    const float* __restrict__ shift,  // [(1+B) Co] or nullptr
    const bool relu,
    const int* __restrict__ jobs,     // [J, 4]: (image, tile, branch, taps) or (image, tile, c block, taps)
    const int* __restrict__ masks,    // dgrad: [tiles, 1+B] mirrored live-tap masks
    const __grid_constant__ JobGeometry g, const int64_t in_cstride, const int64_t out_cstride) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kCK = chunk_elems<T>();   // K elements a stage
  constexpr int kVec = vec_elems<T>();
  constexpr int kE = static_cast<int>(sizeof(T));
  constexpr int kStepK = 32 / kE;         // K of one MMA step: 16 (fp16 / bf16) or 8 (TF32)
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int4 s_entry[kMaxTaps];      // {dy, dx, weight branch, tap ky * 3 + kx}
  __shared__ int s_count;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int* job = jobs + 4 * static_cast<int64_t>(blockIdx.x);
  const int image = job[0], tile = job[1];
  const int n0 = (kDgrad ? job[2] : static_cast<int>(blockIdx.y)) * kBlockN;  // first output channel
  const int K = kDgrad ? g.Co : g.C;
  const int M = kDgrad ? g.C : g.Co;

  if (tid == 0) {
    int cnt = 0;
    if (!kDgrad) {
      const int b = job[2], r = g.rates[b];
      for (int k = 0; k < 9; ++k)
        if ((job[3] >> k) & 1) s_entry[cnt++] = make_int4((k / 3 - 1) * r, (k % 3 - 1) * r, b, k);
    } else {
      for (int b = 0; b < g.num_branches; ++b) {
        const int r = g.rates[b], mask = masks[tile * g.num_branches + b];
        for (int k = 0; k < 9; ++k)
          if ((mask >> k) & 1) s_entry[cnt++] = make_int4(-(k / 3 - 1) * r, -(k % 3 - 1) * r, b, k);
      }
    }
    s_count = cnt;
  }
  __syncthreads();
  const int num_k = (K + kCK - 1) / kCK;
  const int num_steps = s_count * num_k;

  // This thread's four A vectors: rows tid / 4 + 32 i, 16 bytes at 16 (tid % 4); a row's pixel is fixed.
  int a_n[4], a_h[4], a_w[4];
  bool a_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) a_ok[i] = row_pixel(g, image, tile, tid / 4 + 32 * i, a_n[i], a_h[i], a_w[i]);

  auto load_step = [&](int s, int stage) {
    const int4 ent = s_entry[s / num_k];
    const int k0 = (s % num_k) * kCK;
    unsigned char* sa = smem + stage * stage_bytes<T, kDgrad>();
    unsigned char* sb = sa + kBlockM * kLdK;
    const T* in_b = in + (kDgrad ? static_cast<int64_t>(ent.z) * g.Co : 0);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = tid / 4 + 32 * i, kv = tid % 4;
      const int h = a_h[i] + ent.x, w = a_w[i] + ent.y, k = k0 + kv * kVec;
      const bool valid = a_ok[i] && h >= 0 && h < g.H && w >= 0 && w < g.W && k < K;
      const T* src = valid ? in_b + ((static_cast<int64_t>(a_n[i]) * g.H + h) * g.W + w) * in_cstride + k : in;
      cp_async16(sa + row * kLdK + kv * 16, src, valid);
    }
    const T* wtap;
    int64_t co_stride;
    if (ent.z == 0) {
      wtap = static_cast<const T*>(wt.w1);
      co_stride = wt.w1_co;
    } else {
      wtap = static_cast<const T*>(wt.w3) + (ent.z - 1) * wt.b + (ent.w / 3) * wt.ky + (ent.w % 3) * wt.kx;
      co_stride = wt.co;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = tid + kThreads * i;
      if (!kDgrad) {  // rows = output channels, 64 bytes of C each
        const int row = v / 4, kv = v % 4;
        const int m = n0 + row, k = k0 + kv * kVec;
        const bool valid = m < M && k < K;
        cp_async16(sb + row * kLdK + kv * 16, valid ? wtap + m * co_stride + k : wtap, valid);
      } else {        // rows = output channels (K), 128 input channels each
        constexpr int kVpr = kBlockN * kE / 16;
        const int row = v / kVpr, cv = v % kVpr;
        const int k = k0 + row, m = n0 + cv * kVec;
        const bool valid = k < K && m < M;
        cp_async16(sb + row * ld_mn<T>() + cv * 16, valid ? wtap + k * co_stride + m : wtap, valid);
      }
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  // One commit group per step (possibly empty), so that wait_group<kStages - 2> means "step s has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_steps) load_step(s, s);
    cp_async_commit();
  }
  for (int s = 0; s < num_steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step s visible to all; every warp is done with step s - 1's stage
    if (s + kStages - 1 < num_steps) load_step(s + kStages - 1, (s + kStages - 1) % kStages);
    cp_async_commit();
    const unsigned char* sa = smem + (s % kStages) * stage_bytes<T, kDgrad>();
    const unsigned char* sb = sa + kBlockM * kLdK;
    const unsigned char* a = sa + wm * 64 * kLdK;
    const unsigned char* b = kDgrad ? sb + wn * 64 * kE : sb + wn * 64 * kLdK;
#pragma unroll
    for (int k = 0; k < kCK; k += kStepK)
      warp_tile_step<T, false, kDgrad>(acc, a, kLdK, b, kDgrad ? ld_mn<T>() : kLdK, k, lane);
  }
  cp_async_wait<0>();

  // Epilogue from the accumulators (mma_common.cuh).
  const int64_t c_base = kDgrad ? 0 : static_cast<int64_t>(job[2]) * g.Co;
  store_epilogue<T>(acc, g, image, tile, wm, wn, lane, n0, M, c_base, out_cstride, scale, shift, relu, out);
#endif
}

template <typename T, bool kDgrad>
void launch(const T* in, const Weights& wt, T* out, const float* scale, const float* shift, bool relu,
            const at::Tensor& jobs, const int* masks, const JobGeometry& g, int64_t in_cstride, int64_t out_cstride,
            int grid_y) {
  const int64_t J = jobs.size(0);
  if (J == 0) return;
  TORCH_CHECK(J <= std::numeric_limits<int>::max() && grid_y <= 65535, "resaspp_ops._C: too many mma jobs");
  auto kernel = multi_tap_mma_kernel<T, kDgrad>;
  constexpr int smem = conv_smem<T, kDgrad>();
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  kernel<<<dim3(static_cast<unsigned>(J), grid_y), kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      in, wt, out, scale, shift, relu, jobs.const_data_ptr<int>(), masks, g, in_cstride, out_cstride);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

Weights weights(const at::Tensor& w1, const at::Tensor& w3) {
  TORCH_CHECK(w1.stride(1) == 1 && w3.stride(2) == 1, "resaspp_ops._C: mma weights must have C innermost");
  return Weights{w1.const_data_ptr(), w1.stride(0), w3.const_data_ptr(), w3.stride(0), w3.stride(1),
                 w3.stride(3), w3.stride(4)};
}

template <typename F>
void dispatch(at::ScalarType dtype, F&& f) {
  if (dtype == at::kHalf)
    f(__half{});
  else if (dtype == at::kBFloat16)
    f(__nv_bfloat16{});
  else {
    TORCH_CHECK(dtype == at::kFloat, "resaspp_ops._C: the mma kernels take fp16, bf16 or fp32 (TF32)");
    f(float{});
  }
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& out,
             const at::Tensor& scale, const at::Tensor& shift, bool relu, const at::Tensor& jobs,
             const JobGeometry& g) {
  const Weights wt = weights(w1, w3);
  const float* sc = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  const float* sh = shift.defined() ? shift.const_data_ptr<float>() : nullptr;
  dispatch(x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch<T, false>(static_cast<const T*>(x.const_data_ptr()), wt, static_cast<T*>(out.data_ptr()), sc, sh, relu,
                     jobs, nullptr, g, /*in_cstride=*/g.C, /*out_cstride=*/out.size(1),
                     (g.Co + kBlockN - 1) / kBlockN);
  });
}

void dgrad(const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& grad_x,
           const at::Tensor& jobs, const at::Tensor& masks, const JobGeometry& g) {
  const Weights wt = weights(w1, w3);
  dispatch(grad.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch<T, true>(static_cast<const T*>(grad.const_data_ptr()), wt, static_cast<T*>(grad_x.data_ptr()), nullptr,
                    nullptr, false, jobs, masks.const_data_ptr<int>(), g, /*in_cstride=*/grad.size(1),
                    /*out_cstride=*/g.C, 1);
  });
}

void pointwise(const at::Tensor& in, int64_t in_offset, int64_t in_cstride, const at::Tensor& w, at::Tensor& out,
               const at::Tensor& jobs, const JobGeometry& g) {
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && w.size(0) == g.Co && w.size(1) == g.C,
              "resaspp_ops._C: pointwise weights must be [M, K] with K innermost");
  const Weights wt{w.const_data_ptr(), w.stride(0), w.const_data_ptr(), 0, 0, 0, 0};
  dispatch(in.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    launch<T, false>(static_cast<const T*>(in.const_data_ptr()) + in_offset, wt, static_cast<T*>(out.data_ptr()),
                     nullptr, nullptr, false, jobs, nullptr, g, in_cstride, /*out_cstride=*/g.Co,
                     (g.Co + kBlockN - 1) / kBlockN);
  });
}

}  // namespace mma
}  // namespace resaspp
