// Host side of the fused multi-rate convolution (multi_rate_conv2d.h): input checks, layouts, output
// allocation, and the call into the chosen kernel family (sm90.h, multi_rate_conv2d_mma.h,
// multi_rate_conv2d_simt.h).
#include "multi_rate_conv2d.h"

#include "host_common.h"
#include "job_geometry.h"
#include "multi_rate_conv2d_mma.h"
#include "multi_rate_conv2d_simt.h"
#if RESASPP_WITH_SM90
#include "sm90.h"
#endif

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace resaspp {
namespace {

enum class Kernel { kSm90, kMma, kSimt };

Kernel parse_kernel(const std::string& name) {
  if (name == "sm90") {
#if RESASPP_WITH_SM90
    return Kernel::kSm90;
#else
    TORCH_CHECK(false, "resaspp_ops._C was built without the sm_90a kernels (see `resaspp info`)");
#endif
  }
  if (name == "mma") return Kernel::kMma;
  TORCH_CHECK(name == "simt", "resaspp_ops._C: kernel must be sm90, mma or simt, got '", name, "'");
  return Kernel::kSimt;
}

void check_inputs(const at::Tensor& x, const at::Tensor& w1x1, const at::Tensor& w3x3,
                  const std::vector<int64_t>& rates) {
  TORCH_CHECK(x.is_cuda(), "resaspp_ops._C: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "resaspp_ops._C: x must be [N, C, H, W], got ", x.sizes());
  TORCH_CHECK(w1x1.dim() == 4 && w1x1.size(2) == 1 && w1x1.size(3) == 1,
              "resaspp_ops._C: w1x1 must be [Co, C, 1, 1], got ", w1x1.sizes());
  TORCH_CHECK(w3x3.dim() == 5 && w3x3.size(3) == 3 && w3x3.size(4) == 3,
              "resaspp_ops._C: w3x3 must be [B, Co, C, 3, 3], got ", w3x3.sizes());
  TORCH_CHECK(w1x1.size(1) == x.size(1) && w3x3.size(2) == x.size(1),
              "resaspp_ops._C: x has ", x.size(1), " channels but the weights expect ", w1x1.size(1));
  TORCH_CHECK(w3x3.size(1) == w1x1.size(0), "resaspp_ops._C: w1x1 and w3x3 disagree on Co");
  TORCH_CHECK(static_cast<int64_t>(rates.size()) == w3x3.size(0), "resaspp_ops._C: ", rates.size(),
              " rates for ", w3x3.size(0), " atrous branches");
  TORCH_CHECK(w3x3.size(0) <= kMaxBranches, "resaspp_ops._C: at most ", kMaxBranches,
              " atrous branches are supported, got ", w3x3.size(0));
  for (int64_t r : rates) TORCH_CHECK(r >= 1, "resaspp_ops._C: rates must be positive, got ", r);
  TORCH_CHECK(w1x1.scalar_type() == x.scalar_type() && w3x3.scalar_type() == x.scalar_type(),
              "resaspp_ops._C: x, w1x1 and w3x3 must share a dtype");
  TORCH_CHECK(w1x1.device() == x.device() && w3x3.device() == x.device(),
              "resaspp_ops._C: x, w1x1 and w3x3 must be on the same device");
  TORCH_CHECK(x.size(2) < kMaxRate && x.size(3) < kMaxRate, "resaspp_ops._C: spatial size too large (at most ",
              kMaxRate - 1, ")");
}

// What the tensor-core kernels need of the dtype and the channel counts; TORCH_CHECKs with the reason.
void check_tensor_cores(Kernel kernel, const at::Tensor& x, int64_t C, int64_t Co) {
  const at::ScalarType t = x.scalar_type();
  const bool half = t == at::kHalf || t == at::kBFloat16;
  if (kernel == Kernel::kSm90) {
    TORCH_CHECK(half, "resaspp_ops._C: the sm90 kernels take float16 or bfloat16, got ", t);
    TORCH_CHECK(Co <= 256, "resaspp_ops._C: the sm90 kernels take Co <= 256, got ", Co);
  } else {
    TORCH_CHECK(half || t == at::kFloat, "resaspp_ops._C: the mma kernels take float16, bfloat16 or float32 (TF32), "
                "got ", t);
  }
  TORCH_CHECK(C % 8 == 0 && Co % 8 == 0, "resaspp_ops._C: the tensor-core kernels need C and Co to be multiples of 8, "
              "got C=", C, ", Co=", Co);
}

}  // namespace

// The kernels copy 16-byte vectors (cp.async, TMA): data starting off a 16-byte boundary (a channel slice,
// say) is copied once into fresh, aligned memory.
at::Tensor aligned16(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0) return t;
  return t.clone(at::MemoryFormat::ChannelsLast);
}

void fill_epilogue_of_zero(at::Tensor& out, const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const at::Tensor& like = scale.defined() ? scale : shift;
  at::Tensor v = like.defined() ? at::zeros({out.size(1)}, like.options()) : at::zeros({out.size(1)}, out.options());
  if (scale.defined()) v.mul_(scale);  // 0 * inf is NaN, as in the reference
  if (shift.defined()) v.add_(shift);
  if (relu) v.relu_();                 // keeps NaN
  out.copy_(v.view({1, out.size(1), 1, 1}).expand_as(out));
}

namespace {

// Whether the tensor-core kernels read w3x3 [B, Co, C, 3, 3] in place: C innermost, then kx, ky, Co and B
// with strides growing outwards without overlap (FusedASPP's layout: each branch channels_last), every
// stride a whole number of 16 bytes and the data 16-byte aligned (what TMA and cp.async need).
bool w3_in_place(const at::Tensor& w3) {
  const int64_t e = static_cast<int64_t>(w3.element_size());
  const int64_t C = w3.size(2), Co = w3.size(1);
  const int64_t kx = w3.stride(4), ky = w3.stride(3), co = w3.stride(1), b = w3.stride(0);
  const bool aligned = reinterpret_cast<uintptr_t>(w3.const_data_ptr()) % 16 == 0 && (kx * e) % 16 == 0 &&
                       (ky * e) % 16 == 0 && (co * e) % 16 == 0 && (w3.size(0) == 1 || (b * e) % 16 == 0);
  return w3.stride(2) == 1 && aligned && kx >= C && ky >= 3 * kx && co >= 3 * ky && (w3.size(0) == 1 || b >= Co * co);
}

// w1x1 [Co, C, 1, 1] with C innermost and w3x3 as w3_in_place wants: views where they already are, else
// one copy (w3x3 into [B, Co, 3, 3, C], each branch channels_last).
std::pair<at::Tensor, at::Tensor> c_innermost_weights(const at::Tensor& w1x1, const at::Tensor& w3x3) {
  const int64_t e = static_cast<int64_t>(w1x1.element_size());
  const bool w1_ok = w1x1.stride(1) == 1 && w1x1.stride(0) >= w1x1.size(1) && (w1x1.stride(0) * e) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(w1x1.const_data_ptr()) % 16 == 0;
  at::Tensor w1 = w1_ok ? w1x1 : w1x1.contiguous();
  at::Tensor w3 = w3_in_place(w3x3) ? w3x3 : w3x3.permute({0, 1, 3, 4, 2}).contiguous().permute({0, 1, 4, 2, 3});
  return {w1, w3};
}

}  // namespace

JobGeometry geometry(const at::Tensor& x, int64_t Co, const std::vector<int64_t>& rates,
                     const std::vector<int64_t>& tile, int k_chunks) {
  TORCH_CHECK(tile.size() == 3 && tile[0] >= 1 && tile[1] >= 1 && tile[2] >= 1,
              "resaspp_ops._C: tile must be [tile_h, tile_w, stack]");
  JobGeometry g{};
  g.N = static_cast<int>(x.size(0));
  g.C = static_cast<int>(x.size(1));
  g.H = static_cast<int>(x.size(2));
  g.W = static_cast<int>(x.size(3));
  g.Co = static_cast<int>(Co);
  g.num_branches = 1 + static_cast<int>(rates.size());
  g.tile_h = static_cast<int>(tile[0]);
  g.tile_w = static_cast<int>(tile[1]);
  g.stack = static_cast<int>(tile[2]);
  g.tiles_w = static_cast<int>((g.W + g.tile_w - 1) / g.tile_w);
  g.k_chunks = k_chunks;
  for (size_t b = 0; b < rates.size(); ++b) g.rates[b + 1] = static_cast<int>(std::min<int64_t>(rates[b], kMaxRate));
  return g;
}

namespace {

const at::Tensor& table(const std::vector<at::Tensor>& tables, size_t i, const at::Tensor& like) {
  TORCH_CHECK(tables.size() > i, "resaspp_ops._C: the ", i, "-th plan table is missing");
  const at::Tensor& t = tables[i];
  TORCH_CHECK(t.scalar_type() == at::kInt && t.is_contiguous() && t.device() == like.device(),
              "resaspp_ops._C: plan tables must be contiguous int32 on ", like.device());
  return t;
}

#if RESASPP_WITH_SM90
sm90::LaunchPlan sm90_plan(sm90::Kind kind, const std::vector<at::Tensor>& tables, const std::vector<int64_t>& tile,
                           const std::vector<int64_t>& rates, const at::Tensor& x, int64_t Co) {
  TORCH_CHECK(tables.size() == 5 && tile.size() == 3, "resaspp_ops._C: an sm90 plan is 5 tables and a tile");
  for (size_t i = 0; i < 5; ++i) table(tables, i, x);
  return sm90::make_plan(kind, tables[0], tables[1], tables[2], tables[3], tables[4], rates, x.size(0), x.size(1), Co,
                         x.size(2), x.size(3), tile[0], tile[1], tile[2]);
}
#endif

}  // namespace

at::Tensor multi_rate_conv2d_forward_cuda(const at::Tensor& x_in, const at::Tensor& w1x1, const at::Tensor& w3x3,
                                          const std::vector<int64_t>& rates, const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, bool relu, const std::string& name,
                                          const std::vector<at::Tensor>& tables, const std::vector<int64_t>& tile) {
  check_inputs(x_in, w1x1, w3x3, rates);
  const Kernel kernel = parse_kernel(name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = w1x1.size(0), B = w3x3.size(0), Ct = (1 + B) * Co;
  at::Tensor out = at::empty({N, Ct, H, W}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;

  const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  auto epilogue_param = [&](const std::optional<at::Tensor>& p, const char* what) -> at::Tensor {
    if (!p.has_value() || !p->defined()) return at::Tensor();
    TORCH_CHECK(p->dim() == 1 && p->size(0) == Ct, "resaspp_ops._C: ", what, " must be [", Ct, "], got ", p->sizes());
    TORCH_CHECK(p->device() == x.device(), "resaspp_ops._C: ", what, " must be on ", x.device());
    return p->to(acc_type).contiguous();
  };
  const at::Tensor scale_c = epilogue_param(scale, "scale");
  const at::Tensor shift_c = epilogue_param(shift, "shift");
  if (C == 0) {  // every branch sums nothing (and a TMA map cannot have an empty dimension)
    fill_epilogue_of_zero(out, scale_c, shift_c, relu);
    return out;
  }
  if (kernel == Kernel::kSimt) {
    simt::forward(x, w1x1, w3x3, rates, out, scale_c, shift_c, relu);
    return out;
  }
  check_tensor_cores(kernel, x, C, Co);
  const at::Tensor xa = aligned16(x);
  const auto [w1, w3] = c_innermost_weights(w1x1, w3x3);
#if RESASPP_WITH_SM90
  if (kernel == Kernel::kSm90) {
    sm90::forward(xa, w1, w3, out, scale_c, shift_c, relu, sm90_plan(sm90::kForward, tables, tile, rates, xa, Co));
    return out;
  }
#endif
  mma::forward(xa, w1, w3, out, scale_c, shift_c, relu, table(tables, 0, x), geometry(x, Co, rates, tile, 0));
  return out;
}

std::vector<at::Tensor> multi_rate_conv2d_backward_cuda(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& w1x1, const at::Tensor& w3x3,
    const std::vector<int64_t>& rates, bool need_x, bool need_w, const std::string& name,
    const std::vector<at::Tensor>& dgrad_tables, const std::vector<int64_t>& dgrad_tile,
    const std::vector<at::Tensor>& wgrad_tables, const std::vector<int64_t>& wgrad_tile) {
  check_inputs(x_in, w1x1, w3x3, rates);
  const Kernel kernel = parse_kernel(name);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t Co = w1x1.size(0), B = w3x3.size(0), Ct = (1 + B) * Co, T = 1 + 9 * B;
  TORCH_CHECK(grad_in.dim() == 4 && grad_in.size(0) == N && grad_in.size(1) == Ct && grad_in.size(2) == H &&
                  grad_in.size(3) == W,
              "resaspp_ops._C: grad must be [", N, ", ", Ct, ", ", H, ", ", W, "], got ", grad_in.sizes());
  TORCH_CHECK(grad_in.scalar_type() == x.scalar_type() && grad_in.device() == x.device(),
              "resaspp_ops._C: grad must match x in dtype and device");
  const at::Tensor grad = grad_in.contiguous(at::MemoryFormat::ChannelsLast);
  if (kernel != Kernel::kSimt) check_tensor_cores(kernel, x, C, Co);
  const bool any_pixel = N > 0 && H > 0 && W > 0;

  at::Tensor grad_x, grad_w1x1, grad_w3x3;
  if (need_x) {
    grad_x = at::empty_like(x, x.options().memory_format(at::MemoryFormat::ChannelsLast));
    if (grad_x.numel() > 0 && Co == 0) {
      grad_x.zero_();  // no output channel to take a grad from (and no K chunk to walk)
    } else if (grad_x.numel() > 0) {
      if (kernel == Kernel::kSimt) {
        simt::dgrad(grad, w1x1, w3x3, rates, grad_x);
      } else {
        const at::Tensor ga = aligned16(grad);
        const auto [w1, w3] = c_innermost_weights(w1x1, w3x3);
#if RESASPP_WITH_SM90
        if (kernel == Kernel::kSm90)
          sm90::dgrad(ga, w1, w3, grad_x, sm90_plan(sm90::kDgrad, dgrad_tables, dgrad_tile, rates, x, Co));
        else
#endif
          mma::dgrad(ga, w1, w3, grad_x, table(dgrad_tables, 0, x), table(dgrad_tables, 1, x),
                     geometry(x, Co, rates, dgrad_tile, 0));
      }
    }
  }
  if (need_w) {
    grad_w1x1 = at::empty({Co, C, 1, 1}, x.options());
    grad_w3x3 = at::empty({B, Co, C, 3, 3}, x.options());
#if RESASPP_WITH_SM90
    if (kernel == Kernel::kSm90) {
      // Written by the kernel in the weights' dtype and layout; without pixels, every grad is zero.
      if (any_pixel && Co > 0 && C > 0)
        sm90::wgrad(aligned16(grad), aligned16(x), grad_w1x1, grad_w3x3,
                    sm90_plan(sm90::kWgrad, wgrad_tables, wgrad_tile, rates, x, Co));
      else {
        grad_w1x1.zero_();
        grad_w3x3.zero_();
      }
      return {grad_x, grad_w1x1, grad_w3x3};
    }
#endif
    const at::ScalarType acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    // The kernels write every element of the [tap, Co, C] accumulators (a dead tap's zeros too).
    at::Tensor dw = at::empty({T, Co, C}, x.options().dtype(acc_type));
    if (dw.numel() > 0 && !any_pixel) {
      dw.zero_();
    } else if (dw.numel() > 0 && kernel == Kernel::kSimt) {
      simt::wgrad(grad, x, rates, dw);
    } else if (dw.numel() > 0) {
      mma::wgrad(aligned16(grad), aligned16(x), dw, geometry(x, Co, rates, {1, 1, 1}, 0));
    }
    // Copies into the weights' dtype and layout, each grad in its own storage (no view keeps dw alive).
    grad_w1x1.view({Co, C}).copy_(dw[0]);
    grad_w3x3.permute({0, 3, 4, 1, 2}).copy_(dw.slice(0, 1).view({B, 3, 3, Co, C}));
  }
  return {grad_x, grad_w1x1, grad_w3x3};
}

}  // namespace resaspp
