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

// Rows [m0, m1) of a W4A16 block as kMax-row micro-kernel calls and then at most one each
// of the smaller powers of two: micro(RowTile<MR>{}, m) computes rows [m, m + MR).
template <int kMax, typename Micro>
static inline void w4_row_tiles(int64_t m0, int64_t m1, Micro&& micro) {
  int64_t m = m0;
  for (; m + kMax <= m1; m += kMax) micro(RowTile<kMax>{}, m);
  if constexpr (kMax > 8) if (m1 - m >= 8) { micro(RowTile<8>{}, m); m += 8; }
  if constexpr (kMax > 4) if (m1 - m >= 4) { micro(RowTile<4>{}, m); m += 4; }
  if constexpr (kMax > 2) if (m1 - m >= 2) { micro(RowTile<2>{}, m); m += 2; }
  if (m1 - m >= 1) micro(RowTile<1>{}, m);
}

// Adds group g of row m to the output (the tiles with factored group constants):
// y = s * dot + z * xsum[m, g], where dot = sum_{k in g} x[m, k] * (q - 8) per column.
// The output row is the running sum across groups; it stays in L1.
static inline void w4_add_group(const W4A16Args& a, int64_t g, int64_t m, int64_t n0,
                                __mmask16 mk, __m512 s, __m512 z, __m512 dot) {
  float* y = a.out + m * a.N + n0;
  __m512 t = g == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk, y);
  t = _mm512_fmadd_ps(s, dot, t);
  t = _mm512_fmadd_ps(z, _mm512_set1_ps(a.xsum[m * (a.K / a.group_size) + g]), t);
  _mm512_mask_storeu_ps(y, mk, t);
}

}  // namespace gemm
}  // namespace q2ext
