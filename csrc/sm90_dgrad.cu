// The sm_90a dgrad (DESIGN.md section 4): grad_x = sum over branches and taps of grad_b shifted by -d
// times W^T. A job is (image group, tile, 256 input channels) with one K loop over every branch's live
// taps (dgrad-mirrored masks) x 64-channel chunks of Co, so grad_x is written once, without atomics.
// A = the grad box of the branch at the tile shifted by -d (K-major); B = the tap's weights read
// MN-major from the forward's layout (C innermost): four 64 x 64 boxes, no transposed copy.
#include "sm90.h"
#include "sm90_kernel.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace resaspp {
namespace sm90 {
namespace {

template <typename T>
struct DgradOp {
  using Element = T;
  static constexpr int kM = kBlockM;
  static constexpr int kN = kBlockN;
  using TiledMma = decltype(cute::make_tiled_mma(
      typename Gmma<T, cute::GMMA::Major::K, cute::GMMA::Major::MN>::type{}, cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using SmemLayoutA = SmemLayout<T, kBlockM, cute::GMMA::Major::K>;   // (128 px, 64 co, stage)
  using SmemLayoutB = SmemLayout<T, kBlockN, cute::GMMA::Major::MN>;  // (256 c, 64 co, stage)

  struct Params {
    CUtensorMap grad;        // [Co, 1+B, W, H, N], box (64, 1, tile_w, tile_h, stack)
    CUtensorMap w1;          // [C, Co], box (64, 64)
    CUtensorMap w3;          // [C, 3, 3, Co, B], box (64, 1, 1, 64, 1)
    Geometry g;
    const int* jobs;         // [J, 4] (image, tile, c_block, live taps)
    const int* queues;       // [G + 1 + J]
    const int* masks;        // [tiles, 1+B] dgrad live-tap masks
    T* grad_x;               // [N, H, W, C] NHWC
    uint32_t stage_bytes;    // grad box + four weight boxes
    int pixel_rows;          // rows of the grad box
  };

  static __device__ void prefetch(const Params& p) {
    cute::prefetch_tma_descriptor(&p.grad);
    cute::prefetch_tma_descriptor(&p.w1);
    cute::prefetch_tma_descriptor(&p.w3);
  }
  static __device__ int steps(const Params& p, int j) { return DgradWalk::count(p.g, p.jobs + 4 * j); }
  static __device__ DgradWalk walk(const Params& p, int j) { return DgradWalk(p.g, p.jobs + 4 * j, p.masks); }
  static __device__ void load(const Params& p, const Step& s, uint64_t* bar, T* a, T* b) {
    cute::SM90_TMA_LOAD_5D::copy(&p.grad, bar, kCacheHint, a, s.a[0], s.a[1], s.a[2], s.a[3], s.a[4]);
    CUTE_UNROLL
    for (int i = 0; i < kBlockN / 64; ++i) {
      if (s.b_map == kMapW1)
        cute::SM90_TMA_LOAD_2D::copy(&p.w1, bar, kCacheHint, b + i * kBoxElems, s.b[0] + 64 * i, s.b[1]);
      else
        cute::SM90_TMA_LOAD_5D::copy(&p.w3, bar, kCacheHint, b + i * kBoxElems, s.b[0] + 64 * i, s.b[1], s.b[2],
                                     s.b[3], s.b[4]);
    }
  }
  static __device__ void clear_tails(const Params& p, T* a, T*, int tid, int threads) {
    zero_rows(a, 1, kBlockM, p.pixel_rows, tid, threads);
  }

  // Two rows (m, m + 8) a thread, 64 column pairs (c, c + 1): 32-bit stores (C is a multiple of 8).
  template <class Acc, class Coord>
  static __device__ void epilogue(const Params& p, int j, const Acc& acc, const Coord& coord) {
    using namespace cute;
    const int* job = p.jobs + 4 * j;
    const int c0 = job[2] * kBlockN;
    const int m0 = get<0>(coord(0));
    int64_t row_off[2];
    bool row_ok[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      int n, h, w;
      row_ok[r] = row_pixel(p.g, job[0], job[1], m0 + 8 * r, n, h, w);
      row_off[r] = row_ok[r] ? ((static_cast<int64_t>(n) * p.g.H + h) * p.g.W + w) * p.g.C + c0 : 0;
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int upper = get<0>(coord(i)) != m0;
      const int c = get<1>(coord(i));
      if (!(upper ? row_ok[1] : row_ok[0]) || c0 + c >= p.g.C) continue;
      *reinterpret_cast<uint32_t*>(p.grad_x + (upper ? row_off[1] : row_off[0]) + c) = pack2(acc(i), acc(i + 1), T{});
    }
  }
};

template <typename T>
void launch(const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& grad_x,
            const LaunchPlan& plan) {
  using Op = DgradOp<T>;
  typename Op::Params p{};
  p.grad = grad_map(grad, plan.g);
  p.w1 = w1_map(w1, 64);
  p.w3 = w3_map(w3, 64);
  p.g = plan.g;
  p.jobs = plan.jobs.const_data_ptr<int>();
  p.queues = plan.queues.const_data_ptr<int>();
  p.masks = plan.masks.const_data_ptr<int>();
  p.grad_x = reinterpret_cast<T*>(grad_x.data_ptr());
  p.pixel_rows = plan.g.tile_h * plan.g.tile_w * plan.g.stack;
  p.stage_bytes = static_cast<uint32_t>((p.pixel_rows + kBlockN) * kBlockK * sizeof(T));
  auto kernel = persistent_kernel<Op>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem_bytes<T>());
  kernel<<<plan.programs, kThreads, smem_bytes<T>(), c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void dgrad(const at::Tensor& grad, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& grad_x,
           const LaunchPlan& plan) {
  if (plan.num_jobs == 0) return;
  if (grad.scalar_type() == at::kBFloat16)
    launch<cutlass::bfloat16_t>(grad, w1, w3, grad_x, plan);
  else
    launch<cutlass::half_t>(grad, w1, w3, grad_x, plan);
}

std::vector<int> accumulator_coords_dgrad() { return op_accumulator_coords<DgradOp<cutlass::bfloat16_t>>(); }
std::vector<int> smem_offsets_dgrad(bool b) { return op_smem_offsets<DgradOp<cutlass::bfloat16_t>>(b); }

}  // namespace sm90
}  // namespace resaspp
