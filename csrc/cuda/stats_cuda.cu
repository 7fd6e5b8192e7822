// CUDA implementations of torch.ops.gradstats.stats and torch.ops.gradstats.scale_
// (schemas and semantics: csrc/registration.cpp, which registers them for the CUDA
// dispatch key). Built only when torch has CUDA and nvcc is found (setup.py).
//
// Layout of one call:
//   plan (device memory, cached by the STRUCTURE of the gradient set: per tensor numel,
//   dtype and group, plus device and group bounds; never by address):
//     TensorInfo[T]   numel, dtype, group of each tensor           uploaded once per plan
//     int64 cb[T+1]   first chunk of each tensor (prefix sums of ceil(numel / kCudaChunk))
//     int64 gb[G+1]   group bounds (tensor ranges)
//     int64 ptrs[T]   data pointer of each tensor: rewritten by an async host->device copy
//                     whenever the gradients moved (8 bytes per tensor; skipped when the
//                     pointers equal the last ones uploaded)
//   stats_kernel      grid = C chunks (all dtypes in one launch, block-uniform switch);
//                     each block reads its chunk once with 16-byte loads and writes one
//                     fixed slot (ChunkSlot). Bytes moved: one read of every gradient.
//   finalize_kernel   one block: per tensor (a warp each, lanes over chunks), per group
//                     (a warp each, lanes over tensors), total (warp 0), fixed-order
//                     shuffle trees in double; writes all twelve outputs and the clip
//                     coefficient. No atomics anywhere: bit-identical from run to run.
//   scale_kernel      grid-stride over chunks; reads the coefficient of the chunk's group
//                     and returns at once when it is >= 1 (no pass over the gradients).
//
// No host synchronisation on the hot path: pointer uploads go through a ring of pinned
// buffers guarded by CUDA events (cudaEventQuery; a blocking wait only when every slot
// still has a copy in flight). See PointerRing and Plan::table_for below, including what
// happens while a CUDA graph is being captured.
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <list>
#include <memory>
#include <mutex>
#include <tuple>
#include <utility>
#include <vector>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "../gradstats_common.h"
#include "../host_common.h"
#include "../ops.h"
#include "plan_counters.h"

namespace gradstats {
namespace cuda {
namespace {

using at::Tensor;

constexpr int kThreads = 512;                 // threads per stats/scale block
constexpr int kWarps = kThreads / 32;
constexpr int kFinalThreads = 1024;           // one finalize block
constexpr int kFinalWarps = kFinalThreads / 32;
constexpr int kUnroll = 4;                    // 16-byte loads in flight per thread
// Elements per chunk (one block each). Smaller than the CPU's kChunk so that GPT-2-sized
// sets still make many waves of blocks (less tail idle time); still 8 x 16-byte loads
// per thread per chunk for fp32.
constexpr int64_t kCudaChunk = 32768;
static_assert(kCudaChunk <= kChunk, "the range guard (gradstats_common.h) assumes <= 2^16");
// kMinFastSum as a float for device code (2^-100 is a normal float32, exact).
constexpr float kMinFastSumF = 7.888609052210118e-31f;
static_assert(static_cast<double>(kMinFastSumF) == kMinFastSum, "2^-100 must be exact");

struct TensorInfo {
  int64_t numel;
  int32_t dtype;   // DType
  int32_t group;   // group index
};
static_assert(sizeof(TensorInfo) == 16, "TensorInfo layout");

struct ChunkSlot {
  double acc;      // sum |x|^p of finite elements (max |x| for p = inf)
  float max_abs;   // largest finite |x|
  int32_t n_nan;   // <= kCudaChunk: fits
  int32_t n_inf;
  int32_t pad_;
};
static_assert(sizeof(ChunkSlot) == 24, "ChunkSlot layout");

// ----------------------------------------------------------------------------- device

__device__ __forceinline__ int64_t find_tensor(const int64_t* cb, int64_t T, int64_t chunk) {
  // largest t with cb[t] <= chunk (tensors without chunks have cb[t] == cb[t+1])
  int64_t lo = 0, hi = T;  // answer in [lo, hi)
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) >> 1;
    if (cb[mid] <= chunk) lo = mid; else hi = mid;
  }
  return lo;
}

template <int MODE>
__device__ __forceinline__ void accum(float v, float p, float& acc, float& mx) {
  const float a = fabsf(v);
  if (MODE == kModeL2) {
    acc = __fmaf_rn(v, v, acc);
  } else if (MODE == kModeL1) {
    acc = __fadd_rn(acc, a);
  } else if (MODE == kModeInf) {
    acc = __fmaf_rn(v, 0.0f, acc);  // stays 0 unless v is NaN or Inf: the detector
  } else {
    acc = __fadd_rn(acc, powf(a, p));
  }
  mx = fmaxf(mx, a);  // ignores NaN; NaN is caught through acc
}

__device__ __forceinline__ void unpack8(const uint4& r, int32_t dtype, float (&f)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (dtype == kBF16) {
      f[2 * k] = __uint_as_float(w[k] << 16);
      f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    } else {
      const __half2 h = *reinterpret_cast<const __half2*>(&w[k]);
      const float2 ff = __half22float2(h);
      f[2 * k] = ff.x;
      f[2 * k + 1] = ff.y;
    }
  }
}

__device__ __forceinline__ float load_one(const void* base, int32_t dtype, int64_t i) {
  if (dtype == kF32) return static_cast<const float*>(base)[i];
  if (dtype == kBF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return __half2float(static_cast<const __half*>(base)[i]);
}

// Fixed-order block reductions (xor butterfly in each warp, then warp 0 over the warps).
template <typename V, typename Op>
__device__ __forceinline__ V block_reduce(V v, Op op, V* smem) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  __syncthreads();  // smem may still be read by a previous reduction
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? smem[lane] : V(0);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, o));
    if (lane == 0) smem[0] = v;
  }
  __syncthreads();
  return smem[0];
}

struct AddF { __device__ float operator()(float a, float b) const { return __fadd_rn(a, b); } };
struct AddD { __device__ double operator()(double a, double b) const { return __dadd_rn(a, b); } };
struct MaxF { __device__ float operator()(float a, float b) const { return fmaxf(a, b); } };
struct AddI { __device__ int32_t operator()(int32_t a, int32_t b) const { return a + b; } };

// Exact pass over one chunk: counts NaN/Inf, leaves them out, accumulates in double.
__device__ void exact_chunk(const void* base, int32_t dtype, int64_t n, int32_t mode, float p,
                            ChunkSlot& slot, double* smem_d, float* smem_f, int32_t* smem_i) {
  double s = 0.0;
  float mx = 0.0f;
  int32_t nn = 0, ni = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = load_one(base, dtype, i);
    if (isnan(v)) { ++nn; continue; }
    const float a = fabsf(v);
    if (isinf(a)) { ++ni; continue; }
    mx = fmaxf(mx, a);
    if (mode == kModeL2) s += static_cast<double>(a) * static_cast<double>(a);
    else if (mode == kModeL1) s += static_cast<double>(a);
    else if (mode == kModeP) s += pow(static_cast<double>(a), static_cast<double>(p));
  }
  s = block_reduce(s, AddD(), smem_d);
  mx = block_reduce(mx, MaxF(), smem_f);
  nn = block_reduce(nn, AddI(), smem_i);
  ni = block_reduce(ni, AddI(), smem_i);
  if (threadIdx.x == 0) {
    slot.acc = (mode == kModeInf) ? static_cast<double>(mx) : s;
    slot.max_abs = mx;
    slot.n_nan = nn;
    slot.n_inf = ni;
    slot.pad_ = 0;
  }
}

template <int MODE>
__device__ void chunk_stats(const void* tensor_base, int32_t dtype, int64_t start, int64_t n,
                            float p, ChunkSlot& slot, double* smem_d, float* smem_f,
                            int32_t* smem_i) {
  float acc = 0.0f, mx = 0.0f;
  const int esize = dtype == kF32 ? 4 : 2;
  const char* base = static_cast<const char*>(tensor_base) + start * esize;
  const bool aligned = (reinterpret_cast<uintptr_t>(base) & 15u) == 0;
  int64_t done = 0;  // elements handled by the vector loop
  if (aligned) {
    const int per = 16 / esize;  // elements per 16-byte load: 4 (fp32) or 8 (bf16/fp16)
    const int64_t nvec = n / per;
    const uint4* vb = reinterpret_cast<const uint4*>(base);
    int64_t j = threadIdx.x;
    // kUnroll independent loads in flight per thread
    for (; j + (kUnroll - 1) * kThreads < nvec; j += kUnroll * kThreads) {
      uint4 r[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) r[u] = __ldcs(vb + j + u * kThreads);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (dtype == kF32) {
          accum<MODE>(__uint_as_float(r[u].x), p, acc, mx);
          accum<MODE>(__uint_as_float(r[u].y), p, acc, mx);
          accum<MODE>(__uint_as_float(r[u].z), p, acc, mx);
          accum<MODE>(__uint_as_float(r[u].w), p, acc, mx);
        } else {
          float f[8];
          unpack8(r[u], dtype, f);
#pragma unroll
          for (int k = 0; k < 8; ++k) accum<MODE>(f[k], p, acc, mx);
        }
      }
    }
    for (; j < nvec; j += kThreads) {
      const uint4 r = __ldcs(vb + j);
      if (dtype == kF32) {
        accum<MODE>(__uint_as_float(r.x), p, acc, mx);
        accum<MODE>(__uint_as_float(r.y), p, acc, mx);
        accum<MODE>(__uint_as_float(r.z), p, acc, mx);
        accum<MODE>(__uint_as_float(r.w), p, acc, mx);
      } else {
        float f[8];
        unpack8(r, dtype, f);
#pragma unroll
        for (int k = 0; k < 8; ++k) accum<MODE>(f[k], p, acc, mx);
      }
    }
    done = nvec * per;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += kThreads) {
    accum<MODE>(load_one(base, dtype, i), p, acc, mx);
  }
  acc = block_reduce(acc, AddF(), smem_f);
  mx = block_reduce(mx, MaxF(), smem_f);
  // Block-uniform decision: NaN/Inf seen, the float sum overflowed, or a nonzero sum fell
  // below kMinFastSum where float32 loses relative precision (range guard,
  // gradstats_common.h) -> exact pass in double.
  const bool tiny = (MODE != kModeInf) && acc < kMinFastSumF && mx > 0.0f;
  if (!isfinite(acc) || !isfinite(mx) || tiny) {
    exact_chunk(base, dtype, n, MODE, p, slot, smem_d, smem_f, smem_i);
    return;
  }
  if (threadIdx.x == 0) {
    slot.acc = (MODE == kModeInf) ? static_cast<double>(mx) : static_cast<double>(acc);
    slot.max_abs = mx;
    slot.n_nan = 0;
    slot.n_inf = 0;
    slot.pad_ = 0;
  }
}

__global__ void __launch_bounds__(kThreads)
stats_kernel(const int64_t* __restrict__ ptrs, const TensorInfo* __restrict__ info,
             const int64_t* __restrict__ cb, int64_t T, int32_t mode, float p,
             ChunkSlot* __restrict__ slots) {
  __shared__ double smem_d[kWarps];
  __shared__ float smem_f[kWarps];
  __shared__ int32_t smem_i[kWarps];
  const int64_t chunk = blockIdx.x;
  const int64_t t = find_tensor(cb, T, chunk);
  const TensorInfo ti = info[t];
  const void* base = reinterpret_cast<const void*>(ptrs[t]);
  const int64_t start = (chunk - cb[t]) * kCudaChunk;
  const int64_t n = min(kCudaChunk, ti.numel - start);
  ChunkSlot& slot = slots[chunk];
  switch (mode) {
    case kModeL2:
      chunk_stats<kModeL2>(base, ti.dtype, start, n, p, slot, smem_d, smem_f, smem_i);
      break;
    case kModeL1:
      chunk_stats<kModeL1>(base, ti.dtype, start, n, p, slot, smem_d, smem_f, smem_i);
      break;
    case kModeInf:
      chunk_stats<kModeInf>(base, ti.dtype, start, n, p, slot, smem_d, smem_f, smem_i);
      break;
    default:
      chunk_stats<kModeP>(base, ti.dtype, start, n, p, slot, smem_d, smem_f, smem_i);
      break;
  }
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __dadd_rn(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ float warp_maxf(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
__device__ __forceinline__ long long warp_sumi(long long v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ double norm_of(double acc, int32_t mode, double p) {
  if (mode == kModeL2) return sqrt(acc);
  if (mode == kModeL1 || mode == kModeInf) return acc;
  return pow(acc, 1.0 / p);
}

__device__ __forceinline__ float nonfinite_rule(double norm, long long nn, long long ni) {
  if (nn > 0) return __int_as_float(0x7fc00000);
  if (ni > 0) return __int_as_float(0x7f800000);
  return static_cast<float>(norm);
}

struct FinalOut {
  float* acc; float* max_abs; int64_t* n_nan; int64_t* n_inf;
  float* t_acc; int64_t* t_nan; int64_t* t_inf;
  float* norm; float* total; int64_t* nonfinite; float* ptn; float* coef;
};

// Scratch (device): per-tensor double acc, float max; per-group double acc.
__global__ void __launch_bounds__(kFinalThreads)
finalize_kernel(const ChunkSlot* __restrict__ slots, const int64_t* __restrict__ cb,
                const int64_t* __restrict__ gb, int64_t T, int64_t G, int32_t mode, double p,
                int32_t has_max_norm, float max_norm, double* __restrict__ t_accd,
                float* __restrict__ t_max, double* __restrict__ g_accd, FinalOut out) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const bool is_max = (mode == kModeInf);
  // 1) tensors: a warp per tensor, lanes over its chunks
  for (int64_t t = warp; t < T; t += kFinalWarps) {
    double a = 0.0;
    float m = 0.0f;
    long long nn = 0, ni = 0;
    for (int64_t c = cb[t] + lane; c < cb[t + 1]; c += 32) {
      const ChunkSlot s = slots[c];
      a = is_max ? fmax(a, s.acc) : __dadd_rn(a, s.acc);
      m = fmaxf(m, s.max_abs);
      nn += s.n_nan;
      ni += s.n_inf;
    }
    a = is_max ? warp_max(a) : warp_sum(a);
    m = warp_maxf(m);
    nn = warp_sumi(nn);
    ni = warp_sumi(ni);
    if (lane == 0) {
      t_accd[t] = a;
      t_max[t] = m;
      out.t_acc[t] = static_cast<float>(a);
      out.t_nan[t] = nn;
      out.t_inf[t] = ni;
      out.ptn[t] = nonfinite_rule(norm_of(a, mode, p), nn, ni);
    }
  }
  __syncthreads();
  // 2) groups: a warp per group, lanes over its tensors
  for (int64_t g = warp; g < G; g += kFinalWarps) {
    double a = 0.0;
    float m = 0.0f;
    long long nn = 0, ni = 0;
    for (int64_t t = gb[g] + lane; t < gb[g + 1]; t += 32) {
      a = is_max ? fmax(a, t_accd[t]) : __dadd_rn(a, t_accd[t]);
      m = fmaxf(m, t_max[t]);
      nn += out.t_nan[t];
      ni += out.t_inf[t];
    }
    a = is_max ? warp_max(a) : warp_sum(a);
    m = warp_maxf(m);
    nn = warp_sumi(nn);
    ni = warp_sumi(ni);
    if (lane == 0) {
      g_accd[g] = a;
      out.acc[g] = static_cast<float>(a);
      out.max_abs[g] = m;
      out.n_nan[g] = nn;
      out.n_inf[g] = ni;
      out.nonfinite[g] = nn + ni;
      out.norm[g] = nonfinite_rule(norm_of(a, mode, p), nn, ni);
    }
  }
  __syncthreads();
  // 3) total: warp 0, lanes over groups
  if (warp == 0) {
    double a = 0.0;
    long long nn = 0, ni = 0;
    for (int64_t g = lane; g < G; g += 32) {
      a = is_max ? fmax(a, g_accd[g]) : __dadd_rn(a, g_accd[g]);
      nn += out.n_nan[g];
      ni += out.n_inf[g];
    }
    a = is_max ? warp_max(a) : warp_sum(a);
    nn = warp_sumi(nn);
    ni = warp_sumi(ni);
    if (lane == 0) {
      const float tot = nonfinite_rule(norm_of(a, mode, p), nn, ni);
      *out.total = tot;
      float c = 1.0f;
      if (has_max_norm) {  // torch: reciprocal(total + 1e-6) * max_norm, clamp(max=1)
        const float denom = __fadd_rn(tot, 1e-6f);
        c = __fmul_rn(__frcp_rn(denom), max_norm);
        c = (c > 1.0f) ? 1.0f : c;  // NaN stays NaN
      }
      *out.coef = c;
    }
  }
}

template <typename T>
__device__ __forceinline__ T to_elem(float v);
template <>
__device__ __forceinline__ float to_elem<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 to_elem<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half to_elem<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float from_elem(T v);
template <>
__device__ __forceinline__ float from_elem<float>(float v) { return v; }
template <>
__device__ __forceinline__ float from_elem<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float from_elem<__half>(__half v) { return __half2float(v); }

template <typename T>
__device__ void scale_chunk(T* x, int64_t n, float c) {
  constexpr int per = 16 / sizeof(T);
  const bool aligned = (reinterpret_cast<uintptr_t>(x) & 15u) == 0;
  int64_t done = 0;
  if (aligned) {
    const int64_t nvec = n / per;
    uint4* vx = reinterpret_cast<uint4*>(x);
    for (int64_t j = threadIdx.x; j < nvec; j += blockDim.x) {
      uint4 r = vx[j];
      T* e = reinterpret_cast<T*>(&r);
#pragma unroll
      for (int k = 0; k < per; ++k) e[k] = to_elem<T>(__fmul_rn(from_elem<T>(e[k]), c));
      vx[j] = r;
    }
    done = nvec * per;
  }
  for (int64_t i = done + threadIdx.x; i < n; i += blockDim.x) {
    x[i] = to_elem<T>(__fmul_rn(from_elem<T>(x[i]), c));
  }
}

__global__ void __launch_bounds__(kThreads)
scale_kernel(const int64_t* __restrict__ ptrs, const TensorInfo* __restrict__ info,
             const int64_t* __restrict__ cb, int64_t T, int64_t C,
             const float* __restrict__ coef, int32_t coef_per_group) {
  if (!coef_per_group && !(coef[0] < 1.0f) && !isnan(coef[0])) return;  // early exit
  for (int64_t chunk = blockIdx.x; chunk < C; chunk += gridDim.x) {
    const int64_t t = find_tensor(cb, T, chunk);
    const TensorInfo ti = info[t];
    const float c = coef[coef_per_group ? ti.group : 0];
    if (c >= 1.0f) continue;  // clamp(max=1): not clipped, not touched (NaN scales)
    const int64_t start = (chunk - cb[t]) * kCudaChunk;
    const int64_t n = min(kCudaChunk, ti.numel - start);
    void* base = reinterpret_cast<void*>(ptrs[t]);
    if (ti.dtype == kF32) {
      scale_chunk(static_cast<float*>(base) + start, n, c);
    } else if (ti.dtype == kBF16) {
      scale_chunk(static_cast<__nv_bfloat16*>(base) + start, n, c);
    } else {
      scale_chunk(static_cast<__half*>(base) + start, n, c);
    }
  }
}

// ----------------------------------------------------------------------------- host

using host::check_bounds;
using host::dtype_code;
using host::flat_ok;
using host::norm_mode;

int sm_count(int device) {
  static int counts[64] = {0};
  if (device < 0 || device >= 64) return 132;
  if (counts[device] == 0) {
    int n = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device));
    counts[device] = std::max(1, n);
  }
  return counts[device];
}

std::atomic<long long> g_plans_built{0}, g_plans_cached{0}, g_uploads{0},
    g_uploads_skipped{0}, g_ring_waits{0}, g_capture_uploads{0};

// While a thread captures a CUDA graph in torch's default (global) capture mode, "unsafe"
// calls such as cudaHostAlloc are refused. Like torch's caching allocator, switch this
// thread to relaxed mode around them (cudaThreadExchangeStreamCaptureMode swaps modes).
struct RelaxedCaptureMode {
  cudaStreamCaptureMode mode = cudaStreamCaptureModeRelaxed;
  bool swapped = false;
  RelaxedCaptureMode() {
    swapped = cudaThreadExchangeStreamCaptureMode(&mode) == cudaSuccess;
    if (!swapped) (void)cudaGetLastError();
  }
  ~RelaxedCaptureMode() {
    if (swapped) (void)cudaThreadExchangeStreamCaptureMode(&mode);
  }
};

char* pinned_alloc(size_t bytes) {
  RelaxedCaptureMode relaxed;
  void* p = nullptr;
  C10_CUDA_CHECK(cudaHostAlloc(&p, std::max<size_t>(bytes, 8), cudaHostAllocPortable));
  return static_cast<char*>(p);
}

cudaEvent_t new_event() {
  RelaxedCaptureMode relaxed;
  cudaEvent_t e = nullptr;
  C10_CUDA_CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
  return e;
}

bool is_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  return status != cudaStreamCaptureStatusNone;  // active (or invalidated: still inside)
}

