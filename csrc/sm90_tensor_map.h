// TMA descriptors (CUtensorMap) for the sm_90a kernels, encoded on the host through the driver entry point
// that the CUDA runtime hands out (no link against libcuda: the extension still loads without a driver).
#pragma once

#include <cuda.h>

#include <cstdint>

namespace resaspp {
namespace sm90 {

// A descriptor of a rank-`rank` view (rank <= 5) of 16-bit elements at `base` (16-byte aligned):
// dims[d] and strides[d] (in elements, strides[0] == 1 and the others multiples of 8, growing outwards)
// innermost first,
// box[d] the extents a load copies. 128-byte swizzle (box[0] must be 64 elements), zero fill outside
// the tensor, which the kernels rely on for the convolution's padding. TORCH_CHECKs every limit.
CUtensorMap make_tensor_map(const void* base, bool bf16, int rank, const int64_t* dims, const int64_t* strides,
                            const int* box);

}  // namespace sm90
}  // namespace resaspp
