// Host side of torch.ops.gradstats.decide, shared by the CPU op (decide_cpu.cpp) and the
// CUDA op (cuda/decide_cuda.cu): argument checks and the unpacking of `meta`.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "program.h"

namespace gradstats {
namespace decide {

// meta = [G, num_ops, epilogue, out_size, max_history, o_norm, o_total, o_max, o_coef,
//         o_grad_scale, o_found_inf, o_skipped, o_skipped_nonfinite, o_skipped_spike,
//         o_nonfinite, o_clipped, o_running]
constexpr int64_t kMetaWords = 17;

struct Meta {
  int64_t G, num_ops, out_size, max_history;
  bool epilogue;
  Layout layout;
};

inline Meta unpack_meta(c10::IntArrayRef meta) {
  TORCH_CHECK(static_cast<int64_t>(meta.size()) == kMetaWords,
              "gradstats.decide: meta must have ", kMetaWords, " entries, got ", meta.size());
  Meta m;
  m.G = meta[0];
  m.num_ops = meta[1];
  m.epilogue = meta[2] != 0;
  m.out_size = meta[3];
  m.max_history = meta[4];
  TORCH_CHECK(m.G >= 0 && m.num_ops >= 0 && m.out_size >= 1 && m.max_history >= 0,
              "gradstats.decide: invalid meta");
  const int32_t* o = nullptr;
  int32_t v[12];
  for (int i = 0; i < 12; ++i) {
    TORCH_CHECK(meta[5 + i] >= 0 && meta[5 + i] < m.out_size,
                "gradstats.decide: output offset out of range");
    v[i] = static_cast<int32_t>(meta[5 + i]);
  }
  (void)o;
  m.layout = Layout{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9], v[10], v[11]};
  return m;
}

inline void check_inputs(const at::Tensor& norm, const at::Tensor& total,
                         const at::Tensor& max_abs, const at::Tensor& fstate,
                         const at::Tensor& istate, const at::Tensor& table,
                         const at::Tensor& params, const Meta& m) {
  const auto dev = norm.device();
  auto same = [&](const at::Tensor& t, const char* name, at::ScalarType st, int64_t min_numel) {
    TORCH_CHECK(t.device() == dev, "gradstats.decide: ", name, " is on ", t.device(),
                ", expected ", dev);
    TORCH_CHECK(t.scalar_type() == st, "gradstats.decide: ", name, " must be ", st, ", got ",
                t.scalar_type());
    TORCH_CHECK(t.is_contiguous(), "gradstats.decide: ", name, " must be contiguous");
    TORCH_CHECK(t.numel() >= min_numel, "gradstats.decide: ", name, " has ", t.numel(),
                " elements, expected at least ", min_numel);
  };
  same(norm, "norm", at::kFloat, m.G);
  same(total, "total", at::kFloat, 1);
  same(max_abs, "max_abs", at::kFloat, m.G);
  same(fstate, "fstate", at::kFloat, 3 * m.G);
  same(istate, "istate", at::kLong, 6);
  same(table, "table", at::kInt, 5 * m.num_ops);
  same(params, "params", at::kFloat, 0);
}

inline void check_optional(const std::optional<at::Tensor>& t, const at::Tensor& ref,
                           const char* name, at::ScalarType st, int64_t numel) {
  if (!t.has_value()) return;
  TORCH_CHECK(t->device() == ref.device(), "gradstats.decide: ", name, " is on ", t->device(),
              ", expected ", ref.device());
  TORCH_CHECK(t->scalar_type() == st, "gradstats.decide: ", name, " must be ", st, ", got ",
              t->scalar_type());
  TORCH_CHECK(t->numel() == numel && t->is_contiguous(), "gradstats.decide: ", name,
              " must be a contiguous tensor of ", numel, " elements");
}

using DecideOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

template <typename T>
const T* opt_ptr(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Checks every argument of the decide op (device, dtype, size) and unpacks `meta`;
// returns the program's Meta and fills `in` with the input pointers.
inline Meta check_and_bind(const at::Tensor& norm, const at::Tensor& total,
                           const at::Tensor& max_abs, const std::optional<at::Tensor>& loss,
                           const std::optional<at::Tensor>& amp_scale,
                           const std::optional<at::Tensor>& amp_found,
                           const std::optional<at::Tensor>& has_grads,
                           const at::Tensor& fstate, const at::Tensor& istate,
                           const at::Tensor& table, const at::Tensor& params,
                           c10::IntArrayRef meta, double one_minus_alpha, Inputs* in) {
  const Meta m = unpack_meta(meta);
  check_inputs(norm, total, max_abs, fstate, istate, table, params, m);
  check_optional(loss, norm, "loss", at::kFloat, 1);
  check_optional(amp_scale, norm, "amp_scale", at::kFloat, 1);
  check_optional(amp_found, norm, "amp_found", at::kFloat, 1);
  check_optional(has_grads, norm, "has_grads", at::kBool, m.G);
  *in = Inputs{norm.const_data_ptr<float>(), total.const_data_ptr<float>(),
               max_abs.const_data_ptr<float>(), opt_ptr<float>(loss), opt_ptr<float>(amp_scale),
               opt_ptr<float>(amp_found), opt_ptr<bool>(has_grads), m.G,
               static_cast<int32_t>(m.num_ops), m.epilogue,
               static_cast<float>(one_minus_alpha)};
  return m;
}

}  // namespace decide
}  // namespace gradstats
