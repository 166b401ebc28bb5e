// The separable forward (separable.h): one CTA per job of resaspp_ops/backend/jobs.py (a tile's branch:
// M = its pixel rows, all Co in blocks of the CTA width), the depthwise and mid stages computed into shared
// memory as the A operand of the pointwise GEMM chunk by chunk of C; the depthwise output never reaches
// global memory.
//
// mma: 4 warps (2 x 2 warp tiles of 64 x 64, mma_common.cuh) = 128 pixel rows x 128 output channels. K step
// s = channels [s kCK, (s + 1) kCK) (kCK = 64 bytes of x's dtype): each thread computes 4 16-byte vectors of
// A (row tid / 4 + 32 i, channels 16 (tid % 4) bytes on) from the job's live taps (per-pixel zero fill at the
// borders), fp32 FMAs, mid stage, cast, stored K-major; B (the [kCK, 128] block of pw_b, Co contiguous) by
// cp.async, MN-major, zero-filled past C and Co. Two stages: step s writes stage s % 2 while the other
// warps may still run the MMAs of step s - 1 on the other one; one barrier a step.
// simt: 256 threads = 128 pixel rows x 64 output channels, 8 x 4 outputs a thread, K chunks of 16
// channels in the accumulation dtype (exact fp32 / fp64; fp16 / bf16 operands rounded as the MMA path's).
#include "mma_common.cuh"
#include "separable.h"
#include "separable_common.cuh"
#include "smem_limit.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>
#include <type_traits>

namespace resaspp {
namespace separable {
namespace {

constexpr int kThreads = 128;
constexpr int kStages = 2;
constexpr int kLdA = mma::kChunkBytes + mma::kPadBytes;  // bytes of a K-major A row: 80

template <typename T>
constexpr int ld_b() {  // bytes of an MN-major B row of 128 output channels
  return kBlockN * static_cast<int>(sizeof(T)) + mma::kPadBytes;
}
template <typename T>
constexpr int stage_bytes() {
  return kBlockM * kLdA + mma::chunk_elems<T>() * ld_b<T>();
}
template <typename T>
constexpr int forward_smem() {
  return kStages * stage_bytes<T>();
}

static_assert(kBlockM * mma::kChunkBytes / 16 == 4 * kThreads, "A stage = 4 vectors a thread");

// Loads the job's live taps into s_tap ({dy, dx, tap}) and returns their count (thread 0 writes).
__device__ __forceinline__ int job_taps(int3* s_tap, int* s_count, int rate, int taps) {
  if (threadIdx.x == 0) {
    int cnt = 0;
    for (int k = 0; k < 9; ++k)
      if ((taps >> k) & 1) s_tap[cnt++] = make_int3(tap_dy(k, rate), tap_dx(k, rate), k);
    *s_count = cnt;
  }
  __syncthreads();
  return *s_count;
}

// out[pixel, branch Co + n] = epilogue(sum_c A[pixel, c] pw[branch, c, n]),
// A = cast(mid_branch(sum over live taps of x[pixel + d_tap, c] dw[branch, tap, c])).
template <typename T>
__global__ void __launch_bounds__(kThreads) separable_forward_mma_kernel(
    const T* __restrict__ x,              // [N, H, W, C]
    const float* __restrict__ dw,         // [1+B, 9, C]
    const float* __restrict__ mid_scale,  // [(1+B) C] or nullptr
    const float* __restrict__ mid_shift,  // [(1+B) C] or nullptr
    const bool mid_relu,                  // on branches 1..B
    const T* __restrict__ pw,             // [1+B, C, Co]
    T* __restrict__ out,                  // [N, H, W, (1+B) Co]
    const float* __restrict__ scale,      // [(1+B) Co] or nullptr
    const float* __restrict__ shift,      // [(1+B) Co] or nullptr
    const bool relu,
    const int* __restrict__ jobs,         // [J, 4]: (image, tile, branch, taps)
    const __grid_constant__ JobGeometry g) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  constexpr int kCK = mma::chunk_elems<T>();
  constexpr int kVec = mma::vec_elems<T>();
  constexpr int kE = static_cast<int>(sizeof(T));
  constexpr int kStepK = 32 / kE;  // K of one MMA step: 16 (fp16 / bf16) or 8 (TF32)
  static_assert(Vec<T>::kN == kVec, "a 16-byte vector");
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int3 s_tap[9];
  __shared__ int s_count;

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int* job = jobs + 4 * static_cast<int64_t>(blockIdx.x);
  const int image = job[0], tile = job[1], branch = job[2];
  const int n0 = static_cast<int>(blockIdx.y) * kBlockN;
  const int ntaps = job_taps(s_tap, &s_count, g.rates[branch], job[3]);
  const int num_k = (g.C + kCK - 1) / kCK;

