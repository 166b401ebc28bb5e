// The sm_90a wgrad (DESIGN.md section 4): dW[tap] = sum over the pixels where the tap reads inside the map
// of grad_b^T x shifted by d. A job is (tap, 128 Co, 256 C); its K loop walks the tap's live tiles
// (jobs.tap_tiles) in one fixed order, one 64-pixel tile a step, and writes its block once: no split,
// no atomics, bitwise reproducible. A = grad boxes (MN-major: Co innermost), B = x boxes shifted by the
// tap (MN-major: C innermost); TMA's zero fill drops the pixels outside the map from both. A dead tap's
// jobs have no steps and write zeros. The epilogue stores straight into the weights' dtype and layout.
#include "sm90.h"
#include "sm90_kernel.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace resaspp {
namespace sm90 {
namespace {

template <typename T>
struct WgradOp {
  using Element = T;
  static constexpr int kM = kWgradM;
  static constexpr int kN = kWgradN;
  using TiledMma = decltype(cute::make_tiled_mma(
      typename Gmma<T, cute::GMMA::Major::MN, cute::GMMA::Major::MN>::type{}, cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using SmemLayoutA = SmemLayout<T, kWgradM, cute::GMMA::Major::MN>;  // (128 co, 64 px, stage)
  using SmemLayoutB = SmemLayout<T, kWgradN, cute::GMMA::Major::MN>;  // (256 c, 64 px, stage)
  static_assert(kWgradM * kWgradPix <= kSlotA && kWgradN * kWgradPix <= kSlotB, "wgrad stage slots");

  struct Params {
    CUtensorMap grad;         // [Co, 1+B, W, H, N], box (64, 1, tile_w, tile_h, stack)
    CUtensorMap x;            // [C, W, H, N], box (64, tile_w, tile_h, stack)
    Geometry g;
    const int* jobs;          // [J, 4] (tap, co_block, c_block, steps)
    const int* queues;        // [G + 1 + J]
    const int* tap_offsets;   // [T + 1]
    const int* tap_entries;   // [E, 2] (image, tile)
    T* grad_w1;               // [Co, C]
    T* grad_w3;               // [B, Co, C, 3, 3] contiguous
    uint32_t stage_bytes;     // six boxes of pixel_rows rows
    int pixel_rows;           // rows of a box (tile_h * tile_w * stack <= 64)
  };

  static __device__ void prefetch(const Params& p) {
    cute::prefetch_tma_descriptor(&p.grad);
    cute::prefetch_tma_descriptor(&p.x);
  }
  static __device__ int steps(const Params& p, int j) { return WgradWalk::count(p.g, p.jobs + 4 * j); }
  static __device__ WgradWalk walk(const Params& p, int j) {
    return WgradWalk(p.g, p.jobs + 4 * j, p.tap_offsets, p.tap_entries);
  }
  static __device__ void load(const Params& p, const Step& s, uint64_t* bar, T* a, T* b) {
    CUTE_UNROLL
    for (int i = 0; i < kWgradM / 64; ++i)
      cute::SM90_TMA_LOAD_5D::copy(&p.grad, bar, kCacheHint, a + i * kBoxElems, s.a[0] + 64 * i, s.a[1], s.a[2],
                                   s.a[3], s.a[4]);
    CUTE_UNROLL
    for (int i = 0; i < kWgradN / 64; ++i)
      cute::SM90_TMA_LOAD_4D::copy(&p.x, bar, kCacheHint, b + i * kBoxElems, s.b[0] + 64 * i, s.b[1], s.b[2], s.b[3]);
  }
  static __device__ void clear_tails(const Params& p, T* a, T* b, int tid, int threads) {
    zero_rows(a, kWgradM / 64, kWgradPix, p.pixel_rows, tid, threads);
    zero_rows(b, kWgradN / 64, kWgradPix, p.pixel_rows, tid, threads);
  }

  // Rows are output channels, columns input channels. A thread holds two rows (m, m + 8): their base
  // pointers are worked out once; the columns' C stride is 9 elements in w3's layout, so the stores are
  // 16-bit at 32-bit offsets from the row (C * 9 < 2^31, checked by make_plan).
  template <class Acc, class Coord>
  static __device__ void epilogue(const Params& p, int j, const Acc& acc, const Coord& coord) {
    using namespace cute;
    const int* job = p.jobs + 4 * j;
    const int t = job[0];
    const int co0 = job[1] * kWgradM, c0 = job[2] * kWgradN;
    const int m0 = get<0>(coord(0));
    const int c_stride = t == 0 ? 1 : 9;
    const int64_t co_stride = static_cast<int64_t>(p.g.C) * c_stride;
    T* base = t == 0 ? p.grad_w1
                     : p.grad_w3 + static_cast<int64_t>((t - 1) / 9) * p.g.Co * co_stride + (t - 1) % 9;
    T* row[2] = {base + (co0 + m0) * co_stride, base + (co0 + m0 + 8) * co_stride};
    const bool row_ok[2] = {co0 + m0 < p.g.Co, co0 + m0 + 8 < p.g.Co};
    CUTE_UNROLL
    for (int i = 0; i < size(acc); ++i) {
      const int upper = get<0>(coord(i)) != m0;
      const int c = c0 + get<1>(coord(i));
      if ((upper ? row_ok[1] : row_ok[0]) && c < p.g.C)
        *reinterpret_cast<uint16_t*>((upper ? row[1] : row[0]) + c * c_stride) = pack1(acc(i), T{});
    }
  }
};

template <typename T>
void launch(const at::Tensor& grad, const at::Tensor& x, at::Tensor& grad_w1, at::Tensor& grad_w3,
            const LaunchPlan& plan) {
  using Op = WgradOp<T>;
  typename Op::Params p{};
  p.grad = grad_map(grad, plan.g);
  p.x = x_map(x, plan.g);
  p.g = plan.g;
  p.jobs = plan.jobs.const_data_ptr<int>();
  p.queues = plan.queues.const_data_ptr<int>();
  p.tap_offsets = plan.tap_offsets.const_data_ptr<int>();
  p.tap_entries = plan.tap_entries.const_data_ptr<int>();
  p.grad_w1 = reinterpret_cast<T*>(grad_w1.data_ptr());
  p.grad_w3 = reinterpret_cast<T*>(grad_w3.data_ptr());
  p.pixel_rows = plan.g.tile_h * plan.g.tile_w * plan.g.stack;
  p.stage_bytes = static_cast<uint32_t>((kWgradM / 64 + kWgradN / 64) * p.pixel_rows * kBlockK * sizeof(T));
  auto kernel = persistent_kernel<Op>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem_bytes<T>());
  kernel<<<plan.programs, kThreads, smem_bytes<T>(), c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void wgrad(const at::Tensor& grad, const at::Tensor& x, at::Tensor& grad_w1, at::Tensor& grad_w3,
           const LaunchPlan& plan) {
  if (plan.num_jobs == 0) return;
  if (x.scalar_type() == at::kBFloat16)
    launch<cutlass::bfloat16_t>(grad, x, grad_w1, grad_w3, plan);
  else
    launch<cutlass::half_t>(grad, x, grad_w1, grad_w3, plan);
}

std::vector<int> accumulator_coords_wgrad() { return op_accumulator_coords<WgradOp<cutlass::bfloat16_t>>(); }
std::vector<int> smem_offsets_wgrad(bool b) { return op_smem_offsets<WgradOp<cutlass::bfloat16_t>>(b); }

}  // namespace sm90
}  // namespace resaspp
