// Per-element math of the fake-quant family, shared by the CPU kernels (every ISA
// path) and the CUDA kernels, so that the CPU tests exercise the exact arithmetic
// the GPU runs.  The semantics are those of q2ext/reference/fake_quant.py; the rounding
// and bit-exactness rules are numerics.h's.
#pragma once

#include <cstdint>

#include "q2ext/numerics.h"

namespace q2ext {
namespace fake_quant {

// Modes of the fake-quant kernels (keep in sync with q2ext/_ops/fake_quant.py).
// kModeAffine: ATen's learnable fake quant (the mask on the rounded grid index);
// kModeLsq: LSQ / LSQ+ (the same forward, no zero point; the papers' gradients: clip first,
// so the mask is taken on the unrounded v = (x - off) / s); kModePact: the clip is alpha.
enum : int64_t { kModeAffine = 0, kModePact = 1, kModeLsq = 2 };

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

// LSQ (Esser et al.) and LSQ+ (Bhalgat et al.): v = (x - off) / s, inside for
// qmin < v < qmax; d/ds = round(v) - v inside (exact in fp32: the two are within a factor of
// 2 of each other, or round(v) = 0), qmin for v <= qmin, qmax for v >= qmax.
Q2_HD FqGrad fq_backward_lsq(float dy, float x, float s_inv, float off, float qmin, float qmax) {
  FqGrad g;
  float v = q2_mul(q2_sub(x, off), s_inv);
  bool below = v <= qmin;
  bool above = v >= qmax;
  bool inside = (v > qmin) & (v < qmax);
  bool clipped = below | above;
  float inside_term = q2_mul(dy, q2_sub(round_half_even(v), v));
  float edge = select_f32(below, qmin, qmax);
  g.dx = keep_if(inside, dy);
  g.dscale = q2_add(keep_if(inside, inside_term), keep_if(clipped, q2_mul(dy, edge)));
  g.dclip = keep_if(clipped, dy);
  return g;
}

template <int64_t kMode>
Q2_HD FqGrad fq_backward(float dy, float x, float s, float s_inv, float zp, float off,
                         float clip, float qmin, float qmax) {
  if constexpr (kMode == kModePact) {
    return fq_backward_pact(dy, x, clip);
  } else if constexpr (kMode == kModeLsq) {
    return fq_backward_lsq(dy, x, s_inv, off, qmin, qmax);
  } else {
    return fq_backward_affine(dy, x, s, s_inv, zp, off, qmin, qmax);
  }
}

}  // namespace fake_quant
}  // namespace q2ext
