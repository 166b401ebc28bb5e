// Device helpers of the mma.sync kernels (sm_80 and newer; multi_rate_conv2d_mma_*.cu): cp.async copies,
// ldmatrix fragment loads, the m16n8k16 (fp16 / bf16) and m16n8k8 (TF32) MMAs, and a 64 x 64 warp tile
// built from them (4 x 8 MMA tiles, 128 fp32 accumulators a thread).
//
// Operands sit in shared memory in the layout their global rows have: "K-major" rows hold 64 bytes of K
// (a pixel's channels, a weight row's input channels), "MN-major" rows hold one K index (a pixel, an
// output channel) and 64-wide blocks of M or N. 16-bit fragments come from ldmatrix (.trans for
// MN-major); fp32 (TF32) fragments from ldmatrix where K is contiguous and from 32-bit shared loads
// where it is not (ldmatrix.trans moves 16-bit elements). Every function here is inline: the header is
// included by several .cu files.
#pragma once

#include "job_geometry.h"
#include "mma_fragments.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace resaspp {
namespace mma {

constexpr int kChunkBytes = 64;  // K bytes of a K-major row a pipeline stage holds (32 fp16/bf16, 16 fp32)
constexpr int kPadBytes = 16;    // row padding: ldmatrix's 8 rows land in distinct banks

template <typename T>
constexpr int chunk_elems() {
  return kChunkBytes / static_cast<int>(sizeof(T));
}
template <typename T>
constexpr int vec_elems() {  // elements of a 16-byte cp.async vector
  return 16 / static_cast<int>(sizeof(T));
}

// 16-byte global -> shared copy; when !valid the 16 bytes are zero-filled and nothing is read (src-size 0).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem_dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem_src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

__device__ __forceinline__ uint32_t to_tf32(uint32_t bits) {
  uint32_t out;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(out) : "f"(__uint_as_float(bits)));
  return out;
}

// D += A B on one m16 x n8 tile. 16-bit: K = 16, a[4] and b[2] 32-bit registers of pairs; TF32: K = 8.
__device__ __forceinline__ void mma_tile(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], __half) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tile(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                         __nv_bfloat16) {
  asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
__device__ __forceinline__ void mma_tile(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], float) {
  asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
               "{%0,%1,%2,%3};\n"
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One 64 x 64 warp tile over one K step (16 elements of fp16 / bf16, 8 of fp32) at K offset `k` (elements)
// of the stage. A: `a` points at the warp's first M row (K-major: rows of lda bytes, K contiguous) or,
// kATrans, at its first M column of MN-major rows (one K index a row, lda bytes apart). B likewise
// with N: K-major rows (kBTrans false) or MN-major rows (kBTrans true).
template <typename T, bool kATrans, bool kBTrans>
__device__ __forceinline__ void warp_tile_step(float (&acc)[4][8][4], const unsigned char* a, int lda,
                                               const unsigned char* b, int ldb, int k, int lane) {
  constexpr bool kTf32 = sizeof(T) == 4;
  constexpr int kE = static_cast<int>(sizeof(T));
  uint32_t af[4][4], bf[8][2];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (!kATrans || !kTf32) {
      const unsigned char* row = a + a_ldsm_offset(kATrans, lane, i, k, lda, kE);
      if (kATrans)
        ldsm_x4_trans(af[i], row);
      else
        ldsm_x4(af[i], row);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) af[i][q] = *reinterpret_cast<const uint32_t*>(a + a_lds_offset(lane, i, q, k, lda));
    }
  }
#pragma unroll
  for (int j = 0; j < 8; j += 2) {
    uint32_t r[4];
    if (!kBTrans || !kTf32) {
      const unsigned char* row = b + b_ldsm_offset(kBTrans, lane, j, k, ldb, kE);
      if (kBTrans)
        ldsm_x4_trans(r, row);
      else
        ldsm_x4(r, row);
    } else {
#pragma unroll
      for (int q = 0; q < 4; ++q) r[q] = *reinterpret_cast<const uint32_t*>(b + b_lds_offset(lane, j, q, k, ldb));
    }
    bf[j][0] = r[0];
    bf[j][1] = r[1];
    bf[j + 1][0] = r[2];
    bf[j + 1][1] = r[3];
  }
  if (kTf32) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int q = 0; q < 4; ++q) af[i][q] = to_tf32(af[i][q]);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      bf[j][0] = to_tf32(bf[j][0]);
      bf[j][1] = to_tf32(bf[j][1]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 8; ++j) mma_tile(acc[i][j], af[i], bf[j], T{});
}

// Output pairs: two fp32 values rounded to nearest even into T, stored together.
__device__ __forceinline__ void store2(__half* p, float lo, float hi) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(lo, hi);
}
__device__ __forceinline__ void store2(__nv_bfloat16* p, float lo, float hi) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(lo, hi);
}
__device__ __forceinline__ void store2(float* p, float lo, float hi) {
  *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
}

// The epilogue of a 128 x 128 CTA of 2 x 2 warp tiles, from the accumulators: out[pixel of row m,
// c_base + n] = ReLU?(acc * scale[c_base + n] + shift[c_base + n]) for the job's rows (row_pixel) and the
// columns n0 + n < M; a thread holds rows 64 wm + 16 i + lane / 4 (+ 8), columns 64 wn + 8 j + 2 (lane % 4)
// (pairs: M even). Shared by the multi-rate and the separable forward.
template <typename T>
__device__ __forceinline__ void store_epilogue(const float (&acc)[4][8][4], const JobGeometry& g, int image,
                                               int tile, int wm, int wn, int lane, int n0, int M, int64_t c_base,
                                               int64_t out_cstride, const float* __restrict__ scale,
                                               const float* __restrict__ shift, bool relu, T* __restrict__ out) {
  int64_t row_off[8];
  bool row_ok[8];
#pragma unroll
  for (int r = 0; r < 8; ++r) {
    int n, h, w;
    row_ok[r] = row_pixel(g, image, tile, wm * 64 + 16 * (r / 2) + lane / 4 + 8 * (r % 2), n, h, w);
    row_off[r] = row_ok[r] ? ((static_cast<int64_t>(n) * g.H + h) * g.W + w) * out_cstride + c_base : 0;
  }
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const int m = n0 + wn * 64 + 8 * j + 2 * (lane % 4);
    if (m >= M) continue;
    float s0 = 1.0f, s1 = 1.0f, h0 = 0.0f, h1 = 0.0f;
    if (scale != nullptr) {
      s0 = scale[c_base + m];
      s1 = scale[c_base + m + 1];
    }
    if (shift != nullptr) {
      h0 = shift[c_base + m];
      h1 = shift[c_base + m + 1];
    }
#pragma unroll
    for (int r = 0; r < 8; ++r) {
      if (!row_ok[r]) continue;
      float v0 = acc[r / 2][j][2 * (r % 2)] * s0 + h0;
      float v1 = acc[r / 2][j][2 * (r % 2) + 1] * s1 + h1;
      if (relu) {  // NaN stays NaN, as in torch.relu
        v0 = v0 < 0.0f ? 0.0f : v0;
        v1 = v1 < 0.0f ? 0.0f : v1;
      }
      store2(out + row_off[r] + m, v0, v1);
    }
  }
}

}  // namespace mma
}  // namespace resaspp
