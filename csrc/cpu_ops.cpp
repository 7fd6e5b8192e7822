// CPU implementations of torch.ops.gradstats.stats and scale_ (schemas and semantics:
// registration.cpp): the chunk table, the hand-out of chunks to threads, the fixed-order
// reduction in double, the finalize step and torch's clip coefficient. The per-element work
// runs in the CPU kernel build chosen by capability.cpp (cpu/stats_kernel.h).
//
// Bytes moved: stats reads every gradient once (non-flat gradients are first copied into a
// contiguous buffer); scale_ reads and writes every gradient of the groups it scales once.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <vector>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#include "capability.h"
#include "gradstats_common.h"
#include "host_common.h"
#include "ops.h"

namespace gradstats {
namespace {

using at::Tensor;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

// Below this many elements a call runs on the calling thread (thread start-up costs more).
constexpr int64_t kParallelMinElems = 4 * kChunk;

// Runs fn(begin, end) over [0, n) work items, items handed out dynamically in small
// batches (a busy core does not hold back the others). Which thread runs an item never
// changes its result.
template <typename F>
void run_items(int64_t n, int64_t total_elems, const F& fn) {
  if (n <= 0) return;
  const int64_t nt = at::get_num_threads();
  if (nt <= 1 || n == 1 || total_elems < kParallelMinElems || at::in_parallel_region()) {
    fn(0, n);
    return;
  }
  const int64_t workers = std::min<int64_t>(nt, n);
  const int64_t batch = std::max<int64_t>(1, std::min<int64_t>(4, n / (workers * 16)));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, workers, 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      for (;;) {
        const int64_t i = next.fetch_add(batch, std::memory_order_relaxed);
        if (i >= n) break;
        fn(i, std::min(n, i + batch));
      }
    }
  });
}

using host::check_bounds;
using host::dtype_code;
using host::flat_ok;
using host::norm_mode;

// ---------------------------------------------------------------------------------------
// Finalize: chunk slots -> per-tensor -> per-group -> total (the CUDA finalize kernel in
// cuda/stats_cuda.cu follows the same rules)
// ---------------------------------------------------------------------------------------

double norm_from_acc(double acc, int32_t mode, double p) {
  switch (mode) {
    case kModeL2:
      return std::sqrt(acc);
    case kModeL1:
    case kModeInf:
      return acc;
    default:
      return std::pow(acc, 1.0 / p);
  }
}

float apply_nonfinite(double norm, int64_t n_nan, int64_t n_inf) {
  if (n_nan > 0) return std::numeric_limits<float>::quiet_NaN();
  if (n_inf > 0) return std::numeric_limits<float>::infinity();
  return static_cast<float>(norm);
}

// torch: clamp(max_norm / (total + 1e-6), max=1.0) on a float32 tensor is
// reciprocal(total + float(1e-6)) * float(max_norm), each step rounded to float32.
float clip_coef_of(float total, double max_norm) {
  const float denom = total + static_cast<float>(1e-6);
  const float recip = 1.0f / denom;
  const float c = recip * static_cast<float>(max_norm);
  return (c > 1.0f) ? 1.0f : c;  // NaN stays NaN
}

}  // namespace

namespace cpu_ops {

StatsOut stats(at::TensorList tensors, c10::IntArrayRef group_bounds, double norm_type,
               std::optional<double> max_norm) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  const int64_t G = check_bounds(group_bounds, T, "gradstats.stats");
  const int32_t mode = norm_mode(norm_type);

  // Chunk table, tensors in order; chunks of tensor t are [tchunk[t], tchunk[t+1]).
  std::vector<Tensor> keep;  // contiguous copies of gradients that are not flat
  std::vector<CpuChunk> chunks;
  std::vector<int64_t> tchunk(T + 1, 0);
  int64_t total_elems = 0;
  for (int64_t i = 0; i < T; ++i) {
    const Tensor& t0 = tensors[i];
    TORCH_CHECK(t0.device().is_cpu(), "gradstats.stats (CPU): tensors[", i, "] is on ",
                t0.device(), "; all tensors of one call must be on the CPU");
    const int32_t code = dtype_code(t0.scalar_type());
    TORCH_CHECK(code >= 0, "gradstats.stats: tensors[", i, "] has dtype ", t0.scalar_type(),
                "; supported: float32, bfloat16, float16");
    tchunk[i] = static_cast<int64_t>(chunks.size());
    const int64_t n = t0.numel();
    if (n == 0) continue;
    const Tensor* t = &t0;
    if (!flat_ok(t0)) {
      keep.push_back(t0.contiguous());
      t = &keep.back();
    }
    const char* base = static_cast<const char*>(t->const_data_ptr());
    const int64_t esize = t->element_size();
    for (int64_t off = 0; off < n; off += kChunk) {
      chunks.push_back(CpuChunk{base + off * esize, std::min(kChunk, n - off), code,
                                static_cast<int32_t>(i)});
    }
    total_elems += n;
  }
  tchunk[T] = static_cast<int64_t>(chunks.size());

  const int64_t C = static_cast<int64_t>(chunks.size());
  std::vector<ChunkPartial> part(C);
  const auto* kt = capability::kernels();
  const float pf = static_cast<float>(norm_type);
  run_items(C, total_elems, [&](int64_t b, int64_t e) {
    kt->stats(chunks.data() + b, e - b, mode, pf, part.data() + b);
  });

