// Python bindings of resaspp_ops._C. The op's schema, fake kernel and autograd live in
// resaspp_ops/ops.py; this module exposes the CUDA kernels it calls.
#include <torch/extension.h>

#include "multi_rate_conv2d.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "resaspp_ops CUDA kernels: the fused multi-rate convolution (DESIGN.md section 3)";
  m.def("forward", &resaspp::multi_rate_conv2d_forward_cuda,
        "out[N, (1+B)*Co, H, W] (channels_last) = fused 1x1 + atrous 3x3 branches, epilogue scale/shift/ReLU",
        py::arg("x"), py::arg("w1x1"), py::arg("w3x3"), py::arg("rates"), py::arg("scale") = py::none(),
        py::arg("shift") = py::none(), py::arg("relu") = false);
  m.def("backward", &resaspp::multi_rate_conv2d_backward_cuda,
        "[grad_x, grad_w1x1, grad_w3x3] from the grad of the pre-epilogue output (None where not requested)",
        py::arg("grad"), py::arg("x"), py::arg("w1x1"), py::arg("w3x3"), py::arg("rates"), py::arg("need_x"),
        py::arg("need_w"));
  m.attr("max_branches") = resaspp::kMaxBranches;
}
