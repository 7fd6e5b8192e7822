// CPU kernels, default build: the baseline flags of the build (SSE2 on x86-64), always
// compiled and always safe to run. Like the other builds it is compiled with -fno-weak
// (setup.py), so the inline torch/c10 helpers it uses are private copies of this object:
// no link order can swap them for the AVX2/AVX512-compiled copies of the other builds
// (see the note at the top of stats_kernel.h).
#define CPU_CAPABILITY DEFAULT
#if defined(__x86_64__) || defined(_M_X64)
// at::vec has no SSE specialisation: plain lane loops vectorise better (stats_kernel.h).
#define GRADSTATS_PLAIN_LOOPS
#endif
#define GRADSTATS_CAP cap_default
#define GRADSTATS_TABLE_FN table_default
#include "stats_kernel.h"
