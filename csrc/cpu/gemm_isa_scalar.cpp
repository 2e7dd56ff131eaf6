// The portable instantiation of the GEMM tiles (any x86-64 / non-x86 CPU): plain loops
// over the packed layouts, used when the CPU has neither AVX2 nor AVX-512 or when
// Q2EXT_CPU_ISA=scalar forces it (tests cover every path against the reference).
#include "gemm_loops.h"

namespace q2ext {
namespace gemm {
namespace cpu {
namespace scalar {

void w8a8_tile(const W8A8Args& a, int64_t panel, int64_t m0, int64_t m1) {
  w8a8_tile_scalar_impl(a, panel, m0, m1);
}
void w4a16_tile(const W4A16Args& a, int64_t block, int64_t m0, int64_t m1) {
  w4a16_tile_scalar_impl(a, block, m0, m1);
}
void quantize_rows(const QuantArgs& a, int64_t m0, int64_t m1) { quantize_rows_impl(a, m0, m1); }

}  // namespace scalar
}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext
