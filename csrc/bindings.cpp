// Python bindings of resaspp_ops._C. The op's schema, fake kernel and autograd live in resaspp_ops/ops.py,
// the choice of kernel and the plans in resaspp_ops/backend/cuda.py; this module exposes the kernels.
#include <torch/extension.h>

#include "mma_fragments.h"
#include "multi_rate_conv2d.h"
#include "separable.h"
#if RESASPP_WITH_SM90
#include "sm90.h"
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resaspp_ops CUDA kernels: the fused multi-rate convolution (DESIGN.md section 3)";
  m.def("forward", &resaspp::multi_rate_conv2d_forward_cuda,
        "out[N, (1+B)*Co, H, W] (channels_last) = fused 1x1 + atrous 3x3 branches, epilogue scale/shift/ReLU; "
        "kernel: sm90 | mma | simt, with the plan's tables and tile (multi_rate_conv2d.h)",
        py::arg("x"), py::arg("w1x1"), py::arg("w3x3"), py::arg("rates"), py::arg("scale"), py::arg("shift"),
        py::arg("relu"), py::arg("kernel"), py::arg("tables"), py::arg("tile"));
  m.def("backward", &resaspp::multi_rate_conv2d_backward_cuda,
        "[grad_x, grad_w1x1, grad_w3x3] from the grad of the pre-epilogue output (None where not requested)",
        py::arg("grad"), py::arg("x"), py::arg("w1x1"), py::arg("w3x3"), py::arg("rates"), py::arg("need_x"),
        py::arg("need_w"), py::arg("kernel"), py::arg("dgrad_tables"), py::arg("dgrad_tile"),
        py::arg("wgrad_tables"), py::arg("wgrad_tile"));
  m.attr("max_branches") = resaspp::kMaxBranches;
  namespace sep = resaspp::separable;
  m.def("separable_forward", &sep::forward_cuda,
        "out[N, (1+B)*Co, H, W] (channels_last) = the separable branches (depthwise, mid stage, pointwise) with "
        "the epilogue, from the packed operands (dw [1+B, 9, C], pw [1+B, C, Co]) and the plan's jobs; kernel: mma "
        "| simt (separable.h)",
        py::arg("x"), py::arg("dw"), py::arg("pw"), py::arg("mid_scale"), py::arg("mid_shift"), py::arg("mid_relu"),
        py::arg("scale"), py::arg("shift"), py::arg("relu"), py::arg("rates"), py::arg("kernel"), py::arg("jobs"),
        py::arg("tile"));
  m.def("separable_activation", &sep::activation_cuda,
        "out[N H W, C] = branch's mid(depthwise(x)) in x's dtype (the pointwise A operand, recomputed)", py::arg("x"),
        py::arg("dw"), py::arg("mid_scale"), py::arg("mid_shift"), py::arg("mid_relu"), py::arg("branch"),
        py::arg("rate"), py::arg("out"));
  m.def("separable_mid_backward", &sep::mid_backward_cuda,
        "buf[N H W, C]: dA -> dD in place; returns [per-chunk sum dM*D [chunks, C], per-chunk sum dM] (undefined "
        "where not needed)",
        py::arg("x"), py::arg("dw"), py::arg("mid_scale"), py::arg("mid_shift"), py::arg("mid_relu"),
        py::arg("branch"), py::arg("rate"), py::arg("buf"), py::arg("need_mid"));
  m.def("separable_dgrad_stencil", &sep::dgrad_stencil_cuda,
        "gx[N H W, C] (accumulation dtype) += the depthwise transpose of dd[N H W, C] for the branch", py::arg("dd"),
        py::arg("dw"), py::arg("branch"), py::arg("rate"), py::arg("shape"), py::arg("gx"));
  m.def("separable_wgrad_dw", &sep::wgrad_dw_cuda,
        "per-chunk partials [chunks, 9, C] of sum_p dd[p, c] x[p + d_tap, c] (fixed pixel order)", py::arg("dd"),
        py::arg("x"), py::arg("rate"));
  m.def("separable_pointwise_dgrad", &sep::pointwise_dgrad_cuda,
        "out[N H W, C] = grad's branch channels @ pw[branch]^T (mma.sync) over the centre-only jobs of the plan's "
        "tiles", py::arg("grad"), py::arg("branch"), py::arg("pw"), py::arg("out"), py::arg("jobs"), py::arg("tile"));
  m.def("separable_pointwise_wgrad", &sep::pointwise_wgrad_cuda,
        "[Co, C] fp32 = grad's branch channels^T @ a[N H W, C] (mma.sync, one fixed pixel order)", py::arg("grad"),
        py::arg("branch"), py::arg("a"), py::arg("co"));
  py::dict sep_constants;
  sep_constants["block_m"] = sep::kBlockM;
  sep_constants["block_n"] = sep::kBlockN;
  sep_constants["simt_n"] = sep::kSimtN;
  sep_constants["simt_k"] = sep::kSimtK;
  sep_constants["chunk_pixels"] = sep::kChunkPixels;
  m.attr("separable_constants") = sep_constants;
  m.def(
      "mma_fragment_offsets",
      [](const std::string& operand, bool mn_major, bool tf32, int tile, int k, int ld, int elem) {
        TORCH_CHECK(operand == "a" || operand == "b", "operand must be a or b");
        const bool ldsm = !(mn_major && tf32);
        std::vector<int> out;
        for (int lane = 0; lane < 32; ++lane)
          for (int q = 0; q < 4; ++q) {
            if (ldsm)
              out.push_back(q > 0 ? -1
                            : operand == "a" ? resaspp::mma::a_ldsm_offset(mn_major, lane, tile, k, ld, elem)
                                             : resaspp::mma::b_ldsm_offset(mn_major, lane, tile, k, ld, elem));
            else
              out.push_back(operand == "a" ? resaspp::mma::a_lds_offset(lane, tile, q, k, ld)
                                           : resaspp::mma::b_lds_offset(lane, tile, q, k, ld));
          }
        return torch::tensor(out, torch::kInt).view({32, 4});
      },
      "For tests: per lane, the ldmatrix.x4 row address it hands over (column 0; the rest -1), or for TF32 "
      "MN-major operands the address of each of its 4 registers, in bytes from the warp tile's origin "
      "(csrc/mma_fragments.h)",
      py::arg("operand"), py::arg("mn_major"), py::arg("tf32"), py::arg("tile"), py::arg("k"), py::arg("ld"),
      py::arg("elem"));
