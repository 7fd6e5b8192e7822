// CPU kernels, AVX2 build. setup.py compiles this file alone with -mavx2 -mfma -mf16c
// (and -fno-weak, see stats_kernel.h); capability.cpp selects it only when the CPU reports
// AVX2, FMA and F16C.
#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "kernel_avx2.cpp must be compiled with -mavx2 -mfma -mf16c"
#endif
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#define GRADSTATS_CAP cap_avx2
#define GRADSTATS_TABLE_FN table_avx2
#include "stats_kernel.h"
