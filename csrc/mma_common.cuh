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
  const int g = lane / 4, t = lane % 4;
  uint32_t af[4][4], bf[8][2];
  // Lane l addresses row l % 8 of 8 x 16-byte matrix l / 8 (ldmatrix.x4).
  const int lr = lane % 8, lm = lane / 8;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (!kATrans) {  // matrices: rows 0-7 / 8-15 x K bytes 0-15 / 16-31
      ldsm_x4(af[i], a + (16 * i + lr + 8 * (lm % 2)) * lda + k * kE + 16 * (lm / 2));
    } else if (!kTf32) {  // rows = K: matrices K 0-7 / 8-15 x M 0-7 / 8-15, a0 (M 0-7, K 0-7), a1 (M 8-15)...
      ldsm_x4_trans(af[i], a + (k + lr + 8 * (lm / 2)) * lda + (16 * i + 8 * (lm % 2)) * kE);
    } else {
      const unsigned char* col = a + (16 * i + g) * kE;
      af[i][0] = *reinterpret_cast<const uint32_t*>(col + (k + t) * lda);
      af[i][1] = *reinterpret_cast<const uint32_t*>(col + (k + t) * lda + 8 * kE);
      af[i][2] = *reinterpret_cast<const uint32_t*>(col + (k + t + 4) * lda);
      af[i][3] = *reinterpret_cast<const uint32_t*>(col + (k + t + 4) * lda + 8 * kE);
    }
  }
#pragma unroll
  for (int j = 0; j < 8; j += 2) {
    uint32_t r[4];
    if (!kBTrans) {  // rows = N: matrices N 0-7 x K 0-15 (b0, b1 of tile j), N 8-15 (tile j + 1)
      ldsm_x4(r, b + (8 * j + lr + 8 * (lm / 2)) * ldb + k * kE + 16 * (lm % 2));
    } else if (!kTf32) {  // rows = K: matrices K 0-7 / 8-15 x N 0-7 / 8-15
      ldsm_x4_trans(r, b + (k + lr + 8 * (lm % 2)) * ldb + (8 * j + 8 * (lm / 2)) * kE);
    } else {
      const unsigned char* col = b + (8 * j + g) * kE;
      r[0] = *reinterpret_cast<const uint32_t*>(col + (k + t) * ldb);
      r[1] = *reinterpret_cast<const uint32_t*>(col + (k + t + 4) * ldb);
      r[2] = *reinterpret_cast<const uint32_t*>(col + (k + t) * ldb + 8 * kE);
      r[3] = *reinterpret_cast<const uint32_t*>(col + (k + t + 4) * ldb + 8 * kE);
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

}  // namespace mma
}  // namespace resaspp
