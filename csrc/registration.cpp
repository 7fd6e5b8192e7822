// Op schemas and kernel registration of torch.ops.gradstats (TORCH_LIBRARY). Loading the
// library (importing gradstats._C) runs these registrations.
//
//   torch.ops.gradstats.stats(tensors, group_bounds, norm_type, max_norm)
//       One pass over all tensors of all groups. Group g is
//       tensors[group_bounds[g]:group_bounds[g+1]]. Returns fresh tensors:
//         acc[G] f32        sum |x|^p over finite elements (max |x| for p = inf)
//         max_abs[G] f32    largest finite |x| (0 if none)
//         n_nan[G], n_inf[G] i64
//         t_acc[T] f32, t_nan[T] i64, t_inf[T] i64       the same per tensor
//         norm[G] f32       acc^(1/p); NaN if a NaN was seen, else Inf if an Inf was
//         total_norm[] f32  the norm over all groups (same NaN/Inf rule)
//         nonfinite[G] i64  n_nan + n_inf
//         per_tensor_norm[T] f32
//         clip_coef[] f32   clamp(max_norm / (total_norm + 1e-6), max=1) computed with
//                           torch's float32 rounding steps; 1 when max_norm is None.
//       Norms are computed from double partials: they are right (relative error <= 1e-5)
//       for elements anywhere in the float32 range, even where acc itself, a float32,
//       under- or overflows (e.g. gradients of 1e-30: acc 0, norm right).
//   torch.ops.gradstats.scale_(tensors, group_bounds, coef)
//       x *= coef[g] (coef 0-dim: one value for all groups) in place, only for groups whose
//       coefficient is < 1 or NaN; the others are not read. x = (float)x * c rounded to
//       the element type, as torch's mul_ by a float32 0-dim tensor.
//   torch.ops.gradstats.decide(norm, total, max_abs, loss?, amp_scale?, amp_found?,
//                              has_grads?, fstate!, istate!, table, params, meta, 1-alpha)
//       One step of StableOptimizer's decision program (csrc/decide/program.h and
//       gradstats/policies/program.py): updates the program state in place and returns
//       the named output buffer, the step number, grad_scale and found_inf.
//
// Determinism: every tensor is cut into chunks at fixed offsets; each chunk's partials go
// to their own slot; slots are reduced per tensor, tensors per group, groups into the
// total, all in index order and in double. Threads (CPU) and blocks (CUDA) only decide who
// computes a slot, never what goes into it: results are bit-identical from run to run and
// for any thread count.
//
// Fake (meta) kernels: gradstats/backends/native.py.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(gradstats, m) {
  m.def(
      "stats(Tensor[] tensors, int[] group_bounds, float norm_type, float? max_norm=None) -> "
      "(Tensor acc, Tensor max_abs, Tensor n_nan, Tensor n_inf, Tensor t_acc, Tensor t_nan, "
      "Tensor t_inf, Tensor norm, Tensor total_norm, Tensor nonfinite, "
      "Tensor per_tensor_norm, Tensor clip_coef)");
  m.def("scale_(Tensor(a!)[] tensors, int[] group_bounds, Tensor coef) -> ()");
  m.def(
      "decide(Tensor norm, Tensor total, Tensor max_abs, Tensor? loss, Tensor? amp_scale, "
      "Tensor? amp_found, Tensor? has_grads, Tensor(a!) fstate, Tensor(b!) istate, "
      "Tensor table, Tensor params, int[] meta, float one_minus_alpha) -> "
      "(Tensor outf, Tensor outi, Tensor grad_scale, Tensor found_inf)");
}

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("stats", &gradstats::cpu_ops::stats);
  m.impl("scale_", &gradstats::cpu_ops::scale_);
  m.impl("decide", &gradstats::decide::decide_cpu);
}

#if defined(GRADSTATS_WITH_CUDA)
TORCH_LIBRARY_IMPL(gradstats, CUDA, m) {
  m.impl("stats", &gradstats::cuda::stats);
  m.impl("scale_", &gradstats::cuda::scale_);
  m.impl("decide", &gradstats::decide::decide_cuda);
}
#endif
