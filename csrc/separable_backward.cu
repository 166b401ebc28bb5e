// The separable backward's depthwise passes (separable.h), one branch a launch; the two pointwise GEMMs
// (dA = G_b Wpw_b^T, grad Wpw_b = A_b^T G_b) run between them (resaspp_ops/backend/cuda_separable.py).
// All four are SIMT over NHWC [P, C] (P = N H W pixels, C innermost: consecutive threads, consecutive
// channels): the depthwise output D is recomputed from x where it is needed, never stored by the forward.
// The reductions over pixels (mid-stage and depthwise weight grads) are per-chunk partials of kChunkPixels
// pixels summed in pixel order by one thread each, written to [chunks, ...] and reduced over the chunks by
// the host in a fixed order: bitwise reproducible, no float atomics.
#include "separable.h"
#include "separable_common.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

namespace resaspp {
namespace separable {
namespace {

constexpr int kThreads = 256;
constexpr int kReduceThreads = 128;  // channels of a reduction block

__device__ __forceinline__ void pixel_coords(const PixelGeometry& g, int64_t p, int& n, int& h, int& w) {
  w = static_cast<int>(p % g.W);
  h = static_cast<int>((p / g.W) % g.H);
  n = static_cast<int>(p / (static_cast<int64_t>(g.W) * g.H));
}

// D[p, c] = sum over the taps of g.taps inside the map of x[p + d, c] dw_b[tap, c].
template <typename T, typename Acc>
__device__ __forceinline__ Acc depthwise_at(const T* __restrict__ x, const Acc* __restrict__ dw_b,
                                            const PixelGeometry& g, int n, int h, int w, int c) {
  Acc d = Acc(0);
#pragma unroll
  for (int k = 0; k < 9; ++k) {
    if (!((g.taps >> k) & 1)) continue;
    const int hh = h + tap_dy(k, g.rate), ww = w + tap_dx(k, g.rate);
    if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) continue;
    d += to_acc<Acc>(x[((static_cast<int64_t>(n) * g.H + hh) * g.W + ww) * g.C + c]) * dw_b[k * g.C + c];
  }
  return d;
}

template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) activation_kernel(
    const T* __restrict__ x, const Acc* __restrict__ dw_b, const Acc* __restrict__ ms, const Acc* __restrict__ mt,
    const bool relu, const PixelGeometry g, T* __restrict__ a) {
  const int64_t total = static_cast<int64_t>(g.N) * g.H * g.W * g.C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % g.C);
    int n, h, w;
    pixel_coords(g, i / g.C, n, h, w);
    a[i] = Cast<T>::from(mid_stage(depthwise_at(x, dw_b, g, n, h, w, c), ms, mt, c, relu));
  }
}

// buf: dA -> dD; per chunk of pixels, sum dM D and sum dM of each channel (pixel order).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kReduceThreads) mid_backward_kernel(
    const T* __restrict__ x, const Acc* __restrict__ dw_b, const Acc* __restrict__ ms, const Acc* __restrict__ mt,
    const bool relu, const PixelGeometry g, T* __restrict__ buf, Acc* __restrict__ part_scale,
    Acc* __restrict__ part_shift) {
  const int c = blockIdx.x * kReduceThreads + threadIdx.x;
  if (c >= g.C) return;
  const int64_t pixels = static_cast<int64_t>(g.N) * g.H * g.W;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kChunkPixels;
  const int64_t p1 = std::min<int64_t>(p0 + kChunkPixels, pixels);
  const Acc s = ms != nullptr ? ms[c] : Acc(1), t = mt != nullptr ? mt[c] : Acc(0);
  Acc sum_scale = Acc(0), sum_shift = Acc(0);
  for (int64_t p = p0; p < p1; ++p) {
    int n, h, w;
    pixel_coords(g, p, n, h, w);
    const Acc d = depthwise_at(x, dw_b, g, n, h, w, c);
    const Acc m = d * s + t;
    const Acc da = to_acc<Acc>(buf[p * g.C + c]);
    const Acc dm = relu && m <= Acc(0) ? Acc(0) : da;  // torch.relu's backward: zero where m <= 0, NaN passes
    sum_scale += dm * d;
    sum_shift += dm;
    buf[p * g.C + c] = Cast<T>::from(ms != nullptr ? dm * s : dm);
  }
  if (part_scale != nullptr) part_scale[blockIdx.y * static_cast<int64_t>(g.C) + c] = sum_scale;
  if (part_shift != nullptr) part_shift[blockIdx.y * static_cast<int64_t>(g.C) + c] = sum_shift;
}

// gx[p, c] += sum over the taps of g.taps of dd[p - d, c] dw_b[tap, c] (inside the map).
template <typename T, typename Acc>
__global__ void __launch_bounds__(kThreads) dgrad_stencil_kernel(const T* __restrict__ dd, const Acc* __restrict__ dw_b,
                                                                 const PixelGeometry g, Acc* __restrict__ gx) {
  const int64_t total = static_cast<int64_t>(g.N) * g.H * g.W * g.C;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int c = static_cast<int>(i % g.C);
    int n, h, w;
    pixel_coords(g, i / g.C, n, h, w);
    Acc v = Acc(0);
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      if (!((g.taps >> k) & 1)) continue;
      const int hh = h - tap_dy(k, g.rate), ww = w - tap_dx(k, g.rate);
      if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) continue;
      v += to_acc<Acc>(dd[((static_cast<int64_t>(n) * g.H + hh) * g.W + ww) * g.C + c]) * dw_b[k * g.C + c];
    }
    gx[i] += v;
  }
}

