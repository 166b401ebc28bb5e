// Host helpers of the sm_90a kernels (sm90.h): plan tables to geometry, tensor maps over the operands,
// and the host runs of the K-step walks and accumulator maps that the tests read.
#include "sm90.h"
#include "sm90_tensor_map.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <vector>

namespace resaspp {
namespace sm90 {

namespace {

// The host copy of an int32 table (the checks below read the contents).
struct HostTable {
  const int* v;
  int64_t n;
  int operator[](int64_t i) const { return v[i]; }
};

HostTable host(const at::Tensor& t) { return HostTable{t.const_data_ptr<int>(), t.numel()}; }

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// queues [G + 1 + J]: offsets[G + 1] from 0 to J, nondecreasing, then every job index once. A job missing
// leaves its outputs unwritten, an index past J reads past the job table.
void check_queue_contents(const at::Tensor& queues, int64_t J, int64_t G) {
  const HostTable q = host(queues);
  TORCH_CHECK(q[0] == 0 && q[G] == J, "resaspp_ops._C: sm90 queue offsets must run from 0 to ", J, " jobs, got ",
              q[0], " .. ", q[G]);
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(q[g] <= q[g + 1], "resaspp_ops._C: sm90 queue offsets must not decrease (program ", g, ")");
  std::vector<char> seen(static_cast<size_t>(J), 0);
  for (int64_t i = G + 1; i < G + 1 + J; ++i) {
    TORCH_CHECK(q[i] >= 0 && q[i] < J && !seen[q[i]], "resaspp_ops._C: sm90 queues must hold every job index "
                "0 .. ", J - 1, " once, got ", q[i]);
    seen[q[i]] = 1;
  }
}

// Marks cell `i` of a coverage table; every cell must be marked once (each output block written once).
void cover(std::vector<char>& seen, int64_t i, int64_t j, const char* what) {
  TORCH_CHECK(!seen[i], "resaspp_ops._C: sm90 job ", j, " repeats a ", what, " of an earlier job");
  seen[i] = 1;
}

// The job rows, masks and tap tables against the geometry and against each other, where the kernels need
// them to agree: the producer walks a job's steps from `masks` (dgrad) or `tap_offsets` (wgrad) while the
// consumers count job[3]; a mismatch leaves one side waiting on an mbarrier forever. Every index the walks
// and epilogues read is in range, and every output block is some job's, once. What it does not check: that the
// masks are the tiles' true live taps (a live tap dropped from both a mask and its job's count neither hangs nor
// reads out of range, it gives a wrong sum): sm90_plan.py makes them, and the GPU tests check its results.
void check_table_contents(Kind kind, const LaunchPlan& p, int64_t tiles, int64_t groups) {
  const Geometry& g = p.g;
  const int64_t nb = g.num_branches, J = p.num_jobs;
  const HostTable jobs = host(p.jobs), masks = host(p.masks);
  for (int64_t i = 0; i < masks.n; ++i)
    TORCH_CHECK(masks[i] >= 0 && masks[i] <= 0x1FF && (i % nb != 0 || (masks[i] & ~(1 << kCentreTap)) == 0),
                "resaspp_ops._C: sm90 tap mask ", masks[i], " at tile ", i / nb, ", branch ", i % nb,
                " is not a 9-bit mask (the 1x1 branch: its centre tap only)");
  auto check_image_tile = [&](int64_t j, int image, int tile) {
    TORCH_CHECK(image >= 0 && image < g.N && image % g.stack == 0 && tile >= 0 && tile < tiles,
                "resaspp_ops._C: sm90 job ", j, " names image ", image, ", tile ", tile, " (", g.N,
                " images in groups of ", g.stack, ", ", tiles, " tiles)");
  };
  if (kind == kForward) {
    std::vector<char> seen(static_cast<size_t>(groups * tiles * nb), 0);
    for (int64_t j = 0; j < J; ++j) {
      const int* job = &jobs.v[4 * j];
      check_image_tile(j, job[0], job[1]);
      TORCH_CHECK(job[2] >= 0 && job[2] < nb, "resaspp_ops._C: sm90 job ", j, " names branch ", job[2], " of ", nb);
      TORCH_CHECK(job[3] == masks[job[1] * nb + job[2]], "resaspp_ops._C: sm90 forward job ", j, " has taps ", job[3],
                  " where its tile's mask is ", masks[job[1] * nb + job[2]]);
      cover(seen, (job[0] / g.stack * tiles + job[1]) * nb + job[2], j, "(image, tile, branch)");
    }
    TORCH_CHECK(J == groups * tiles * nb, "resaspp_ops._C: sm90 forward plan has ", J, " jobs for ",
                groups * tiles * nb, " (image group, tile, branch) blocks");
  } else if (kind == kDgrad) {
    const int64_t cblocks = ceil_div(g.C, kBlockN);
    std::vector<char> seen(static_cast<size_t>(groups * tiles * cblocks), 0);
    for (int64_t j = 0; j < J; ++j) {
      const int* job = &jobs.v[4 * j];
      check_image_tile(j, job[0], job[1]);
      TORCH_CHECK(job[2] >= 0 && job[2] < cblocks, "resaspp_ops._C: sm90 dgrad job ", j, " names channel block ",
                  job[2], " of ", cblocks);
      int live = 0;
      for (int64_t b = 0; b < nb; ++b) live += popcount9(masks[job[1] * nb + b]);
      TORCH_CHECK(job[3] == live, "resaspp_ops._C: sm90 dgrad job ", j, " counts ", job[3], " taps where its tile's "
                  "masks hold ", live, " (the producer walks the masks, the consumers count the job's taps)");
      cover(seen, (job[0] / g.stack * tiles + job[1]) * cblocks + job[2], j, "(image, tile, channel block)");
    }
    TORCH_CHECK(J == groups * tiles * cblocks, "resaspp_ops._C: sm90 dgrad plan has ", J, " jobs for ",
                groups * tiles * cblocks, " (image group, tile, channel block) blocks");
  } else {
    const int64_t taps = 1 + 9 * (nb - 1), coblocks = ceil_div(g.Co, kWgradM), cblocks = ceil_div(g.C, kWgradN);
    const HostTable off = host(p.tap_offsets), ent = host(p.tap_entries);
    TORCH_CHECK(off.n == taps + 1 && off[0] == 0 && off[taps] <= p.tap_entries.size(0),
                "resaspp_ops._C: sm90 tap_offsets must be [", taps + 1, "] from 0 to at most the ",
                p.tap_entries.size(0), " tap entries");
    // Every offset in order first: with off[taps] bounded above, no entry read below can pass the table's end.
    for (int64_t t = 0; t < taps; ++t) {
      TORCH_CHECK(off[t] <= off[t + 1], "resaspp_ops._C: sm90 tap_offsets must not decrease (tap ", t, ")");
    }
    for (int64_t t = 0; t < taps; ++t) {
      const int64_t branch = t == 0 ? 0 : 1 + (t - 1) / 9, bit = t == 0 ? kCentreTap : (t - 1) % 9;
      for (int64_t e = off[t]; e < off[t + 1]; ++e) {
        const int image = ent[2 * e], tile = ent[2 * e + 1];
        TORCH_CHECK(image >= 0 && image < g.N && image % g.stack == 0 && tile >= 0 && tile < tiles &&
                        ((masks[tile * nb + branch] >> bit) & 1),
                    "resaspp_ops._C: sm90 tap entry ", e, " (image ", image, ", tile ", tile, ") of tap ", t,
                    " is not a tile where that tap is live");
      }
    }
    std::vector<char> seen(static_cast<size_t>(taps * coblocks * cblocks), 0);
    for (int64_t j = 0; j < J; ++j) {
      const int* job = &jobs.v[4 * j];
      TORCH_CHECK(job[0] >= 0 && job[0] < taps && job[1] >= 0 && job[1] < coblocks && job[2] >= 0 && job[2] < cblocks,
                  "resaspp_ops._C: sm90 wgrad job ", j, " names tap ", job[0], ", blocks (", job[1], ", ", job[2],
                  ") of ", taps, " taps, (", coblocks, ", ", cblocks, ") blocks");
      TORCH_CHECK(job[3] == off[job[0] + 1] - off[job[0]], "resaspp_ops._C: sm90 wgrad job ", j, " counts ", job[3],
                  " steps where tap ", job[0], " has ", off[job[0] + 1] - off[job[0]], " entries (the producer walks "
                  "the entries, the consumers count the job's steps)");
      cover(seen, (static_cast<int64_t>(job[0]) * coblocks + job[1]) * cblocks + job[2], j, "(tap, block)");
    }
    TORCH_CHECK(J == taps * coblocks * cblocks, "resaspp_ops._C: sm90 wgrad plan has ", J, " jobs for ",
                taps * coblocks * cblocks, " (tap, block) blocks");
  }
}

}  // namespace

LaunchPlan make_plan(Kind kind, const at::Tensor& jobs, const at::Tensor& queues, const at::Tensor& masks,
                     const at::Tensor& tap_offsets, const at::Tensor& tap_entries, const std::vector<int64_t>& rates,
                     int64_t N, int64_t C, int64_t Co, int64_t H, int64_t W, int64_t tile_h, int64_t tile_w,
                     int64_t stack) {
  for (const at::Tensor* t : {&jobs, &queues, &masks, &tap_offsets, &tap_entries})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous() && t->device() == jobs.device(),
                "resaspp_ops._C: sm90 plan tables must be contiguous int32 on one device");
  TORCH_CHECK(static_cast<int64_t>(rates.size()) <= kMaxBranches, "resaspp_ops._C: too many branches");
  // A walk of a job with no K chunk never ends; the host writes such outputs without a launch.
  TORCH_CHECK(N >= 0 && H >= 1 && W >= 1 && C >= 1 && Co >= 1, "resaspp_ops._C: the sm90 kernels need N >= 0 and "
              "H, W, C, Co >= 1, got N=", N, " C=", C, " Co=", Co, " H=", H, " W=", W);
  // The wgrad epilogue steps along C at 32-bit offsets of 9 elements (w3x3's C stride).
  TORCH_CHECK(H < kMaxRate && W < kMaxRate && N < (int64_t{1} << 31) && 9 * C < (int64_t{1} << 31) &&
                  Co < (int64_t{1} << 31),
              "resaspp_ops._C: problem too large for the sm90 kernels");
  TORCH_CHECK(tile_h >= 1 && tile_w >= 1 && stack >= 1 &&
                  tile_h * tile_w * stack <= (kind == kWgrad ? kWgradPix : kBlockM),
              "resaspp_ops._C: bad sm90 tile ", tile_h, "x", tile_w, " x", stack);
  const int64_t nb = 1 + static_cast<int64_t>(rates.size());
  const int64_t tiles = ceil_div(H, tile_h) * ceil_div(W, tile_w), groups = ceil_div(N, stack);
  TORCH_CHECK(jobs.dim() == 2 && jobs.size(1) == 4, "resaspp_ops._C: jobs must be [J, 4], got ", jobs.sizes());
  const int64_t J = jobs.size(0);
  TORCH_CHECK(J < (int64_t{1} << 31), "resaspp_ops._C: too many sm90 jobs");
  TORCH_CHECK(queues.dim() == 1 && queues.numel() >= J + 2 && queues.numel() - J - 1 <= std::max<int64_t>(J, 1),
              "resaspp_ops._C: queues must be [G + 1 + J] with 1 <= G <= J programs, got ", queues.numel(),
              " entries for ", J, " jobs");
  TORCH_CHECK(masks.dim() == 2 && masks.size(0) == tiles && masks.size(1) == nb, "resaspp_ops._C: masks must be [",
              tiles, " tiles, ", nb, " branches], got ", masks.sizes());
  if (kind == kWgrad)
    TORCH_CHECK(tap_offsets.dim() == 1 && tap_offsets.numel() == 1 + 9 * (nb - 1) + 1 && tap_entries.dim() == 2 &&
                    tap_entries.size(1) == 2,
                "resaspp_ops._C: sm90 tap_offsets must be [", 1 + 9 * (nb - 1) + 1, "] and tap_entries [E, 2], got ",
                tap_offsets.sizes(), " and ", tap_entries.sizes());
  LaunchPlan p;
  p.jobs = jobs;
  p.queues = queues;
  p.masks = masks;
  p.tap_offsets = tap_offsets;
  p.tap_entries = tap_entries;
  p.num_jobs = static_cast<int>(J);
  p.programs = static_cast<int>(queues.numel() - J - 1);
  Geometry& g = p.g;
  g = Geometry{};
  g.N = static_cast<int>(N);
  g.H = static_cast<int>(H);
  g.W = static_cast<int>(W);
  g.C = static_cast<int>(C);
  g.Co = static_cast<int>(Co);
  g.num_branches = static_cast<int>(nb);
  g.tile_h = static_cast<int>(tile_h);
  g.tile_w = static_cast<int>(tile_w);
  g.tiles_w = static_cast<int>(ceil_div(W, tile_w));
  g.stack = static_cast<int>(stack);
  g.k_chunks = static_cast<int>(ceil_div(kind == kDgrad ? Co : C, kBlockK));
  g.rates[0] = 0;
  for (size_t b = 0; b < rates.size(); ++b) {
    TORCH_CHECK(rates[b] >= 1, "resaspp_ops._C: rates must be positive");
    g.rates[b + 1] = static_cast<int>(std::min<int64_t>(rates[b], kMaxRate));
  }
  // The contents are read where they are: on the host. Device tables would need a copy and a sync every
  // launch; the backend checks each plan's host tables once (sm90_check_plan) before it copies them over.
  if (jobs.device().is_cpu()) {
    check_queue_contents(queues, J, p.programs);
    check_table_contents(kind, p, tiles, groups);
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