  const float* dw_b = dw + static_cast<int64_t>(branch) * 9 * g.C;
  const float* ms = mid_scale != nullptr ? mid_scale + static_cast<int64_t>(branch) * g.C : nullptr;
  const float* mt = mid_shift != nullptr ? mid_shift + static_cast<int64_t>(branch) * g.C : nullptr;
  const bool mrelu = mid_relu && branch > 0;
  const T* pw_b = pw + static_cast<int64_t>(branch) * g.C * g.Co;

  // This thread's four A vectors: rows tid / 4 + 32 i (a row's pixel is fixed), 16 bytes at 16 (tid % 4).
  int a_n[4], a_h[4], a_w[4];
  bool a_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) a_ok[i] = row_pixel(g, image, tile, tid / 4 + 32 * i, a_n[i], a_h[i], a_w[i]);

  auto load_b = [&](int s, unsigned char* sb) {
    constexpr int kVpr = kBlockN * kE / 16;  // vectors of a B row
    const int k0 = s * kCK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int v = tid + kThreads * i;
      const int row = v / kVpr, cv = v % kVpr;
      const int k = k0 + row, m = n0 + cv * kVec;
      const bool valid = k < g.C && m < g.Co;
      mma::cp_async16(sb + row * ld_b<T>() + cv * 16, valid ? pw_b + static_cast<int64_t>(k) * g.Co + m : pw_b,
                      valid);
    }
  };
  auto build_a = [&](int s, unsigned char* sa) {
    const int k0 = s * kCK;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = tid / 4 + 32 * i, c = k0 + (tid % 4) * kVec;
      float d[kVec];
#pragma unroll
      for (int e = 0; e < kVec; ++e) d[e] = 0.0f;
      if (a_ok[i] && c < g.C) {
        for (int t = 0; t < ntaps; ++t) {
          const int3 tp = s_tap[t];
          const int h = a_h[i] + tp.x, w = a_w[i] + tp.y;
          if (h < 0 || h >= g.H || w < 0 || w >= g.W) continue;  // zero padding
          float xv[kVec];
          Vec<T>::load(xv, *reinterpret_cast<const int4*>(
                               x + ((static_cast<int64_t>(a_n[i]) * g.H + h) * g.W + w) * g.C + c));
          const float* wp = dw_b + tp.z * g.C + c;
#pragma unroll
          for (int e = 0; e < kVec; ++e) d[e] = fmaf(xv[e], __ldg(wp + e), d[e]);
        }
#pragma unroll
        for (int e = 0; e < kVec; ++e) d[e] = mid_stage(d[e], ms, mt, c + e, mrelu);
      }
      *reinterpret_cast<int4*>(sa + row * kLdA + (tid % 4) * 16) = Vec<T>::pack(d);
    }
  };

  float acc[4][8][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[i][j][q] = 0.0f;

  for (int s = 0; s < num_k; ++s) {
    unsigned char* sa = smem + (s % kStages) * stage_bytes<T>();
    unsigned char* sb = sa + kBlockM * kLdA;
    load_b(s, sb);
    mma::cp_async_commit();
    build_a(s, sa);
    mma::cp_async_wait<0>();
    __syncthreads();  // stage s written by all; every warp is past the MMAs of step s - 2 (this stage's last use)
    const unsigned char* a = sa + wm * 64 * kLdA;
    const unsigned char* b = sb + wn * 64 * kE;
#pragma unroll
    for (int k = 0; k < kCK; k += kStepK) mma::warp_tile_step<T, false, true>(acc, a, kLdA, b, ld_b<T>(), k, lane);
  }

  mma::store_epilogue<T>(acc, g, image, tile, wm, wn, lane, n0, g.Co, static_cast<int64_t>(branch) * g.Co,
                         static_cast<int64_t>(g.num_branches) * g.Co, scale, shift, relu, out);
#endif
}

