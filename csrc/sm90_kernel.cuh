// The persistent warp-specialised kernel shared by the sm_90a forward, dgrad and wgrad (DESIGN.md section 4),
// from CuTe's building blocks: TMA copy atoms (SM90_TMA_LOAD_*), GMMA atoms (wgmma m64n256k16) and
// CUTLASS's mbarrier pipeline (PipelineTmaAsync).
//
// One program per SM runs its queue of jobs (jobs.lpt_queues: offsets[G + 1], then job indices). Warpgroup 0
// is the producer: one thread walks each job's K steps (sm90_plan.h) and issues the TMA boxes of a step
// into a free stage of a kStages-deep ring, its mbarrier counting the bytes. Warpgroups 1 and 2 are the
// consumers: each owns 64 of the 128 accumulator rows (M) and all 256 columns (N), waits for a stage, runs
// its wgmma K block, keeps one batch in flight, releases the stage before, and at the end of a job hands
// the fp32 accumulators to the Op's epilogue. The producer runs ahead into the next job meanwhile.
//
// An Op (sm90_forward.cu, sm90_dgrad.cu, sm90_wgrad.cu) supplies: Element, Params (tensor maps, geometry,
// job tables, `queues`, `stage_bytes`), the GMMA atom majors and shared-memory layouts, `steps(p, j)`,
// `walk(p, j)`, `load(p, step, barrier, a_slot, b_slot)`, `clear_tails(p, a, b, tid, threads)` and
// `epilogue(p, j, acc, coord)`.
#pragma once

#include "sm90_plan.h"

#include <cuda.h>

#include <cute/arch/copy_sm90_desc.hpp>
#include <cute/arch/copy_sm90_tma.hpp>
#include <cute/atom/mma_atom.hpp>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>
#include <cutlass/bfloat16.h>
#include <cutlass/half.h>
#include <cutlass/pipeline/sm90_pipeline.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <vector>

namespace resaspp {
namespace sm90 {

constexpr int kThreads = 384;      // producer warpgroup + 2 consumer warpgroups
constexpr int kProducerRegs = 56;  // setmaxnreg: 128 x 56 + 256 x 224 = the 384 x 168 the program starts with
constexpr int kConsumerRegs = 224;
constexpr int kSlotA = kBlockM * kBlockK;  // elements of a stage's A slot (16 KiB); wgrad: 128 co x 64 px
constexpr int kSlotB = kBlockN * kBlockK;  // elements of a stage's B slot (32 KiB); wgrad: 256 c x 64 px
constexpr int kBoxElems = 64 * kBlockK;    // a 64-row box (8 KiB): dgrad's B, wgrad's A and B come in these
constexpr uint64_t kCacheHint = static_cast<uint64_t>(cute::TMA::CacheHintSm90::EVICT_NORMAL);

using Pipeline = cutlass::PipelineTmaAsync<kStages>;

template <typename T>
struct alignas(1024) SharedStorage {
  alignas(1024) T a[kStages * kSlotA];
  alignas(1024) T b[kStages * kSlotB];
  typename Pipeline::SharedStorage pipe;
};

// Dynamic shared memory the kernel asks for: the storage plus the slack that aligns it to 1024 bytes (the
// 128-byte swizzle's period, which TMA and the wgmma descriptors must agree on).
template <typename T>
constexpr int smem_bytes() {
  return static_cast<int>(sizeof(SharedStorage<T>)) + 1024;
}

// wgmma m64n256k16, fp32 accumulators, both operands from shared memory.
template <typename T, cute::GMMA::Major A, cute::GMMA::Major B>
struct Gmma;
template <cute::GMMA::Major A, cute::GMMA::Major B>
struct Gmma<cutlass::bfloat16_t, A, B> {
  using type = cute::SM90_64x256x16_F32BF16BF16_SS<A, B>;
};
template <cute::GMMA::Major A, cute::GMMA::Major B>
struct Gmma<cutlass::half_t, A, B> {
  using type = cute::SM90_64x256x16_F32F16F16_SS<A, B>;
};

// The shared-memory layout of `Rows` x 64 (K) operand tiles, kStages of them: K-major rows of 128 bytes
// (one pixel's or one weight row's 64 channels), or MN-major (64 contiguous channels of M or N per K row,
// 64-wide blocks one 8 KiB box apart: Step<_2, _1, _3> puts the K atoms of a block next to each other).
template <typename T, int Rows, cute::GMMA::Major Major>
using SmemLayout = std::conditional_t<
    Major == cute::GMMA::Major::K,
    decltype(cute::tile_to_shape(cute::GMMA::Layout_K_SW128_Atom<T>{},
                                 cute::Shape<cute::Int<Rows>, cute::Int<kBlockK>, cute::Int<kStages>>{})),
    decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<T>{},
                                 cute::Shape<cute::Int<Rows>, cute::Int<kBlockK>, cute::Int<kStages>>{},
                                 cute::Step<cute::_2, cute::_1, cute::_3>{}))>;

