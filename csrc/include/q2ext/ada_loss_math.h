// Per-element and per-row math of q2ext::ada_loss (Q-ADA), shared by the CPU kernel and
// the CUDA kernel.  The semantics are those of q2ext/reference/ada_loss.py; the derivation
// of the backward is in ada_loss_backward's docstring there.
//
// Compute types: float for fp32/fp16/bf16 storage, double for fp64 storage.
//  * float: log and exp are the Cephes single-precision polynomials (about 1 ulp) written
//    branch-free, so that GCC vectorises the row loops at any -m level: libm's scalar
//    logf/expf calls would dominate the run time (each element needs up to six of them).
//  * double: the libm functions (that path exists for gradcheck, not speed).
// log1p is evaluated as log(u) + (y - (u - 1))/u from a pair (u ~ 1 + y, y): the second
// term restores the bits of y that u lost, so log1p stays accurate for tiny y, and the
// divergence can pass u = 2P/(P+R) and y = (P-R)/(P+R) computed independently (both to
// full relative precision) instead of forming 1 + y, which matters when P << R.
// No torch header here: this file is also compiled by nvcc for device code.
#pragma once

#include <math.h>

#include <cstdint>

#include "q2ext/numerics.h"

namespace q2ext {
namespace ada_loss {

// Keep in sync with q2ext/_ops/ada_loss.py.
enum : int64_t { kDivJs = 0, kDivKl = 1 };
enum : int64_t { kNormSigmoid = 0, kNormSoftmax = 1 };
constexpr int kRowStats = 5;  // mu, sigma, sum of weights, max score, KL(R||M)

Q2_HD float sel(bool c, float a, float b) { return select_f32(c, a, b); }
Q2_HD double sel(bool c, double a, double b) { return c ? a : b; }

// max(a, b) that propagates NaN, like torch.amax (the reference's max score): a row with a
// NaN score has a NaN max, as stored in row_stats, on every backend.
template <typename F>
Q2_HD F max_nan(F a, F b) {
  return sel((a < b) | (b != b), b, a);
}
Q2_HD float absval(float v) { return bits_f32(f32_bits(v) & 0x7fffffffu); }
Q2_HD double absval(double v) { return fabs(v); }

// ------------------------------------------------------------------ float transcendentals
// log(u), u >= 0: Cephes logf.  u = m 2^e with m in [sqrt(1/2), sqrt(2)); 0 and subnormals
// are read as FLT_MIN (only reachable by underflowed probabilities whose term is then
// multiplied by that same tiny probability); +inf -> +inf, NaN -> NaN.
Q2_HD float log_f32(float u) {
  float v = sel(u < kFltMin, kFltMin, u);
  uint32_t b = f32_bits(v);
  float e = static_cast<float>(static_cast<int32_t>(b >> 23) - 126);
  float m = bits_f32((b & 0x007fffffu) | 0x3f000000u);  // [0.5, 1)
  bool low = m < 0.707106781186547524f;
  e = sel(low, e - 1.0f, e);
  float x = sel(low, m + m - 1.0f, m - 1.0f);  // exact (Sterbenz)
  float z = x * x;
  float y = 7.0376836292e-2f;
  y = y * x - 1.1514610310e-1f;
  y = y * x + 1.1676998740e-1f;
  y = y * x - 1.2420140846e-1f;
  y = y * x + 1.4249322787e-1f;
  y = y * x - 1.6668057665e-1f;
  y = y * x + 2.0000714765e-1f;
  y = y * x - 2.4999993993e-1f;
  y = y * x + 3.3333331174e-1f;
  y = y * x * z;
  y = y + -2.12194440e-4f * e;
  y = y - 0.5f * z;
  float r = x + y;
  r = r + 0.693359375f * e;
  return sel(u < kInfF, r, u);  // +inf and NaN pass through
}

// exp(x) for x <= 0: Cephes expf with the reduction n = round(x log2 e) done by the
// 1.5 * 2^23 trick (no float -> int conversion, so no UB on NaN and it vectorises).
// Below -87 the result (< 1.7e-38) is flushed to +0.
Q2_HD float exp_nonpos_f32(float x) {
  float xc = sel(x < -87.0f, -87.0f, x);
  float t = xc * 1.44269504088896341f + 12582912.0f;
  float fx = t - 12582912.0f;
  int32_t n = static_cast<int32_t>(f32_bits(t) - f32_bits(12582912.0f));
  float r = xc - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  float z = r * r;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * z + r + 1.0f;
  float res = y * bits_f32(static_cast<uint32_t>(n + 127) << 23);
  return sel(x < -87.0f, 0.0f, res);
}

// ------------------------------------------------------------------ generic helpers
// For u < 1/2 the correction is dropped: there y (a difference rounded at the scale of 1)
// carries less information about log(u) than u itself, so log(u) alone is the accurate
// value (and log1p(y) would even reach -inf when y rounds to -1).
Q2_HD float log1p_pair(float u, float y) {
  float l = log_f32(u);
  float r = sel(u < 0.5f, l, l + (y - (u - 1.0f)) / u);
  return sel(u < kInfF, r, u);
}
Q2_HD double log1p_pair(double u, double y) { return u < 0.5 ? log(u) : log1p(y); }
Q2_HD float log1p_nonneg(float y) { return log1p_pair(1.0f + y, y); }
Q2_HD double log1p_nonneg(double y) { return log1p(y); }
Q2_HD float exp_nonpos(float x) { return exp_nonpos_f32(x); }
Q2_HD double exp_nonpos(double x) { return exp(x); }

// ------------------------------------------------------------------ Q-ADA terms
// The op's scalar arguments and the rows' geometry.  A row is one (sample, channel):
// `length` = H*W contiguous elements of a contiguous input.
struct RowConfig {
  int64_t rows, channels, length;
  double gamma, kappa, inv_temp;
  bool js, softmax;
  const double* step;  // quantizer step [1] or [channels] as double, or nullptr: each row's sigma
  int64_t step_numel;
};

// Constants of one row (one sample, one channel) of one side.
template <typename F>
struct RowConsts {
  F mu;   // spatial mean
  F qz;   // 1 / (sigma + kappa)
  F qr;   // 1 / (s + kappa), s = step or sigma
  F gamma;
};

template <typename F>
Q2_HD RowConsts<F> row_consts(F mu, F sigma, int64_t channel, const RowConfig& cfg) {
  const F kappa = static_cast<F>(cfg.kappa);
  const F s = cfg.step ? static_cast<F>(cfg.step[cfg.step_numel == 1 ? 0 : channel]) : sigma;
  return RowConsts<F>{mu, F(1) / (sigma + kappa), F(1) / (s + kappa), static_cast<F>(cfg.gamma)};
}

template <typename F>
struct Score {
  F d;      // x - mu
  F z;      // |d| qz
  F uz;     // 1 + z^2
  F r2;     // r^2
  F ur;     // 1 + r^2
  F score;  // log(1 + z^2) + gamma log(1 + r^2)
};

// kHasQ: a quantized value is given (Delta = |x - xq|); otherwise r = 0.
template <bool kHasQ, typename F>
Q2_HD Score<F> score_of(F x, F xq, const RowConsts<F>& c) {
  Score<F> s;
  s.d = x - c.mu;
  s.z = absval(s.d) * c.qz;
  F z2 = s.z * s.z;
  s.uz = F(1) + z2;
  s.score = log1p_pair(s.uz, z2);
  s.r2 = F(0);
  s.ur = F(1);
  if constexpr (kHasQ) {
    F r = absval(x - xq) * c.qr;
    s.r2 = r * r;
    s.ur = F(1) + s.r2;
    s.score = s.score + c.gamma * log1p_pair(s.ur, s.r2);
  }
  return s;
}

// Unnormalised weight: sigmoid(S) (S >= 0, so exp(-S) cannot overflow) or
// exp((S - max S) / T).  `softmax` is loop-invariant; GCC unswitches the loops on it.
template <typename F>
Q2_HD F weight_of(F score, bool softmax, F max_score, F inv_temp) {
  return softmax ? exp_nonpos((score - max_score) * inv_temp) : F(1) / (F(1) + exp_nonpos(-score));
}

// Divergence of one element pair.  loss: JS: (P log(P/M) + R log(R/M)) / 2, KL: P log(P/R);
// r_log_rm: R log(R/M) (JS only; its row sum enters the backward).  0 log 0 = 0; KL with R = 0 < P is +inf.
template <typename F>
struct DivTerm {
  F loss;
  F r_log_rm;  // R log(R/M): summed per row into KL(R||M)
};

template <typename F>
Q2_HD DivTerm<F> js_term(F p, F r) {
  DivTerm<F> t;
  F inv = F(1) / (p + r);
  F y = (p - r) * inv;
  F lp = log1p_pair((p + p) * inv, y);
  F lr = log1p_pair((r + r) * inv, -y);
  // 0 log 0 = 0: the selects drop the NaN of p = r = 0.  Not positive is 0 or NaN, and
  // p * 0 keeps a NaN p (a row with a NaN) NaN, as the reference's p * log(...) does.
  F tp = sel(p > F(0), p * lp, p * F(0));
  F tr = sel(r > F(0), r * lr, r * F(0));
  t.loss = F(0.5) * (tp + tr);
  t.r_log_rm = tr;
  return t;
}

template <typename F>
Q2_HD F kl_term(F p, F r) {
  F inv = F(1) / r;
  F lp = log1p_pair(p * inv, (p - r) * inv);
  F t = sel((r > F(0)) | (r != r), p * lp, static_cast<F>(kInfF));  // a NaN r gives NaN
  return sel(p > F(0), t, p * F(0));  // 0 for p = 0, NaN for a NaN p
}

// d D / d S of one element, before the factor grad/(N C):
//   (dD/dR - sum_i R_i dD/dR_i) R dw/dS / w, i.e. KL: (R - P), JS: R (log(R/M) - KL(R||M)) / 2,
//   times (1 - w) (sigmoid) or 1/T (softmax).
template <typename F>
Q2_HD F dscore_of(F p, F r, F w, bool js, F kl_rm, bool softmax, F inv_temp) {
  F t;
  if (js) {
    F inv = F(1) / (p + r);
    F lr = log1p_pair((r + r) * inv, (r - p) * inv);
    t = sel(r > F(0), r * F(0.5) * (lr - kl_rm), F(0));
  } else {
    t = r - p;
  }
  return t * (softmax ? inv_temp : F(1) - w);
}

Q2_HD float sign_of(float v) { return sel(v > 0.0f, 1.0f, sel(v < 0.0f, -1.0f, 0.0f)); }
Q2_HD double sign_of(double v) { return v > 0.0 ? 1.0 : (v < 0.0 ? -1.0 : 0.0); }

// Row statistics saved by the forward for the backward (kRowStats values, in this order).
template <typename F>
Q2_HD void store_row_stats(F* row, F mu, F sigma, double z, F max_score, double kl_rm) {
  row[0] = mu;
  row[1] = sigma;
  row[2] = static_cast<F>(z);
  row[3] = max_score;
  row[4] = static_cast<F>(kl_rm);
}

// ------------------------------------------------------------------ backward rows
// Constants of one student row in the backward, from the forward's row statistics
// (kRowStats values: mu, sigma, sum of weights, max score, KL(R||M)).
template <typename F>
struct BackRow {
  RowConsts<F> rc;
  F max_score, inv_t, z, kl_rm;
  F g0;            // incoming gradient / rows
  F gamma2_sigma;  // 2 gamma when s = sigma (no step), else 0
};

template <typename F>
Q2_HD BackRow<F> back_row(const F* stats_row, int64_t channel, const RowConfig& cfg, double grad) {
  BackRow<F> b;
  b.rc = row_consts(stats_row[0], stats_row[1], channel, cfg);
  b.max_score = stats_row[3];
  b.inv_t = static_cast<F>(cfg.inv_temp);
  b.z = stats_row[2];
  b.kl_rm = stats_row[4];
  b.g0 = static_cast<F>(grad / static_cast<double>(cfg.rows));
  b.gamma2_sigma = cfg.step == nullptr ? static_cast<F>(2.0 * cfg.gamma) : F(0);
  return b;
}

// The two per-element terms of the backward: returns sign(d) dL/dz (through mu) and sets
// *t_sigma = dL/dz z + [s = sigma] dL/dr r (through sigma).  The row's dx then is
// qz (sign(d) dL/dz - mean(sign(d) dL/dz) - d sum(t_sigma) / (L sigma)).
template <bool kHasQ, typename F>
Q2_HD F backward_terms_of(F x, F xq, F p, const BackRow<F>& b, bool js, bool softmax,
                          F* t_sigma) {
  const Score<F> s = score_of<kHasQ>(x, xq, b.rc);
  const F w = weight_of(s.score, softmax, b.max_score, b.inv_t);
  const F g = b.g0 * dscore_of(p, w / b.z, w, js, b.kl_rm, softmax, b.inv_t);
  const F gz = g * F(2) * s.z / s.uz;
  F t = gz * s.z;
  if constexpr (kHasQ) t = t + g * b.gamma2_sigma * s.r2 / s.ur;
  *t_sigma = t;
  return sign_of(s.d) * gz;
}

}  // namespace ada_loss
}  // namespace q2ext
