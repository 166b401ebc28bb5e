// Where the lanes of a warp read the fragments of mma.sync m16n8k16 (fp16 / bf16) and m16n8k8 (TF32) in
// shared memory: the ldmatrix.x4 row addresses each lane hands over, and for TF32 operands stored
// MN-major (which ldmatrix.trans, a 16-bit transpose, cannot serve) the address of each register.
// Offsets are bytes from the warp tile's first row (K-major: rows of M or N, K contiguous) or first column
// (MN-major: rows of K). Host and device code: mma_common.cuh loads through these, and the bindings
// expose them so that tests/test_cuda_kernels.py checks them against the PTX fragment layouts.
#pragma once

#if defined(__CUDACC__)
#define RESASPP_FRAG __host__ __device__ __forceinline__
#else
#define RESASPP_FRAG inline
#endif

namespace resaspp {
namespace mma {

// A tile i (M rows 16 i .. 16 i + 15) at K offset k (elements). ldmatrix.x4 matrix q = lane / 8, row lane % 8:
// K-major: q = 0..3 -> (M 0-7, K 0-7), (M 8-15, K 0-7), (M 0-7, K 8-15), (M 8-15, K 8-15) of 16-bit, the
// same bytes for TF32 (K 0-3 / 4-7); MN-major (16-bit, .trans): (K 0-7, M 0-7), (K 0-7, M 8-15),
// (K 8-15, M 0-7), (K 8-15, M 8-15), i.e. registers a0..a3.
RESASPP_FRAG int a_ldsm_offset(bool mn_major, int lane, int i, int k, int ld, int elem) {
  const int r = lane % 8, q = lane / 8;
  return mn_major ? (k + r + 8 * (q / 2)) * ld + (16 * i + 8 * (q % 2)) * elem
                  : (16 * i + r + 8 * (q % 2)) * ld + k * elem + 16 * (q / 2);
}

// B tiles j and j + 1 (N columns 8 j .. 8 j + 15), j even, at K offset k. K-major: (N 0-7, K lo), (N 0-7,
// K hi), (N 8-15, K lo), (N 8-15, K hi): b0, b1 of tile j, then of tile j + 1; MN-major (16-bit, .trans):
// (K 0-7, N 0-7), (K 8-15, N 0-7), (K 0-7, N 8-15), (K 8-15, N 8-15).
RESASPP_FRAG int b_ldsm_offset(bool mn_major, int lane, int j, int k, int ld, int elem) {
  const int r = lane % 8, q = lane / 8;
  return mn_major ? (k + r + 8 * (q % 2)) * ld + (8 * j + 8 * (q / 2)) * elem
                  : (8 * j + r + 8 * (q / 2)) * ld + k * elem + 16 * (q % 2);
}

// TF32, MN-major A: register q of tile i holds (M g + 8 (q % 2), K t + 4 (q / 2)), g = lane / 4, t = lane % 4.
RESASPP_FRAG int a_lds_offset(int lane, int i, int q, int k, int ld) {
  return (k + lane % 4 + 4 * (q / 2)) * ld + (16 * i + lane / 4 + 8 * (q % 2)) * 4;
}

// TF32, MN-major B: register q of the pair j, j + 1: b0, b1 of tile j, then of tile j + 1; b_r holds
// (K t + 4 r, N g).
RESASPP_FRAG int b_lds_offset(int lane, int j, int q, int k, int ld) {
  return (k + lane % 4 + 4 * (q % 2)) * ld + (8 * j + 8 * (q / 2) + lane / 4) * 4;
}

}  // namespace mma
}  // namespace resaspp