// Two fp32 values rounded to nearest even into one 32-bit word of T.
__device__ __forceinline__ uint32_t pack2(float lo, float hi, cutlass::bfloat16_t) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint32_t pack2(float lo, float hi, cutlass::half_t) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
__device__ __forceinline__ uint16_t pack1(float v, cutlass::bfloat16_t) {
  const __nv_bfloat16 b = __float2bfloat16_rn(v);
  return *reinterpret_cast<const uint16_t*>(&b);
}
__device__ __forceinline__ uint16_t pack1(float v, cutlass::half_t) {
  const __half b = __float2half_rn(v);
  return *reinterpret_cast<const uint16_t*>(&b);
}

// Zeroes rows [first_row, rows) of `regions` consecutive blocks of `rows` 128-byte rows from `base`, with
// 16-byte stores spread over `threads` threads. TMA never writes those rows (its boxes hold first_row rows),
// and they must read as zero (K rows of wgrad) or at least finite (M rows whose results are never stored).
template <typename T>
__device__ __forceinline__ void zero_rows(T* base, int regions, int rows, int first_row, int tid, int threads) {
  constexpr int kVecPerRow = kBlockK * static_cast<int>(sizeof(T)) / 16;
  const int tail = (rows - first_row) * kVecPerRow;
  for (int v = tid; v < regions * tail; v += threads) {
    const int r = v / tail, i = v % tail;
    reinterpret_cast<uint4*>(base + (r * rows + first_row) * kBlockK)[i] = make_uint4(0, 0, 0, 0);
  }
}

