// Pieces shared by the AVX-512 GEMM translation units (gemm_isa_avx512vnni.cpp,
// gemm_isa_avx512bf16.cpp).  Include it after <immintrin.h>, under the unit's
// `#pragma GCC target`; everything has internal linkage (see numerics.h on why).
#pragma once

#include <cstdint>

#include "gemm_kernels.h"

namespace q2ext {
namespace gemm {
namespace cpu {

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

// Accumulators per row of the factored W4A16 tiles: enough independent multiply-add
// chains in flight (their latency is several cycles) when the tile has few rows.
constexpr int w4_chains(int MR) { return MR == 1 ? 4 : (MR == 2 ? 2 : 1); }

// The group loop of the W4A16 tiles that factor the group constants out (gemm_kernels.h)
// for rows [m, m + MR) of the 16 columns from n0: per group, step(k, acc) adds k-rows
// [k, k + kStep) of x * (q - 8) into acc[r * w4_chains(MR) + i]; the chains of row r are
// then summed and y = s * dot + z * xsum[m + r, g] is added to the output row, which
// holds the running sum across groups (it stays in L1).
template <int MR, int kStep, typename Step>
__attribute__((always_inline)) static inline void w4_factored_rows(
    const W4A16Args& a, int64_t m, int64_t n0, __mmask16 mk, Step&& step) {
  constexpr int NA = w4_chains(MR);
  const int64_t G = a.K / a.group_size;
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[MR * NA];
#pragma GCC unroll 16
    for (int i = 0; i < MR * NA; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; k += kStep) step(k, acc);
    const __m512 s = _mm512_maskz_loadu_ps(mk, a.scales + g * a.N + n0);
    const __m512 z = _mm512_maskz_loadu_ps(mk, a.zeros + g * a.N + n0);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      __m512 dot = acc[r * NA];
#pragma GCC unroll 4
      for (int i = 1; i < NA; ++i) dot = _mm512_add_ps(dot, acc[r * NA + i]);
      float* y = a.out + (m + r) * a.N + n0;
      __m512 t = g == 0 ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mk, y);
      t = _mm512_fmadd_ps(s, dot, t);
      t = _mm512_fmadd_ps(z, _mm512_set1_ps(a.xsum[(m + r) * G + g]), t);
      _mm512_mask_storeu_ps(y, mk, t);
    }
  }
}

}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext
