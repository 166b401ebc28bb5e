// Device helpers shared by the tensor-core kernels: cp.async, element types, tap tests, and the
// multi-tap implicit-GEMM kernel used by both the forward and dgrad (DESIGN.md section 4).
//
// Tensor cores through nvcuda::wmma (16x16x16, fp16/bf16 in, fp32 accumulate; HMMA in SASS):
// its fragments hide the register layouts, so the index math left to check is the tiles'.
#pragma once

#include "multi_rate_conv2d_tc.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>

namespace resaspp {
namespace tc {

// The CUDA element type of a c10 scalar type.
template <typename scalar_t> struct CudaType;
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// 16-byte global -> shared copy; when !valid the 16 bytes are zero-filled and nothing is read
// (src-size 0), so padding and out-of-range channels cost no memory traffic.
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Tap (dy, dx) reads only zero padding for every output pixel of [h0,h1) x [w0,w1).
__device__ __forceinline__ bool tap_is_padding(int h0, int h1, int w0, int w1, int dy, int dx, int H, int W) {
  return h1 + dy <= 0 || h0 + dy >= H || w1 + dx <= 0 || w0 + dx >= W;
}

// ---------------------------------------------------------------------------------------------
// Multi-tap kernel (forward and dgrad).
//
// CTA = 8 warps, output tile = tile_h x tile_w pixels (at most M = 128 pixel slots; the host picks
// the shape per map: 11 x 11 covers 33 x 33 exactly, where 8 x 16 would waste 44% of the slots)
// x 64 output channels (N), K-chunk = 32. Pixel slot q < tile_h * tile_w is tile pixel
// (q / tile_w, q % tile_w); the slots past it are zero rows that are never stored.
// Warp (wm, wn), wm in 0..3, wn in 0..1, owns slots 32wm .. 32wm+31 (two 16-slot M fragments) and
// channels 32wn .. 32wn+31 (two N fragments).
//
// Work is a list of "entries", each run over all K-chunks; an entry's stage holds one shifted input
// tile A [128 px][32 ch] and up to kSlots weight tiles B [32 ch][64 out-ch]:
//   forward: entry 0 is the centre: A = the unshifted x tile, loaded once per K-chunk and multiplied
//            by the centre weights of every branch of the CTA's branch group (kSlots = 4 branches,
//            one accumulator set each); the other entries are the off-centre taps that are not
//            wholly padding for this tile (one B, into their branch's accumulators).
//   dgrad:   every tap of every branch that is not wholly padding (A = that branch's grad, shifted
//            by the negated offset), all into one accumulator set (kSlots = 1).
// The list depends only on the tile, so skipping is uniform per CTA.
// ---------------------------------------------------------------------------------------------
constexpr int kThreads = 256;
constexpr int kTilePix = 128;  // pixel slots per tile (M)
constexpr int kBlockN = 64;
constexpr int kBlockK = 32;
constexpr int kStages = 3;
constexpr int kPad = 8;                     // 16 bytes of row padding against bank conflicts
constexpr int kLdA = kBlockK + kPad;        // 40 elements
constexpr int kLdB = kBlockN + kPad;        // 72 elements
constexpr int kLdC = kBlockN + 4;           // 68 floats (epilogue staging)
constexpr int kATile = kTilePix * kLdA;     // elements
constexpr int kBTile = kBlockK * kLdB;      // elements
constexpr int kFwdSlots = 4;                // branches per forward CTA (1x1 + 3 atrous: DeepLab's)

template <bool kDgrad> constexpr int slots() { return kDgrad ? 1 : kFwdSlots; }

template <bool kDgrad> constexpr int conv_smem_bytes() {
  // 2-byte elements; the fp32 epilogue staging tile reuses the pipeline buffers.
  return kStages * (kATile + slots<kDgrad>() * kBTile) * 2 > kTilePix * kLdC * 4
             ? kStages * (kATile + slots<kDgrad>() * kBTile) * 2
             : kTilePix * kLdC * 4;
}

// Alignment facts the wmma loads (32-byte aligned pointers) and cp.async (16 bytes) rely on.
static_assert((kLdA * 2) % 16 == 0 && (16 * kLdA * 2) % 32 == 0, "A rows");
static_assert((kLdB * 2) % 16 == 0 && (16 * kLdB * 2) % 32 == 0, "B rows");
static_assert((kATile * 2) % 128 == 0 && (kBTile * 2) % 32 == 0, "stage layout");
static_assert((16 * kLdC * 4) % 32 == 0, "C rows");
static_assert(kTilePix * (kBlockK / kVec) == 2 * kThreads, "A tile = 2 vectors per thread");
static_assert(kBlockK * (kBlockN / kVec) == kThreads, "B tile = 1 vector per thread");
static_assert(kTilePix * (kBlockN / kVec) == 4 * kThreads, "epilogue = 4 vectors per thread");

// out[n, p, ob*out_branch_off + m] = epilogue(sum over the entries' taps and k of
//   in[n, p + (dy, dx), b_t*in_branch_off + k] * wpk[t, k, m])
template <typename T, bool kDgrad>
__global__ void __launch_bounds__(kThreads, 1) multi_tap_tc_kernel(
    const T* __restrict__ in,         // [N, H, W, in_cstride] NHWC
    const T* __restrict__ wpk,        // [T, K, M] packed weights: tap t maps K -> M channels
    T* __restrict__ out,              // [N, H, W, out_cstride] NHWC
    const float* __restrict__ scale,  // [out_cstride] per-channel epilogue, or nullptr
    const float* __restrict__ shift,  // [out_cstride] or nullptr
    const bool relu, const TapTable taps, const int num_branches, const int H, const int W, const int K,
    const int M, const int tile_h, const int tile_w, const int tiles_w, const int tiles_per_image,
    const int64_t in_cstride, const int64_t in_branch_off, const int64_t out_cstride, const int64_t out_branch_off) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  using namespace nvcuda;
  constexpr int kSlots = slots<kDgrad>();
  constexpr int kStage = kATile + kSlots * kBTile;  // elements per pipeline stage
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);
  // Per entry {tap t (-1 = the forward's shared centre), dy, dx, input branch}.
  __shared__ int4 s_entry[kMaxTaps];
  __shared__ int s_num_entries;

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t n = blockIdx.x / tiles_per_image;
  const int tile = blockIdx.x % tiles_per_image;
  const int h0 = (tile / tiles_w) * tile_h;
  const int w0 = (tile % tiles_w) * tile_w;
  const int h1 = min(h0 + tile_h, H);
  const int w1 = min(w0 + tile_w, W);
  const int tile_pix = tile_h * tile_w;
  const int m0 = blockIdx.y * kBlockN;
  // Forward: this CTA's branches are first_branch .. first_branch + nbr - 1.
  const int first_branch = kDgrad ? 0 : blockIdx.z * kSlots;
  const int nbr = kDgrad ? 1 : min(kSlots, num_branches - first_branch);

  // The entry list (uniform for the CTA).
  if (tid == 0) {
    int cnt = 0;
    if (kDgrad) {
      for (int t = 0; t < taps.num_taps; ++t)
        if (!tap_is_padding(h0, h1, w0, w1, taps.dy[t], taps.dx[t], H, W))
          s_entry[cnt++] = make_int4(t, taps.dy[t], taps.dx[t], taps.branch[t]);
    } else {
      s_entry[cnt++] = make_int4(-1, 0, 0, 0);  // the centre tap (0, 0) is never padding
      for (int b = max(first_branch, 1); b < first_branch + nbr; ++b)
        for (int k = 0; k < 9; ++k) {
          const int t = 1 + 9 * (b - 1) + k;
          if (k != 4 && !tap_is_padding(h0, h1, w0, w1, taps.dy[t], taps.dx[t], H, W))
            s_entry[cnt++] = make_int4(t, taps.dy[t], taps.dx[t], b);
        }
    }
    s_num_entries = cnt;
  }
  __syncthreads();
  const int num_k = (K + kBlockK - 1) / kBlockK;
  const int num_steps = s_num_entries * num_k;

  // Centre weight tap of branch b: the 1x1 is tap 0, atrous branch b's (1, 1) is 1 + 9(b-1) + 4.
  auto centre_tap = [&](int b) { return b == 0 ? 0 : 9 * b - 4; };

  // This thread's two A-tile vectors: slot tid / 4 + 64 i, channels 8 (tid % 4) ..; the slot's tile
  // pixel is fixed for the whole kernel, so its position is worked out once.
  int a_r[2], a_c[2];
  bool a_in[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int q = (tid + i * kThreads) / (kBlockK / kVec);
    a_in[i] = q < tile_pix;
    a_r[i] = h0 + q / tile_w;
    a_c[i] = w0 + q % tile_w;
  }

