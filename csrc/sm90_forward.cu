// The sm_90a forward (DESIGN.md section 4): a job is (image group, tile, branch) with all Co <= 256 output
// channels; its K loop runs over the branch's live taps x 64-channel chunks of C. A = the tile's x box
// shifted by the tap (TMA at signed coordinates: the zero fill outside the map is the padding), B = the
// tap's [Co, 64] weight rows, both K-major; the epilogue applies scale/shift/ReLU and stores the branch's
// channels of the concatenated output.
#include "sm90.h"
#include "sm90_kernel.cuh"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

namespace resaspp {
namespace sm90 {
namespace {

template <typename T>
struct ForwardOp {
  using Element = T;
  static constexpr int kM = kBlockM;
  static constexpr int kN = kBlockN;
  using TiledMma = decltype(cute::make_tiled_mma(
      typename Gmma<T, cute::GMMA::Major::K, cute::GMMA::Major::K>::type{}, cute::Layout<cute::Shape<cute::_2, cute::_1, cute::_1>>{}));
  using SmemLayoutA = SmemLayout<T, kBlockM, cute::GMMA::Major::K>;  // (128 px, 64 c, stage)
  using SmemLayoutB = SmemLayout<T, kBlockN, cute::GMMA::Major::K>;  // (256 co, 64 c, stage)

  struct Params {
    CUtensorMap x;           // [C, W, H, N], box (64, tile_w, tile_h, stack)
    CUtensorMap w1;          // [C, Co], box (64, 256)
    CUtensorMap w3;          // [C, 3, 3, Co, B], box (64, 1, 1, 256, 1)
    Geometry g;
    const int* jobs;         // [J, 4] (image, tile, branch, taps)
    const int* queues;       // [G + 1 + J]
    T* out;                  // [N, H, W, out_cstride] NHWC, out_cstride = (1+B) Co
    const float* scale;      // [(1+B) Co] or nullptr
    const float* shift;      // [(1+B) Co] or nullptr
    int64_t out_cstride;
    uint32_t stage_bytes;    // x box + weight box
    int pixel_rows;          // rows of the x box (tile_h * tile_w * stack)
    int relu;
  };

  static __device__ void prefetch(const Params& p) {
    cute::prefetch_tma_descriptor(&p.x);
    cute::prefetch_tma_descriptor(&p.w1);
    cute::prefetch_tma_descriptor(&p.w3);
  }
  static __device__ int steps(const Params& p, int j) { return ForwardWalk::count(p.g, p.jobs + 4 * j); }
  static __device__ ForwardWalk walk(const Params& p, int j) { return ForwardWalk(p.g, p.jobs + 4 * j); }
  static __device__ void load(const Params& p, const Step& s, uint64_t* bar, T* a, T* b) {
    cute::SM90_TMA_LOAD_4D::copy(&p.x, bar, kCacheHint, a, s.a[0], s.a[1], s.a[2], s.a[3]);
    if (s.b_map == kMapW1)
      cute::SM90_TMA_LOAD_2D::copy(&p.w1, bar, kCacheHint, b, s.b[0], s.b[1]);
    else
      cute::SM90_TMA_LOAD_5D::copy(&p.w3, bar, kCacheHint, b, s.b[0], s.b[1], s.b[2], s.b[3], s.b[4]);
  }
  static __device__ void clear_tails(const Params& p, T* a, T*, int tid, int threads) {
    zero_rows(a, 1, kBlockM, p.pixel_rows, tid, threads);
  }

  // Each consumer thread holds two rows (m, m + 8) and 64 column pairs (n, n + 1) of the tile: the
  // row's output offset is worked out once, the pairs are one 32-bit store each.
  template <class Acc, class Coord>
  static __device__ void epilogue(const Params& p, int j, const Acc& acc, const Coord& coord) {
    using namespace cute;
    const int* job = p.jobs + 4 * j;
    const int co_count = p.g.Co;
    const int64_t cbase = static_cast<int64_t>(job[2]) * co_count;
    const int m0 = get<0>(coord(0));
    int64_t row_off[2];
    bool row_ok[2];
    CUTE_UNROLL
    for (int r = 0; r < 2; ++r) {
      int n, h, w;
      row_ok[r] = row_pixel(p.g, job[0], job[1], m0 + 8 * r, n, h, w);
      row_off[r] = row_ok[r] ? ((static_cast<int64_t>(n) * p.g.H + h) * p.g.W + w) * p.out_cstride + cbase : 0;
    }
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      const int upper = get<0>(coord(i)) != m0;
      const int co = get<1>(coord(i));
      if (!(upper ? row_ok[1] : row_ok[0]) || co >= co_count) continue;
      float v0 = acc(i), v1 = acc(i + 1);
      if (p.scale != nullptr) {
        v0 *= p.scale[cbase + co];
        v1 *= p.scale[cbase + co + 1];
      }
      if (p.shift != nullptr) {
        v0 += p.shift[cbase + co];
        v1 += p.shift[cbase + co + 1];
      }
      if (p.relu) {  // NaN stays NaN, as in torch.relu
        v0 = v0 < 0.0f ? 0.0f : v0;
        v1 = v1 < 0.0f ? 0.0f : v1;
      }
      *reinterpret_cast<uint32_t*>(p.out + (upper ? row_off[1] : row_off[0]) + co) = pack2(v0, v1, T{});
    }
  }
};

template <typename T>
void launch(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& out,
            const at::Tensor& scale, const at::Tensor& shift, bool relu, const LaunchPlan& plan) {
  using Op = ForwardOp<T>;
  typename Op::Params p{};
  p.x = x_map(x, plan.g);
  p.w1 = w1_map(w1, kBlockN);
  p.w3 = w3_map(w3, kBlockN);
  p.g = plan.g;
  p.jobs = plan.jobs.const_data_ptr<int>();
  p.queues = plan.queues.const_data_ptr<int>();
  p.out = reinterpret_cast<T*>(out.data_ptr());
  p.scale = scale.defined() ? scale.const_data_ptr<float>() : nullptr;
  p.shift = shift.defined() ? shift.const_data_ptr<float>() : nullptr;
  p.out_cstride = out.size(1);
  p.pixel_rows = plan.g.tile_h * plan.g.tile_w * plan.g.stack;
  p.stage_bytes = static_cast<uint32_t>((p.pixel_rows + kBlockN) * kBlockK * sizeof(T));
  p.relu = relu ? 1 : 0;
  auto kernel = persistent_kernel<Op>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem_bytes<T>());
  kernel<<<plan.programs, kThreads, smem_bytes<T>(), c10::cuda::getCurrentCUDAStream()>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void forward(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w3, at::Tensor& out,
             const at::Tensor& scale, const at::Tensor& shift, bool relu, const LaunchPlan& plan) {
  TORCH_CHECK(plan.g.Co <= kBlockN, "resaspp_ops._C: the sm90 forward takes Co <= ", kBlockN, ", got ", plan.g.Co);
  if (plan.num_jobs == 0) return;
  if (x.scalar_type() == at::kBFloat16)
    launch<cutlass::bfloat16_t>(x, w1, w3, out, scale, shift, relu, plan);
  else
    launch<cutlass::half_t>(x, w1, w3, out, scale, shift, relu, plan);
}

std::vector<int> accumulator_coords_forward() { return op_accumulator_coords<ForwardOp<cutlass::bfloat16_t>>(); }
std::vector<int> smem_offsets_forward(bool b) { return op_smem_offsets<ForwardOp<cutlass::bfloat16_t>>(b); }

}  // namespace sm90
}  // namespace resaspp
