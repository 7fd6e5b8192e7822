// The implementations of torch.ops.gradstats.* registered by registration.cpp: one pair
// per device (CPU in cpu_ops.cpp, CUDA in cuda/stats_cuda.cu). Schemas, semantics and
// output order: registration.cpp.
#pragma once

#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>

namespace gradstats {

using StatsOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor,
                            at::Tensor, at::Tensor>;

namespace cpu_ops {
StatsOut stats(at::TensorList tensors, c10::IntArrayRef group_bounds, double norm_type,
               std::optional<double> max_norm);
void scale_(at::TensorList tensors, c10::IntArrayRef group_bounds, const at::Tensor& coef);
}  // namespace cpu_ops

#if defined(GRADSTATS_WITH_CUDA)
namespace cuda {
StatsOut stats(at::TensorList tensors, c10::IntArrayRef group_bounds, double norm_type,
               std::optional<double> max_norm);
void scale_(at::TensorList tensors, c10::IntArrayRef group_bounds, const at::Tensor& coef);
}  // namespace cuda
#endif

}  // namespace gradstats
