// CPU kernels of gradstats, written once against at::vec and compiled once per CPU
// capability (kernel_default.cpp, kernel_avx2.cpp, kernel_avx512.cpp). The including file
// defines GRADSTATS_CAP (namespace name) and GRADSTATS_TABLE_FN (table getter name).
//
// Only at::vec and c10 scalar types are used here: no Tensor, no dispatcher, no threads.
// The host code (cpu_ops.cpp) cuts the tensors into chunks and runs these functions on
// ranges of chunks from at::parallel_for.
//
// One definition rule and instruction sets. Each including file is compiled with its own
// -m flags. Everything defined here lives in gradstats::cpu::<cap>::(anonymous), and at::vec
// puts its types in at::vec::<CPU_CAPABILITY>, so those never collide. But the inline
// functions of the torch/c10/std headers (c10::BFloat16 and c10::Half conversions,
// std::pow, ...) have the same names in every object file; normally each object emits them
// as weak (COMDAT) copies and the linker keeps ONE copy for the whole library, whichever
// object comes first on the link line. setuptools sorts the sources, so the link line is
// cpu/kernel_avx2.o, cpu/kernel_avx512.o, cpu/kernel_default.o, ...: an AVX2- or AVX512-
// compiled copy could serve the baseline kernels and the host code (SIGILL on an older CPU),
// or a baseline copy the AVX512 kernels. setup.py therefore compiles these files with
// -fno-weak: every such function is emitted with internal linkage, a private copy per ISA
// object, and nothing is merged. setup.py also checks, after compiling, that the object
// exports no symbol but its table getter (GRADSTATS_TABLE_FN), and fails the build if it
// does.
//
// Bytes moved: the statistics read every element once; the scale pass reads and writes
// every element of the tensors it is asked to scale once.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../gradstats_common.h"

#if !defined(GRADSTATS_CAP) || !defined(GRADSTATS_TABLE_FN)
#error "define GRADSTATS_CAP and GRADSTATS_TABLE_FN before including stats_kernel.h"
#endif