constexpr int kRingSlots = 4;

// The device-side description of one gradient STRUCTURE (see the top of this file), with
// the machinery that keeps its pointer table current.
//
// Pointer upload (eager): every call computes the T data pointers on the host. Equal to
// the last uploaded ones -> nothing to do. Otherwise they are written into one of
// kRingSlots pinned host slots and copied to the device table `dptrs` with cudaMemcpyAsync
// on the current stream, followed by a CUDA event. A slot is reused only once its event
// has completed (cudaEventQuery, no wait); only if all kRingSlots copies are still in flight
// does the call block on the oldest one (counted in ring_waits). Kernels of the call are
// enqueued after the copy on the same stream, so they read the new pointers; the next
// call's copy is enqueued after them, so it cannot overwrite the table under them. When a
// call comes on another stream than the previous one, the new stream first waits (device
// side, cudaStreamWaitEvent) for everything already enqueued on the old one.
//
// CUDA graph capture: while the current stream is capturing, a call does NOT touch the
// eager table or the ring. It writes its pointers into a pinned buffer and a device table
// of its own, both made for this capture and never reused or freed (kept in the leaky
// PlanCache), and captures the copy between them: every replay re-copies the same
// capture-time pointers and the captured kernels read that private table, whatever eager
// calls did in between. A plan used inside a capture is marked `captured` and is never
// freed either (the graph reads its static part). A plan built during a capture never
// serves eager calls (its static upload happens only when the graph replays), so run one
// eager step before capturing, as with any torch code that allocates on first use.
struct Plan {
  std::vector<int64_t> key;
  int device = 0;
  int64_t T = 0, G = 0, C = 0;
  Tensor meta;                    // device: TensorInfo[T] | int64 cb[T+1] | int64 gb[G+1]
  Tensor dptrs;                   // device: eager pointer table, int64[T]
  char* pinned = nullptr;         // host: static part, then kRingSlots pointer slots
  size_t static_bytes = 0;
  cudaEvent_t static_done = nullptr;
  cudaEvent_t slot_done[kRingSlots] = {};
  bool slot_used[kRingSlots] = {};
  int next_slot = 0;
  cudaEvent_t switch_event = nullptr;
  cudaStream_t last_stream = nullptr;
  bool have_last_stream = false;
  std::vector<int64_t> last_ptrs;  // what the eager table holds once its last copy lands
  bool have_last_ptrs = false;
  bool captured = false;           // set under PlanCache::mu; such a plan is never freed
  std::mutex mu;                   // held by one call from its upload to its last launch

