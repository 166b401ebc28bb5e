// Host side of the separable op's kernels (separable.h): input checks with the reason, layouts, output
// allocation and the launches. The operands come packed by resaspp_ops/backend/separable_plan.py and the
// jobs from resaspp_ops/backend/jobs.py (resaspp_ops/backend/cuda_separable.py calls these).
#include "separable.h"

#include "host_common.h"
#include "multi_rate_conv2d_mma.h"
#include "tap_table.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>

#include <algorithm>
#include <cstdint>

namespace resaspp {
namespace separable {
namespace {

constexpr int64_t kWgradCtas = 256;  // the pointwise weight grad's target CTA count (about 2 waves of 132 SMs)

at::ScalarType acc_type(const at::Tensor& x) { return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat; }

// x [N, C, H, W] CUDA; dw [1+B, 9, C] in the accumulation dtype; the rates; returns 1+B.
int64_t check_operands(const at::Tensor& x, const at::Tensor& dw, const std::vector<int64_t>& rates) {
  TORCH_CHECK(x.is_cuda(), "resaspp_ops._C: x must be a CUDA tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, "resaspp_ops._C: x must be [N, C, H, W], got ", x.sizes());
  const at::ScalarType t = x.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble,
              "resaspp_ops._C: the separable kernels take fp16, bf16, fp32 or fp64, got ", t);
  const int64_t nb = 1 + static_cast<int64_t>(rates.size());
  TORCH_CHECK(static_cast<int64_t>(rates.size()) <= kMaxBranches, "resaspp_ops._C: at most ", kMaxBranches,
              " atrous branches are supported, got ", rates.size());
  for (int64_t r : rates) TORCH_CHECK(r >= 1, "resaspp_ops._C: rates must be positive, got ", r);
  TORCH_CHECK(dw.dim() == 3 && dw.size(0) == nb && dw.size(1) == 9 && dw.size(2) == x.size(1) && dw.is_contiguous(),
              "resaspp_ops._C: dw must be a contiguous [", nb, ", 9, ", x.size(1), "], got ", dw.sizes());
  TORCH_CHECK(dw.scalar_type() == acc_type(x) && dw.device() == x.device(), "resaspp_ops._C: dw must be ",
              acc_type(x), " on ", x.device());
  TORCH_CHECK(x.size(2) < kMaxRate && x.size(3) < kMaxRate, "resaspp_ops._C: spatial size too large");
  return nb;
}

at::Tensor per_channel(const std::optional<at::Tensor>& p, int64_t n, const at::Tensor& x, const char* what) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->size(0) == n, "resaspp_ops._C: ", what, " must be [", n, "], got ", p->sizes());
  TORCH_CHECK(p->device() == x.device(), "resaspp_ops._C: ", what, " must be on ", x.device());
  return p->to(acc_type(x)).contiguous();
}

PixelGeometry pixel_geometry(const at::Tensor& x, int64_t branch, int64_t rate) {
  return PixelGeometry{static_cast<int>(x.size(0)), static_cast<int>(x.size(2)), static_cast<int>(x.size(3)),
                       static_cast<int>(x.size(1)),
                       branch == 0 ? 0 : static_cast<int>(std::min<int64_t>(rate, kMaxRate)),
                       branch == 0 ? 1 << 4 : 0x1FF};
}

// [P, C] pixel rows of a channels_last [N, C, H, W] tensor, or a [P, C] tensor, checked.
void check_rows(const at::Tensor& t, const at::Tensor& x, const char* what) {
  TORCH_CHECK(t.device() == x.device() && t.scalar_type() == x.scalar_type(), "resaspp_ops._C: ", what,
              " must match x in dtype and device");
  TORCH_CHECK(t.numel() == x.numel() && (t.dim() == 2 ? t.is_contiguous() : t.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "resaspp_ops._C: ", what, " must be [N H W, C] contiguous (or x's shape, channels_last)");
}

}  // namespace

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& dw, const at::Tensor& pw,
                        const std::optional<at::Tensor>& mid_scale, const std::optional<at::Tensor>& mid_shift,
                        bool mid_relu, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                        bool relu, const std::vector<int64_t>& rates, const std::string& kernel,
                        const at::Tensor& jobs, const std::vector<int64_t>& tile) {
  const int64_t nb = check_operands(x_in, dw, rates);
  const c10::cuda::CUDAGuard guard(x_in.device());
  TORCH_CHECK(kernel == "mma" || kernel == "simt", "resaspp_ops._C: the separable kernel must be mma or simt, got '",
              kernel, "'");
  const int64_t N = x_in.size(0), C = x_in.size(1), H = x_in.size(2), W = x_in.size(3);
  TORCH_CHECK(pw.dim() == 3 && pw.size(0) == nb && pw.size(1) == C && pw.is_contiguous() &&
                  pw.scalar_type() == x_in.scalar_type() && pw.device() == x_in.device(),
              "resaspp_ops._C: pw must be a contiguous [", nb, ", ", C, ", Co] of x's dtype, got ", pw.sizes());
  const int64_t Co = pw.size(2);
  TORCH_CHECK(jobs.scalar_type() == at::kInt && jobs.is_contiguous() && jobs.device() == x_in.device() &&
                  jobs.dim() == 2 && jobs.size(1) == 4,
              "resaspp_ops._C: jobs must be a contiguous int32 [J, 4] on ", x_in.device());
  const at::Tensor ms = per_channel(mid_scale, nb * C, x_in, "mid_scale");
  const at::Tensor mt = per_channel(mid_shift, nb * C, x_in, "mid_shift");
  const at::Tensor sc = per_channel(scale, nb * Co, x_in, "scale");
  const at::Tensor sh = per_channel(shift, nb * Co, x_in, "shift");
  at::Tensor out = at::empty({N, nb * Co, H, W}, x_in.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (out.numel() == 0) return out;
  if (C == 0) {  // every branch sums nothing
    fill_epilogue_of_zero(out, sc, sh, relu);
    return out;
  }
  const at::Tensor x = x_in.contiguous(at::MemoryFormat::ChannelsLast);
  const JobGeometry g = geometry(x, Co, rates, tile, 0);
  if (kernel == "mma") {
    const at::ScalarType t = x.scalar_type();
    TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat,
                "resaspp_ops._C: the separable mma kernel takes float16, bfloat16 or float32 (TF32), got ", t);
    TORCH_CHECK(C % 8 == 0 && Co % 8 == 0, "resaspp_ops._C: the separable mma kernel needs C and Co to be "
                "multiples of 8, got C=", C, ", Co=", Co);
    const at::Tensor pwa = aligned16(pw);
    forward_mma(aligned16(x), dw, pwa.is_contiguous() ? pwa : pwa.contiguous(), ms, mt, mid_relu, sc, sh, relu, out,
                jobs, g);
  } else {
    forward_simt(x, dw, pw, ms, mt, mid_relu, sc, sh, relu, out, jobs, g);
  }
  return out;
}

