// CPU kernels, default build: the baseline flags of the build (SSE2 on x86-64), always
// compiled and always safe to run. Listed before the AVX builds when linking, so that
// the inline c10 helpers every build instantiates resolve to these baseline copies.
#define CPU_CAPABILITY DEFAULT
#if defined(__x86_64__) || defined(_M_X64)
// at::vec has no SSE specialisation: plain lane loops vectorise better (stats_kernel.h).
#define GRADSTATS_PLAIN_LOOPS
#endif
#define GRADSTATS_CAP cap_default
#define GRADSTATS_TABLE_FN table_default
#include "stats_kernel.h"