template <class Op>
__global__ void __launch_bounds__(kThreads, 1) persistent_kernel(const __grid_constant__ typename Op::Params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using namespace cute;
  using T = typename Op::Element;
  using Storage = SharedStorage<T>;
  extern __shared__ unsigned char smem_raw[];
  // Aligned by an offset from smem_raw, so that the compiler still knows the pointers are shared memory.
  const unsigned misalign = static_cast<unsigned>(__cvta_generic_to_shared(smem_raw)) & 1023u;
  Storage& s = *reinterpret_cast<Storage*>(smem_raw + ((1024u - misalign) & 1023u));

  const int tid = static_cast<int>(threadIdx.x);
  const int warpgroup = tid / 128;

  typename Pipeline::Params pp;
  pp.transaction_bytes = p.stage_bytes;
  pp.role = warpgroup == 0 ? Pipeline::ThreadCategory::Producer : Pipeline::ThreadCategory::Consumer;
  pp.is_leader = tid == 0;
  pp.num_consumers = kThreads - 128;
  Pipeline pipeline(s.pipe, pp, Shape<_1, _1, _1>{});

  for (int stage = 0; stage < kStages; ++stage) Op::clear_tails(p, s.a + stage * kSlotA, s.b + stage * kSlotB, tid, kThreads);
  cutlass::arch::fence_view_async_shared();  // the zeros, written by threads, are read by wgmma
  __syncthreads();                           // and the barriers initialised above are visible

  const int begin = p.queues[blockIdx.x], end = p.queues[blockIdx.x + 1];
  const int* order = p.queues + gridDim.x + 1;

  if (warpgroup == 0) {
    cutlass::arch::warpgroup_reg_dealloc<kProducerRegs>();
    if (tid == 0) {
      Op::prefetch(p);
      auto state = cutlass::make_producer_start_state<Pipeline>();
      for (int q = begin; q < end; ++q) {
        const int j = order[q];
        for (auto walk = Op::walk(p, j); !walk.done(); walk.next()) {
          pipeline.producer_acquire(state);
          Op::load(p, walk.step(), pipeline.producer_get_barrier(state), s.a + state.index() * kSlotA,
                   s.b + state.index() * kSlotB);
          ++state;
        }
      }
      pipeline.producer_tail(state);  // every issued stage consumed before the program exits
    }
  } else {
    cutlass::arch::warpgroup_reg_alloc<kConsumerRegs>();
    typename Op::TiledMma mma;
    auto thr = mma.get_thread_slice(tid - 128);
    Tensor sA = make_tensor(make_smem_ptr(s.a), typename Op::SmemLayoutA{});  // (M, K, stage)
    Tensor sB = make_tensor(make_smem_ptr(s.b), typename Op::SmemLayoutB{});  // (N, K, stage)
    Tensor tCrA = thr.make_fragment_A(thr.partition_A(sA));                 // wgmma descriptors
    Tensor tCrB = thr.make_fragment_B(thr.partition_B(sB));
    Tensor acc = partition_fragment_C(mma, Shape<Int<Op::kM>, Int<Op::kN>>{});  // fp32 (MMA, 1, 1)
    Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<Op::kM>, Int<Op::kN>>{}));
    cutlass::PipelineState<kStages> read, release;
    for (int q = begin; q < end; ++q) {
      const int j = order[q];
      const int steps = Op::steps(p, j);
      clear(acc);
      warpgroup_fence_operand(acc);
      for (int k = 0; k < steps; ++k) {
        pipeline.consumer_wait(read);
        warpgroup_fence_operand(acc);
        warpgroup_arrive();
        CUTE_UNROLL
        for (int kb = 0; kb < size<2>(tCrA); ++kb)
          cute::gemm(mma, tCrA(_, _, kb, read.index()), tCrB(_, _, kb, read.index()), acc);
        warpgroup_commit_batch();
        warpgroup_wait<1>();  // the step before is done: its stage goes back to the producer
        warpgroup_fence_operand(acc);
        if (k > 0) {
          pipeline.consumer_release(release);
          ++release;
        }
        ++read;
      }
      warpgroup_wait<0>();
      if (steps > 0) {
        pipeline.consumer_release(release);
        ++release;
      }
      warpgroup_fence_operand(acc);
      Op::epilogue(p, j, acc, coord);
    }
  }
#elif defined(__CUDA_ARCH__)
  // Compiled for a target without the sm_90a features (a compute_90 PTX, a plain sm_90 build): no wgmma,
  // no setmaxnreg. Stop the grid with an error rather than return leaving the outputs unwritten.
  __trap();
#endif
}

// Host side, for tests: the (m, n) of every accumulator value of every consumer thread, flattened
// [thread][value][2] (sm90.h accumulator_coords). The epilogues rely on what it shows: a thread holds two
// rows m and m + 8, and values 2i, 2i + 1 are columns n, n + 1.
template <class Op>
std::vector<int> op_accumulator_coords() {
  using namespace cute;
  typename Op::TiledMma mma;
  std::vector<int> out;
  for (int t = 0; t < kThreads - 128; ++t) {
    auto thr = mma.get_thread_slice(t);
    Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<Op::kM>, Int<Op::kN>>{}));
    for (int i = 0; i < size(coord); ++i) {
      out.push_back(get<0>(coord(i)));
      out.push_back(get<1>(coord(i)));
    }
  }
  return out;
}

// Host side, for tests: the element offset of every (row, k, stage) of the A and B layouts (swizzle
// included) that the wgmma descriptors are built from; tests/test_sm90_kernels.py checks them against
// where TMA's 128-byte swizzle puts each element of a box.
template <class Op>
std::vector<int> op_smem_offsets(bool b_operand) {
  using namespace cute;
  using T = typename Op::Element;
  std::vector<int> out;
  auto collect = [&](auto layout) {
    Tensor t = make_tensor(make_smem_ptr(static_cast<T*>(nullptr)), layout);
    for (int s = 0; s < size<2>(t); ++s)
      for (int r = 0; r < size<0>(t); ++r)
        for (int k = 0; k < size<1>(t); ++k)
          out.push_back(static_cast<int>(&t(r, k, s) - static_cast<T*>(nullptr)));
  };
  if (b_operand)
    collect(typename Op::SmemLayoutB{});
  else
    collect(typename Op::SmemLayoutA{});
  return out;
}

}  // namespace sm90
}  // namespace resaspp