namespace gradstats {
namespace cpu {
namespace GRADSTATS_CAP {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kW = Vec::size();
// Elements consumed per inner iteration: four independent float vectors.
constexpr int64_t kStep = 4 * kW;
// Inner iterations per block. Each lane of the four block accumulators sums
// kBlockIters values; block sums are then added into the chunk accumulator. Two short
// float sums instead of one long one keep the float32 rounding error small.
constexpr int64_t kBlockIters = 16;

template <typename T>
struct Loader;

template <>
struct Loader<float> {
  static inline void load4(const float* x, Vec (&v)[4]) {
    v[0] = Vec::loadu(x);
    v[1] = Vec::loadu(x + kW);
    v[2] = Vec::loadu(x + 2 * kW);
    v[3] = Vec::loadu(x + 3 * kW);
  }
};

template <typename T>
struct Loader {  // BFloat16 / Half: one reduced vector holds two float vectors
  using RVec = at::vec::Vectorized<T>;
  static_assert(RVec::size() == 2 * kW, "reduced vector must hold two float vectors");
  static inline void load4(const T* x, Vec (&v)[4]) {
    auto lo = at::vec::convert_to_float<T>(RVec::loadu(x));
    auto hi = at::vec::convert_to_float<T>(RVec::loadu(x + 2 * kW));
    v[0] = std::get<0>(lo);
    v[1] = std::get<1>(lo);
    v[2] = std::get<0>(hi);
    v[3] = std::get<1>(hi);
  }
};

// One vector of elements into (accumulator, running max). NaN/Inf need no test here:
// for the summing modes they turn the accumulator into NaN/Inf, for p = inf the
// NaN-propagating maximum does; either sends the chunk to the exact slow path.
template <int MODE>
static inline void step(const Vec& v, Vec& acc, Vec& mx) {
  Vec a = v.abs();
  if constexpr (MODE == kModeL2) {
    acc = at::vec::fmadd(v, v, acc);
    mx = at::vec::clamp_min(a, mx);
  } else if constexpr (MODE == kModeL1) {
    acc = acc + a;
    mx = at::vec::clamp_min(a, mx);
  } else {  // kModeInf
    mx = at::vec::maximum(mx, a);
  }
}

// |x|**p for general p: float pow where its result is a normal float32 (full relative
// precision), double pow where it would underflow (1e-30**3) or overflow (1e20**3).
// Double pow everywhere would double the time of this path.
static inline double pow_abs(float a, float p, double pd) {
  const float r = std::pow(a, p);
  if (r >= std::numeric_limits<float>::min() && r <= std::numeric_limits<float>::max()) {
    return static_cast<double>(r);
  }
  return a == 0.0f ? static_cast<double>(r) : std::pow(static_cast<double>(a), pd);
}

// Exact per-element pass, used for chunks that hold NaN/Inf, whose float32 sum overflowed
// or fell below kMinFastSum (gradstats_common.h), and for general p: counts NaN and Inf,
// leaves them out of acc and max, accumulates |x|**p in double (pow_abs: never under- or
// overflowing for finite x).
template <typename T>
static void slow_chunk(const T* x, int64_t n, int32_t mode, float p, ChunkPartial& out) {
  const double pd = static_cast<double>(p);
  double s = 0.0;
  float m = 0.0f;
  int64_t n_nan = 0, n_inf = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = static_cast<float>(x[i]);
    if (std::isnan(v)) {
      ++n_nan;
      continue;
    }
    const float a = std::fabs(v);
    if (std::isinf(a)) {
      ++n_inf;
      continue;
    }
    m = std::max(m, a);
    if (mode == kModeL2) {
      s += static_cast<double>(a) * static_cast<double>(a);
    } else if (mode == kModeL1) {
      s += static_cast<double>(a);
    } else if (mode == kModeP) {
      s += pow_abs(a, p, pd);
    }
  }
  out.acc = (mode == kModeInf) ? static_cast<double>(m) : s;
  out.max_abs = m;
  out.pad_ = 0.0f;
  out.n_nan = n_nan;
  out.n_inf = n_inf;
}

// Vectorised pass over one chunk (all-finite fast path).
template <typename T, int MODE>
static void fast_chunk(const T* x, int64_t n, float p, ChunkPartial& out) {
  Vec cacc(0.0f), cmax(0.0f);
  const int64_t nfull = n - n % kStep;
  int64_t i = 0;
  while (i < nfull) {
    const int64_t bend = std::min(nfull, i + kStep * kBlockIters);
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    Vec m0(0.0f), m1(0.0f), m2(0.0f), m3(0.0f);
    for (; i < bend; i += kStep) {
      Vec v[4];
      Loader<T>::load4(x + i, v);
      step<MODE>(v[0], a0, m0);
      step<MODE>(v[1], a1, m1);
      step<MODE>(v[2], a2, m2);
      step<MODE>(v[3], a3, m3);
    }
    if constexpr (MODE != kModeInf) {
      cacc = cacc + ((a0 + a1) + (a2 + a3));
    }
    cmax = at::vec::maximum(cmax, at::vec::maximum(at::vec::maximum(m0, m1),
                                                   at::vec::maximum(m2, m3)));
  }
  if (i < n) {  // tail: fewer than kStep elements, zero padded (zeros change nothing)
    float buf[kStep];
    const int64_t rest = n - i;
    for (int64_t j = 0; j < kStep; ++j) {
      buf[j] = j < rest ? static_cast<float>(x[i + j]) : 0.0f;
    }
    Vec v[4];
    Loader<float>::load4(buf, v);
    Vec a0(0.0f), a1(0.0f), a2(0.0f), a3(0.0f);
    Vec m0(0.0f), m1(0.0f), m2(0.0f), m3(0.0f);
    step<MODE>(v[0], a0, m0);
    step<MODE>(v[1], a1, m1);
    step<MODE>(v[2], a2, m2);
    step<MODE>(v[3], a3, m3);
    if constexpr (MODE != kModeInf) {
      cacc = cacc + ((a0 + a1) + (a2 + a3));
    }
    cmax = at::vec::maximum(cmax, at::vec::maximum(at::vec::maximum(m0, m1),
                                                   at::vec::maximum(m2, m3)));
  }
  float lanes_acc[kW], lanes_max[kW];
  cacc.store(lanes_acc);
  cmax.store(lanes_max);
  double s = 0.0;
  float m = 0.0f;
  bool nan_max = false;
  for (int64_t l = 0; l < kW; ++l) {  // fixed order
    s += static_cast<double>(lanes_acc[l]);
    nan_max |= std::isnan(lanes_max[l]);
    m = std::max(m, lanes_max[l]);
  }
  const bool finite = (MODE == kModeInf) ? (!nan_max && std::isfinite(m))
                                         : (std::isfinite(s) && !nan_max && std::isfinite(m));
  // range guard (gradstats_common.h): a tiny nonzero sum lost precision in float32
  const bool tiny = (MODE != kModeInf) && s < kMinFastSum && m > 0.0f;
  if (!finite || tiny) {
    slow_chunk<T>(x, n, MODE, p, out);
    return;
  }
  out.acc = (MODE == kModeInf) ? static_cast<double>(m) : s;
  out.max_abs = m;
  out.pad_ = 0.0f;
  out.n_nan = 0;
  out.n_inf = 0;
}

#if defined(GRADSTATS_PLAIN_LOOPS)
// Baseline x86-64 build: at::vec's generic Vectorized (arrays plus per-lane loops) does
// not vectorise here and runs several times slower, so this build uses GCC/Clang vector
// types of 4 floats (SSE2). Same structure as fast_chunk: four lane accumulators summed
// per block, block sums added per chunk, NaN/Inf detected through the sums and sent to
// slow_chunk.
typedef float v4f __attribute__((vector_size(16)));
typedef int32_t v4i __attribute__((vector_size(16)));

template <typename T>
static inline v4f load_v4(const T* x) {
  v4f v;
  if constexpr (std::is_same_v<T, float>) {
    std::memcpy(&v, x, sizeof(v));
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {  // bf16 -> f32: shift by 16
    uint16_t h[4];
    std::memcpy(h, x, sizeof(h));
    const v4i w = v4i{h[0], h[1], h[2], h[3]} << 16;
    std::memcpy(&v, &w, sizeof(v));
  } else {
    v = v4f{static_cast<float>(x[0]), static_cast<float>(x[1]), static_cast<float>(x[2]),
            static_cast<float>(x[3])};
  }
  return v;
}

template <int MODE>
static inline void step_v4(v4f v, v4f& acc, v4f& mx) {
  const v4f a = reinterpret_cast<v4f>(reinterpret_cast<v4i>(v) & 0x7fffffff);
  if constexpr (MODE == kModeL2) {
    acc += v * v;
  } else if constexpr (MODE == kModeL1) {
    acc += a;
  } else {
    acc += v * 0.0f;  // NaN for NaN or Inf: the detector of the p = inf mode
  }
  mx = a > mx ? a : mx;
}

template <typename T, int MODE>
static void fast_chunk_plain(const T* x, int64_t n, float p, ChunkPartial& out) {
  constexpr int64_t kS = 16;  // elements per inner iteration (4 x v4f)
  v4f cacc = {}, cmax = {};
  int64_t i = 0;
  const int64_t nfull = n - n % kS;
  while (i < nfull) {
    const int64_t bend = std::min(nfull, i + kS * kBlockIters * 4);
    v4f a0 = {}, a1 = {}, a2 = {}, a3 = {}, m0 = {}, m1 = {}, m2 = {}, m3 = {};
    for (; i < bend; i += kS) {
      step_v4<MODE>(load_v4(x + i), a0, m0);
      step_v4<MODE>(load_v4(x + i + 4), a1, m1);
      step_v4<MODE>(load_v4(x + i + 8), a2, m2);
      step_v4<MODE>(load_v4(x + i + 12), a3, m3);
    }
    cacc += (a0 + a1) + (a2 + a3);
    m0 = m0 > m1 ? m0 : m1;
    m2 = m2 > m3 ? m2 : m3;
    m0 = m0 > m2 ? m0 : m2;
    cmax = m0 > cmax ? m0 : cmax;
  }
  if (i < n) {  // tail, zero padded
    float buf[kS] = {};
    for (int64_t j = 0; i + j < n; ++j) buf[j] = static_cast<float>(x[i + j]);
    v4f a0 = {}, m0 = {};
    for (int64_t j = 0; j < kS; j += 4) step_v4<MODE>(load_v4(buf + j), a0, m0);
    cacc += a0;
    cmax = m0 > cmax ? m0 : cmax;
  }
  double s = 0.0;
  float mx = 0.0f;
  bool nan_max = false;
  for (int l = 0; l < 4; ++l) {
    s += static_cast<double>(cacc[l]);
    nan_max |= std::isnan(cmax[l]);
    mx = std::max(mx, static_cast<float>(cmax[l]));
  }
  const bool tiny = (MODE != kModeInf) && s < kMinFastSum && mx > 0.0f;  // range guard
  if (!std::isfinite(s) || nan_max || !std::isfinite(mx) || tiny) {
    slow_chunk<T>(x, n, MODE, p, out);
    return;
  }
  out.acc = (MODE == kModeInf) ? static_cast<double>(mx) : s;
  out.max_abs = mx;
  out.pad_ = 0.0f;
  out.n_nan = 0;
  out.n_inf = 0;
}
#define GRADSTATS_FAST_CHUNK fast_chunk_plain
#else
#define GRADSTATS_FAST_CHUNK fast_chunk
#endif

template <typename T>
static void chunk_dispatch_mode(const T* x, int64_t n, int32_t mode, float p,
                                ChunkPartial& out) {
  switch (mode) {
    case kModeL2:
      GRADSTATS_FAST_CHUNK<T, kModeL2>(x, n, p, out);
      break;
    case kModeL1:
      GRADSTATS_FAST_CHUNK<T, kModeL1>(x, n, p, out);
      break;
    case kModeInf:
      GRADSTATS_FAST_CHUNK<T, kModeInf>(x, n, p, out);
      break;
    default:  // general p: pow per element, exact path
      slow_chunk<T>(x, n, mode, p, out);
      break;
  }
}

void stats_impl(const CpuChunk* chunks, int64_t count, int32_t mode, float p,
                ChunkPartial* out) {
  for (int64_t c = 0; c < count; ++c) {
    const CpuChunk& ch = chunks[c];
    switch (ch.dtype) {
      case kF32:
        chunk_dispatch_mode(static_cast<const float*>(ch.ptr), ch.n, mode, p, out[c]);
        break;
      case kBF16:
        chunk_dispatch_mode(static_cast<const c10::BFloat16*>(ch.ptr), ch.n, mode, p, out[c]);
        break;
      default:
        chunk_dispatch_mode(static_cast<const c10::Half*>(ch.ptr), ch.n, mode, p, out[c]);
        break;
    }
  }
}

static void scale_f32(float* x, int64_t n, float c) {
  const Vec cv(c);
  int64_t i = 0;
  for (; i + kW <= n; i += kW) {
    (Vec::loadu(x + i) * cv).store(x + i);
  }
  for (; i < n; ++i) {
    x[i] = x[i] * c;
  }
}

template <typename T>
static void scale_reduced(T* x, int64_t n, float c) {
  using RVec = at::vec::Vectorized<T>;
  const Vec cv(c);
  int64_t i = 0;
#if !defined(GRADSTATS_PLAIN_LOOPS)  // the baseline build converts element by element
  for (; i + RVec::size() <= n; i += RVec::size()) {
    auto f = at::vec::convert_to_float<T>(RVec::loadu(x + i));
    at::vec::convert_from_float<T>(std::get<0>(f) * cv, std::get<1>(f) * cv).store(x + i);
  }
#endif
  for (; i < n; ++i) {
    x[i] = static_cast<T>(static_cast<float>(x[i]) * c);
  }
}

void scale_impl(void* ptr, int32_t dtype, int64_t n, float c) {
  switch (dtype) {
    case kF32:
      scale_f32(static_cast<float*>(ptr), n, c);
      break;
    case kBF16:
      scale_reduced(static_cast<c10::BFloat16*>(ptr), n, c);
      break;
    default:
      scale_reduced(static_cast<c10::Half*>(ptr), n, c);
      break;
  }
}

#define GRADSTATS_STR2(x) #x
#define GRADSTATS_STR(x) GRADSTATS_STR2(x)

const KernelTable kTable = {GRADSTATS_STR(GRADSTATS_CAP), &stats_impl, &scale_impl};

}  // namespace
}  // namespace GRADSTATS_CAP

const KernelTable* GRADSTATS_TABLE_FN() { return &GRADSTATS_CAP::kTable; }

}  // namespace cpu
}  // namespace gradstats
