// The tap table shared by the SIMT and tensor-core kernels. Kept free of torch headers so that the
// kernel files include only what they use (the torch headers dominate their compile time).
#pragma once

namespace resaspp {

// Largest number of atrous branches a launch supports (tap table size is static).
constexpr int kMaxBranches = 16;
constexpr int kMaxTaps = 1 + 9 * kMaxBranches;

// Tap table, passed by value as a kernel argument.
struct TapTable {
  int num_taps;
  int branch[kMaxTaps];  // output branch (forward) or input branch (dgrad) of tap t
  int dy[kMaxTaps];      // row offset of the input read, in pixels
  int dx[kMaxTaps];      // column offset of the input read, in pixels
};

}  // namespace resaspp
