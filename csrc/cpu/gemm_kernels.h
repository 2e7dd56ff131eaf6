// Argument blocks and per-ISA entry points of the CPU int8/int4 GEMM kernels.
//
// Included by the torch-facing driver (csrc/cpu/gemm.cpp) and by the ISA translation
// units (csrc/cpu/gemm_isa_*.cpp).  Like numerics.h it includes no torch or std header:
// the ISA units are compiled under `#pragma GCC target(...)`, and any shared inline
// function they instantiated could be picked by the linker for the baseline path.
// The packed layouts themselves (kNB8, kNB4) are gemm_math.h's: the CUDA kernels read
// the same packed weights.
#pragma once

#include <cstdint>

#include "q2ext/gemm_math.h"

namespace q2ext {
namespace gemm {
namespace cpu {

// ---- W8A8 --------------------------------------------------------------------------
// B comes in the VNNI panels of gemm_math.h (kNB8).  VNNI multiplies unsigned by signed
// bytes, so one operand must be unsigned:
//  * a uint8 A is that operand and B stays signed;
//  * an int8 A stays signed and B is stored as B ^ 0x80 = B + 128 (unsigned); the
//    kernel then subtracts 128 * sum_k A[m, k] (a_comp) to get the exact int32 sum.
// Both are exact: every product fits in 16 bits and int32 sums wrap like the reference.

struct W8A8Args {
  const uint8_t* a;        // [M, lda] bytes of A (int8 or uint8)
  int64_t lda;
  bool a_signed;           // int8 A (B panels hold B + 128, a_comp is used)
  const int32_t* a_comp;   // [M] 128 * sum_k A[m, k], only when a_signed
  const uint8_t* b_panels; // ceil(N / kNB8) panels of kq * kNB8 * 4 bytes
  int64_t M, N, K;
  int64_t kq;              // ceil(K / 4)
  const float* a_scale;    // [M] or [1]
  bool a_scale_per_row;
  const float* b_scale;    // [N]
  const float* bias;       // [N] or nullptr
  bool relu;
  int out_kind;            // OutKind
  void* out;               // [M, ldc] of float / bf16 bits / int32
  int64_t ldc;
};

// Computes rows [m0, m1) of the output columns of panel `panel`.
using W8A8TileFn = void (*)(const W8A8Args&, int64_t panel, int64_t m0, int64_t m1);

// ---- W4A16 -------------------------------------------------------------------------
// Packed int4 weights: gemm_math.h's kNB4 blocks.
//
// The AVX2 and scalar tiles dequantise each weight and multiply-add it in fp32.  The
// AVX-512 tiles (fp32 x, and bfloat16 x on AVX512-BF16 CPUs) factor the group constants
// out of the k loop:
//   y[m, n] = sum_g ( s[g, n] * sum_{k in g} x[m, k] * (q[n, k] - 8) + z[g, n] * xsum[m, g] )
// with xsum[m, g] = sum_{k in g} x[m, k] computed once per call (w4a16_group_sums,
// w4a16_prepare_bf16).
struct W4A16Args {
  const float* x;          // [K / 2, M, 2] fp32 pairs, see w4_x_index (fp32 tiles; bf16 x is
                           // widened once)
  int64_t M, K, N;
  const uint8_t* w;        // [ceil(N / 16), K, 8]
  const float* scales;     // [K / g, N]
  const float* zeros;      // [K / g, N]
  int64_t group_size;
  float* out;              // [M, N] fp32
  const int32_t* xpairs;   // [K / 2, M] bf16 pairs (x[m, 2i], x[m, 2i + 1]) (bf16 tile only)
  const float* xsum;       // [M, K / g] per-group sums of x (factored tiles only)
};

// x[m, k] of the fp32 tiles: pairs (x[m, 2i], x[m, 2i + 1]) of all rows side by side, so
// the rows of a tile at one k-pair share a cache line (rows K * 4 bytes apart would map
// to the same L1 sets and evict each other).
static inline int64_t w4_x_index(int64_t M, int64_t m, int64_t k) {
  return ((k >> 1) * M + m) * 2 + (k & 1);
}

using W4A16TileFn = void (*)(const W4A16Args&, int64_t block, int64_t m0, int64_t m1);

}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext

// Entry points of one ISA translation unit (names are the ISA namespaces).
#define Q2EXT_DECLARE_GEMM_ENTRY_POINTS(ns)                                             \
  namespace q2ext {                                                                     \
  namespace gemm {                                                                      \
  namespace cpu {                                                                        \
  namespace ns {                                                                        \
  void w8a8_tile(const W8A8Args& a, int64_t panel, int64_t m0, int64_t m1);             \
  void w4a16_tile(const W4A16Args& a, int64_t block, int64_t m0, int64_t m1);           \
  }                                                                                     \
  }                                                                                     \
  }                                                                                     \
  }

// Entry points outside the common set; both scan rows [row0, row1) of x, so that the
// caller can split the rows between threads.  avx512vnni::w4a16_group_sums fills xsum
// [M, K / group_size] from fp32 x [M, K] for that unit's (factored) W4A16 tile; it
// returns false when x holds an inf or NaN: the factored form turns inf * (q - 8 = 0)
// and inf - inf into NaN where the reference gives +-inf, so the caller then uses a tile
// that dequantises each weight.  The AVX512-BF16 W4A16 tile (gemm_isa_avx512bf16.cpp)
// reads xsum and xpairs [K / 2, M] that w4a16_prepare_bf16 fills from bf16 x [M, K]; it
// returns false for non-finite x and when x holds a nonzero |x| < 2^-96, which the tile
// (VDPBF16PS flushes subnormals) would not compute to fp32 accuracy: the caller then
// uses the fp32 tiles.
namespace q2ext {
namespace gemm {
namespace cpu {
namespace avx512vnni {
bool w4a16_group_sums(const float* x, int64_t K, int64_t group_size, int64_t row0,
                      int64_t row1, float* xsum);
}  // namespace avx512vnni
namespace avx512bf16 {
void w4a16_tile(const W4A16Args& a, int64_t block, int64_t m0, int64_t m1);
bool w4a16_prepare_bf16(const uint16_t* x, int64_t M, int64_t K, int64_t group_size,
                        int64_t row0, int64_t row1, float* xsum, int32_t* xpairs);
}  // namespace avx512bf16
}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext
