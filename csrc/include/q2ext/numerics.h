// Scalar arithmetic every op family shares, on the CPU (every ISA path) and on the GPU:
// explicitly rounded float operations, bit casts and branch-free selects, round half to
// even, the scale-sanitising rule, the 16-bit storage formats and their conversions, the
// storage <-> compute type mapping, and ceil_div.
//
// Rules that keep all backends bit-identical to the references and to ATen:
//  * every product/sum is rounded separately (no FMA contraction): CPU code is built
//    with -ffp-contract=off, device code uses the explicitly rounded intrinsics;
//  * rounding is half-to-even through the 1.5*2^23 trick, exact for |v| < 2^22; for
//    larger |v| the value is far outside any supported grid (|quant_min|, |quant_max|
//    <= 2^16) so it only has to stay on the correct side, which it does;
//  * everything here has internal linkage (static): the ISA-specific CPU translation
//    units compile it with AVX-512/AVX2 enabled, and a shared inline copy could be
//    picked by the linker for the baseline code path.
// No torch or std header beyond <cstdint>: nvcc compiles this for device code, and the
// ISA translation units must not instantiate shared inline library code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define Q2_HD static __host__ __device__ __forceinline__
#else
#define Q2_HD static inline __attribute__((always_inline))
#endif

namespace q2ext {

constexpr float kScaleMin = 1.1920928955078125e-07f;  // FLT_EPSILON, as torch.ao's learnable module
constexpr float kScaleMax = 3.4028234663852886e+38f;  // FLT_MAX
constexpr float kInfF = __builtin_huge_valf();
constexpr float kFltMin = 1.17549435082228750797e-38f;  // smallest normal float

Q2_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Products and sums rounded on their own: nvcc would otherwise contract a * b + c into an
// FMA that the references (and the CPU, built with -ffp-contract=off) do not do.
#if defined(__CUDA_ARCH__)
Q2_HD float q2_mul(float a, float b) { return __fmul_rn(a, b); }
Q2_HD float q2_add(float a, float b) { return __fadd_rn(a, b); }
Q2_HD float q2_sub(float a, float b) { return __fsub_rn(a, b); }
#else
Q2_HD float q2_mul(float a, float b) { return a * b; }
Q2_HD float q2_add(float a, float b) { return a + b; }
Q2_HD float q2_sub(float a, float b) { return a - b; }
#endif

// Bit casts through a union: GCC and nvcc both define the behaviour, and unlike memcpy
// it needs no header in the ISA translation units.
union F32Bits {
  float f;
  uint32_t u;
};
Q2_HD uint32_t f32_bits(float f) {
  F32Bits v;
  v.f = f;
  return v.u;
}
Q2_HD float bits_f32(uint32_t u) {
  F32Bits v;
  v.u = u;
  return v.f;
}

// Branch-free selects.  Every per-element choice goes through these bit masks: with
// `c ? a : b` GCC sinks loads and arithmetic into branches and then (notably for AVX2,
// which lacks mask registers) refuses to vectorise the loop.
Q2_HD uint32_t mask_of(bool c) { return 0u - static_cast<uint32_t>(c); }
Q2_HD uint32_t select_u32(bool c, uint32_t a, uint32_t b) {
  uint32_t m = mask_of(c);
  return (a & m) | (b & ~m);
}
Q2_HD float select_f32(bool c, float a, float b) {
  return bits_f32(select_u32(c, f32_bits(a), f32_bits(b)));
}
// v where c holds, else +0.
Q2_HD float keep_if(bool c, float v) { return bits_f32(f32_bits(v) & mask_of(c)); }

// Round half to even (see the header comment for the range argument).
Q2_HD float round_half_even(float v) {
  return q2_sub(q2_add(v, 12582912.0f), 12582912.0f);
}

// A scale that is NaN, <= 0 or tiny becomes kScaleMin, +inf becomes kScaleMax; the
// gradient is then taken with respect to this effective scale.
Q2_HD float sanitize_scale(float s) {
  return s > kScaleMax ? kScaleMax : (s >= kScaleMin ? s : kScaleMin);
}

// Storage formats.  Conversions are written out so that they are identical on every
// path and vectorise without F16C/AVX512-BF16 (round to nearest even, NaN kept quiet).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

Q2_HD float to_f32(float v) { return v; }
Q2_HD float to_f32(bf16_t v) { return bits_f32(static_cast<uint32_t>(v.bits) << 16); }
Q2_HD float to_f32(f16_t v) {
  // Scale the half's exponent/mantissa into a float and let the FPU renormalise
  // subnormals: exponent bias moves from 15 to 127 by multiplying with 2^112.
  uint32_t h = v.bits;
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t em = h & 0x7fffu;
  float mag = q2_mul(bits_f32(em << 13), 5.192296858534828e+33f);  // 2^112
  uint32_t bits = select_u32(em >= 0x7c00u, (em << 13) | 0x7f800000u, f32_bits(mag));
  return bits_f32(sign | bits);
}

Q2_HD void from_f32(float f, float* out) { *out = f; }
Q2_HD void from_f32(float f, bf16_t* out) {
  uint32_t u = f32_bits(f);
  uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  out->bits = static_cast<uint16_t>(select_u32(f != f, (u >> 16) | 0x40u, rounded));
}
Q2_HD void from_f32(float f, f16_t* out) {
  uint32_t u = f32_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  // All candidates computed, one picked: branch-free for the vectoriser.
  uint32_t inf_nan = select_u32(a > 0x7f800000u, 0x7e00u, 0x7c00u);
  // Half subnormal or zero: adding 0.5 aligns the half's subnormal ulp (2^-24) with the
  // float ulp at 0.5, so the FPU's round-to-nearest-even does the rounding.
  uint32_t subnormal = f32_bits(q2_add(bits_f32(a), 0.5f)) - 0x3f000000u;
  // Normal: rebias the exponent (0xc8000000 = -(112 << 23)) and round the mantissa.
  uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
  uint32_t res = select_u32(a < 0x38800000u, subnormal, normal);
  res = select_u32(a >= 0x477ff000u, 0x7c00u, res);  // rounds to >= 65520: inf
  res = select_u32(a >= 0x7f800000u, inf_nan, res);
  out->bits = static_cast<uint16_t>(sign | res);
}

// Compute type of the kernels that work in the storage's precision class: float for
// fp32/fp16/bf16 storage, double for fp64 storage (which exists so that gradcheck runs
// on the kernels themselves).  to_compute / store_compute convert between the two.
template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};

Q2_HD float to_compute(float v) { return v; }
Q2_HD float to_compute(bf16_t v) { return to_f32(v); }
Q2_HD float to_compute(f16_t v) { return to_f32(v); }
Q2_HD double to_compute(double v) { return v; }
Q2_HD void store_compute(float v, float* o) { *o = v; }
Q2_HD void store_compute(float v, bf16_t* o) { from_f32(v, o); }
Q2_HD void store_compute(float v, f16_t* o) { from_f32(v, o); }
Q2_HD void store_compute(double v, double* o) { *o = v; }

}  // namespace q2ext