constexpr int kSimtThreads = 256;

template <typename T, typename Acc>
__global__ void __launch_bounds__(kSimtThreads) separable_forward_simt_kernel(
    const T* __restrict__ x, const Acc* __restrict__ dw, const Acc* __restrict__ mid_scale,
    const Acc* __restrict__ mid_shift, const bool mid_relu, const T* __restrict__ pw, T* __restrict__ out,
    const Acc* __restrict__ scale, const Acc* __restrict__ shift, const bool relu, const int* __restrict__ jobs,
    const __grid_constant__ JobGeometry g) {
  __shared__ Acc s_a[kSimtK][kBlockM];
  __shared__ Acc s_b[kSimtK][kSimtN];
  __shared__ int3 s_tap[9];
  __shared__ int s_count;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int* job = jobs + 4 * static_cast<int64_t>(blockIdx.x);
  const int image = job[0], tile = job[1], branch = job[2];
  const int n0 = static_cast<int>(blockIdx.y) * kSimtN;
  const int ntaps = job_taps(s_tap, &s_count, g.rates[branch], job[3]);
  const Acc* dw_b = dw + static_cast<int64_t>(branch) * 9 * g.C;
  const Acc* ms = mid_scale != nullptr ? mid_scale + static_cast<int64_t>(branch) * g.C : nullptr;
  const Acc* mt = mid_shift != nullptr ? mid_shift + static_cast<int64_t>(branch) * g.C : nullptr;
  const bool mrelu = mid_relu && branch > 0;
  const T* pw_b = pw + static_cast<int64_t>(branch) * g.C * g.Co;

  Acc acc[8][4];
#pragma unroll
  for (int r = 0; r < 8; ++r)
#pragma unroll
    for (int q = 0; q < 4; ++q) acc[r][q] = Acc(0);

  for (int k0 = 0; k0 < g.C; k0 += kSimtK) {
    __syncthreads();  // the previous chunk's reads are done
#pragma unroll
    for (int i = 0; i < kSimtK * kBlockM / kSimtThreads; ++i) {
      const int e = tid + kSimtThreads * i, kk = e / kBlockM, m = e % kBlockM, c = k0 + kk;
      Acc v = Acc(0);
      int n, h, w;
      if (c < g.C && row_pixel(g, image, tile, m, n, h, w)) {
        for (int t = 0; t < ntaps; ++t) {
          const int3 tp = s_tap[t];
          const int hh = h + tp.x, ww = w + tp.y;
          if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) continue;
          v += to_acc<Acc>(x[((static_cast<int64_t>(n) * g.H + hh) * g.W + ww) * g.C + c]) * dw_b[tp.z * g.C + c];
        }
        v = to_acc<Acc>(Cast<T>::from(mid_stage(v, ms, mt, c, mrelu)));  // the A operand in x's dtype
      }
      s_a[kk][m] = v;
    }
#pragma unroll
    for (int i = 0; i < kSimtK * kSimtN / kSimtThreads; ++i) {
      const int e = tid + kSimtThreads * i, kk = e / kSimtN, nn = e % kSimtN, c = k0 + kk, co = n0 + nn;
      s_b[kk][nn] = c < g.C && co < g.Co ? to_acc<Acc>(pw_b[static_cast<int64_t>(c) * g.Co + co]) : Acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kSimtK; ++kk) {
      Acc a[8], b[4];
#pragma unroll
      for (int r = 0; r < 8; ++r) a[r] = s_a[kk][ty * 8 + r];
#pragma unroll
      for (int q = 0; q < 4; ++q) b[q] = s_b[kk][tx * 4 + q];
#pragma unroll
      for (int r = 0; r < 8; ++r)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[r][q] += a[r] * b[q];
    }
  }

  const int64_t c_base = static_cast<int64_t>(branch) * g.Co, cstride = static_cast<int64_t>(g.num_branches) * g.Co;
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    int n, h, w;
    if (!row_pixel(g, image, tile, ty * 8 + r, n, h, w)) continue;
    T* row = out + ((static_cast<int64_t>(n) * g.H + h) * g.W + w) * cstride + c_base;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int co = n0 + tx * 4 + q;
      if (co >= g.Co) continue;
      Acc v = acc[r][q];
      if (scale != nullptr) v = v * scale[c_base + co];
      if (shift != nullptr) v = v + shift[c_base + co];
      if (relu) v = v < Acc(0) ? Acc(0) : v;
      row[co] = Cast<T>::from(v);
    }
  }
}

