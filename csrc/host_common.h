// Host-side helpers shared by the CPU ops (cpu_ops.cpp) and the CUDA host code
// (cuda/stats_cuda.cu): argument checks and codes. Compiled with the ordinary flags only;
// the ISA-specific kernel files include gradstats_common.h, never this header.
#pragma once

#include <cmath>
#include <cstdint>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "gradstats_common.h"

namespace gradstats {
namespace host {

// Kernel dtype code of a scalar type, -1 when the kernels do not read it.
inline int32_t dtype_code(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
      return kF32;
    case at::kBFloat16:
      return kBF16;
    case at::kHalf:
      return kF16;
    default:
      return -1;
  }
}

// Accumulation mode of a norm order p (> 0 or inf).
inline int32_t norm_mode(double p) {
  TORCH_CHECK(p > 0, "gradstats.stats: norm_type must be > 0 or inf, got ", p);
  if (std::isinf(p)) return kModeInf;
  if (p == 2.0) return kModeL2;
  if (p == 1.0) return kModeL1;
  return kModeP;
}

// Number of groups described by group_bounds (0 = b[0] <= ... <= b[G] = T).
inline int64_t check_bounds(c10::IntArrayRef bounds, int64_t T, const char* op) {
  TORCH_CHECK(!bounds.empty() && bounds[0] == 0 && bounds.back() == T, op,
              ": group_bounds must start at 0 and end at len(tensors)=", T);
  for (size_t g = 1; g < bounds.size(); ++g) {
    TORCH_CHECK(bounds[g] >= bounds[g - 1], op, ": group_bounds must be non-decreasing");
  }
  return static_cast<int64_t>(bounds.size()) - 1;
}

// A tensor whose elements are exactly the numel elements from data_ptr (any order).
inline bool flat_ok(const at::Tensor& t) {
  return t.is_contiguous() || t.is_non_overlapping_and_dense();
}

}  // namespace host
}  // namespace gradstats
