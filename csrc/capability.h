// Run-time choice of the CPU kernel build (capability.cpp).
#pragma once

#include <string>
#include <vector>

#include "gradstats_common.h"

namespace gradstats {
namespace capability {

// One CPU kernel build compiled into this library.
struct Variant {
  const char* name;                      // "AVX512", "AVX2", "DEFAULT"
  int rank;                              // 2, 1, 0
  const cpu::KernelTable* (*table)();    // its kernels
  bool (*cpu_has)();                     // does this CPU run it
  bool verified;                         // has it passed the test suite on a machine of ours
};

// Every build compiled in, best first (the last is DEFAULT).
const std::vector<Variant>& variants();

// Whether a build may be dispatched: verified, or explicitly requested through
// GRADSTATS_CPU_CAPABILITY (read once per process).
bool enabled(const Variant& v);

// The build in use (chosen on first use; see capability.cpp for the rule).
const Variant& current();

// The kernels of the build in use.
const cpu::KernelTable* kernels();

// Use build `name` (must be compiled in, run on this CPU and be enabled). Returns the
// previous build's name; throws std::invalid_argument with the reason otherwise.
std::string set_current(const std::string& name);

// One line: the build in use, the builds this CPU runs, and any build that is compiled in
// but only available on request.
std::string summary();

}  // namespace capability
}  // namespace gradstats
