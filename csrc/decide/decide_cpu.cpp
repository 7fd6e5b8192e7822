// torch.ops.gradstats.decide: schema and CPU implementation (the decision program of
// StableOptimizer, see decide/program.h for the semantics and the bytes moved).
#include <optional>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "../ops.h"
#include "decide_op.h"

namespace gradstats {
namespace decide {

DecideOut decide_cpu(const at::Tensor& norm, const at::Tensor& total, const at::Tensor& max_abs,
                     const std::optional<at::Tensor>& loss,
                     const std::optional<at::Tensor>& amp_scale,
                     const std::optional<at::Tensor>& amp_found,
                     const std::optional<at::Tensor>& has_grads, at::Tensor& fstate,
                     at::Tensor& istate, const at::Tensor& table, const at::Tensor& params,
                     c10::IntArrayRef meta, double one_minus_alpha) {
  Inputs in;
  const Meta m = check_and_bind(norm, total, max_abs, loss, amp_scale, amp_found, has_grads,
                                fstate, istate, table, params, meta, one_minus_alpha, &in);
  TORCH_CHECK(norm.device().is_cpu(), "gradstats.decide (CPU): tensors must be on the CPU");
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor outf = at::empty({m.out_size}, f32);
  at::Tensor outi = at::empty({1}, at::TensorOptions().dtype(at::kLong));
  at::Tensor gs = at::empty({}, f32);
  at::Tensor fi = at::empty({}, f32);
  std::vector<float> coef(static_cast<size_t>(m.G > 0 ? m.G : 1));
  std::vector<float> scratch(static_cast<size_t>(m.max_history > 0 ? m.max_history : 1));
  float* out = outf.mutable_data_ptr<float>();
  // fields the program does not write in this mode keep a defined value
  for (int64_t i = 0; i < m.out_size; ++i) out[i] = 0.0f;
  Program p{table.const_data_ptr<int32_t>(), params.const_data_ptr<float>(),
            fstate.mutable_data_ptr<float>(), istate.mutable_data_ptr<int64_t>(),
            scratch.data()};
  int64_t step = istate.const_data_ptr<int64_t>()[0];
  run(in, p, m.layout, out, &step, coef.data());
  outi.mutable_data_ptr<int64_t>()[0] = step;
  gs.mutable_data_ptr<float>()[0] = out[m.layout.grad_scale];
  fi.mutable_data_ptr<float>()[0] = out[m.layout.found_inf];
  return {outf, outi, gs, fi};
}

}  // namespace decide
}  // namespace gradstats
