// C++-level checks of the one-pass pixel statistics of csrc/include/q2ext/gb_fusion_math.h
// (gb_moments_*: the CUDA forward's arithmetic, run here on the CPU) against a long double
// two-pass oracle: a channel 0 that is an outlier for its pixel, constant pixels, and NaN
// and infinities, which must give a NaN rstd as the reference does.  Run by ctest.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "expect.h"
#include "q2ext/gb_fusion_math.h"

using namespace q2ext::gb_fusion;

constexpr double kEps = 1e-6;

struct Truth {
  long double mean, rstd;
};

static Truth two_pass(const std::vector<float>& h) {
  long double s = 0;
  for (float v : h) s += v;
  const long double mean = s / h.size();
  long double q = 0;
  for (float v : h) q += (v - mean) * (v - mean);
  return {mean, 1.0L / std::sqrt(q / h.size() + kEps)};
}

static GbStats<float> one_pass(const std::vector<float>& h) {
  GbMoments m = gb_moments_init();
  for (size_t c = 0; c < h.size(); ++c) gb_moments_add(m, h[c], c == 0);
  return gb_moments_stats<float>(m, static_cast<int64_t>(h.size()), kEps);
}

// The pre-fix arithmetic (fp32 shifted sums), to show the inputs below do expose it.
static float one_pass_fp32_rstd(const std::vector<float>& h) {
  float shift = h[0], s1 = 0, s2 = 0;
  for (float v : h) {
    const float d = v - shift;
    s1 += d;
    s2 += d * d;
  }
  const float inv_c = 1.0f / h.size(), m1 = s1 * inv_c;
  float var = s2 * inv_c - m1 * m1;
  var = var > 0 ? var : 0;
  return 1.0f / std::sqrt(var + static_cast<float>(kEps));
}

static void test_outlier_channel_zero() {
  std::mt19937 rng(0);
  std::normal_distribution<float> noise(0.0f, 1.0f);
  int fp32_broken = 0;
  for (int c : {3, 64, 192, 256, 1025}) {
    for (float outlier : {10.0f, 1e3f, 3e4f, -1e5f}) {
      std::vector<float> h(c);
      for (auto& v : h) v = noise(rng);
      h[0] += outlier;
      const Truth t = two_pass(h);
      const GbStats<float> s = one_pass(h);
      // Correctly rounded up to a few ulps: far inside the Python tests' 8-ulp budget.
      const double rel_rstd = std::fabs(s.rstd - t.rstd) / t.rstd;
      const double err_mean = std::fabs(s.mean - t.mean);
      EXPECT(rel_rstd < 4e-7, "C=%d outlier=%g: rstd %.9g vs %.9Lg (rel %.3g)", c, outlier, s.rstd,
             t.rstd, rel_rstd);
      EXPECT(err_mean <= 2e-7 * std::fabs(outlier) + 1e-6, "C=%d outlier=%g: mean %.9g vs %.9Lg", c,
             outlier, s.mean, t.mean);
      const double rel32 = std::fabs(one_pass_fp32_rstd(h) - t.rstd) / t.rstd;
      fp32_broken += rel32 > 10 * 4e-7;
    }
  }
  // The same inputs break fp32 shifted sums (errors 2e-6 .. 5e-3, growing with C): without
  // this the test could pass with the old arithmetic too.
  EXPECT(fp32_broken >= 10, "fp32 shifted sums broke only %d of 20 cases", fp32_broken);
}

static void test_constant_and_tiny() {
  for (float v : {0.0f, 1.0f, -7.5f, 3e30f}) {
    const GbStats<float> s = one_pass(std::vector<float>(37, v));
    EXPECT(s.mean == v, "constant %g: mean %g", v, s.mean);
    EXPECT(s.rstd == static_cast<float>(1.0 / std::sqrt(kEps)), "constant %g: rstd %g", v, s.rstd);
  }
}

static void test_nan_and_inf() {
  const float nan = std::nanf(""), inf = INFINITY;
  for (int pos : {0, 1, 5}) {
    for (float bad : {nan, inf, -inf}) {
      std::vector<float> h = {0.5f, -1.0f, 2.0f, 0.25f, 1.5f, -0.75f};
      h[pos] = bad;
      const GbStats<float> s = one_pass(h);
      EXPECT(std::isnan(s.rstd), "%g at %d: rstd %g, want NaN (variance NaN)", bad, pos, s.rstd);
      // The reference: mean is NaN for a NaN, +-inf for one infinity.
      EXPECT(std::isnan(bad) ? std::isnan(s.mean) : s.mean == bad, "%g at %d: mean %g", bad, pos,
             s.mean);
    }
  }
  // The two-pass helper of the CPU kernels keeps NaN too.
  EXPECT(std::isnan(gb_rstd(nan, 1.0f / 8, 1e-6f)), "gb_rstd(NaN) must be NaN");
  EXPECT(std::isnan(gb_rstd(std::nan(""), 1.0 / 8, 1e-6)), "gb_rstd(NaN) must be NaN (double)");
}

int main() {
  test_outlier_channel_zero();
  test_constant_and_tiny();
  test_nan_and_inf();
  return q2ext_test::exit_code("gb_fusion_math");
}
