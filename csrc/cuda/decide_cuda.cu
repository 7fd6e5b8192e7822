// torch.ops.gradstats.decide on CUDA: the decision program of StableOptimizer (see
// decide/program.h) run by one device thread, on the current stream, with no host sync.
// It is a few hundred scalar operations (plus a quickselect over the quantile history when
// a QuantileClip is fused), so one thread is the right size: the launch is the cost.
//
// Bytes moved: see decide/program.h (the statistics, the program state, the outputs).
#include <optional>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "../decide/decide_op.h"
#include "../ops.h"

namespace gradstats {
namespace decide {
namespace {

__global__ void decide_kernel(Inputs in, Program p, Layout layout, float* out, int64_t* outi,
                              float* gs, float* fi, float* coef) {
  int64_t step = p.istate[0];
  run(in, p, layout, out, &step, coef);
  outi[0] = step;
  gs[0] = out[layout.grad_scale];
  fi[0] = out[layout.found_inf];
}


}  // namespace

DecideOut decide_cuda(const at::Tensor& norm, const at::Tensor& total, const at::Tensor& max_abs,
                      const std::optional<at::Tensor>& loss,
                      const std::optional<at::Tensor>& amp_scale,
                      const std::optional<at::Tensor>& amp_found,
                      const std::optional<at::Tensor>& has_grads, at::Tensor& fstate,
                      at::Tensor& istate, const at::Tensor& table, const at::Tensor& params,
                      c10::IntArrayRef meta, double one_minus_alpha) {
  Inputs in;
  const Meta m = check_and_bind(norm, total, max_abs, loss, amp_scale, amp_found, has_grads,
                                fstate, istate, table, params, meta, one_minus_alpha, &in);
  const c10::cuda::CUDAGuard guard(norm.device());
  auto f32 = at::TensorOptions().dtype(at::kFloat).device(norm.device());
  at::Tensor outf = at::zeros({m.out_size}, f32);
  at::Tensor outi = at::empty({1}, at::TensorOptions().dtype(at::kLong).device(norm.device()));
  at::Tensor gs = at::empty({}, f32);
  at::Tensor fi = at::empty({}, f32);
  // work space: coef[G], then the quantile selection scratch
  at::Tensor work = at::empty({(m.G > 0 ? m.G : 1) + (m.max_history > 0 ? m.max_history : 1)},
                              f32);
  float* coef = work.mutable_data_ptr<float>();
  Program p{table.const_data_ptr<int32_t>(), params.const_data_ptr<float>(),
            fstate.mutable_data_ptr<float>(), istate.mutable_data_ptr<int64_t>(),
            coef + (m.G > 0 ? m.G : 1)};
  const auto stream = c10::cuda::getCurrentCUDAStream(norm.device().index());
  decide_kernel<<<1, 1, 0, stream>>>(in, p, m.layout, outf.mutable_data_ptr<float>(),
                                     outi.mutable_data_ptr<int64_t>(),
                                     gs.mutable_data_ptr<float>(), fi.mutable_data_ptr<float>(),
                                     coef);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {outf, outi, gs, fi};
}

}  // namespace decide
}  // namespace gradstats
