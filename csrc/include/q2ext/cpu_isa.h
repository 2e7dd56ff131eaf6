// Run-time choice of the CPU code path.  The wheel is built without -march=native;
// the AVX-512 and AVX2 loops are separate translation units and this picks one per
// call from what the CPU reports, capped by Q2EXT_CPU_ISA=avx512|avx2|scalar (read at
// first use) or by set_cpu_isa() from Python, so tests can cover every path.
#pragma once

#include <string>

namespace q2ext {

enum class CpuIsa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

CpuIsa best_cpu_isa();        // what this CPU supports
CpuIsa active_cpu_isa();      // what the kernels use now
void set_cpu_isa(const std::string& name);  // "auto", "avx512", "avx2" or "scalar"
std::string cpu_isa_name(CpuIsa isa);

}  // namespace q2ext
