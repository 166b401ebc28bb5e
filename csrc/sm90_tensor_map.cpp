// See sm90_tensor_map.h.
#include "sm90_tensor_map.h"

#include <c10/util/Exception.h>
#include <cuda_runtime_api.h>
#include <cudaTypedefs.h>

#include <mutex>

namespace resaspp {
namespace sm90 {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_fn() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  static std::once_flag once;
  static cudaError_t err = cudaSuccess;
  static cudaDriverEntryPointQueryResult status = cudaDriverEntryPointSuccess;
  std::call_once(once, [] {
    void* ptr = nullptr;
    err = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &status);
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(ptr);
  });
  TORCH_CHECK(err == cudaSuccess && status == cudaDriverEntryPointSuccess && fn != nullptr,
              "resaspp_ops._C: the CUDA driver does not provide cuTensorMapEncodeTiled (",
              cudaGetErrorString(err), ", query status ", static_cast<int>(status), ")");
  return fn;
}

}  // namespace

CUtensorMap make_tensor_map(const void* base, bool bf16, int rank, const int64_t* dims, const int64_t* strides,
                            const int* box) {
  TORCH_CHECK(rank >= 1 && rank <= 5, "resaspp_ops._C: tensor map rank ", rank);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(base) % 16 == 0, "resaspp_ops._C: TMA base not 16-byte aligned");
  TORCH_CHECK(strides[0] == 1 && box[0] * 2 == 128, "resaspp_ops._C: TMA rows must be 64 contiguous elements");
  cuuint64_t gdim[5], gstride[4];
  cuuint32_t gbox[5], estride[5];
  int64_t stride[5];
  for (int d = 0; d < rank; ++d) {
    // A dimension of extent 1 is never stepped along: its stride (PyTorch's may be anything) is set to the
    // one a dense tensor would have, so that it passes the checks.
    stride[d] = d == 0 ? 1 : dims[d] == 1 ? stride[d - 1] * dims[d - 1] : strides[d];
    TORCH_CHECK(dims[d] >= 1 && dims[d] <= (int64_t{1} << 32), "resaspp_ops._C: TMA dimension ", d, " of ",
                dims[d], " elements");
    TORCH_CHECK(box[d] >= 1 && box[d] <= 256, "resaspp_ops._C: TMA box extent ", box[d]);
    gdim[d] = static_cast<cuuint64_t>(dims[d]);
    gbox[d] = static_cast<cuuint32_t>(box[d]);
    estride[d] = 1;
    if (d > 0) {
      const int64_t bytes = stride[d] * 2;
      TORCH_CHECK(bytes % 16 == 0 && bytes > 0 && bytes < (int64_t{1} << 40),
                  "resaspp_ops._C: TMA stride of ", stride[d], " elements in dimension ", d);
      gstride[d - 1] = static_cast<cuuint64_t>(bytes);
    }
  }
  CUtensorMap map;
  const CUresult res = encode_fn()(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, static_cast<cuuint32_t>(rank),
      const_cast<void*>(base), gdim, gstride, gbox, estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  TORCH_CHECK(res == CUDA_SUCCESS, "resaspp_ops._C: cuTensorMapEncodeTiled failed (CUresult ", static_cast<int>(res),
              ")");
  return map;
}

}  // namespace sm90
}  // namespace resaspp