namespace {
at::Tensor branch_rows(const std::optional<at::Tensor>& p, const at::Tensor& x, int64_t branch, int64_t n) {
  if (!p.has_value() || !p->defined()) return at::Tensor();
  TORCH_CHECK(p->dim() == 1 && p->size(0) >= (branch + 1) * n && p->scalar_type() == acc_type(x) &&
                  p->is_contiguous() && p->device() == x.device(),
              "resaspp_ops._C: mid_scale / mid_shift must be contiguous [(1+B) C] of ", acc_type(x));
  return p->narrow(0, branch * n, n);
}

void check_dw(const at::Tensor& dw, const at::Tensor& x, int64_t branch) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resaspp_ops._C: x must be a channels_last CUDA [N, C, H, W]");
  TORCH_CHECK(dw.dim() == 3 && dw.size(1) == 9 && dw.size(2) == x.size(1) && dw.is_contiguous() &&
                  branch >= 0 && branch < dw.size(0) && dw.scalar_type() == acc_type(x) && dw.device() == x.device(),
              "resaspp_ops._C: dw must be a contiguous [1+B, 9, C] of ", acc_type(x), " holding branch ", branch);
}
}  // namespace

at::Tensor activation_cuda(const at::Tensor& x, const at::Tensor& dw, const std::optional<at::Tensor>& mid_scale,
                           const std::optional<at::Tensor>& mid_shift, bool mid_relu, int64_t branch, int64_t rate,
                           at::Tensor& out) {
  check_dw(dw, x, branch);
  check_rows(out, x, "out");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1);
  activation(x, dw[branch], branch_rows(mid_scale, x, branch, C), branch_rows(mid_shift, x, branch, C),
             mid_relu && branch > 0, pixel_geometry(x, branch, rate), out);
  return out;
}

