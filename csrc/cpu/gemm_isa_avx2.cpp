// AVX2 instantiation of the GEMM tiles (Haswell .. Alder Lake, Zen 1-3): no VNNI, so the
// W8A8 tile widens bytes to int16 and uses VPMADDWD (exact: each pair sum <= 65280),
// keeping two int32 partial sums per column that one VPHADDD folds at the end.  W4A16
// dequantises 8 nibbles per ymm in registers.  Own translation unit, no torch or std
// headers (see numerics.h).
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx2,fma,bmi2")
#include <immintrin.h>

#include "gemm_loops.h"

namespace q2ext {
namespace gemm {
namespace cpu {
namespace avx2 {
namespace {

inline int32_t load_a4(const uint8_t* p, int64_t n) {
  if (n >= 4) {
    int32_t v;
    __builtin_memcpy(&v, p, 4);
    return v;
  }
  uint32_t v = 0;
  for (int64_t i = 0; i < n; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return static_cast<int32_t>(v);
}

template <bool kSigned>
inline __m256i widen_a(int32_t a4) {
  const __m128i v = _mm_cvtsi32_si128(a4);
  const __m128i w = kSigned ? _mm_cvtepi8_epi16(v) : _mm_cvtepu8_epi16(v);
  return _mm256_broadcastq_epi64(w);  // a0..a3 repeated for every column
}

template <bool kSigned>
inline __m256i widen_b(const uint8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return kSigned ? _mm256_cvtepu8_epi16(v) : _mm256_cvtepi8_epi16(v);
}

// Rows [m, m+MR) x columns [n0 + 8*jg, +8) of one panel.
template <int MR, bool kSigned>
void w8a8_micro(const W8A8Args& a, const uint8_t* bp, int64_t m, int64_t n0, int64_t jg) {
  __m256i acc[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_si256();
  for (int64_t q = 0; q < a.kq; ++q) {
    const uint8_t* bq = bp + (q * kNB8 + jg * 8) * 4;
    const __m256i b0 = widen_b<kSigned>(bq), b1 = widen_b<kSigned>(bq + 16);
    const int64_t avail = a.K - 4 * q;
#pragma GCC unroll 4
    for (int r = 0; r < MR; ++r) {
      const __m256i av = widen_a<kSigned>(load_a4(a.a + (m + r) * a.lda + 4 * q, avail));
      acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(b0, av));
      acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(b1, av));
    }
  }
  const int64_t n = n0 + jg * 8;
  const int64_t width = a.N - n < 8 ? a.N - n : 8;
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    // hadd gives columns (0,1,4,5 | 2,3,6,7); the 64-bit permute restores 0..7.
    const __m256i sums =
        _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[r][0], acc[r][1]), 0xD8);
    int32_t out[8];
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), sums);
    for (int64_t j = 0; j < width; ++j) w8a8_store(a, m + r, n + j, out[j]);
  }
}

template <bool kSigned>
void w8a8_panel(const W8A8Args& a, const uint8_t* bp, int64_t n0, int64_t m0, int64_t m1) {
  for (int64_t jg = 0; jg < kNB8 / 8 && n0 + jg * 8 < a.N; ++jg) {
    int64_t m = m0;
    for (; m + 4 <= m1; m += 4) w8a8_micro<4, kSigned>(a, bp, m, n0, jg);
    for (; m < m1; ++m) w8a8_micro<1, kSigned>(a, bp, m, n0, jg);
  }
}

template <int MR>
void w4_micro(const W4A16Args& a, const uint8_t* wb, int64_t m, int64_t n0, int64_t width) {
  __m256 acc[MR][2];
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  const __m128i nib = _mm_set1_epi8(0x0F);
  float s[kNB4], z[kNB4];
  for (int64_t g = 0; g < a.K / a.group_size; ++g) {
    w4_group_consts(a, g, n0, width, s, z);
    const __m256 s0 = _mm256_loadu_ps(s), s1 = _mm256_loadu_ps(s + 8);
    const __m256 z0 = _mm256_loadu_ps(z), z1 = _mm256_loadu_ps(z + 8);
    for (int64_t k = g * a.group_size; k < (g + 1) * a.group_size; ++k) {
      const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(wb + k * 8));
      const __m128i lo = _mm_and_si128(v, nib);
      const __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), nib);
      const __m256 w0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), s0, z0);
      const __m256 w1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), s1, z1);
#pragma GCC unroll 4
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_set1_ps(a.x[w4_x_index(a.M, m + r, k)]);
        acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
      }
    }
  }
#pragma GCC unroll 4
  for (int r = 0; r < MR; ++r) {
    float out[kNB4];
    _mm256_storeu_ps(out, acc[r][0]);
    _mm256_storeu_ps(out + 8, acc[r][1]);
    for (int64_t j = 0; j < width; ++j) a.out[(m + r) * a.N + n0 + j] = out[j];
  }
}

}  // namespace

void w8a8_tile(const W8A8Args& a, int64_t panel, int64_t m0, int64_t m1) {
  const uint8_t* bp = a.b_panels + panel * a.kq * kNB8 * 4;
  if (a.a_signed) {
    w8a8_panel<true>(a, bp, panel * kNB8, m0, m1);
  } else {
    w8a8_panel<false>(a, bp, panel * kNB8, m0, m1);
  }
}

void w4a16_tile(const W4A16Args& a, int64_t block, int64_t m0, int64_t m1) {
  const uint8_t* wb = a.w + block * a.K * 8;
  const int64_t n0 = block * kNB4;
  const int64_t width = a.N - n0 < kNB4 ? a.N - n0 : kNB4;
  int64_t m = m0;
  for (; m + 4 <= m1; m += 4) w4_micro<4>(a, wb, m, n0, width);
  for (; m < m1; ++m) w4_micro<1>(a, wb, m, n0, width);
}

void quantize_rows(const QuantArgs& a, int64_t m0, int64_t m1) { quantize_rows_impl(a, m0, m1); }

}  // namespace avx2
}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext
#endif
