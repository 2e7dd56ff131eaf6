// Pieces shared by the AVX-512 GEMM translation units (gemm_isa_avx512vnni.cpp,
// gemm_isa_avx512bf16.cpp).  Include it after <immintrin.h>, under the unit's
// `#pragma GCC target`; everything has internal linkage (see fake_quant_math.h on why).
#pragma once

#include <cstdint>

#include "q2ext/gemm_kernels.h"

namespace q2ext {
namespace gemm {

// Lane mask of the first min(rem, 16) columns.
static inline __mmask16 lanes(int64_t rem) {
  return rem >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << rem) - 1);
}

template <int N>
struct RowTile {
  static constexpr int kRows = N;
};

// Rows [m0, m1) of a W4A16 block as 16-row micro-kernel calls and then at most one each
// of 8, 4, 2, 1 rows: micro(RowTile<MR>{}, m) computes rows [m, m + MR).
template <typename Micro>
static inline void w4_row_tiles(int64_t m0, int64_t m1, Micro&& micro) {
  int64_t m = m0;
  for (; m + 16 <= m1; m += 16) micro(RowTile<16>{}, m);
  if (m1 - m >= 8) { micro(RowTile<8>{}, m); m += 8; }
  if (m1 - m >= 4) { micro(RowTile<4>{}, m); m += 4; }
  if (m1 - m >= 2) { micro(RowTile<2>{}, m); m += 2; }
  if (m1 - m >= 1) micro(RowTile<1>{}, m);
}

}  // namespace gemm
}  // namespace q2ext