  auto f32 = at::TensorOptions().dtype(at::kFloat);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  Tensor acc = at::empty({G}, f32), max_abs = at::empty({G}, f32);
  Tensor n_nan = at::empty({G}, i64), n_inf = at::empty({G}, i64);
  Tensor t_acc = at::empty({T}, f32), t_nan = at::empty({T}, i64), t_inf = at::empty({T}, i64);
  Tensor norm = at::empty({G}, f32), total = at::empty({}, f32);
  Tensor nonfinite = at::empty({G}, i64), ptn = at::empty({T}, f32);
  Tensor coef = at::empty({}, f32);

  float* p_tacc = t_acc.data_ptr<float>();
  int64_t* p_tnan = t_nan.data_ptr<int64_t>();
  int64_t* p_tinf = t_inf.data_ptr<int64_t>();
  float* p_ptn = ptn.data_ptr<float>();
  float* p_acc = acc.data_ptr<float>();
  float* p_max = max_abs.data_ptr<float>();
  int64_t* p_nan = n_nan.data_ptr<int64_t>();
  int64_t* p_inf = n_inf.data_ptr<int64_t>();
  float* p_norm = norm.data_ptr<float>();
  int64_t* p_nf = nonfinite.data_ptr<int64_t>();

  const bool is_max = (mode == kModeInf);
  double tot_acc = 0.0;
  int64_t tot_nan = 0, tot_inf = 0;
  for (int64_t g = 0; g < G; ++g) {
    double gacc = 0.0;
    float gmax = 0.0f;
    int64_t gnan = 0, ginf = 0;
    for (int64_t i = group_bounds[g]; i < group_bounds[g + 1]; ++i) {
      double a = 0.0;
      float m = 0.0f;
      int64_t nn = 0, ni = 0;
      for (int64_t c = tchunk[i]; c < tchunk[i + 1]; ++c) {
        const ChunkPartial& cp = part[c];
        a = is_max ? std::max(a, cp.acc) : a + cp.acc;
        m = std::max(m, cp.max_abs);
        nn += cp.n_nan;
        ni += cp.n_inf;
      }
      p_tacc[i] = static_cast<float>(a);
      p_tnan[i] = nn;
      p_tinf[i] = ni;
      p_ptn[i] = apply_nonfinite(norm_from_acc(a, mode, norm_type), nn, ni);
      gacc = is_max ? std::max(gacc, a) : gacc + a;
      gmax = std::max(gmax, m);
      gnan += nn;
      ginf += ni;
    }
    p_acc[g] = static_cast<float>(gacc);
    p_max[g] = gmax;
    p_nan[g] = gnan;
    p_inf[g] = ginf;
    p_nf[g] = gnan + ginf;
    p_norm[g] = apply_nonfinite(norm_from_acc(gacc, mode, norm_type), gnan, ginf);
    tot_acc = is_max ? std::max(tot_acc, gacc) : tot_acc + gacc;
    tot_nan += gnan;
    tot_inf += ginf;
  }
  const float tot = apply_nonfinite(norm_from_acc(tot_acc, mode, norm_type), tot_nan, tot_inf);
  *total.data_ptr<float>() = tot;
  *coef.data_ptr<float>() = max_norm.has_value() ? clip_coef_of(tot, *max_norm) : 1.0f;
  return StatsOut(acc, max_abs, n_nan, n_inf, t_acc, t_nan, t_inf, norm, total, nonfinite,
                  ptn, coef);
}

namespace {

struct ScaleItem {
  void* ptr;
  int64_t n;
  int32_t dtype;
  float coef;
};

}  // namespace

void scale_(at::TensorList tensors, c10::IntArrayRef group_bounds, const Tensor& coef) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  const int64_t G = check_bounds(group_bounds, T, "gradstats.scale_");
  TORCH_CHECK(coef.device().is_cpu(), "gradstats.scale_ (CPU): coef must be on the CPU, got ",
              coef.device());
  TORCH_CHECK(coef.dim() == 0 || (coef.dim() == 1 && coef.numel() == G),
              "gradstats.scale_: coef must be 0-dim or have one value per group (", G,
              "), got shape ", coef.sizes());
  const Tensor cf = coef.to(at::kFloat).contiguous();
  const float* cv = cf.const_data_ptr<float>();
  std::vector<ScaleItem> items;
  int64_t total_elems = 0;
  for (int64_t g = 0; g < G; ++g) {
    const float c = coef.dim() == 0 ? cv[0] : cv[g];
    if (c >= 1.0f) continue;  // clamp(max=1): nothing to do, the gradients are not read
    for (int64_t i = group_bounds[g]; i < group_bounds[g + 1]; ++i) {
      const Tensor& t = tensors[i];
      TORCH_CHECK(t.device().is_cpu(), "gradstats.scale_ (CPU): tensors[", i, "] is on ",
                  t.device());
      const int64_t n = t.numel();
      if (n == 0) continue;
      const int32_t code = dtype_code(t.scalar_type());
      if (code < 0 || !flat_ok(t)) {
        // Other dtypes and strided views: torch's own in-place multiply (same result).
        t.mul_(coef.dim() == 0 ? cf : cf.select(0, g));
        continue;
      }
      char* base = static_cast<char*>(t.data_ptr());
      const int64_t esize = t.element_size();
      for (int64_t off = 0; off < n; off += kChunk) {
        items.push_back(ScaleItem{base + off * esize, std::min(kChunk, n - off), code, c});
      }
      total_elems += n;
    }
  }
  const auto* kt = capability::kernels();
  run_items(static_cast<int64_t>(items.size()), total_elems, [&](int64_t b, int64_t e) {
    for (int64_t k = b; k < e; ++k) {
      kt->scale(items[k].ptr, items[k].dtype, items[k].n, items[k].coef);
    }
  });
}

}  // namespace cpu_ops
}  // namespace gradstats