std::vector<at::Tensor> mid_backward_cuda(const at::Tensor& x, const at::Tensor& dw,
                                          const std::optional<at::Tensor>& mid_scale,
                                          const std::optional<at::Tensor>& mid_shift, bool mid_relu, int64_t branch,
                                          int64_t rate, at::Tensor& buf, bool need_mid) {
  check_dw(dw, x, branch);
  check_rows(buf, x, "buf");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1), P = x.size(0) * x.size(2) * x.size(3);
  const int64_t chunks = (P + kChunkPixels - 1) / kChunkPixels;
  const at::Tensor ms = branch_rows(mid_scale, x, branch, C), mt = branch_rows(mid_shift, x, branch, C);
  at::Tensor ps, pt;
  if (need_mid && ms.defined()) ps = at::empty({chunks, C}, x.options().dtype(acc_type(x)));
  if (need_mid && mt.defined()) pt = at::empty({chunks, C}, x.options().dtype(acc_type(x)));
  mid_backward(x, dw[branch], ms, mt, mid_relu && branch > 0, pixel_geometry(x, branch, rate), buf, ps, pt);
  return {ps, pt};
}

void dgrad_stencil_cuda(const at::Tensor& dd, const at::Tensor& dw, int64_t branch, int64_t rate,
                        const std::vector<int64_t>& shape, at::Tensor& gx) {
  TORCH_CHECK(shape.size() == 4, "resaspp_ops._C: shape must be [N, C, H, W]");
  const int64_t N = shape[0], C = shape[1], H = shape[2], W = shape[3];
  TORCH_CHECK(dd.is_cuda() && dd.numel() == N * C * H * W && dd.is_contiguous(),
              "resaspp_ops._C: dd must be a contiguous CUDA [N H W, C]");
  TORCH_CHECK(dw.dim() == 3 && dw.size(1) == 9 && dw.size(2) == C && dw.is_contiguous() && branch >= 0 &&
                  branch < dw.size(0) && dw.device() == dd.device(),
              "resaspp_ops._C: dw must be a contiguous [1+B, 9, C]");
  const at::ScalarType acc = dd.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dw.scalar_type() == acc && gx.scalar_type() == acc && gx.numel() == dd.numel() && gx.is_contiguous() &&
                  gx.device() == dd.device(),
              "resaspp_ops._C: dw and gx must be contiguous ", acc, " (gx [N H W, C])");
  const c10::cuda::CUDAGuard guard(dd.device());
  const PixelGeometry g{static_cast<int>(N), static_cast<int>(H), static_cast<int>(W), static_cast<int>(C),
                        branch == 0 ? 0 : static_cast<int>(std::min<int64_t>(rate, kMaxRate)),
                        branch == 0 ? 1 << 4 : 0x1FF};
  dgrad_stencil(dd, dw[branch], g, gx);
}

at::Tensor wgrad_dw_cuda(const at::Tensor& dd, const at::Tensor& x, int64_t rate) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resaspp_ops._C: x must be a channels_last CUDA [N, C, H, W]");
  check_rows(dd, x, "dd");
  TORCH_CHECK(rate >= 1, "resaspp_ops._C: rates must be positive, got ", rate);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(1), P = x.size(0) * x.size(2) * x.size(3);
  const int64_t chunks = (P + kChunkPixels - 1) / kChunkPixels;
  at::Tensor part = at::empty({chunks, 9, C}, x.options().dtype(acc_type(x)));
  wgrad_dw(dd, x, pixel_geometry(x, 1, rate), part);
  return part;
}

namespace {
// What the mma pointwise GEMMs need of grad and the channel counts; x-like sizes from grad.
void check_pointwise(const at::Tensor& grad, int64_t branch, int64_t C, int64_t Co) {
  TORCH_CHECK(grad.is_cuda() && grad.dim() == 4 && grad.is_contiguous(at::MemoryFormat::ChannelsLast),
              "resaspp_ops._C: grad must be a channels_last CUDA [N, (1+B) Co, H, W]");
  const at::ScalarType t = grad.scalar_type();
  TORCH_CHECK(t == at::kHalf || t == at::kBFloat16 || t == at::kFloat,
              "resaspp_ops._C: the mma pointwise GEMMs take float16, bfloat16 or float32 (TF32), got ", t);
  TORCH_CHECK(C % 8 == 0 && Co % 8 == 0, "resaspp_ops._C: the mma pointwise GEMMs need C and Co to be multiples "
              "of 8, got C=", C, ", Co=", Co);
  TORCH_CHECK(Co > 0 && grad.size(1) % Co == 0 && branch >= 0 && (branch + 1) * Co <= grad.size(1),
              "resaspp_ops._C: grad has ", grad.size(1), " channels, no branch ", branch, " of ", Co);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(grad.const_data_ptr()) % 16 == 0, "resaspp_ops._C: grad must be 16-byte "
              "aligned");
}