  Plan() = default;
  Plan(const Plan&) = delete;
  Plan& operator=(const Plan&) = delete;

  const TensorInfo* info() const { return static_cast<const TensorInfo*>(meta.const_data_ptr()); }
  const int64_t* cb() const {
    return reinterpret_cast<const int64_t*>(static_cast<const char*>(meta.const_data_ptr()) +
                                            T * sizeof(TensorInfo));
  }
  const int64_t* gb() const { return cb() + (T + 1); }
  int64_t* slot_host(int k) { return reinterpret_cast<int64_t*>(pinned + static_bytes) + k * T; }

  // Runs only for an evicted plan that no graph captured (PlanCache is never destroyed,
  // so never at interpreter exit). Waits for this plan's copies still in flight, if any,
  // before releasing the pinned memory they read.
  ~Plan() {
    c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
    RelaxedCaptureMode relaxed;  // another thread may be capturing (global mode)
    cudaEvent_t* all[] = {&static_done, &switch_event};
    for (cudaEvent_t* e : all) {
      if (*e != nullptr) {
        (void)cudaEventSynchronize(*e);
        (void)cudaEventDestroy(*e);
      }
    }
    for (cudaEvent_t& e : slot_done) {
      if (e != nullptr) {
        (void)cudaEventSynchronize(e);
        (void)cudaEventDestroy(e);
      }
    }
    if (pinned != nullptr) (void)cudaFreeHost(pinned);
    (void)cudaGetLastError();  // leave no stale error for the next launch check
  }

  int acquire_slot() {
    for (int i = 0; i < kRingSlots; ++i) {
      const int k = (next_slot + i) % kRingSlots;
      if (!slot_used[k]) return take(k);
      const cudaError_t err = cudaEventQuery(slot_done[k]);
      if (err == cudaSuccess) return take(k);
      if (err != cudaErrorNotReady) C10_CUDA_CHECK(err);
      (void)cudaGetLastError();  // cudaErrorNotReady is not an error: clear it
    }
    const int k = next_slot;  // every slot busy: wait for the oldest copy
    g_ring_waits.fetch_add(1, std::memory_order_relaxed);
    C10_CUDA_CHECK(cudaEventSynchronize(slot_done[k]));
    return take(k);
  }

  int take(int k) {
    next_slot = (k + 1) % kRingSlots;
    return k;
  }
};

// Memory of CUDA graph captures: pinned source and device copy of one capture's pointers.
struct CaptureTable {
  char* host;
  Tensor dev;
};

