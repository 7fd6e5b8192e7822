// Counters of the CUDA plan cache (cuda/stats_cuda.cu), for tests and `gradstats info`.
// Plain C++: included by module.cpp, which is not compiled by nvcc.
#pragma once

#include <cstdint>

namespace gradstats {
namespace cuda {

struct PlanCounters {
  long long plans_built;      // plans made (cache misses)
  long long plans_cached;     // calls that found their plan in the cache
  long long uploads;          // pointer-table uploads (host -> device copies)
  long long uploads_skipped;  // calls whose pointers equalled the last uploaded ones
  long long ring_waits;       // uploads that had to wait for a busy pinned slot
  long long capture_uploads;  // uploads made while capturing a CUDA graph
};

PlanCounters plan_counters();

}  // namespace cuda
}  // namespace gradstats
