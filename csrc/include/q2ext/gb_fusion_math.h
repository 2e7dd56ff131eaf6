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

// rstd = 1 / sqrt(sum_sq / C + eps): the biased variance, as LayerNorm.
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
