// Run-time choice of the CPU kernel build (DEFAULT, AVX2, AVX512; cpu/kernel_*.cpp).
//
// Rule: a kernel build that no machine of ours has run through the test suite is never
// dispatched by default. AVX512 is compiled in but has not been verified (on the first
// AVX512 host the test run died in tests/test_native.py, see capability note in
// csrc/README.md), so it is used only when GRADSTATS_CPU_CAPABILITY=avx512 asks for it.
//
// Choice, made once per process (the first op call or query):
//   GRADSTATS_CPU_CAPABILITY unset: the best *verified* build this CPU runs, capped by
//       torch's own choice (at::get_cpu_capability(), which honours ATEN_CPU_CAPABILITY);
//   GRADSTATS_CPU_CAPABILITY=avx512|avx2|default: the best build this CPU runs up to the
//       named one (an explicit request, so it may name an unverified build; other values
//       mean default).
// Tests switch builds with set_current() (gradstats._C.set_cpu_capability), which refuses a
// build that is not enabled.
#include "capability.h"

#include <atomic>
#include <cctype>
#include <cstdlib>
#include <stdexcept>

#include <ATen/Version.h>

namespace gradstats {
namespace capability {
namespace {

bool has_default() { return true; }
#if defined(GRADSTATS_HAVE_AVX2)
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("f16c");
}
#endif
#if defined(GRADSTATS_HAVE_AVX512)
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif

int rank_of(const std::string& upper_name) {
  if (upper_name == "AVX512") return 2;
  if (upper_name == "AVX2") return 1;
  return 0;
}

std::string upper(const char* s) {
  std::string out(s);
  for (auto& ch : out) ch = static_cast<char>(std::toupper(static_cast<unsigned char>(ch)));
  return out;
}

std::string lower(const char* s) {
  std::string out(s);
  for (auto& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}

// Rank requested through GRADSTATS_CPU_CAPABILITY, -1 when unset or empty.
int env_rank() {
  static const int r = [] {
    const char* env = std::getenv("GRADSTATS_CPU_CAPABILITY");
    if (env == nullptr || *env == '\0') return -1;
    return rank_of(upper(env));
  }();
  return r;
}

const Variant* choose() {
  const int req = env_rank();
  const int limit = req >= 0 ? req : rank_of(at::get_cpu_capability());
  for (const auto& v : variants()) {
    if (v.rank <= limit && v.cpu_has() && enabled(v)) return &v;
  }
  return &variants().back();
}

std::atomic<const Variant*> g_current{nullptr};

}  // namespace

const std::vector<Variant>& variants() {
  // Leaky singleton: plain data, but never destroyed so that no exit-time destructor order
  // can matter.
  static const auto* vs = new std::vector<Variant>{
#if defined(GRADSTATS_HAVE_AVX512)
      {"AVX512", 2, &cpu::table_avx512, &has_avx512, /*verified=*/false},
#endif
#if defined(GRADSTATS_HAVE_AVX2)
      {"AVX2", 1, &cpu::table_avx2, &has_avx2, /*verified=*/true},
#endif
      {"DEFAULT", 0, &cpu::table_default, &has_default, /*verified=*/true},
  };
  return *vs;
}

bool enabled(const Variant& v) { return v.verified || env_rank() >= v.rank; }

const Variant& current() {
  const Variant* c = g_current.load(std::memory_order_acquire);
  if (c == nullptr) {
    c = choose();
    const Variant* expected = nullptr;
    if (!g_current.compare_exchange_strong(expected, c, std::memory_order_acq_rel)) {
      c = expected;
    }
  }
  return *c;
}

const cpu::KernelTable* kernels() { return current().table(); }

std::string set_current(const std::string& name) {
  for (const auto& v : variants()) {
    if (name != v.name) continue;
    if (!v.cpu_has()) {
      throw std::invalid_argument(name + " is not supported by this CPU");
    }
    if (!enabled(v)) {
      throw std::invalid_argument(name + " kernels are built but opt-in until verified on a "
                                  "machine of ours: set GRADSTATS_CPU_CAPABILITY=" +
                                  lower(v.name) + " before the first use");
    }
    const std::string prev = current().name;
    g_current.store(&v, std::memory_order_release);
    return prev;
  }
  throw std::invalid_argument(name + " is not a CPU kernel build of this library");
}

std::string summary() {
  const Variant& cur = current();
  std::string runs;
  for (const auto& v : variants()) {
    if (v.cpu_has() && enabled(v)) runs += (runs.empty() ? "" : ", ") + std::string(v.name);
  }
  std::string out = std::string("CPU kernels ") + cur.name;
  if (!cur.verified) out += " (opt-in, not yet verified)";
  out += "; this CPU runs: " + runs;
  for (const auto& v : variants()) {
    if (v.verified || enabled(v)) continue;
    out += std::string("; ") + v.name + " built, opt-in until verified (GRADSTATS_CPU_CAPABILITY=" +
           lower(v.name) + (v.cpu_has() ? ")" : "; this CPU lacks it)");
  }
  return out;
}

}  // namespace capability
}  // namespace gradstats
