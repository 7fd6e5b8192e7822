// The implementations of torch.ops.gradstats.* registered by registration.cpp: one pair
// per device (CPU in cpu_ops.cpp, CUDA in cuda/stats_cuda.cu; decide: see below). Schemas, semantics and
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

// torch.ops.gradstats.decide (the decision program, csrc/decide/program.h): CPU in
// decide/decide_cpu.cpp, CUDA in cuda/decide_cuda.cu.
using DecideOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
#define GRADSTATS_DECIDE_ARGS                                                                 \
  const at::Tensor &norm, const at::Tensor &total, const at::Tensor &max_abs,                 \
      const std::optional<at::Tensor> &loss, const std::optional<at::Tensor> &amp_scale,      \
      const std::optional<at::Tensor> &amp_found, const std::optional<at::Tensor> &has_grads, \
      at::Tensor &fstate, at::Tensor &istate, const at::Tensor &table,                       \
      const at::Tensor &params, c10::IntArrayRef meta, double one_minus_alpha
namespace decide {
DecideOut decide_cpu(GRADSTATS_DECIDE_ARGS);
#if defined(GRADSTATS_WITH_CUDA)
DecideOut decide_cuda(GRADSTATS_DECIDE_ARGS);
#endif
}  // namespace decide

#if defined(GRADSTATS_WITH_CUDA)
namespace cuda {
StatsOut stats(at::TensorList tensors, c10::IntArrayRef group_bounds, double norm_type,
               std::optional<double> max_norm);
void scale_(at::TensorList tensors, c10::IntArrayRef group_bounds, const at::Tensor& coef);
}  // namespace cuda
#endif

}  // namespace gradstats