JobGeometry pointwise_geometry(const at::Tensor& grad, int64_t K, int64_t M, const std::vector<int64_t>& tile) {
  TORCH_CHECK(tile.size() == 3 && tile[0] >= 1 && tile[1] >= 1 && tile[2] >= 1,
              "resaspp_ops._C: tile must be [tile_h, tile_w, stack]");
  JobGeometry g{};
  g.N = static_cast<int>(grad.size(0));
  g.H = static_cast<int>(grad.size(2));
  g.W = static_cast<int>(grad.size(3));
  g.C = static_cast<int>(K);
  g.Co = static_cast<int>(M);
  g.num_branches = 1;
  g.tile_h = static_cast<int>(tile[0]);
  g.tile_w = static_cast<int>(tile[1]);
  g.stack = static_cast<int>(tile[2]);
  g.tiles_w = (g.W + g.tile_w - 1) / g.tile_w;
  return g;
}
}  // namespace

void pointwise_dgrad_cuda(const at::Tensor& grad, int64_t branch, const at::Tensor& pw, at::Tensor& out,
                          const at::Tensor& jobs, const std::vector<int64_t>& tile) {
  TORCH_CHECK(pw.dim() == 3 && pw.is_contiguous() && pw.scalar_type() == grad.scalar_type() &&
                  pw.device() == grad.device() && branch < pw.size(0),
              "resaspp_ops._C: pw must be a contiguous [1+B, C, Co] of grad's dtype");
  const int64_t C = pw.size(1), Co = pw.size(2);
  check_pointwise(grad, branch, C, Co);
  const int64_t P = grad.size(0) * grad.size(2) * grad.size(3);
  TORCH_CHECK(out.dim() == 2 && out.size(0) == P && out.size(1) == C && out.is_contiguous() &&
                  out.scalar_type() == grad.scalar_type() && out.device() == grad.device(),
              "resaspp_ops._C: out must be a contiguous [", P, ", ", C, "] of grad's dtype");
  TORCH_CHECK(jobs.scalar_type() == at::kInt && jobs.is_contiguous() && jobs.device() == grad.device() &&
                  jobs.dim() == 2 && jobs.size(1) == 4,
              "resaspp_ops._C: jobs must be a contiguous int32 [J, 4] on ", grad.device());
  const c10::cuda::CUDAGuard guard(grad.device());
  if (out.numel() == 0) return;
  const at::Tensor w = aligned16(pw[branch]);  // [C, Co]: rows = the GEMM's output channels, Co innermost
  mma::pointwise(grad, branch * Co, grad.size(1), w.is_contiguous() ? w : w.contiguous(), out, jobs,
                 pointwise_geometry(grad, Co, C, tile));
}

at::Tensor pointwise_wgrad_cuda(const at::Tensor& grad, int64_t branch, const at::Tensor& a, int64_t Co) {
  const int64_t C = a.size(-1);
  check_pointwise(grad, branch, C, Co);
  const int64_t P = grad.size(0) * grad.size(2) * grad.size(3);
  TORCH_CHECK(a.dim() == 2 && a.size(0) == P && a.is_contiguous() && a.scalar_type() == grad.scalar_type() &&
                  a.device() == grad.device() && reinterpret_cast<uintptr_t>(a.const_data_ptr()) % 16 == 0,
              "resaspp_ops._C: a must be a contiguous, 16-byte aligned [", P, ", C] of grad's dtype");
  const c10::cuda::CUDAGuard guard(grad.device());
  // Split-K over groups of whole images, in a fixed order: S = min(N, kWgradCtas / output blocks) partials
  // [S, Co, C], summed over S by at::sum (a fixed-order reduction): independent of the device, reproducible.
  const int64_t N = grad.size(0), HW = grad.size(2) * grad.size(3);
  const int64_t blocks = ((C + 127) / 128) * ((Co + 127) / 128);
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(N, kWgradCtas / std::max<int64_t>(blocks, 1)));
  at::Tensor parts = at::empty({splits, Co, C}, grad.options().dtype(at::kFloat));
  if (parts.numel() == 0) return parts.sum(0);
  if (P == 0) return parts.zero_().sum(0);
  for (int64_t s = 0; s < splits; ++s) {
    const int64_t n0 = N * s / splits, n1 = N * (s + 1) / splits;
    at::Tensor part = parts.narrow(0, s, 1);
    if (n1 == n0) {
      part.zero_();
      continue;
    }
    const at::Tensor gs = grad.narrow(0, n0, n1 - n0), as = a.narrow(0, n0 * HW, (n1 - n0) * HW);
    mma::wgrad_strided(gs, branch * Co, grad.size(1), as, part, pointwise_geometry(gs, C, Co, {1, 1, 1}));
  }
  return parts.sum(0);
}

}  // namespace separable
}  // namespace resaspp
