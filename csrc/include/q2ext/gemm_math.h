// Per-element math of the int8/int4 GEMM ops, shared by the CPU kernels (gemm_loops.h,
// every ISA path) and the CUDA kernels (csrc/cuda/gemm_*.cu), so that the CPU tests run
// the arithmetic the GPU runs.  Semantics: q2ext/reference/gemm.py.
//
// Same rules as numerics.h (whose Q2_HD helpers this builds on): no torch or std
// headers, internal linkage, and every product/sum rounded separately (q2_mul/q2_add are
// __fmul_rn/__fadd_rn on the device, so nvcc cannot contract them into an FMA that the
// reference does not do).  The vectorised CPU epilogues (AVX-512) implement the same
// formulas lane-wise and are checked bit for bit against these by the CPU tests.
#pragma once

#include <cstdint>

#include "q2ext/numerics.h"

namespace q2ext {
namespace gemm {

// ---- packed weight layouts (pack_int8_weight, pack_int4) --------------------------------
// W8A8: B [N, K] int8 in panels of kNB8 output columns in the VNNI order: panel p, k-quad
// q, column j holds bytes B[p*kNB8 + j, 4q .. 4q+3] (zero past N or K), as [ceil(N/kNB8),
// ceil(K/4), kNB8, 4] bytes.
constexpr int64_t kNB8 = 64;
// W4A16: blocks of kNB4 output columns; block b, row k holds 8 bytes, byte j =
// q[16b + j, k] | q[16b + 8 + j, k] << 4 (one 8-byte load dequantises into 16 lanes in
// column order).  w[n, k] = (q - 8) * scales[k / g, n] + zeros[k / g, n].
constexpr int64_t kNB4 = 16;

// Output kinds of the W8A8 epilogue.
enum OutKind : int { kOutF32 = 0, kOutBF16 = 1, kOutI32 = 2 };

// ---- activation quantisation ----------------------------------------------------------

// One step of the row |x| maximum: NaN never wins (the comparison is false), inf stays.
Q2_HD float absmax_step(float m, float x) {
  const float v = x < 0.0f ? -x : x;
  return v > m ? v : m;
}

// Dynamic per-row scale from the row's |x| maximum: max|x| * (1 / quant_max), sanitised.
Q2_HD float dynamic_scale(float absmax, float qmax) {
  return sanitize_scale(q2_mul(absmax, 1.0f / qmax));
}

// The multiplier applied to x: 1 / s, correctly rounded on both sides (IEEE division on
// the host; nvcc's default -prec-div=true on the device).
Q2_HD float quant_inv(float s) { return 1.0f / s; }

// Integer code of one element: round_half_even(clamp(x * inv, qmin, qmax)), NaN -> 0.
// qmin/qmax are integers, so clamping before rounding equals clamping after.
Q2_HD int32_t quant_code(float x, float inv, float qmin, float qmax) {
  float v = q2_mul(x, inv);
  v = v == v ? v : 0.0f;
  v = v < qmin ? qmin : (v > qmax ? qmax : v);
  return static_cast<int32_t>(round_half_even(v));
}

// ---- W8A8 epilogue --------------------------------------------------------------------

// y = ((acc * a_scale) * b_scale) + bias, then ReLU; each operation rounded on its own.
// Without a bias nothing is added (adding +0 would turn a -0 into +0, unlike the reference).
Q2_HD float w8a8_epilogue(int32_t acc, float a_scale, float b_scale, bool has_bias, float bias,
                          bool relu) {
  float y = q2_mul(q2_mul(static_cast<float>(acc), a_scale), b_scale);
  if (has_bias) y = q2_add(y, bias);
  if (relu) y = y < 0.0f ? 0.0f : y;
  return y;
}

// ---- W4A16 dequantisation -------------------------------------------------------------
// w = (q - 8) * s + z is evaluated as q * s + (z - 8 * s): the shifted zero is computed
// once per (group, column) and the inner loop is one multiply and one add.  The two forms
// differ by rounding only (the tests allow 1e-3 relative error against the reference).
Q2_HD float w4_shifted_zero(float s, float z) { return q2_sub(z, q2_mul(8.0f, s)); }
Q2_HD float w4_dequant(uint32_t q, float s, float shifted_zero) {
  return q2_add(q2_mul(static_cast<float>(q), s), shifted_zero);
}

// Codes of a packed byte: column 16b + j in the low nibble, 16b + 8 + j in the high one.
Q2_HD uint32_t w4_lo(uint32_t byte) { return byte & 15u; }
Q2_HD uint32_t w4_hi(uint32_t byte) { return (byte >> 4) & 15u; }

}  // namespace gemm
}  // namespace q2ext