#if RESASPP_WITH_SM90
  namespace sm90 = resaspp::sm90;
  m.attr("sm90_built") = true;
  py::dict constants;
  constants["block_m"] = sm90::kBlockM;
  constants["block_n"] = sm90::kBlockN;
  constants["block_k"] = sm90::kBlockK;
  constants["wgrad_pix"] = sm90::kWgradPix;
  constants["wgrad_m"] = sm90::kWgradM;
  constants["wgrad_n"] = sm90::kWgradN;
  constants["stages"] = sm90::kStages;
  constants["max_rate"] = resaspp::kMaxRate;
  m.attr("sm90_constants") = constants;
  auto kind = [](const std::string& k) {
    TORCH_CHECK(k == "forward" || k == "dgrad" || k == "wgrad", "kind must be forward, dgrad or wgrad");
    return k == "forward" ? sm90::kForward : k == "dgrad" ? sm90::kDgrad : sm90::kWgrad;
  };
  m.def(
      "sm90_steps",
      [kind](const std::string& k, const at::Tensor& jobs, const at::Tensor& masks, const at::Tensor& tap_offsets,
             const at::Tensor& tap_entries, const std::vector<int64_t>& rates, int64_t N, int64_t C, int64_t Co,
             int64_t H, int64_t W, int64_t tile_h, int64_t tile_w, int64_t stack) {
        // One program running every job in order: offsets (0, J), then 0 .. J - 1.
        const int64_t J = jobs.dim() == 2 ? jobs.size(0) : 0;
        const at::Tensor queues = at::cat({at::zeros({1}, jobs.options()), at::full({1}, J, jobs.options()),
                                           at::arange(J, jobs.options())});
        const sm90::LaunchPlan plan = sm90::make_plan(kind(k), jobs, queues, masks, tap_offsets, tap_entries, rates,
                                                      N, C, Co, H, W, tile_h, tile_w, stack);
        return sm90::host_steps(kind(k), plan);
      },
      "For tests: the K steps and accumulator rows the sm90 kernels' walks (csrc/sm90_plan.h) produce, run on "
      "the host: [steps (job, A origin x5, B map, B origin x5), rows (job, m, n, h, w)]");
  m.def(
      "sm90_check_plan",
      [kind](const std::string& k, const at::Tensor& jobs, const at::Tensor& queues, const at::Tensor& masks,
             const at::Tensor& tap_offsets, const at::Tensor& tap_entries, const std::vector<int64_t>& rates,
             int64_t N, int64_t C, int64_t Co, int64_t H, int64_t W, int64_t tile_h, int64_t tile_w, int64_t stack) {
        for (const at::Tensor* t : {&jobs, &queues, &masks, &tap_offsets, &tap_entries})
          TORCH_CHECK(t->device().is_cpu(), "sm90_check_plan reads the tables on the host: pass CPU tensors");
        sm90::make_plan(kind(k), jobs, queues, masks, tap_offsets, tap_entries, rates, N, C, Co, H, W, tile_h,
                        tile_w, stack);
      },
      "Raises (RuntimeError, with the reason) unless an sm90 plan's host tables are what the kernels can walk: "
      "shapes, index ranges, the producer's walk agreeing with the consumers' step counts, every job queued and "
      "every output block some job's, once (csrc/sm90_host.cpp make_plan)",
      py::arg("kind"), py::arg("jobs"), py::arg("queues"), py::arg("masks"), py::arg("tap_offsets"),
      py::arg("tap_entries"), py::arg("rates"), py::arg("N"), py::arg("C"), py::arg("Co"), py::arg("H"), py::arg("W"),
      py::arg("tile_h"), py::arg("tile_w"), py::arg("stack"));
  m.def(
      "sm90_accumulator_coords", [kind](const std::string& k) { return sm90::accumulator_coords(kind(k)); },
      "For tests: the (m, n) of each accumulator value of each consumer thread, int32 [256, values, 2]");
  m.def(
      "sm90_smem_offsets",
      [kind](const std::string& k, bool b_operand) { return sm90::smem_offsets(kind(k), b_operand); },
      "For tests: the swizzled element offsets of the A or B shared-memory layout, int32 [stages, rows, 64]");
#else
  m.attr("sm90_built") = false;
#endif
}