  // Issue the cp.async copies of step s into stage buffer `stage`.
  auto load_step = [&](int s, int stage) {
    const int4 ent = s_entry[s / num_k];
    const int e = ent.x, dy = ent.y, dx = ent.z;
    const int k0 = (s % num_k) * kBlockK;
    T* sa = smem + stage * kStage;
    T* sb = sa + kATile;
    const T* in_b = in + ent.w * in_branch_off;
    // A: 128 pixel slots x 4 vectors of 8 channels, 2 vectors per thread.
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int v = tid + i * kThreads;
      const int p = v / (kBlockK / kVec), kv = v % (kBlockK / kVec);
      const int h = a_r[i] + dy, w = a_c[i] + dx;
      const int k = k0 + kv * kVec;
      const bool valid = a_in[i] && h >= 0 && h < H && w >= 0 && w < W && k < K;
      const T* src = valid ? in_b + ((n * H + h) * W + w) * in_cstride + k : in;
      cp_async16(sa + p * kLdA + kv * kVec, src, valid);
    }
    // B: 32 rows x 8 vectors, 1 vector per thread, for each weight tile of this entry.
    const int row = tid / (kBlockN / kVec), mv = tid % (kBlockN / kVec);
    const int k = k0 + row, m = m0 + mv * kVec;
    const int nb = e < 0 ? nbr : 1;
    for (int g = 0; g < nb; ++g) {
      const int t = e < 0 ? centre_tap(first_branch + g) : e;
      const bool valid = k < K && m < M;
      const T* src = valid ? wpk + (static_cast<int64_t>(t) * K + k) * M + m : wpk;
      cp_async16(sb + g * kBTile + row * kLdB + mv * kVec, src, valid);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kSlots][2][2];
#pragma unroll
  for (int g = 0; g < kSlots; ++g)
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[g][i][j], 0.0f);

  // cp.async pipeline, kStages deep: step s lives in stage s % kStages; one commit group per step
  // (possibly empty) so that wait_group<kStages-2> always means "step s has landed".
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < num_steps) load_step(s, s);
    cp_async_commit();
  }
  for (int s = 0; s < num_steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step s visible to all; every warp is done with step s-1's stage
    if (s + kStages - 1 < num_steps) load_step(s + kStages - 1, (s + kStages - 1) % kStages);
    cp_async_commit();

    const int4 ent = s_entry[s / num_k];
    const T* sa = smem + (s % kStages) * kStage;
    const T* sb = sa + kATile;
    const int slot = ent.x < 0 ? -1 : (kDgrad ? 0 : ent.w - first_branch);
#pragma unroll
    for (int kk = 0; kk < kBlockK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], sa + (wm * 2 + i) * 16 * kLdA + kk, kLdA);
#pragma unroll
      for (int g = 0; g < kSlots; ++g) {
        // Centre: B tile g feeds branch slot g. Off-centre: B tile 0 feeds the tap's slot.
        if (slot < 0 ? g < nbr : g == slot) {
          const T* b = sb + (slot < 0 ? g : 0) * kBTile;
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
            wmma::load_matrix_sync(fb, b + kk * kLdB + wn * 32 + j * 16, kLdB);
#pragma unroll
            for (int i = 0; i < 2; ++i) wmma::mma_sync(acc[g][i][j], fa[i], fb, acc[g][i][j]);
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // the pipeline buffers become the epilogue's staging tile

  // Epilogue, branch by branch: stage the fp32 tile in shared memory, then 16-byte stores of
  // scale/shift/ReLU(acc) cast to T into the concatenated NHWC output.
  float* sc = reinterpret_cast<float*>(smem_raw);
#pragma unroll
  for (int g = 0; g < kSlots; ++g) {
    if (g < nbr) {
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::store_matrix_sync(sc + (wm * 2 + i) * 16 * kLdC + wn * 32 + j * 16, acc[g][i][j], kLdC,
                                  wmma::mem_row_major);
      __syncthreads();
      const int64_t c_base = static_cast<int64_t>(first_branch + g) * out_branch_off;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int v = tid + i * kThreads;
        const int p = v / (kBlockN / kVec), mv = v % (kBlockN / kVec);
        const int h = h0 + p / tile_w, w = w0 + p % tile_w;
        const int m = m0 + mv * kVec;
        if (p < tile_pix && h < H && w < W && m < M) {
          alignas(16) T vals[kVec];
#pragma unroll
          for (int q = 0; q < kVec; ++q) {
            float val = sc[p * kLdC + mv * kVec + q];
            if (scale != nullptr) val *= scale[c_base + m + q];
            if (shift != nullptr) val += shift[c_base + m + q];
            if (relu) val = val < 0.0f ? 0.0f : val;  // NaN stays NaN, as in torch.relu
            vals[q] = from_float<T>(val);
          }
          *reinterpret_cast<uint4*>(out + ((n * H + h) * W + w) * out_cstride + c_base + m) =
              *reinterpret_cast<const uint4*>(vals);
        }
      }
      __syncthreads();  // before the next branch overwrites the staging tile
    }
  }
#endif
}

}  // namespace tc
}  // namespace resaspp
