#include "q2ext/cpu_isa.h"

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdlib>

namespace q2ext {
namespace {

CpuIsa parse_isa(const std::string& name) {
  if (name == "auto" || name.empty()) return best_cpu_isa();
  if (name == "avx512") return CpuIsa::kAvx512;
  if (name == "avx2") return CpuIsa::kAvx2;
  if (name == "scalar") return CpuIsa::kScalar;
  TORCH_CHECK(false, "q2ext: unknown CPU ISA '", name,
              "' (Q2EXT_CPU_ISA / set_cpu_isa take auto, avx512, avx2 or scalar)");
}

CpuIsa capped(CpuIsa want) {
  CpuIsa best = best_cpu_isa();
  TORCH_CHECK(static_cast<int>(want) <= static_cast<int>(best), "q2ext: CPU ISA '",
              cpu_isa_name(want), "' requested but this CPU only supports '",
              cpu_isa_name(best), "'");
  return want;
}

std::atomic<int>& active_slot() {
  static std::atomic<int> slot([] {
    const char* env = std::getenv("Q2EXT_CPU_ISA");
    return static_cast<int>(capped(parse_isa(env ? env : "auto")));
  }());
  return slot;
}

}  // namespace

CpuIsa best_cpu_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const CpuIsa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return CpuIsa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("bmi2"))
      return CpuIsa::kAvx2;
    return CpuIsa::kScalar;
  }();
  return best;
#else
  return CpuIsa::kScalar;
#endif
}

CpuIsa active_cpu_isa() { return static_cast<CpuIsa>(active_slot().load()); }

void set_cpu_isa(const std::string& name) {
  active_slot().store(static_cast<int>(capped(parse_isa(name))));
}

std::string cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace q2ext
