// Device helpers of the separable kernels (separable_forward.cu, separable_backward.cu): element
// conversions to and from the accumulation dtype, 16-byte vectors of x as fp32, and the depthwise tap
// offsets. Every function is inline: the header is included by both .cu files.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace resaspp {
namespace separable {

template <typename Acc>
__device__ __forceinline__ Acc to_acc(__half v) { return static_cast<Acc>(__half2float(v)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(__nv_bfloat16 v) { return static_cast<Acc>(__bfloat162float(v)); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(float v) { return static_cast<Acc>(v); }
template <typename Acc>
__device__ __forceinline__ Acc to_acc(double v) { return static_cast<Acc>(v); }

template <typename T>
struct Cast;
template <>
struct Cast<__half> {
  __device__ static __half from(float v) { return __float2half_rn(v); }
};
template <>
struct Cast<__nv_bfloat16> {
  __device__ static __nv_bfloat16 from(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Cast<float> {
  __device__ static float from(float v) { return v; }
};
template <>
struct Cast<double> {
  __device__ static double from(double v) { return v; }
};

// A 16-byte vector of T as kN fp32 values (and back, rounded to nearest even).
template <typename T>
struct Vec;
template <>
struct Vec<__half> {
  static constexpr int kN = 8;
  __device__ static void load(float (&f)[8], const int4& v) {
    const __half2* h = reinterpret_cast<const __half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __half22float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static int4 pack(const float (&f)[8]) {
    int4 v;
    __half2* h = reinterpret_cast<__half2*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2half2_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};
template <>
struct Vec<__nv_bfloat16> {
  static constexpr int kN = 8;
  __device__ static void load(float (&f)[8], const int4& v) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 t = __bfloat1622float2(h[i]);
      f[2 * i] = t.x;
      f[2 * i + 1] = t.y;
    }
  }
  __device__ static int4 pack(const float (&f)[8]) {
    int4 v;
    __nv_bfloat162* h = reinterpret_cast<__nv_bfloat162*>(&v);
#pragma unroll
    for (int i = 0; i < 4; ++i) h[i] = __floats2bfloat162_rn(f[2 * i], f[2 * i + 1]);
    return v;
  }
};
template <>
struct Vec<float> {
  static constexpr int kN = 4;
  __device__ static void load(float (&f)[4], const int4& v) {
    f[0] = __int_as_float(v.x);
    f[1] = __int_as_float(v.y);
    f[2] = __int_as_float(v.z);
    f[3] = __int_as_float(v.w);
  }
  __device__ static int4 pack(const float (&f)[4]) {
    return make_int4(__float_as_int(f[0]), __float_as_int(f[1]), __float_as_int(f[2]), __float_as_int(f[3]));
  }
};

// Tap k = ky * 3 + kx of a rate-r branch reads (h + dy, w + dx).
__device__ __forceinline__ int tap_dy(int k, int r) { return (k / 3 - 1) * r; }
__device__ __forceinline__ int tap_dx(int k, int r) { return (k % 3 - 1) * r; }

// The mid stage of one value: v * s + t, then ReLU (NaN stays NaN, as torch.relu).
template <typename Acc>
__device__ __forceinline__ Acc mid_stage(Acc v, const Acc* ms, const Acc* mt, int c, bool relu) {
  if (ms != nullptr) v = v * ms[c];
  if (mt != nullptr) v = v + mt[c];
  if (relu) v = v < Acc(0) ? Acc(0) : v;
  return v;
}

}  // namespace separable
}  // namespace resaspp