template <typename T>
const T* ptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}

void check_grid(int64_t jobs, int64_t grid_y) {
  TORCH_CHECK(jobs <= std::numeric_limits<int>::max() && grid_y <= 65535,
              "resaspp_ops._C: too many separable jobs (", jobs, " x ", grid_y, ")");
}

}  // namespace

void forward_mma(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& mid_scale,
                 const at::Tensor& mid_shift, bool mid_relu, const at::Tensor& scale, const at::Tensor& shift,
                 bool relu, at::Tensor& out, const at::Tensor& jobs, const JobGeometry& g) {
  const int64_t J = jobs.size(0), grid_y = (g.Co + kBlockN - 1) / kBlockN;
  if (J == 0) return;
  check_grid(J, grid_y);
  auto run = [&](auto tag) {
    using T = decltype(tag);
    auto kernel = separable_forward_mma_kernel<T>;
    constexpr int smem = forward_smem<T>();
    set_smem_limit(reinterpret_cast<const void*>(kernel), smem);
    kernel<<<dim3(static_cast<unsigned>(J), static_cast<unsigned>(grid_y)), kThreads, smem,
             c10::cuda::getCurrentCUDAStream()>>>(
        ptr<T>(x), ptr<float>(dw), ptr<float>(mid_scale), ptr<float>(mid_shift), mid_relu, ptr<T>(pw),
        static_cast<T*>(out.data_ptr()), ptr<float>(scale), ptr<float>(shift), relu, jobs.const_data_ptr<int>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const at::ScalarType t = x.scalar_type();
  if (t == at::kHalf)
    run(__half{});
  else if (t == at::kBFloat16)
    run(__nv_bfloat16{});
  else {
    TORCH_CHECK(t == at::kFloat, "resaspp_ops._C: the separable mma kernel takes fp16, bf16 or fp32 (TF32), got ", t);
    run(float{});
  }
}

void forward_simt(const at::Tensor& x, const at::Tensor& dw, const at::Tensor& pw, const at::Tensor& mid_scale,
                  const at::Tensor& mid_shift, bool mid_relu, const at::Tensor& scale, const at::Tensor& shift,
                  bool relu, at::Tensor& out, const at::Tensor& jobs, const JobGeometry& g) {
  const int64_t J = jobs.size(0), grid_y = (g.Co + kSimtN - 1) / kSimtN;
  if (J == 0) return;
  check_grid(J, grid_y);
  auto run = [&](auto tag, auto acc_tag) {
    using T = decltype(tag);
    using Acc = decltype(acc_tag);
    separable_forward_simt_kernel<T, Acc>
        <<<dim3(static_cast<unsigned>(J), static_cast<unsigned>(grid_y)), kSimtThreads, 0,
           c10::cuda::getCurrentCUDAStream()>>>(
            ptr<T>(x), ptr<Acc>(dw), ptr<Acc>(mid_scale), ptr<Acc>(mid_shift), mid_relu, ptr<T>(pw),
            static_cast<T*>(out.data_ptr()), ptr<Acc>(scale), ptr<Acc>(shift), relu, jobs.const_data_ptr<int>(), g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  const at::ScalarType t = x.scalar_type();
  if (t == at::kHalf)
    run(__half{}, float{});
  else if (t == at::kBFloat16)
    run(__nv_bfloat16{}, float{});
  else if (t == at::kFloat)
    run(float{}, float{});
  else {
    TORCH_CHECK(t == at::kDouble, "resaspp_ops._C: the separable simt kernel takes fp16, bf16, fp32 or fp64, got ", t);
    run(double{}, double{});
  }
}

}  // namespace separable
}  // namespace resaspp
