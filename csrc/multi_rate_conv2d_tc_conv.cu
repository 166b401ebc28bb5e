// Tensor-core forward and dgrad of the fused multi-rate convolution (both are multi-tap
// correlations: multi_tap_tc_kernel in tc_common.cuh), and the dispatch rule. Wgrad is in
// multi_rate_conv2d_tc_wgrad.cu, so the two files compile in parallel.
#include "tc_common.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <utility>

namespace resaspp {
namespace tc {

bool tensor_cores_apply(const at::Tensor& x, int64_t C, int64_t Co) {
  // Read at call time so that tests and users can switch paths without reimporting.
  const char* env = std::getenv("RESASPP_CUDA_KERNEL");
  const bool force_simt = env != nullptr && std::strcmp(env, "simt") == 0;
  const bool force_tc = env != nullptr && std::strcmp(env, "tc") == 0;
  TORCH_CHECK(env == nullptr || env[0] == '\0' || force_simt || force_tc || std::strcmp(env, "auto") == 0,
              "resaspp_ops._C: RESASPP_CUDA_KERNEL must be auto, simt or tc, got '", env, "'");
  if (force_simt) return false;
  const bool dtype_ok = x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16;
  const bool shape_ok = C % kVec == 0 && Co % kVec == 0;
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.get_device()));
  const bool arch_ok = major >= 8;
  if (force_tc) {
    TORCH_CHECK(dtype_ok, "resaspp_ops._C: RESASPP_CUDA_KERNEL=tc needs float16 or bfloat16, got ", x.scalar_type());
    TORCH_CHECK(shape_ok, "resaspp_ops._C: RESASPP_CUDA_KERNEL=tc needs C and Co to be multiples of ", kVec,
                ", got C=", C, ", Co=", Co);
    TORCH_CHECK(arch_ok, "resaspp_ops._C: RESASPP_CUDA_KERNEL=tc needs an sm_80 or newer GPU, got sm_", major, "x");
  }
  return dtype_ok && shape_ok && arch_ok;
}

