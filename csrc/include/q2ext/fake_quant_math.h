// Per-element math of the fake-quant family, shared by the CPU kernels (every ISA
// path) and the CUDA kernels, so that the CPU tests exercise the exact arithmetic
// the GPU runs.  The semantics are those of q2ext/reference.py.
//
// Rules that keep all backends bit-identical to the reference and to ATen:
//  * every product/sum is rounded separately (no FMA contraction): CPU code is built
//    with -ffp-contract=off, device code uses the explicitly rounded intrinsics;
//  * rounding is half-to-even through the 1.5*2^23 trick, exact for |v| < 2^22; for
//    larger |v| the value is far outside any supported grid (|quant_min|, |quant_max|
//    <= 2^16) so it only has to stay on the correct side, which it does;
//  * everything here has internal linkage (static): the ISA-specific CPU translation
//    units compile it with AVX-512/AVX2 enabled, and a shared inline copy could be
//    picked by the linker for the baseline code path.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define Q2_HD static __host__ __device__ __forceinline__
#else
#define Q2_HD static inline __attribute__((always_inline))
#endif

namespace q2ext {

// Modes of the fake-quant kernels (keep in sync with q2ext/_ops.py).
enum : int64_t { kModeAffine = 0, kModePact = 1 };

constexpr float kScaleMin = 1.1920928955078125e-07f;  // FLT_EPSILON, as torch.ao's learnable module
constexpr float kScaleMax = 3.4028234663852886e+38f;  // FLT_MAX

Q2_HD float q2_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}
Q2_HD float q2_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}
Q2_HD float q2_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

Q2_HD uint32_t f32_bits(float f) {
  union {
    float f;
    uint32_t u;
  } v;
  v.f = f;
  return v.u;
}
Q2_HD float bits_f32(uint32_t u) {
  union {
    float f;
    uint32_t u;
  } v;
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

// Learnable zero points are floats; like ATen's learnable ops we use
// clamp(nearbyint(zp), qmin, qmax) in forward *and* backward (ATen's per-tensor
// backward truncates zp + 0.5 instead; q2ext deliberately rounds the same way in both
// directions).  NaN is treated as 0.
Q2_HD float effective_zero_point(float zp, float qmin, float qmax) {
  float r = (zp == zp) ? round_half_even(zp) : 0.0f;
  return r < qmin ? qmin : (r > qmax ? qmax : r);
}

// Everything the element loop needs about one channel.
struct FqChannel {
  float s;    // effective scale (step)
  float inv;  // 1 / s, multiplied as ATen does (not a division per element)
  float zp;   // integral zero point (affine) or 0
  float off;  // additive float offset (LSQ+ beta) or 0
  float clip; // PACT: clip value alpha; unused otherwise
};

// scale_or_alpha: the raw scale (affine) or the raw PACT alpha.
Q2_HD FqChannel make_channel(int64_t mode, float scale_or_alpha, float zp, float off,
                             float qmin, float qmax) {
  FqChannel c;
  if (mode == kModePact) {
    c.clip = sanitize_scale(scale_or_alpha);
    c.s = c.clip / qmax;
    c.zp = 0.0f;
    c.off = 0.0f;
  } else {
    c.s = sanitize_scale(scale_or_alpha);
    c.zp = effective_zero_point(zp, qmin, qmax);
    c.off = off;
    c.clip = 0.0f;
  }
  c.inv = 1.0f / c.s;
  return c;
}

// Grid index before clamping, zero point included (the mask is taken on this value).
Q2_HD float fq_grid(float x, float s_inv, float zp, float off) {
  return q2_add(round_half_even(q2_mul(q2_sub(x, off), s_inv)), zp);
}

// Forward: y = (clamp(q, qmin, qmax) - zp) * s + off.  NaN propagates (q NaN -> y NaN);
// +-inf saturate to the grid ends.
Q2_HD float fq_forward(float x, float s, float s_inv, float zp, float off, float qmin,
                       float qmax) {
  float q = fq_grid(x, s_inv, zp, off);
  float c = select_f32(q < qmin, qmin, select_f32(q > qmax, qmax, q));
  return q2_add(q2_mul(q2_sub(c, zp), s), off);
}

// Per-element backward terms.
//   dx:    dy where the element is inside (STE), else 0;
//   dscale: affine: dy * d(y)/d(s)  (inside: (y - x)/s, below: qmin - zp,
//           above: qmax - zp), PACT: 0;
//   dclip: dy summed where the clip acts: affine: below or above the grid (the zero-point
//          and offset gradients are built from it), PACT: x >= alpha.
// NaN inputs are neither inside nor clipped: they contribute 0 everywhere.
struct FqGrad {
  float dx, dscale, dclip;
};

Q2_HD FqGrad fq_backward_pact(float dy, float x, float clip) {
  FqGrad g;
  bool above = x >= clip;
  bool inside = (x >= 0.0f) & (x < clip);
  g.dx = keep_if(inside, dy);
  g.dscale = 0.0f;
  g.dclip = keep_if(above, dy);
  return g;
}

Q2_HD FqGrad fq_backward_affine(float dy, float x, float s, float s_inv, float zp, float off,
                                float qmin, float qmax) {
  FqGrad g;
  float q = fq_grid(x, s_inv, zp, off);
  bool below = q < qmin;
  bool above = q > qmax;
  bool inside = (q >= qmin) & (q <= qmax);
  bool clipped = below | above;
  float yq = q2_mul(q2_sub(q, zp), s);  // only used when inside
  float inside_term = q2_mul(q2_mul(dy, q2_sub(yq, q2_sub(x, off))), s_inv);
  float edge = select_f32(below, q2_sub(qmin, zp), q2_sub(qmax, zp));
  g.dx = keep_if(inside, dy);
  // inside and clipped are exclusive, so one of the two terms is +0.
  g.dscale = q2_add(keep_if(inside, inside_term), keep_if(clipped, q2_mul(dy, edge)));
  g.dclip = keep_if(clipped, dy);
  return g;
}

template <int64_t kMode>
Q2_HD FqGrad fq_backward(float dy, float x, float s, float s_inv, float zp, float off,
                         float clip, float qmin, float qmax) {
  if constexpr (kMode == kModePact) {
    return fq_backward_pact(dy, x, clip);
  } else {
    return fq_backward_affine(dy, x, s, s_inv, zp, off, qmin, qmax);
  }
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

}  // namespace q2ext
