// ISA-independent pieces of the CPU GEMM kernels: activation quantisation, the scalar
// epilogue and the scalar W8A8/W4A16 tiles.  Compiled into every ISA translation unit
// (gemm_isa_*.cpp) under that unit's `#pragma GCC target`, so the loops vectorise for
// it; everything has internal linkage for the reason given in numerics.h.
// Numerics are those of q2ext/reference/gemm.py.
#pragma once

#include <cstdint>

#include "q2ext/fake_quant_math.h"
#include "gemm_kernels.h"
#include "q2ext/gemm_math.h"

namespace q2ext {
namespace gemm {
namespace cpu {

// Quantise rows [m0, m1) of x to bytes: q = clamp(round_half_even(x * (1 / s)), qmin,
// qmax), NaN -> 0; dynamic (no scale given): s = max|x_row| / qmax per row.  Also writes
// 128 * sum_k q (the VNNI compensation of a signed A) when comp is set.
struct QuantArgs {
  const void* x;  // [M, ldx] fp32 or bf16
  bool x_bf16;
  int64_t ldx, K;
  const float* scale;   // [1] or [M]; nullptr = dynamic
  bool per_row;
  float qmin, qmax;
  uint8_t* q;           // [M, ldq]
  int64_t ldq;
  int32_t* comp;        // [M] or nullptr
  float* scale_out;     // [M] (dynamic or per-row) or [1]
};

template <typename T>
static inline void quantize_row(const T* __restrict x, int64_t K, float s, float qmin,
                                float qmax, uint8_t* __restrict q, int32_t* comp) {
  const float inv = quant_inv(s);
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    const int32_t iv = quant_code(to_f32(x[k]), inv, qmin, qmax);
    sum += iv;
    q[k] = static_cast<uint8_t>(iv);
  }
  if (comp) *comp = 128 * sum;
}

template <typename T>
static inline float row_absmax(const T* __restrict x, int64_t K) {
  float m = 0.0f;
  for (int64_t k = 0; k < K; ++k) m = absmax_step(m, to_f32(x[k]));
  return m;
}

template <typename T>
static inline void quantize_rows_t(const QuantArgs& a, int64_t m0, int64_t m1) {
  for (int64_t m = m0; m < m1; ++m) {
    const T* xr = static_cast<const T*>(a.x) + m * a.ldx;
    float s;
    if (a.scale == nullptr) {
      s = dynamic_scale(row_absmax(xr, a.K), a.qmax);
      a.scale_out[m] = s;
    } else {
      s = sanitize_scale(a.scale[a.per_row ? m : 0]);
      if (a.per_row || m == 0) a.scale_out[a.per_row ? m : 0] = s;
    }
    quantize_row(xr, a.K, s, a.qmin, a.qmax, a.q + m * a.ldq, a.comp ? a.comp + m : nullptr);
  }
}

static inline void quantize_rows_impl(const QuantArgs& a, int64_t m0, int64_t m1) {
  if (a.x_bf16) {
    quantize_rows_t<bf16_t>(a, m0, m1);
  } else {
    quantize_rows_t<float>(a, m0, m1);
  }
}

// Epilogue of one output (gemm_math.h), matching the reference and the vector epilogues.
static inline void w8a8_store(const W8A8Args& a, int64_t m, int64_t n, int32_t acc) {
  if (a.a_signed) acc -= a.a_comp[m];
  if (a.out_kind == kOutI32) {
    static_cast<int32_t*>(a.out)[m * a.ldc + n] = acc;
    return;
  }
  const float y = w8a8_epilogue(acc, a.a_scale[a.a_scale_per_row ? m : 0], a.b_scale[n],
                                a.bias != nullptr, a.bias ? a.bias[n] : 0.0f, a.relu);
  if (a.out_kind == kOutF32) {
    static_cast<float*>(a.out)[m * a.ldc + n] = y;
  } else {
    from_f32(y, static_cast<bf16_t*>(a.out) + m * a.ldc + n);
  }
}

static inline void w8a8_tile_scalar_impl(const W8A8Args& a, int64_t panel, int64_t m0,
                                         int64_t m1) {
  const uint8_t* bp = a.b_panels + panel * a.kq * kNB8 * 4;
  const int64_t n0 = panel * kNB8;
  const int64_t width = a.N - n0 < kNB8 ? a.N - n0 : kNB8;
  for (int64_t m = m0; m < m1; ++m) {
    const uint8_t* ar = a.a + m * a.lda;
    for (int64_t j = 0; j < width; ++j) {
      int32_t acc = 0;
      for (int64_t k = 0; k < a.K; ++k) {
        const uint8_t bb = bp[((k >> 2) * kNB8 + j) * 4 + (k & 3)];
        // Signed A: A signed, B stored unsigned; unsigned A: the other way round.
        const int32_t av = a.a_signed ? static_cast<int8_t>(ar[k]) : ar[k];
        const int32_t bv = a.a_signed ? static_cast<int32_t>(bb) : static_cast<int8_t>(bb);
        acc += av * bv;
      }
      w8a8_store(a, m, n0 + j, acc);
    }
  }
}

// Scales and shifted zeros of 16 columns of one group: w = q * s + (zero - 8 * s).
static inline void w4_group_consts(const W4A16Args& a, int64_t g, int64_t n0, int64_t width,
                                   float* s, float* z) {
  for (int64_t j = 0; j < kNB4; ++j) {
    const bool ok = j < width;
    s[j] = ok ? a.scales[g * a.N + n0 + j] : 0.0f;
    z[j] = ok ? w4_shifted_zero(s[j], a.zeros[g * a.N + n0 + j]) : 0.0f;
  }
}

static inline void w4a16_tile_scalar_impl(const W4A16Args& a, int64_t block, int64_t m0,
                                          int64_t m1) {
  const uint8_t* wb = a.w + block * a.K * 8;
  const int64_t n0 = block * kNB4;
  const int64_t width = a.N - n0 < kNB4 ? a.N - n0 : kNB4;
  float acc[kNB4];
  float s[kNB4], z[kNB4], w[kNB4];
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t j = 0; j < kNB4; ++j) acc[j] = 0.0f;
    for (int64_t k = 0; k < a.K; ++k) {
      if (k % a.group_size == 0) w4_group_consts(a, k / a.group_size, n0, width, s, z);
      const uint8_t* row = wb + k * 8;
      for (int64_t j = 0; j < 8; ++j) {
        w[j] = w4_dequant(w4_lo(row[j]), s[j], z[j]);
        w[j + 8] = w4_dequant(w4_hi(row[j]), s[j + 8], z[j + 8]);
      }
      const float xk = a.x[w4_x_index(a.M, m, k)];
      for (int64_t j = 0; j < kNB4; ++j) acc[j] = q2_add(acc[j], q2_mul(xk, w[j]));
    }
    for (int64_t j = 0; j < width; ++j) a.out[m * a.N + n0 + j] = acc[j];
  }
}

}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext

#define Q2EXT_DECLARE_QUANT_ENTRY_POINT(ns)                                           \
  namespace q2ext {                                                                   \
  namespace gemm {                                                                    \
  namespace cpu {                                                                      \
  namespace ns {                                                                      \
  void quantize_rows(const QuantArgs& a, int64_t m0, int64_t m1);                     \
  }                                                                                   \
  }                                                                                   \
  }                                                                                   \
  }