// The plan cache: a small LRU of eager plans, plus everything a captured graph may read.
// It is a leaky singleton on purpose: created on first use and never destroyed. A static
// object here would be destroyed by the C++ runtime after Python has finalized and after
// torch's CUDA caching allocators, pinned-memory allocator and CUDA context may already be
// torn down (they are created later, on first CUDA use, so their teardown runs earlier):
// freeing the plans' device and pinned tensors then touches destroyed allocator state, the
// segmentation fault at exit (rc 139) seen after GPU work. Leaking a few KB of tables at
// exit is harmless (the process and its CUDA context go away), and nothing of ours runs
// during teardown. Not released from a Python atexit hook either: a graph replayed by
// another exit hook would read freed tables.
struct PlanCache {
  std::mutex mu;
  std::list<std::shared_ptr<Plan>> lru;       // eager plans, most recent first
  std::vector<std::shared_ptr<Plan>> kept;    // captured or built in a capture: never freed
  std::vector<CaptureTable> capture_tables;   // never freed
};
constexpr size_t kMaxPlans = 8;

PlanCache& plan_cache() {
  static PlanCache* cache = new PlanCache();  // leaky singleton, see PlanCache
  return *cache;
}

std::vector<int64_t> structure_key(const std::vector<const Tensor*>& ts, c10::IntArrayRef bounds,
                                   int device) {
  const int64_t T = static_cast<int64_t>(ts.size());
  std::vector<int64_t> key;
  key.reserve(2 * T + bounds.size() + 2);
  key.push_back(device);
  key.push_back(T);
  for (int64_t b : bounds) key.push_back(b);
  for (const Tensor* t : ts) {
    key.push_back(t->numel());
    key.push_back(dtype_code(t->scalar_type()));
  }
  return key;
}

std::shared_ptr<Plan> build_plan(std::vector<int64_t> key, const std::vector<const Tensor*>& ts,
                                 c10::IntArrayRef bounds, const at::Device& device,
                                 cudaStream_t stream, bool capturing) {
  auto made = std::make_shared<Plan>();
  Plan& plan = *made;
  const int64_t T = static_cast<int64_t>(ts.size());
  const int64_t G = static_cast<int64_t>(bounds.size()) - 1;
  plan.key = std::move(key);
  plan.device = device.index();
  plan.T = T;
  plan.G = G;
  plan.static_bytes = T * sizeof(TensorInfo) + (T + 1 + G + 1) * sizeof(int64_t);
  plan.pinned = pinned_alloc(plan.static_bytes + kRingSlots * T * sizeof(int64_t));
  auto* ti = reinterpret_cast<TensorInfo*>(plan.pinned);
  auto* cb = reinterpret_cast<int64_t*>(plan.pinned + T * sizeof(TensorInfo));
  auto* gb = cb + (T + 1);
  int64_t c = 0;
  int64_t g = 0;
  for (int64_t i = 0; i < T; ++i) {
    while (g < G && bounds[g + 1] <= i) ++g;
    ti[i].numel = ts[i]->numel();
    ti[i].dtype = dtype_code(ts[i]->scalar_type());
    ti[i].group = static_cast<int32_t>(g);
    cb[i] = c;
    c += (ts[i]->numel() + kCudaChunk - 1) / kCudaChunk;
  }
  cb[T] = c;
  for (int64_t k = 0; k <= G; ++k) gb[k] = bounds[k];
  plan.C = c;
  plan.meta = at::empty({static_cast<int64_t>(plan.static_bytes)},
                        at::TensorOptions().dtype(at::kByte).device(device));
  plan.dptrs = at::empty({std::max<int64_t>(T, 1)},
                         at::TensorOptions().dtype(at::kLong).device(device));
  plan.static_done = new_event();
  plan.switch_event = new_event();
  for (auto& e : plan.slot_done) e = new_event();
  C10_CUDA_CHECK(cudaMemcpyAsync(plan.meta.data_ptr(), plan.pinned, plan.static_bytes,
                                 cudaMemcpyHostToDevice, stream));
  if (!capturing) {
    C10_CUDA_CHECK(cudaEventRecord(plan.static_done, stream));
    plan.last_stream = stream;
    plan.have_last_stream = true;
  }
  return made;
}

// The plan for this structure (built on a miss). Inside a capture the plan is marked
// captured (never freed afterwards); a plan built inside a capture is kept out of the
// eager LRU.
std::shared_ptr<Plan> get_plan(const std::vector<const Tensor*>& ts, c10::IntArrayRef bounds,
                               const at::Device& device, cudaStream_t stream, bool capturing) {
  std::vector<int64_t> key = structure_key(ts, bounds, device.index());
  PlanCache& cache = plan_cache();
  std::lock_guard<std::mutex> lock(cache.mu);
  for (auto it = cache.lru.begin(); it != cache.lru.end(); ++it) {
    if ((*it)->key == key) {
      cache.lru.splice(cache.lru.begin(), cache.lru, it);
      if (capturing) cache.lru.front()->captured = true;
      g_plans_cached.fetch_add(1, std::memory_order_relaxed);
      return cache.lru.front();
    }
  }
  auto made = build_plan(std::move(key), ts, bounds, device, stream, capturing);
  g_plans_built.fetch_add(1, std::memory_order_relaxed);
  if (capturing) {
    made->captured = true;
    cache.kept.push_back(made);
    return made;
  }
  cache.lru.push_front(made);
  if (cache.lru.size() > kMaxPlans) {
    std::shared_ptr<Plan> old = std::move(cache.lru.back());
    cache.lru.pop_back();
    if (old->captured) cache.kept.push_back(std::move(old));
    // else: freed when the last call using it returns (~Plan)
  }
  return made;
}

