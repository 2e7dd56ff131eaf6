// AVX512-BF16 (+VBMI) W4A16 tile for bfloat16 activations: Zen 4, Sapphire Rapids and
// newer (Cooper Lake has BF16 but not VBMI, so it keeps the fp32 tile).  Only this
// translation unit is compiled for this ISA and it includes no torch or std headers (see
// numerics.h on why).
//
// The group scale and zero are factored out of the inner loop (gemm_kernels.h), so the
// inner product only needs the integer codes q - 8, which bf16 holds exactly.  VDPBF16PS then does 32 bf16 multiply-adds per instruction: lane j is
// output column j, its pair holds two consecutive k.  Per 64-byte load (8 k-rows of the
// 16-column block): one shift exposes the high nibbles, then per two k-pairs one
// two-source byte permute (VPERMT2B) gathers the nibbles into the bytes of 32 words, and
// per k-pair one word permute (VPERMW) maps them to bf16(q - 8) through a 32-entry table
// (its index is the low 5 bits, so bit 4, a neighbouring nibble's bit, is absorbed by
// repeating the 16 values).  No cancellation: the products x * (q - 8) are exact in fp32.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512bf16,avx2,fma,bmi2")
#include <immintrin.h>

#include "gemm_avx512.h"

namespace q2ext {
namespace gemm {
namespace cpu {
namespace avx512bf16 {
namespace {

// VPERMT2B indices for two k-pairs at once: the low byte of word 2j + e serves k-pair 2c,
// the high byte k-pair 2c + 1, so one byte permute feeds two VPERMW (the second after a
// 16-bit shift, an ALU op: the permutes are the bottleneck at M = 1).  For k-pair p, word
// 2j + e takes byte j % 8 of k-row 2p + e of the load (columns 0..7, low nibbles) or of
// the load shifted right by 4 (index bit 6: columns 8..15, high nibbles).
struct PairIdx {
  uint8_t b[2][64];
};
constexpr PairIdx make_pair_idx() {
  PairIdx t{};
  for (int p = 0; p < 4; ++p)
    for (int j = 0; j < 16; ++j)
      for (int e = 0; e < 2; ++e)
        t.b[p / 2][2 * (2 * j + e) + p % 2] =
            static_cast<uint8_t>((j < 8 ? 0 : 64) + 8 * (2 * p + e) + (j & 7));
  return t;
}
alignas(64) constexpr PairIdx kPairIdx = make_pair_idx();

struct CodeTable {
  uint16_t w[32];
};
constexpr CodeTable make_code_table() {
  CodeTable t{};
  for (int i = 0; i < 32; ++i)
    t.w[i] = static_cast<uint16_t>(
        __builtin_bit_cast(uint32_t, static_cast<float>((i & 15) - 8)) >> 16);
  return t;
}
alignas(64) constexpr CodeTable kCodeTable = make_code_table();

// MR rows x 16 columns, one 64-byte load (8 k-rows) per step.
template <int MR>
void w4bf_micro(const W4A16Args& a, const uint8_t* wb, int64_t m, int64_t n0, __mmask16 mk) {
  constexpr int NA = w4_chains(MR);
  const __m512i idx0 = _mm512_load_si512(kPairIdx.b[0]);
  const __m512i idx1 = _mm512_load_si512(kPairIdx.b[1]);
  const __m512i table = _mm512_load_si512(kCodeTable.w);
  const int64_t M = a.M;
  const int32_t* xr = a.xpairs + m;
  w4_factored_rows<MR, 8>(a, m, n0, mk, [&](int64_t k, __m512* acc) {
    const __m512i v = _mm512_loadu_si512(wb + k * 8);
    const __m512i hi = _mm512_srli_epi16(v, 4);
    const __m512i two[2] = {_mm512_permutex2var_epi8(v, idx0, hi),
                            _mm512_permutex2var_epi8(v, idx1, hi)};
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512i t = p % 2 ? _mm512_srli_epi16(two[p / 2], 8) : two[p / 2];
      const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(t, table);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r) {
        const __m512bh xp = (__m512bh)_mm512_set1_epi32(xr[(k / 2 + p) * M + r]);
        acc[r * NA + p % NA] = _mm512_dpbf16_ps(acc[r * NA + p % NA], w, xp);
      }
    }
  });
}

}  // namespace

void w4a16_tile(const W4A16Args& a, int64_t block, int64_t m0, int64_t m1) {
  const uint8_t* wb = a.w + block * a.K * 8;
  const int64_t n0 = block * kNB4;
  const __mmask16 mk = lanes(a.N - n0);
  w4_row_tiles<16>(m0, m1, [&](auto t, int64_t m) { w4bf_micro<decltype(t)::kRows>(a, wb, m, n0, mk); });
}

bool w4a16_prepare_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t group_size,
                        int64_t row0, int64_t row1, float* xsum, int32_t* xpairs) {
  // VDPBF16PS treats subnormal inputs as zero and flushes subnormal results.  With every
  // nonzero |x| >= 2^-96 neither can happen (partial sums of x * (q - 8) are multiples of
  // 2^-103, far above FLT_MIN), so only then is the tile exact up to fp32 rounding.
  // Non-finite x is refused as well (see w4a16_group_sums).
  const __m512i mag_mask = _mm512_set1_epi32(0x7FFF);
  const __m512i min_normal = _mm512_set1_epi32(31 << 7);  // bf16 bits of 2^-96
  const __m512i inf_bits = _mm512_set1_epi32(0x7F80);
  __mmask16 tiny = 0, non_finite = 0;
  const int64_t G = K / group_size;
  // The pairs (k, k + 1) of all rows are interleaved so that the tile reads one line per
  // k-pair (rows K * 2 bytes apart share L1 sets and evict each other).  16 rows at a
  // time per group, so that their pairs fill the same group_size / 2 lines.
  for (int64_t m0 = row0; m0 < row1; m0 += 16) {
    const int64_t m1 = m0 + 16 < row1 ? m0 + 16 : row1;
    for (int64_t g = 0; g < G; ++g) {
      for (int64_t m = m0; m < m1; ++m) {
        const uint16_t* xm = x + m * K;
        __m512 s = _mm512_setzero_ps();
        for (int64_t k = g * group_size; k < (g + 1) * group_size; k += 16) {
          const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xm + k));
          const __m512i b = _mm512_cvtepu16_epi32(raw);
          const __m512i mag = _mm512_and_si512(b, mag_mask);
          tiny |= _mm512_mask_cmplt_epi32_mask(_mm512_test_epi32_mask(mag, mag), mag, min_normal);
          non_finite |= _mm512_cmpge_epi32_mask(mag, inf_bits);
          s = _mm512_add_ps(s, _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
          alignas(32) int32_t pairs[8];
          _mm256_store_si256(reinterpret_cast<__m256i*>(pairs), raw);
          for (int i = 0; i < 8; ++i) xpairs[(k / 2 + i) * M + m] = pairs[i];
        }
        xsum[m * G + g] = _mm512_reduce_add_ps(s);
      }
    }
  }
  return (tiny | non_finite) == 0;
}

}  // namespace avx512bf16
}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext
#endif
