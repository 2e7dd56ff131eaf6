// Per-element and per-node math of Q-GBFusion, shared by the CPU kernels (every ISA
// path) and the CUDA kernels.  Semantics: q2ext/reference/gb_fusion.py.
//
// Storage and compute types are numerics.h's (ComputeType: float for fp32/fp16/bf16
// branches, double for fp64 ones).  Everything is static (internal linkage) for the
// reason given in numerics.h: the CPU code inlines it into ISA-specific functions.
#pragma once

#include <cmath>
#include <cstdint>

#include "q2ext/numerics.h"

namespace q2ext {
namespace gb_fusion {

// Fusion modes (keep in sync with MODE_CONCAT / MODE_ADD of q2ext/reference/gb_fusion.py).
enum : int64_t { kGbConcat = 0, kGbAdd = 1 };
constexpr int kGbMaxBranches = 16;

// ---------------------------------------------------------------- per-pixel statistics
// Two passes (the CPU kernels, over a cached tile): mean = sum(h) / C, then
// sum_sq = sum((h - mean)^2) and rstd below.  One pass (the CUDA kernel: a thread per
// pixel, whose C values lie in C planes, so a second pass would read the branches again):
// GbMoments, sums shifted by the pixel's first value and accumulated in double.  With
// fp32 (or narrower) h, h - shift and its square are (nearly) exact in double, so
// var = s2/C - m1^2 loses only the digits the cancellation takes from double's 53 bits:
// when channel 0 is an outlier for its pixel both terms are ~ outlier^2, and fp32 sums
// lost all of the variance's 24 bits.  (For fp64 storage the same sums keep ~16 -
// log10(outlier^2 / var) digits.)
struct GbMoments {
  double shift, s1, s2;
};

Q2_HD GbMoments gb_moments_init() { return GbMoments{0.0, 0.0, 0.0}; }

// Adds one fused value h of the pixel; `first` for its channel 0, which sets the shift
// (0 when it is not finite, so that an infinity gives the reference's +-inf mean, not
// inf - inf = NaN).
Q2_HD void gb_moments_add(GbMoments& m, double h, bool first) {
  if (first) m.shift = h - h == 0.0 ? h : 0.0;
  const double d = h - m.shift;
  m.s1 += d;
  m.s2 += d * d;
}

template <typename A>
struct GbStats {
  A mean, rstd;
};

// mean and rstd = 1 / sqrt(var + eps) of the pixel's C values (biased variance, as
// LayerNorm).  A variance that rounding made slightly negative is 0; a NaN one (a NaN or
// an infinity among the values) stays NaN, so rstd is NaN like the reference's, not
// 1 / sqrt(eps).
template <typename A>
Q2_HD GbStats<A> gb_moments_stats(const GbMoments& m, int64_t c, double eps) {
  const double inv_c = 1.0 / static_cast<double>(c);
  const double m1 = m.s1 * inv_c;
  double var = m.s2 * inv_c - m1 * m1;
  var = var < 0.0 ? 0.0 : var;
  GbStats<A> s;
  s.mean = static_cast<A>(m.shift + m1);
  s.rstd = static_cast<A>(1.0 / sqrt(var + eps));
  return s;
}

// rstd = 1 / sqrt(sum_sq / C + eps): the biased variance, as LayerNorm.  NaN stays NaN.
Q2_HD float gb_rstd(float sum_sq, float inv_c, float eps) {
  return 1.0f / sqrtf(sum_sq * inv_c + eps);
}
Q2_HD double gb_rstd(double sum_sq, double inv_c, double eps) {
  return 1.0 / sqrt(sum_sq * inv_c + eps);
}

// LayerNorm input gradient of one element: rstd * (gy - mean(gy) - y * mean(gy * y)),
// with m1 = mean(gy) and m2 = mean(gy * y) over the pixel's channels.
template <typename A>
Q2_HD A gb_ln_grad(A gy, A y, A m1, A m2, A rstd) {
  return rstd * ((gy - m1) - y * m2);
}

// alpha = softmax(lam) over K <= kGbMaxBranches values, max-subtracted, evaluated in
// double and rounded once to fp32: the result is then (all but always) the correctly
// rounded softmax, identical on every backend and to the reference's
// softmax(lam.double()).float(); an fp32 exp differs by an ulp between libraries.
Q2_HD void gb_softmax(const float* lam, float* alpha, int k) {
  double m = lam[0];
  for (int i = 1; i < k; ++i) m = lam[i] > m ? lam[i] : m;
  double e[kGbMaxBranches], s = 0.0;
  for (int i = 0; i < k; ++i) {
    e[i] = exp(static_cast<double>(lam[i]) - m);
    s += e[i];
  }
  for (int i = 0; i < k; ++i) alpha[i] = static_cast<float>(e[i] / s);
}

// The controller law (Eq. 8-10), in place on lam/g_ema (fp32 [K]).  The first update
// (g_ema == 0) takes G itself instead of beta * G, so the EMA starts without warm-up
// bias.  A step whose g_sq holds inf/NaN (AMP overflow) changes nothing.
Q2_HD void gb_update_law(float* lam, float* g_ema, const float* g_sq, const float* tau, int k,
                         float beta, float eta, float eps, float lam_clip) {
  bool finite = true;
  for (int i = 0; i < k; ++i) finite = finite && (g_sq[i] - g_sq[i] == 0.0f);
  if (!finite) return;
  float ema[kGbMaxBranches], logs[kGbMaxBranches];
  float mean_log = 0.0f;
  for (int i = 0; i < k; ++i) {
    const float g = sqrtf(g_sq[i]);
    ema[i] = g_ema[i] > 0.0f ? (1.0f - beta) * g_ema[i] + beta * g : g;
    logs[i] = logf(ema[i] + eps);
    mean_log += logs[i];
  }
  mean_log = mean_log / static_cast<float>(k);
  for (int i = 0; i < k; ++i) {
    const float e = logs[i] - mean_log - (tau != nullptr ? tau[i] : 0.0f);
    float l = lam[i] - eta * e;
    l = l < -lam_clip ? -lam_clip : (l > lam_clip ? lam_clip : l);
    lam[i] = l;
    g_ema[i] = ema[i];
  }
}

}  // namespace gb_fusion
}  // namespace q2ext
