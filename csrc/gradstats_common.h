// Shared declarations of the gradstats native kernels (CPU and CUDA).
//
// The host side cuts every gradient into fixed-size chunks of kChunk elements (the last
// chunk of a tensor is shorter). Each chunk gets one fixed slot of partial results; the
// slots are reduced per tensor and per group in chunk order, so the statistics never
// depend on how the chunks were spread over threads or thread blocks.
#pragma once

#include <cstdint>

namespace gradstats {

// Elements per chunk. Fixed: changing it changes the rounding of the float32 partials.
constexpr int64_t kChunk = 65536;

// Element type codes used in the chunk tables (kept independent of c10 for the kernels).
enum DType : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Which power of |x| is accumulated.
enum NormMode : int32_t {
  kModeL2 = 0,   // sum x*x
  kModeL1 = 1,   // sum |x|
  kModeInf = 2,  // max |x| (the accumulator is the finite maximum)
  kModeP = 3,    // sum |x|**p, general p > 0
};

// One chunk of one tensor, as seen by the CPU kernels.
struct CpuChunk {
  const void* ptr;  // first element of the chunk
  int64_t n;        // elements in the chunk (1..kChunk)
  int32_t dtype;    // DType
  int32_t tensor;   // index of the tensor in the call
};

// Partial results of one chunk.
struct ChunkPartial {
  double acc;      // sum of |x|**p over finite elements (max |x| for p = inf)
  float max_abs;   // largest finite |x| (0 if none)
  float pad_;
  int64_t n_nan;   // NaN elements
  int64_t n_inf;   // +-Inf elements
};

namespace cpu {

// Kernels compiled once per CPU capability (default, AVX2, AVX512), each in its own
// namespace; the host code picks one table at run time.
struct KernelTable {
  const char* name;
  // Statistics of chunks[0..count) into out[0..count).
  void (*stats)(const CpuChunk* chunks, int64_t count, int32_t mode, float p,
                ChunkPartial* out);
  // x = (float)x * coef rounded to the element type, for n elements at ptr.
  void (*scale)(void* ptr, int32_t dtype, int64_t n, float coef);
};

const KernelTable* table_default();
#if defined(GRADSTATS_HAVE_AVX2)
const KernelTable* table_avx2();
#endif
#if defined(GRADSTATS_HAVE_AVX512)
const KernelTable* table_avx512();
#endif

}  // namespace cpu
}  // namespace gradstats
