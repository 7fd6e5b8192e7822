// The decision program of StableOptimizer (gradstats/policies/program.py), in C++ that
// compiles for the host and, under nvcc, for one device thread: the same code decides on the
// CPU and in the CUDA decide kernel.
//
// Inputs are the step's final statistics (norm[G], total, max_abs[G]), the optional loss /
// AMP scale / AMP found_inf / has-gradients mask, and the program: an op table (int32, five
// words per op: code, param offset, fstate offset, istate offset, info offset) and float32
// parameters. The program's state lives in two packed buffers updated in place: fstate
// (float32: running mean/var/count of every group's norm [3G], then each op's state) and
// istate (int64: six step counters, then each op's counters). Outputs go into a float32
// buffer with the program's named layout (the offsets are passed in `Layout`).
//
// Every operation mirrors the torch implementation in float32 with IEEE rounding (no fast
// math, no contraction: see setup.py), so decisions match the torch executor; sums over
// ring buffers are taken in index order.
//
// Bytes moved: reads 12*G bytes of statistics, the program state (the quantile history and
// spike windows: at most a few KB) and writes the outputs (~100 bytes + 40*G).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define GS_HD __host__ __device__
#else
#define GS_HD
#endif

namespace gradstats {
namespace decide {

enum OpCode : int32_t {
  kOpNone = 0,
  kOpSkipNonFinite = 1,
  kOpFixedNorm = 2,
  kOpZScore = 3,
  kOpQuantile = 4,
  kOpSpike = 5,
};

// Offsets of the named outputs in the float32 output buffer (policies/program.py).
struct Layout {
  int32_t norm, total, max_abs, coef, grad_scale, found_inf, skipped, skipped_nonfinite,
      skipped_spike, nonfinite, clipped, running;
};

struct Inputs {
  const float* norm;     // [G]
  const float* total;    // [1]
  const float* max_abs;  // [G]
  const float* loss;       // [1] or nullptr
  const float* amp_scale;  // [1] or nullptr
  const float* amp_found;  // [1] or nullptr
  const bool* has_grads;   // [G] or nullptr
  int64_t G;
  int32_t num_ops;
  bool epilogue;
  float one_minus_alpha;
};

struct Program {
  const int32_t* table;  // [num_ops * 5]
  const float* params;
  float* fstate;
  int64_t* istate;
  float* scratch;  // >= the longest quantile history (for selection)
};

GS_HD inline float gs_inf() { return INFINITY; }
GS_HD inline bool is_nan(float x) { return x != x; }
GS_HD inline bool finite_f(float x) { return fabsf(x) < INFINITY; }

// torch: clamp(max_norm / (norm + 1e-6), max=1) == reciprocal(norm + 1e-6f) * max_norm.
GS_HD inline float clip_coef(float max_norm, float norm) {
  const volatile float denom = norm + 1e-6f;  // volatile: no contraction across statements
  const volatile float recip = 1.0f / denom;
  const float c = recip * max_norm;
  return (c > 1.0f) ? 1.0f : c;  // NaN stays NaN
}

// gradstats.core.running.update_ for one value (float32, the same operations).
GS_HD inline void running_update(float* mean, float* var, float* cnt, float x, bool valid,
                                 float one_minus_alpha) {
  valid = valid && finite_f(x);
  const float vf = valid ? 1.0f : 0.0f;
  const float c = *cnt + vf;
  *cnt = c;
  float w = 1.0f / (c < 1.0f ? 1.0f : c);
  w = (w < one_minus_alpha ? one_minus_alpha : w) * vf;
  const float d = (valid ? x : *mean) - *mean;
  const volatile float wd = w * d;
  const volatile float wdd = wd * d;
  const volatile float s = *var + wdd;
  *var = s * (1.0f - w);
  *mean = *mean + wd;
}

// k-th smallest (0-based) of a[0..n) by quickselect on the array (reorders it).
GS_HD inline float select_kth(float* a, int64_t n, int64_t k) {
  int64_t lo = 0, hi = n - 1;
  while (lo < hi) {
    const float pivot = a[lo + (hi - lo) / 2];
    int64_t i = lo, j = hi;
    while (i <= j) {
      while (a[i] < pivot) ++i;
      while (pivot < a[j]) --j;
      if (i <= j) {
        const float t = a[i];
        a[i] = a[j];
        a[j] = t;
        ++i;
        --j;
      }
    }
    if (k <= j) {
      hi = j;
    } else if (k >= i) {
      lo = i;
    } else {
      return a[k];
    }
  }
  return a[k];
}

// One step of the program; `coef` is a caller-provided float[G] work array.
GS_HD inline void run(const Inputs& in, const Program& p, const Layout& L, float* out,
                      int64_t* step_out, float* coef) {
  const int64_t G = in.G;
  float inv = 1.0f;
  if (in.amp_scale != nullptr) inv = static_cast<float>(1.0 / static_cast<double>(in.amp_scale[0]));
  float total = in.total[0];
  if (in.amp_scale != nullptr) total = total * inv;
  for (int64_t g = 0; g < G; ++g) {
    const float n = in.amp_scale != nullptr ? in.norm[g] * inv : in.norm[g];
    out[L.norm + g] = n;
    out[L.max_abs + g] = in.amp_scale != nullptr ? in.max_abs[g] * inv : in.max_abs[g];
    coef[g] = 1.0f;
  }
  bool finite = total < gs_inf();
  float loss = 0.0f;
  if (in.loss != nullptr) {
    loss = in.loss[0];
    finite = finite && finite_f(loss);
  }
  bool amp_bad = false;
  if (in.amp_found != nullptr) {
    amp_bad = in.amp_found[0] > 0.0f;
    finite = finite && !amp_bad;
  }
  bool skip = false, skip_nf = false, pskip = false;
  for (int32_t k = 0; k < in.num_ops; ++k) {
    const int32_t* row = p.table + 5 * k;
    const int32_t op = row[0];
    const float* prm = p.params + row[1];
    float* fs = p.fstate + row[2];
    int64_t* is = p.istate + row[3];
    float* info = out + row[4];
    if (op == kOpSkipNonFinite) {
      bool bad;
      if (prm[0] > 0.0f || in.amp_scale != nullptr) {
        bad = !finite;
      } else {
        bad = amp_bad;
      }
      skip_nf = bad;
      skip = skip || bad;
    } else if (op == kOpFixedNorm) {
      const bool per_group = prm[1] > 0.0f;
      const float cg = clip_coef(prm[0], total);
      for (int64_t g = 0; g < G; ++g) {
        coef[g] = coef[g] * (per_group ? clip_coef(prm[0], out[L.norm + g]) : cg);
      }
    } else if (op == kOpZScore) {
      const float zt = prm[1], warm = prm[2], mx = prm[3], zt2 = prm[4], oma = prm[5];
      const float mean = fs[0], var = fs[1], cnt = fs[2];
      const float std = sqrtf(var > 0.0f ? var : 0.0f);
      const bool active = cnt >= warm;
      const float z = active ? (total - mean) / (std > 1e-12f ? std : 1e-12f) : 0.0f;
      const bool over = active && (z > zt);
      const float safe_z = over ? z : zt;
      const volatile float num = zt2 * std;
      const volatile float q = num / safe_z;
      const float target = mean + q;
      const float cnorm = over ? target : total;
      float c = over ? clip_coef(target, total) : 1.0f;
      if (mx >= 0.0f) {
        const float c2 = clip_coef(mx, total);
        if (c2 < c || is_nan(c2)) c = c2;
      }
      for (int64_t g = 0; g < G; ++g) coef[g] = coef[g] * c;
      info[0] = z;
      info[1] = mean;
      info[2] = std;
      info[3] = cnorm;
      float m = mean, v = var, n = cnt;
      running_update(&m, &v, &n, cnorm, !skip, oma);
      fs[0] = m;
      fs[1] = v;
      fs[2] = n;
    } else if (op == kOpQuantile) {
      const float q = prm[0];
      const int64_t H = static_cast<int64_t>(prm[1]);
      int64_t cnt = is[0];
      const bool valid = !skip && (total < gs_inf());
      if (valid) fs[cnt % H] = total;
      cnt += valid ? 1 : 0;
      is[0] = cnt;
      const int64_t n = cnt < H ? cnt : H;
      const int64_t last = n - 1 > 0 ? n - 1 : 0;
      const float pos = q * static_cast<float>(last);
      int64_t lo = static_cast<int64_t>(floorf(pos));
      if (lo > H - 1) lo = H - 1;
      const int64_t hi = lo + 1 < last ? lo + 1 : last;
      const float frac = pos - static_cast<float>(lo);
      for (int64_t i = 0; i < H; ++i) p.scratch[i] = fs[i];  // unfilled slots hold +inf
      const float v_lo = select_kth(p.scratch, H, lo);
      const float v_hi = hi == lo ? v_lo : select_kth(p.scratch, H, hi);
      const float thr = frac > 0.0f ? v_lo + frac * (v_hi - v_lo) : v_lo;
      const float c = n > 0 ? clip_coef(thr, total) : 1.0f;
      for (int64_t g = 0; g < G; ++g) coef[g] = coef[g] * c;
      info[0] = thr;
    } else if (op == kOpSpike) {
      const int64_t W = static_cast<int64_t>(prm[0]);
      const float kk = prm[1];
      const int64_t warm = static_cast<int64_t>(prm[2]);
      const bool on_norm = prm[3] > 0.0f, on_loss = prm[4] > 0.0f, loss_first = prm[5] > 0.0f;
      const int32_t S = (on_norm ? 1 : 0) + (on_loss ? 1 : 0);
      bool hit = false;
      for (int32_t s = 0; s < S; ++s) {
        const bool is_loss = (s == 0) == loss_first;
        const float x = is_loss ? loss : total;
        const int64_t c = is[s];
        const int64_t n = c < W ? c : W;
        const float* buf = fs + s * W;
        const float nf = static_cast<float>(n);
        float sum = 0.0f;
        for (int64_t i = 0; i < n; ++i) sum += buf[i];
        const float mean = sum / (nf > 1.0f ? nf : 1.0f);
        float dev2 = 0.0f;
        for (int64_t i = 0; i < n; ++i) {
          const float dv = buf[i] - mean;
          dev2 += dv * dv;
        }
        const float den = nf - 1.0f;
        const float std = sqrtf(dev2 / (den > 1.0f ? den : 1.0f));
        const bool flag = (c >= warm) && (x > mean + kk * std);
        hit = hit || flag;
        const bool valid = !skip && finite_f(x);
        if (valid) fs[s * W + c % W] = x;
        is[s] = c + (valid ? 1 : 0);
        info[s] = mean;
        info[S + s] = std;
        info[2 * S + s] = flag ? 1.0f : 0.0f;
      }
      pskip = pskip || hit;
      skip = skip || hit;
    }
  }
  out[L.total] = total;
  for (int64_t g = 0; g < G; ++g) out[L.coef + g] = coef[g];
  out[L.skipped] = skip ? 1.0f : 0.0f;
  out[L.skipped_nonfinite] = skip_nf ? 1.0f : 0.0f;
  out[L.nonfinite] = finite ? 0.0f : 1.0f;
  if (!in.epilogue) {
    out[L.skipped_spike] = pskip ? 1.0f : 0.0f;
    return;
  }
  const bool taken = !skip;
  bool any_clip = false;
  float* run_mean = p.fstate;
  float* run_var = p.fstate + G;
  float* run_cnt = p.fstate + 2 * G;
  for (int64_t g = 0; g < G; ++g) {
    out[L.running + g] = run_mean[g];
    out[L.running + G + g] = run_var[g];
    out[L.running + 2 * G + g] = run_cnt[g];
    const float n = out[L.norm + g];
    bool valid = taken && (n < gs_inf());
    if (in.has_grads != nullptr) valid = valid && in.has_grads[g];
    running_update(run_mean + g, run_var + g, run_cnt + g, n, valid, in.one_minus_alpha);
    const bool clipped = (coef[g] < 1.0f) && taken;
    out[L.clipped + g] = clipped ? 1.0f : 0.0f;
    any_clip = any_clip || clipped;
  }
  const bool sspike = pskip && !skip_nf;
  out[L.skipped_spike] = sspike ? 1.0f : 0.0f;
  p.istate[0] += 1;
  p.istate[1] += skip ? 1 : 0;
  p.istate[2] += skip_nf ? 1 : 0;
  p.istate[3] += sspike ? 1 : 0;
  p.istate[4] += any_clip ? 1 : 0;
  p.istate[5] += finite ? 0 : 1;
  *step_out = p.istate[0];
  const float c0 = G > 0 ? coef[0] : 1.0f;
  out[L.grad_scale] = in.amp_scale != nullptr ? in.amp_scale[0] / c0 : 1.0f / c0;
  out[L.found_inf] = skip ? 1.0f : 0.0f;
}

}  // namespace decide
}  // namespace gradstats
