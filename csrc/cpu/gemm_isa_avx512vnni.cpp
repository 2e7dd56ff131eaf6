// AVX-512 (+VNNI) instantiation of the GEMM tiles: Zen 4, Ice Lake-SP, Sapphire Rapids
// and newer.  Only this translation unit is compiled for this ISA and it includes no
// torch or std headers (see numerics.h on why).
//
// W8A8 micro-kernel: 6 rows x 64 columns (24 zmm accumulators) per k-quad: four
// 64-byte loads of the packed B panel, six 4-byte broadcasts of A, 24 VPDPBUSD.  The
// B panel (K x 64 bytes) streams from L2 once per 6 rows; A rows stay in L1.  The int32
// accumulators never leave registers before the fused epilogue.
// W4A16 micro-kernel (fp32 x): up to 16 rows x 16 columns; the group scale and zero are
// applied once per group (see w4_micro), so per k-row the loop only turns 16 nibbles into
// q - 8 (widen, shift, one table permute) and FMAs them with every row's x.
#if defined(__x86_64__) || defined(__i386__)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,bmi2")
#include <immintrin.h>

#include "gemm_avx512.h"
#include "gemm_loops.h"

namespace q2ext {
namespace gemm {
namespace cpu {
namespace avx512vnni {
namespace {

inline int32_t load_i32(const uint8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return v;
}

template <bool kSigned>
inline __m512i dot4(__m512i acc, __m512i b, __m512i a) {
  // VPDPBUSD: first operand unsigned, second signed.
  return kSigned ? _mm512_dpbusd_epi32(acc, b, a) : _mm512_dpbusd_epi32(acc, a, b);
}

inline __m256i f32_to_bf16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(
      _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb), 16);
  const __mmask16 nan = _mm512_cmp_ps_mask(f, f, _CMP_UNORD_Q);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16),
                                                    _mm512_set1_epi32(0x40)));
  return _mm512_cvtepi32_epi16(r);
}

// Epilogue of one row (4 x 16 columns), accumulators passed by value so that they stay
// in registers: an accumulator array taken by reference makes GCC 12 keep a stack copy
// of every accumulator and store it on each k step.
__attribute__((noinline)) void w8a8_store_row(const W8A8Args& a, int64_t m, int64_t n0, __m512i v0, __m512i v1,
                           __m512i v2, __m512i v3) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i comp = _mm512_set1_epi32(a.a_signed ? a.a_comp[m] : 0);
  const __m512 as = _mm512_set1_ps(a.a_scale[a.a_scale_per_row ? m : 0]);
  const __m512i vs[4] = {v0, v1, v2, v3};
  for (int c = 0; c < 4; ++c) {
    const int64_t n = n0 + 16 * c;
    if (n >= a.N) break;
    const __mmask16 mk = lanes(a.N - n);
    const __m512i v = _mm512_sub_epi32(vs[c], comp);
    const int64_t off = m * a.ldc + n;
    if (a.out_kind == kOutI32) {
      _mm512_mask_storeu_epi32(static_cast<int32_t*>(a.out) + off, mk, v);
      continue;
    }
    __m512 f = _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(v), as),
                             _mm512_maskz_loadu_ps(mk, a.b_scale + n));
    if (a.bias) f = _mm512_add_ps(f, _mm512_maskz_loadu_ps(mk, a.bias + n));
    if (a.relu) f = _mm512_mask_mov_ps(f, _mm512_cmp_ps_mask(f, zero, _CMP_LT_OQ), zero);
    if (a.out_kind == kOutF32) {
      _mm512_mask_storeu_ps(static_cast<float*>(a.out) + off, mk, f);
    } else {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(a.out) + off, mk, f32_to_bf16(f));
    }
  }
}

// One k-quad for row r of the tile (named accumulators c<r>0..c<r>3, see above).
#define Q2_W8A8_ROW(r, A4)                                   \
  if constexpr (MR > r) {                                    \
    const __m512i av = _mm512_set1_epi32(A4(ar + (r) * lda)); \
    c##r##0 = dot4<kSigned>(c##r##0, b0, av);                \
    c##r##1 = dot4<kSigned>(c##r##1, b1, av);                \
    c##r##2 = dot4<kSigned>(c##r##2, b2, av);                \
    c##r##3 = dot4<kSigned>(c##r##3, b3, av);                \
  }
#define Q2_W8A8_QUAD(A4)                                                               \
  {                                                                                     \
    const __m512i b0 = _mm512_loadu_si512(bq), b1 = _mm512_loadu_si512(bq + 64);      \
    const __m512i b2 = _mm512_loadu_si512(bq + 128), b3 = _mm512_loadu_si512(bq + 192); \
    Q2_W8A8_ROW(0, A4) Q2_W8A8_ROW(1, A4) Q2_W8A8_ROW(2, A4)                           \
    Q2_W8A8_ROW(3, A4) Q2_W8A8_ROW(4, A4) Q2_W8A8_ROW(5, A4)                           \
  }