// part[chunk, tap, c] = sum over the chunk's pixels (in order) of dd[p, c] x[p + d, c].
template <typename T, typename Acc>
__global__ void __launch_bounds__(kReduceThreads) wgrad_dw_kernel(const T* __restrict__ dd, const T* __restrict__ x,
                                                                  const PixelGeometry g, Acc* __restrict__ part) {
  const int c = blockIdx.x * kReduceThreads + threadIdx.x;
  if (c >= g.C) return;
  const int64_t pixels = static_cast<int64_t>(g.N) * g.H * g.W;
  const int64_t p0 = static_cast<int64_t>(blockIdx.y) * kChunkPixels;
  const int64_t p1 = std::min<int64_t>(p0 + kChunkPixels, pixels);
  Acc acc[9];
#pragma unroll
  for (int k = 0; k < 9; ++k) acc[k] = Acc(0);
  for (int64_t p = p0; p < p1; ++p) {
    int n, h, w;
    pixel_coords(g, p, n, h, w);
    const Acc v = to_acc<Acc>(dd[p * g.C + c]);
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      if (!((g.taps >> k) & 1)) continue;
      const int hh = h + tap_dy(k, g.rate), ww = w + tap_dx(k, g.rate);
      if (hh < 0 || hh >= g.H || ww < 0 || ww >= g.W) continue;
      acc[k] += v * to_acc<Acc>(x[((static_cast<int64_t>(n) * g.H + hh) * g.W + ww) * g.C + c]);
    }
  }
#pragma unroll
  for (int k = 0; k < 9; ++k) part[(blockIdx.y * static_cast<int64_t>(9) + k) * g.C + c] = acc[k];
}

template <typename T>
const T* cptr(const at::Tensor& t) {
  return t.defined() ? static_cast<const T*>(t.const_data_ptr()) : nullptr;
}
template <typename T>
T* mptr(at::Tensor& t) {
  return t.defined() ? static_cast<T*>(t.data_ptr()) : nullptr;
}

template <typename F>
void dispatch(at::ScalarType t, F&& f) {
  if (t == at::kHalf)
    f(__half{}, float{});
  else if (t == at::kBFloat16)
    f(__nv_bfloat16{}, float{});
  else if (t == at::kFloat)
    f(float{}, float{});
  else {
    TORCH_CHECK(t == at::kDouble, "resaspp_ops._C: the separable backward takes fp16, bf16, fp32 or fp64, got ", t);
    f(double{}, double{});
  }
}

unsigned elementwise_blocks(const PixelGeometry& g) {
  const int64_t total = static_cast<int64_t>(g.N) * g.H * g.W * g.C;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>((total + kThreads - 1) / kThreads, 65536)));
}

dim3 reduce_grid(const PixelGeometry& g) {
  const int64_t pixels = static_cast<int64_t>(g.N) * g.H * g.W;
  const int64_t chunks = (pixels + kChunkPixels - 1) / kChunkPixels;
  TORCH_CHECK(chunks <= 65535, "resaspp_ops._C: too many pixel chunks (", chunks, ") for the separable backward");
  return dim3(static_cast<unsigned>((g.C + kReduceThreads - 1) / kReduceThreads), static_cast<unsigned>(chunks));
}

}  // namespace

void activation(const at::Tensor& x, const at::Tensor& dw_b, const at::Tensor& ms_b, const at::Tensor& mt_b,
                bool mid_relu, const PixelGeometry& g, at::Tensor& a) {
  if (a.numel() == 0) return;
  dispatch(x.scalar_type(), [&](auto tag, auto acc_tag) {
    using T = decltype(tag);
    using Acc = decltype(acc_tag);
    activation_kernel<T, Acc><<<elementwise_blocks(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cptr<T>(x), cptr<Acc>(dw_b), cptr<Acc>(ms_b), cptr<Acc>(mt_b), mid_relu, g, mptr<T>(a));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void mid_backward(const at::Tensor& x, const at::Tensor& dw_b, const at::Tensor& ms_b, const at::Tensor& mt_b,
                  bool mid_relu, const PixelGeometry& g, at::Tensor& buf, at::Tensor& part_scale,
                  at::Tensor& part_shift) {
  if (buf.numel() == 0) return;
  dispatch(x.scalar_type(), [&](auto tag, auto acc_tag) {
    using T = decltype(tag);
    using Acc = decltype(acc_tag);
    mid_backward_kernel<T, Acc><<<reduce_grid(g), kReduceThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cptr<T>(x), cptr<Acc>(dw_b), cptr<Acc>(ms_b), cptr<Acc>(mt_b), mid_relu, g, mptr<T>(buf),
        mptr<Acc>(part_scale), mptr<Acc>(part_shift));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void dgrad_stencil(const at::Tensor& dd, const at::Tensor& dw_b, const PixelGeometry& g, at::Tensor& gx) {
  if (gx.numel() == 0) return;
  dispatch(dd.scalar_type(), [&](auto tag, auto acc_tag) {
    using T = decltype(tag);
    using Acc = decltype(acc_tag);
    dgrad_stencil_kernel<T, Acc><<<elementwise_blocks(g), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cptr<T>(dd), cptr<Acc>(dw_b), g, mptr<Acc>(gx));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void wgrad_dw(const at::Tensor& dd, const at::Tensor& x, const PixelGeometry& g, at::Tensor& part) {
  if (part.numel() == 0) return;
  dispatch(x.scalar_type(), [&](auto tag, auto acc_tag) {
    using T = decltype(tag);
    using Acc = decltype(acc_tag);
    wgrad_dw_kernel<T, Acc><<<reduce_grid(g), kReduceThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        cptr<T>(dd), cptr<T>(x), g, mptr<Acc>(part));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace separable
}  // namespace resaspp
