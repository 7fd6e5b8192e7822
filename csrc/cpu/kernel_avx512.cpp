// CPU kernels, AVX512 build. setup.py compiles this file alone with
// -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma -mf16c (and -fno-weak, see
// stats_kernel.h). capability.cpp selects it only when the CPU reports those features AND
// the user opted in with GRADSTATS_CPU_CAPABILITY=avx512: no machine of ours has passed
// the test suite with this build yet (see capability.cpp).
#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || \
    !defined(__AVX512DQ__) || !defined(__FMA__)
#error "kernel_avx512.cpp must be compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma"
#endif
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#define GRADSTATS_CAP cap_avx512
#define GRADSTATS_TABLE_FN table_avx512
#include "stats_kernel.h"
