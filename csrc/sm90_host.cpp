// Host helpers of the sm_90a kernels (sm90.h): plan tables to geometry, tensor maps over the operands,
// and the host runs of the K-step walks and accumulator maps that the tests read.
#include "sm90.h"
#include "sm90_tensor_map.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>

namespace resaspp {
namespace sm90 {

LaunchPlan make_plan(Kind kind, const at::Tensor& jobs, const at::Tensor& queues, const at::Tensor& masks,
                     const at::Tensor& tap_offsets, const at::Tensor& tap_entries, const std::vector<int64_t>& rates,
                     int64_t N, int64_t C, int64_t Co, int64_t H, int64_t W, int64_t tile_h, int64_t tile_w,
                     int64_t stack) {
  for (const at::Tensor* t : {&jobs, &queues, &masks, &tap_offsets, &tap_entries})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(), "resaspp_ops._C: sm90 plan tables must be "
                "contiguous int32");
  TORCH_CHECK(jobs.dim() == 2 && jobs.size(1) == 4, "resaspp_ops._C: jobs must be [J, 4]");
  TORCH_CHECK(static_cast<int64_t>(rates.size()) <= kMaxBranches, "resaspp_ops._C: too many branches");
  // The wgrad epilogue steps along C at 32-bit offsets of 9 elements (w3x3's C stride).
  TORCH_CHECK(H < kMaxRate && W < kMaxRate && N < (int64_t{1} << 31) && 9 * C < (int64_t{1} << 31) &&
                  Co < (int64_t{1} << 31),
              "resaspp_ops._C: problem too large for the sm90 kernels");
  TORCH_CHECK(tile_h >= 1 && tile_w >= 1 && stack >= 1 &&
                  tile_h * tile_w * stack <= (kind == kWgrad ? kWgradPix : kBlockM),
              "resaspp_ops._C: bad sm90 tile ", tile_h, "x", tile_w, " x", stack);
  LaunchPlan p;
  p.jobs = jobs;
  p.queues = queues;
  p.masks = masks;
  p.tap_offsets = tap_offsets;
  p.tap_entries = tap_entries;
  p.num_jobs = static_cast<int>(jobs.size(0));
  p.programs = static_cast<int>(queues.numel() - jobs.size(0) - 1);
  TORCH_CHECK(p.num_jobs == 0 || (p.programs >= 1 && p.programs <= p.num_jobs),
              "resaspp_ops._C: queues do not match the jobs");
  Geometry& g = p.g;
  g = Geometry{};
  g.N = static_cast<int>(N);
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.C = static_cast<int>(C);
  g.Co = static_cast<int>(Co);
  g.num_branches = 1 + static_cast<int>(rates.size());
  g.tile_h = static_cast<int>(tile_h);
  g.tile_w = static_cast<int>(tile_w);
  g.tiles_w = static_cast<int>((W + tile_w - 1) / tile_w);
  g.stack = static_cast<int>(stack);
  g.k_chunks = static_cast<int>(((kind == kDgrad ? Co : C) + kBlockK - 1) / kBlockK);
  g.rates[0] = 0;
  for (size_t b = 0; b < rates.size(); ++b) {
    TORCH_CHECK(rates[b] >= 1, "resaspp_ops._C: rates must be positive");
    g.rates[b + 1] = static_cast<int>(std::min<int64_t>(rates[b], kMaxRate));
  }
  return p;
}

namespace {

bool is_bf16(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf,
              "resaspp_ops._C: the sm90 kernels take float16 or bfloat16, got ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

}  // namespace

CUtensorMap x_map(const at::Tensor& x, const Geometry& g) {
  TORCH_CHECK(x.dim() == 4 && x.stride(1) == 1, "resaspp_ops._C: x must be channels_last");
  const int64_t dims[4] = {x.size(1), x.size(3), x.size(2), x.size(0)};
  const int64_t strides[4] = {1, x.stride(3), x.stride(2), x.stride(0)};
  const int box[4] = {kBlockK, g.tile_w, g.tile_h, g.stack};
  return make_tensor_map(x.const_data_ptr(), is_bf16(x), 4, dims, strides, box);
}

CUtensorMap grad_map(const at::Tensor& grad, const Geometry& g) {
  TORCH_CHECK(grad.dim() == 4 && grad.stride(1) == 1, "resaspp_ops._C: grad must be channels_last");
  TORCH_CHECK(grad.size(1) == static_cast<int64_t>(g.num_branches) * g.Co, "resaspp_ops._C: grad channels");
  const int64_t dims[5] = {g.Co, g.num_branches, grad.size(3), grad.size(2), grad.size(0)};
  const int64_t strides[5] = {1, g.Co, grad.stride(3), grad.stride(2), grad.stride(0)};
  const int box[5] = {kBlockK, 1, g.tile_w, g.tile_h, g.stack};
  return make_tensor_map(grad.const_data_ptr(), is_bf16(grad), 5, dims, strides, box);
}

CUtensorMap w1_map(const at::Tensor& w1, int box_co) {
  TORCH_CHECK(w1.dim() == 4 && w1.stride(1) == 1, "resaspp_ops._C: w1x1 must have C innermost");
  const int64_t dims[2] = {w1.size(1), w1.size(0)};
  const int64_t strides[2] = {1, w1.stride(0)};
  const int box[2] = {kBlockK, box_co};
  return make_tensor_map(w1.const_data_ptr(), is_bf16(w1), 2, dims, strides, box);
}

CUtensorMap w3_map(const at::Tensor& w3, int box_co) {
  TORCH_CHECK(w3.dim() == 5 && w3.stride(2) == 1, "resaspp_ops._C: w3x3 must have C innermost");
  const int64_t dims[5] = {w3.size(2), 3, 3, w3.size(1), w3.size(0)};
  const int64_t strides[5] = {1, w3.stride(4), w3.stride(3), w3.stride(1), w3.stride(0)};
  const int box[5] = {kBlockK, 1, 1, box_co, 1};
  return make_tensor_map(w3.const_data_ptr(), is_bf16(w3), 5, dims, strides, box);
}

at::Tensor accumulator_coords(Kind kind) {
  std::vector<int> v = kind == kForward ? accumulator_coords_forward()
                       : kind == kDgrad ? accumulator_coords_dgrad()
                                        : accumulator_coords_wgrad();
  const int64_t threads = 256, values = static_cast<int64_t>(v.size()) / (threads * 2);
  return at::from_blob(v.data(), {threads, values, 2}, at::kInt).clone();
}

at::Tensor smem_offsets(Kind kind, bool b_operand) {
  std::vector<int> v = kind == kForward ? smem_offsets_forward(b_operand)
                       : kind == kDgrad ? smem_offsets_dgrad(b_operand)
                                        : smem_offsets_wgrad(b_operand);
  const int64_t rows = static_cast<int64_t>(v.size()) / (kStages * kBlockK);
  return at::from_blob(v.data(), {kStages, rows, kBlockK}, at::kInt).clone();
}

std::vector<at::Tensor> host_steps(Kind kind, const LaunchPlan& plan) {
  const at::Tensor jobs = plan.jobs.cpu(), masks = plan.masks.cpu();
  const at::Tensor offsets = plan.tap_offsets.cpu(), entries = plan.tap_entries.cpu();
  const int* jb = jobs.const_data_ptr<int>();
  std::vector<int> steps, rows;
  auto emit = [&](int j, const Step& s) {
    steps.push_back(j);
    steps.insert(steps.end(), s.a, s.a + 5);
    steps.push_back(s.b_map);
    steps.insert(steps.end(), s.b, s.b + 5);
  };
  for (int j = 0; j < plan.num_jobs; ++j) {
    const int* job = jb + 4 * j;
    int count = 0;
    if (kind == kForward) {
      for (ForwardWalk w(plan.g, job); !w.done(); w.next(), ++count) emit(j, w.step());
      TORCH_CHECK(count == ForwardWalk::count(plan.g, job), "resaspp_ops._C: forward walk count");
    } else if (kind == kDgrad) {
      for (DgradWalk w(plan.g, job, masks.const_data_ptr<int>()); !w.done(); w.next(), ++count) emit(j, w.step());
      TORCH_CHECK(count == DgradWalk::count(plan.g, job), "resaspp_ops._C: dgrad walk count");
    } else {
      for (WgradWalk w(plan.g, job, offsets.const_data_ptr<int>(), entries.const_data_ptr<int>()); !w.done();
           w.next(), ++count)
        emit(j, w.step());
      TORCH_CHECK(count == WgradWalk::count(plan.g, job), "resaspp_ops._C: wgrad walk count");
    }
    if (kind != kWgrad) {
      for (int m = 0; m < kBlockM; ++m) {
        int n = -1, h = -1, w = -1;
        if (!row_pixel(plan.g, job[0], job[1], m, n, h, w)) n = h = w = -1;
        rows.insert(rows.end(), {j, m, n, h, w});
      }
    }
  }
  auto table = [](std::vector<int>& v, int64_t width) {
    return at::from_blob(v.data(), {static_cast<int64_t>(v.size()) / width, width}, at::kInt).clone();
  };
  return {table(steps, 12), table(rows, 5)};
}

}  // namespace sm90
}  // namespace resaspp