// The device pointer table the kernels of this call read (see Plan). Call with plan.mu
// held, and keep holding it until the call's last launch is enqueued.
const int64_t* table_for(Plan& plan, const std::vector<int64_t>& ptrs,
                         const c10::cuda::CUDAStream& cstream, bool capturing) {
  const cudaStream_t stream = cstream.stream();
  const size_t bytes = ptrs.size() * sizeof(int64_t);
  if (capturing) {
    char* host = pinned_alloc(bytes);
    std::memcpy(host, ptrs.data(), bytes);
    Tensor dev = at::empty({std::max<int64_t>(plan.T, 1)},
                           at::TensorOptions().dtype(at::kLong).device(plan.meta.device()));
    C10_CUDA_CHECK(cudaMemcpyAsync(dev.data_ptr(), host, bytes, cudaMemcpyHostToDevice, stream));
    const int64_t* out = dev.const_data_ptr<int64_t>();
    {
      PlanCache& cache = plan_cache();
      std::lock_guard<std::mutex> lock(cache.mu);
      cache.capture_tables.push_back(CaptureTable{host, std::move(dev)});
    }
    g_capture_uploads.fetch_add(1, std::memory_order_relaxed);
    return out;
  }
  if (plan.have_last_stream && stream != plan.last_stream) {
    // order this stream after the previous one's copies and kernels (device side), and
    // keep the caching allocator from recycling the tables before this stream is done
    C10_CUDA_CHECK(cudaEventRecord(plan.switch_event, plan.last_stream));
    C10_CUDA_CHECK(cudaStreamWaitEvent(stream, plan.switch_event, 0));
    plan.meta.record_stream(cstream.unwrap());
    plan.dptrs.record_stream(cstream.unwrap());
  }
  plan.last_stream = stream;
  plan.have_last_stream = true;
  if (plan.have_last_ptrs && plan.last_ptrs == ptrs) {
    g_uploads_skipped.fetch_add(1, std::memory_order_relaxed);
    return plan.dptrs.const_data_ptr<int64_t>();
  }
  if (bytes > 0) {
    const int k = plan.acquire_slot();
    int64_t* h = plan.slot_host(k);
    std::memcpy(h, ptrs.data(), bytes);
    C10_CUDA_CHECK(cudaMemcpyAsync(plan.dptrs.data_ptr(), h, bytes, cudaMemcpyHostToDevice,
                                   stream));
    C10_CUDA_CHECK(cudaEventRecord(plan.slot_done[k], stream));
    plan.slot_used[k] = true;
  }
  plan.last_ptrs = ptrs;
  plan.have_last_ptrs = true;
  g_uploads.fetch_add(1, std::memory_order_relaxed);
  return plan.dptrs.const_data_ptr<int64_t>();
}

std::vector<int64_t> data_ptrs(const std::vector<const Tensor*>& ts) {
  std::vector<int64_t> out(ts.size());
  for (size_t i = 0; i < ts.size(); ++i) {
    out[i] = reinterpret_cast<int64_t>(ts[i]->const_data_ptr());
  }
  return out;
}

}  // namespace

PlanCounters plan_counters() {
  return PlanCounters{g_plans_built.load(), g_plans_cached.load(), g_uploads.load(),
                      g_uploads_skipped.load(), g_ring_waits.load(), g_capture_uploads.load()};
}

StatsOut stats(at::TensorList tensors, c10::IntArrayRef group_bounds, double norm_type,
               std::optional<double> max_norm) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  const int64_t G = check_bounds(group_bounds, T, "gradstats.stats");
  const int32_t mode = norm_mode(norm_type);
  TORCH_CHECK(T > 0, "gradstats.stats (CUDA): no tensors");
  const at::Device device = tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  std::vector<Tensor> keep;  // contiguous copies of non-flat gradients
  keep.reserve(T);
  std::vector<const Tensor*> ts(T);
  for (int64_t i = 0; i < T; ++i) {
    const Tensor& t = tensors[i];
    TORCH_CHECK(t.device() == device, "gradstats.stats (CUDA): tensors[", i, "] is on ",
                t.device(), ", expected ", device);
    TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, "gradstats.stats: tensors[", i,
                "] has dtype ", t.scalar_type(), "; supported: float32, bfloat16, float16");
    if (t.numel() > 0 && !flat_ok(t)) {
      keep.push_back(t.contiguous());
      ts[i] = &keep.back();
    } else {
      ts[i] = &t;
    }
  }
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = is_capturing(stream.stream());
  const std::shared_ptr<Plan> plan_ptr = get_plan(ts, group_bounds, device, stream.stream(),
                                                  capturing);
  Plan& plan = *plan_ptr;
  std::lock_guard<std::mutex> use(plan.mu);
  const int64_t* dptrs = table_for(plan, data_ptrs(ts), stream, capturing);

  auto f32 = at::TensorOptions().dtype(at::kFloat).device(device);
  auto i64 = at::TensorOptions().dtype(at::kLong).device(device);
  auto u8 = at::TensorOptions().dtype(at::kByte).device(device);
  // scratch: chunk slots, per-tensor double acc + float max, per-group double acc
  const int64_t slot_bytes = std::max<int64_t>(1, plan.C) * sizeof(ChunkSlot);
  const int64_t scratch_bytes = slot_bytes + T * (8 + 8) + std::max<int64_t>(G, 1) * 8;
  Tensor scratch = at::empty({scratch_bytes}, u8);
  char* sp = static_cast<char*>(scratch.data_ptr());
  auto* slots = reinterpret_cast<ChunkSlot*>(sp);
  auto* t_accd = reinterpret_cast<double*>(sp + slot_bytes);
  auto* t_max = reinterpret_cast<float*>(sp + slot_bytes + T * 8);
  auto* g_accd = reinterpret_cast<double*>(sp + slot_bytes + T * 16);

  Tensor acc = at::empty({G}, f32), max_abs = at::empty({G}, f32);
  Tensor n_nan = at::empty({G}, i64), n_inf = at::empty({G}, i64);
  Tensor t_acc = at::empty({T}, f32), t_nan = at::empty({T}, i64), t_inf = at::empty({T}, i64);
  Tensor norm = at::empty({G}, f32), total = at::empty({}, f32);
  Tensor nonfinite = at::empty({G}, i64), ptn = at::empty({T}, f32);
  Tensor coef = at::empty({}, f32);

  if (plan.C > 0) {
    TORCH_CHECK(plan.C < (int64_t{1} << 31), "gradstats.stats (CUDA): too many chunks");
    stats_kernel<<<static_cast<unsigned>(plan.C), kThreads, 0, stream.stream()>>>(
        dptrs, plan.info(), plan.cb(), T, mode, static_cast<float>(norm_type), slots);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  FinalOut out{acc.data_ptr<float>(), max_abs.data_ptr<float>(), n_nan.data_ptr<int64_t>(),
               n_inf.data_ptr<int64_t>(), t_acc.data_ptr<float>(), t_nan.data_ptr<int64_t>(),
               t_inf.data_ptr<int64_t>(), norm.data_ptr<float>(), total.data_ptr<float>(),
               nonfinite.data_ptr<int64_t>(), ptn.data_ptr<float>(), coef.data_ptr<float>()};
  finalize_kernel<<<1, kFinalThreads, 0, stream.stream()>>>(
      slots, plan.cb(), plan.gb(), T, G, mode, norm_type, max_norm.has_value() ? 1 : 0,
      max_norm.has_value() ? static_cast<float>(*max_norm) : 1.0f, t_accd, t_max, g_accd, out);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return StatsOut(acc, max_abs, n_nan, n_inf, t_acc, t_nan, t_inf, norm, total, nonfinite,
                  ptn, coef);
}

void scale_(at::TensorList tensors, c10::IntArrayRef group_bounds, const Tensor& coef) {
  const int64_t T = static_cast<int64_t>(tensors.size());
  const int64_t G = check_bounds(group_bounds, T, "gradstats.scale_");
  if (T == 0) return;
  const at::Device device = tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  TORCH_CHECK(coef.device() == device, "gradstats.scale_ (CUDA): coef must be on ", device,
              ", got ", coef.device());
  TORCH_CHECK(coef.dim() == 0 || (coef.dim() == 1 && coef.numel() == G),
              "gradstats.scale_: coef must be 0-dim or have one value per group (", G,
              "), got shape ", coef.sizes());
  const Tensor cf = coef.to(at::kFloat).contiguous();
  // Gradients the kernel cannot address as one flat run (strided views, other dtypes):
  // torch's multiply by min(coef, 1), which leaves them unchanged when coef >= 1.
  std::vector<const Tensor*> ts;
  std::vector<int64_t> bounds(1, 0);
  ts.reserve(T);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t i = group_bounds[g]; i < group_bounds[g + 1]; ++i) {
      const Tensor& t = tensors[i];
      TORCH_CHECK(t.device() == device, "gradstats.scale_ (CUDA): tensors[", i, "] is on ",
                  t.device());
      if (t.numel() == 0) continue;
      if (dtype_code(t.scalar_type()) < 0 || !flat_ok(t)) {
        const Tensor c1 = (cf.dim() == 0 ? cf : cf.select(0, g)).clamp_max(1.0);
        t.mul_(c1);
        continue;
      }
      ts.push_back(&t);
    }
    bounds.push_back(static_cast<int64_t>(ts.size()));
  }
  if (ts.empty()) return;
  const auto stream = c10::cuda::getCurrentCUDAStream(device.index());
  const bool capturing = is_capturing(stream.stream());
  const std::shared_ptr<Plan> plan_ptr = get_plan(ts, bounds, device, stream.stream(),
                                                  capturing);
  Plan& plan = *plan_ptr;
  if (plan.C == 0) return;
  std::lock_guard<std::mutex> use(plan.mu);
  const int64_t* dptrs = table_for(plan, data_ptrs(ts), stream, capturing);
  const int64_t blocks = std::min<int64_t>(plan.C, int64_t{8} * sm_count(device.index()));
  scale_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, stream.stream()>>>(
      dptrs, plan.info(), plan.cb(), plan.T, plan.C, cf.const_data_ptr<float>(),
      cf.dim() == 0 ? 0 : 1);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace gradstats
