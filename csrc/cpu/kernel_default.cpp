// CPU kernels, default build: the baseline flags of the build (SSE2 on x86-64), always
// compiled and always safe to run. Listed before the AVX builds when linking, so that
// the inline c10 helpers every build instantiates resolve to these baseline copies.
#define CPU_CAPABILITY DEFAULT
#define GRADSTATS_CAP cap_default
#define GRADSTATS_TABLE_FN table_default
#include "stats_kernel.h"