namespace {

// The output tile shape for an H x W map: tile_h * tile_w <= kTilePix slots, fewest tiles (least
// padding work: 33 x 33 takes 9 tiles of 11 x 11, not 15 of 8 x 16), then the squarest (more taps
// skipped per tile).
std::pair<int, int> pick_tile(int64_t H, int64_t W) {
  int64_t best_tiles = -1, best_skew = 0;
  std::pair<int, int> best{1, kTilePix};
  for (int th = 1; th <= kTilePix; ++th) {
    const int tw = kTilePix / th;
    const int64_t eh = std::min<int64_t>(th, H), ew = std::min<int64_t>(tw, W);
    const int64_t tiles = ((H + th - 1) / th) * ((W + tw - 1) / tw);
    const int64_t skew = eh > ew ? eh - ew : ew - eh;
    if (best_tiles < 0 || tiles < best_tiles || (tiles == best_tiles && skew < best_skew)) {
      best_tiles = tiles;
      best_skew = skew;
      best = {static_cast<int>(std::max<int64_t>(eh, 1)), static_cast<int>(std::max<int64_t>(ew, 1))};
    }
  }
  return best;
}

template <typename T, bool kDgrad>
void launch_multi_tap(const T* in, const T* wpk, T* out, const float* scale, const float* shift, bool relu,
                      const TapTable& taps, int num_branches, int64_t N, int64_t H, int64_t W, int64_t K,
                      int64_t M, int64_t in_cstride, int64_t in_branch_off, int64_t out_cstride,
                      int64_t out_branch_off, int groups) {
  const auto [tile_h, tile_w] = pick_tile(H, W);
  const int64_t tiles_w = (W + tile_w - 1) / tile_w;
  const int64_t tiles_per_image = (H + tile_h - 1) / tile_h * tiles_w;
  const int64_t grid_x = N * tiles_per_image;
  TORCH_CHECK(grid_x <= std::numeric_limits<int>::max(), "resaspp_ops._C: too many spatial tiles (", grid_x, ")");
  const int64_t grid_y = (M + kBlockN - 1) / kBlockN;
  TORCH_CHECK(grid_y <= 65535, "resaspp_ops._C: too many channels (", M, ")");
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y), groups);
  constexpr int smem = conv_smem_bytes<kDgrad>();
  auto kernel = multi_tap_tc_kernel<T, kDgrad>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<grid, kThreads, smem, c10::cuda::getCurrentCUDAStream()>>>(
      in, wpk, out, scale, shift, relu, taps, num_branches, static_cast<int>(H), static_cast<int>(W),
      static_cast<int>(K), static_cast<int>(M), tile_h, tile_w, static_cast<int>(tiles_w),
      static_cast<int>(tiles_per_image),
      in_cstride, in_branch_off, out_cstride, out_branch_off);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& wpk, at::Tensor& out, const at::Tensor& scale,
             const at::Tensor& shift, bool relu, const TapTable& taps, int num_branches) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = wpk.size(2), Ct = out.size(1);
  const int groups = (num_branches + kFwdSlots - 1) / kFwdSlots;
  const float* sc = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  const float* sh = shift.defined() ? shift.const_data_ptr<float>() : nullptr;
  if (x.scalar_type() == at::kHalf) {
    using T = CudaType<c10::Half>::type;
    launch_multi_tap<T, false>(reinterpret_cast<const T*>(x.const_data_ptr<c10::Half>()),
                               reinterpret_cast<const T*>(wpk.const_data_ptr<c10::Half>()),
                               reinterpret_cast<T*>(out.mutable_data_ptr<c10::Half>()), sc, sh, relu, taps,
                               num_branches, N, H, W, /*K=*/C, /*M=*/Co, /*in_cstride=*/C, /*in_branch_off=*/0,
                               /*out_cstride=*/Ct, /*out_branch_off=*/Co, groups);
  } else {
    TORCH_CHECK(x.scalar_type() == at::kBFloat16, "resaspp_ops._C: tensor-core forward needs fp16 or bf16");
    using T = CudaType<c10::BFloat16>::type;
    launch_multi_tap<T, false>(reinterpret_cast<const T*>(x.const_data_ptr<c10::BFloat16>()),
                               reinterpret_cast<const T*>(wpk.const_data_ptr<c10::BFloat16>()),
                               reinterpret_cast<T*>(out.mutable_data_ptr<c10::BFloat16>()), sc, sh, relu, taps,
                               num_branches, N, H, W, /*K=*/C, /*M=*/Co, /*in_cstride=*/C, /*in_branch_off=*/0,
                               /*out_cstride=*/Ct, /*out_branch_off=*/Co, groups);
  }
}

void dgrad(const at::Tensor& grad, const at::Tensor& wpk_t, at::Tensor& grad_x, const TapTable& taps) {
  const int64_t N = grad_x.size(0), C = grad_x.size(1), H = grad_x.size(2), W = grad_x.size(3);
  const int64_t Co = wpk_t.size(1), Ct = grad.size(1);
  if (grad.scalar_type() == at::kHalf) {
    using T = CudaType<c10::Half>::type;
    launch_multi_tap<T, true>(reinterpret_cast<const T*>(grad.const_data_ptr<c10::Half>()),
                              reinterpret_cast<const T*>(wpk_t.const_data_ptr<c10::Half>()),
                              reinterpret_cast<T*>(grad_x.mutable_data_ptr<c10::Half>()), nullptr, nullptr, false,
                              taps, 1, N, H, W, /*K=*/Co, /*M=*/C, /*in_cstride=*/Ct, /*in_branch_off=*/Co,
                              /*out_cstride=*/C, /*out_branch_off=*/0, 1);
  } else {
    TORCH_CHECK(grad.scalar_type() == at::kBFloat16, "resaspp_ops._C: tensor-core dgrad needs fp16 or bf16");
    using T = CudaType<c10::BFloat16>::type;
    launch_multi_tap<T, true>(reinterpret_cast<const T*>(grad.const_data_ptr<c10::BFloat16>()),
                              reinterpret_cast<const T*>(wpk_t.const_data_ptr<c10::BFloat16>()),
                              reinterpret_cast<T*>(grad_x.mutable_data_ptr<c10::BFloat16>()), nullptr, nullptr,
                              false, taps, 1, N, H, W, /*K=*/Co, /*M=*/C, /*in_cstride=*/Ct, /*in_branch_off=*/Co,
                              /*out_cstride=*/C, /*out_branch_off=*/0, 1);
  }
}

}  // namespace tc
}  // namespace resaspp
