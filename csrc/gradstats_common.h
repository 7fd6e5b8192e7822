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

// Range guard of the float32 fast path (CPU and CUDA kernels alike).
//
// The fast path sums |x|**p of a chunk in float32. With nonnegative terms every partial sum
// is <= the chunk's final sum S, so a finite S means nothing overflowed on the way. What
// float32 cannot represent well is the bottom of its range: below 2^-126 a product or sum
// is rounded to a multiple of 2^-149 (subnormals) or flushed to 0, an absolute error of at
// most 2^-150 per rounding, one rounding per element (fused multiply-add) plus one per
// addition. Over at most 2^16 elements that is < 2^-133 in all; relative to a chunk sum
// S >= 2^-100 it is < 2^-33 (1e-10), far below the 1e-5 the ops promise. So:
//
//   S finite and (S >= kMinFastSum or max_abs == 0)  -> the float32 result stands;
//   otherwise                                          -> the chunk is recomputed exactly
//                                                         in double (slow path).
//
// For p = 2 the bound is met whenever max_abs >= 2^-50 (S >= max_abs^2); at the top, a
// finite S is the whole condition (float32 keeps its 24-bit relative precision up to its
// largest finite value; an overflow anywhere makes S infinite). Double holds every
// |x|**p of a finite float32 x for the p the tests use (1, 2, 3, 0.5: 1e-45**3 = 3e-135,
// 3.4e38**3 = 4e115), and every chunk, tensor, group and total partial is double on both
// CPU and CUDA. Real gradients almost never take the slow path (a chunk whose max_abs is
// above 2^-50 = 9e-16 and whose sum does not overflow stays on the fast path), so the guard
// costs one compare per chunk.
constexpr double kMinFastSum = 7.888609052210118e-31;  // 2^-100

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
// namespace and with -fno-weak (see setup.py, ISA_FLAGS): the only symbol an ISA object
// exports is its table getter below; the host code (capability.cpp) picks one table at
// run time.
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