#define Q2_W8A8_STORE(r) \
  if constexpr (MR > r) w8a8_store_row(a, m + r, n0, c##r##0, c##r##1, c##r##2, c##r##3);

template <int MR, bool kSigned>
void w8a8_micro(const W8A8Args& a, const uint8_t* bp, int64_t m, int64_t n0) {
  const __m512i z = _mm512_setzero_si512();
  __m512i c00 = z, c01 = z, c02 = z, c03 = z, c10 = z, c11 = z, c12 = z, c13 = z;
  __m512i c20 = z, c21 = z, c22 = z, c23 = z, c30 = z, c31 = z, c32 = z, c33 = z;
  __m512i c40 = z, c41 = z, c42 = z, c43 = z, c50 = z, c51 = z, c52 = z, c53 = z;
  // The driver guarantees 4 * kq readable bytes per A row (bytes past K meet zero B
  // padding), so there is no tail quad: a second copy of the loop body makes GCC 12
  // spill the accumulators in the main loop.
  const int64_t lda = a.lda, kq = a.kq;
  const uint8_t* ar = a.a + m * lda;
  const uint8_t* bq = bp;
  for (int64_t q = 0; q < kq; ++q, ar += 4, bq += kNB8 * 4) {
    Q2_W8A8_QUAD(load_i32)
  }
  Q2_W8A8_STORE(0) Q2_W8A8_STORE(1) Q2_W8A8_STORE(2)
  Q2_W8A8_STORE(3) Q2_W8A8_STORE(4) Q2_W8A8_STORE(5)
}
#undef Q2_W8A8_ROW
#undef Q2_W8A8_QUAD
#undef Q2_W8A8_STORE

template <bool kSigned>
void w8a8_rows(const W8A8Args& a, const uint8_t* bp, int64_t n0, int64_t m0, int64_t m1) {
  int64_t m = m0;
  for (; m + 6 <= m1; m += 6) w8a8_micro<6, kSigned>(a, bp, m, n0);
  switch (m1 - m) {
    case 5: w8a8_micro<5, kSigned>(a, bp, m, n0); break;
    case 4: w8a8_micro<4, kSigned>(a, bp, m, n0); break;
    case 3: w8a8_micro<3, kSigned>(a, bp, m, n0); break;
    case 2: w8a8_micro<2, kSigned>(a, bp, m, n0); break;
    case 1: w8a8_micro<1, kSigned>(a, bp, m, n0); break;
    default: break;
  }
}

// float(i - 8) at index i.  VPERMPS reads only the low 4 bits of each index, so a lane
// holding a whole packed byte selects its low nibble's code without masking.
alignas(64) constexpr float kCodes[16] = {-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7};

// q - 8 of the 16 columns of k-row `row` (8 packed bytes) in column order: the bytes are
// widened twice (lanes j and j + 8 both hold byte j), the upper copy shifted right by 4.
inline __m512 w4_codes(const uint8_t* row, __m512i shifts, __m512 codes) {
  int64_t v;
  __builtin_memcpy(&v, row, 8);
  const __m512i d = _mm512_cvtepu8_epi32(_mm_set1_epi64x(v));
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(d, shifts), codes);
}

// MR rows x 16 columns with the group constants factored out: the k loop only turns
// nibbles into q - 8 and FMAs them with x.
template <int MR>
void w4_micro(const W4A16Args& a, const uint8_t* wb, int64_t m, int64_t n0, __mmask16 mk) {
  constexpr int NA = w4_chains(MR);
  const __m512 codes = _mm512_load_ps(kCodes);
  const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4);
  const int64_t M = a.M;
  w4_factored_rows<MR, 4>(a, m, n0, mk, [&](int64_t k, __m512* acc) {
#pragma GCC unroll 4
    for (int p = 0; p < 4; ++p) {
      const __m512 w = w4_codes(wb + (k + p) * 8, shifts, codes);
      const float* xk = a.x + w4_x_index(M, m, k + p);
#pragma GCC unroll 16
      for (int r = 0; r < MR; ++r)
        acc[r * NA + p % NA] = _mm512_fmadd_ps(_mm512_set1_ps(xk[2 * r]), w, acc[r * NA + p % NA]);
    }
  });
}

}  // namespace

void w8a8_tile(const W8A8Args& a, int64_t panel, int64_t m0, int64_t m1) {
  const uint8_t* bp = a.b_panels + panel * a.kq * kNB8 * 4;
  if (a.a_signed) {
    w8a8_rows<true>(a, bp, panel * kNB8, m0, m1);
  } else {
    w8a8_rows<false>(a, bp, panel * kNB8, m0, m1);
  }
}

void w4a16_tile(const W4A16Args& a, int64_t block, int64_t m0, int64_t m1) {
  const uint8_t* wb = a.w + block * a.K * 8;
  const int64_t n0 = block * kNB4;
  const __mmask16 mk = lanes(a.N - n0);
  w4_row_tiles<16>(m0, m1, [&](auto t, int64_t m) { w4_micro<decltype(t)::kRows>(a, wb, m, n0, mk); });
}

bool w4a16_group_sums(const float* x, int64_t K, int64_t group_size, int64_t row0,
                      int64_t row1, float* xsum) {
  const int64_t G = K / group_size;
  const __m512i exp_mask = _mm512_set1_epi32(0x7F800000);
  __mmask16 non_finite = 0;
  for (int64_t m = row0; m < row1; ++m)
    for (int64_t g = 0; g < G; ++g) {
      const float* xg = x + m * K + g * group_size;
      __m512 s = _mm512_setzero_ps();
      for (int64_t k = 0; k < group_size; k += 16) {
        const __m512 v = _mm512_loadu_ps(xg + k);
        const __m512i e = _mm512_and_si512(_mm512_castps_si512(v), exp_mask);
        non_finite |= _mm512_cmpeq_epi32_mask(e, exp_mask);
        s = _mm512_add_ps(s, v);
      }
      xsum[m * G + g] = _mm512_reduce_add_ps(s);
    }
  return non_finite == 0;
}

void quantize_rows(const QuantArgs& a, int64_t m0, int64_t m1) { quantize_rows_impl(a, m0, m1); }

}  // namespace avx512vnni
}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext
#endif
