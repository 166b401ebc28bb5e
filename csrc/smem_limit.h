// The dynamic shared-memory limit of a kernel, raised once per kernel and device (cudaFuncSetAttribute is a
// per-device setting, and not free on every launch).
#pragma once

namespace resaspp {

// Raises `kernel`'s cudaFuncAttributeMaxDynamicSharedMemorySize to `bytes` on the current device, the first
// time it is asked for that kernel and device. Errors as exceptions.
void set_smem_limit(const void* kernel, int bytes);

}  // namespace resaspp
