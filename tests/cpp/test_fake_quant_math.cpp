// C++-level checks of csrc/include/q2ext/numerics.h and fake_quant_math.h against independent
// oracles: std::nearbyint for rounding, the compiler's _Float16 for half conversion,
// and exhaustive round trips of every 16-bit pattern.  Run by ctest (CMakeLists.txt).
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "expect.h"
#include "q2ext/fake_quant_math.h"

using namespace q2ext;
using namespace q2ext::fake_quant;

static void test_rounding() {
  // Exact ties and their neighbours over the range any grid uses.
  for (int k = -70000; k <= 70000; ++k) {
    for (float v : {k + 0.5f, std::nextafter(k + 0.5f, 1e9f), std::nextafter(k + 0.5f, -1e9f),
                    static_cast<float>(k)}) {
      EXPECT(round_half_even(v) == std::nearbyint(v), "v=%.9g", v);
    }
  }
  std::mt19937 rng(0);
  std::uniform_real_distribution<float> dist(-4194304.f, 4194304.f);  // |v| < 2^22
  for (int i = 0; i < 1000000; ++i) {
    float v = dist(rng);
    EXPECT(round_half_even(v) == std::nearbyint(v), "v=%.9g", v);
  }
  // Beyond 2^22 only the side of the grid matters.
  for (float v : {5e6f, -5e6f, 1e30f, -1e30f, INFINITY, -INFINITY}) {
    float r = round_half_even(v);
    EXPECT((r > 65535.f) == (v > 0) && (r < -65536.f) == (v < 0), "v=%g r=%g", v, r);
  }
  EXPECT(std::isnan(round_half_even(NAN)), "NaN");
}

static void test_half() {
  for (uint32_t h = 0; h < 65536; ++h) {
    f16_t in{static_cast<uint16_t>(h)};
    float f = to_f32(in);
    _Float16 ref;
    uint16_t hb = static_cast<uint16_t>(h);
    std::memcpy(&ref, &hb, 2);
    if (std::isnan(static_cast<float>(ref))) {
      EXPECT(std::isnan(f), "h=%04x", h);
      continue;
    }
    EXPECT(f == static_cast<float>(ref) && std::signbit(f) == std::signbit((float)ref), "h=%04x", h);
    f16_t back;
    from_f32(f, &back);
    EXPECT(back.bits == h, "round trip h=%04x got %04x", h, back.bits);
  }
  std::mt19937 rng(1);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = rng();
    float f;
    std::memcpy(&f, &u, 4);
    f16_t ours;
    from_f32(f, &ours);
    _Float16 ref = static_cast<_Float16>(f);
    uint16_t rb;
    std::memcpy(&rb, &ref, 2);
    if (std::isnan(f)) {
      EXPECT((ours.bits & 0x7c00u) == 0x7c00u && (ours.bits & 0x3ffu), "nan u=%08x", u);
    } else {
      EXPECT(ours.bits == rb, "u=%08x ours=%04x ref=%04x", u, ours.bits, rb);
    }
  }
}

static void test_bf16() {
  for (uint32_t h = 0; h < 65536; ++h) {
    bf16_t in{static_cast<uint16_t>(h)};
    float f = to_f32(in);
    if (std::isnan(f)) continue;
    bf16_t back;
    from_f32(f, &back);
    EXPECT(back.bits == h, "bf16 round trip h=%04x", h);
  }
  // Round to nearest even against a double-precision oracle.
  std::mt19937 rng(2);
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = rng() & 0x7f7fffffu;  // finite
    float f;
    std::memcpy(&f, &u, 4);
    bf16_t ours;
    from_f32(f, &ours);
    uint32_t lo = u & 0xffff0000u, hi = lo + 0x10000u;
    float flo, fhi;
    std::memcpy(&flo, &lo, 4);
    std::memcpy(&fhi, &hi, 4);
    // Rounding up from the largest finite bf16 gives inf: measure it as 2^128.
    double dhi = hi == 0x7f800000u ? std::ldexp(1.0, 128) : (double)fhi;
    double dl = std::fabs((double)f - flo), dh = std::fabs(dhi - f);
    uint16_t want = static_cast<uint16_t>(
        (dl < dh || (dl == dh && ((lo >> 16) & 1u) == 0)) ? lo >> 16 : hi >> 16);
    EXPECT(ours.bits == want, "u=%08x", u);
  }
}

static void test_forward_backward() {
  // y and the gradient terms for a hand-checked 4-bit signed grid, s = 0.5.
  const float s = 0.5f, inv = 2.0f, qmin = -8.f, qmax = 7.f;
  EXPECT(fq_forward(1.25f, s, inv, 0.f, 0.f, qmin, qmax) == 1.0f, "tie 2.5 -> 2");
  EXPECT(fq_forward(1.75f, s, inv, 0.f, 0.f, qmin, qmax) == 2.0f, "tie 3.5 -> 4");
  EXPECT(fq_forward(100.f, s, inv, 0.f, 0.f, qmin, qmax) == 3.5f, "clamp high");
  EXPECT(fq_forward(-INFINITY, s, inv, 0.f, 0.f, qmin, qmax) == -4.f, "-inf");
  EXPECT(std::isnan(fq_forward(NAN, s, inv, 0.f, 0.f, qmin, qmax)), "nan");
  FqGrad g = fq_backward_affine(2.f, 100.f, s, inv, 0.f, 0.f, qmin, qmax);
  EXPECT(g.dx == 0.f && g.dscale == 14.f && g.dclip == 2.f, "above");
  g = fq_backward_affine(2.f, 0.6f, s, inv, 0.f, 0.f, qmin, qmax);
  EXPECT(g.dx == 2.f && std::fabs(g.dscale - 2.f * (1.0f - 1.2f)) < 1e-6f && g.dclip == 0.f,
         "inside %g", g.dscale);
  g = fq_backward_affine(2.f, NAN, s, inv, 0.f, 0.f, qmin, qmax);
  EXPECT(g.dx == 0.f && g.dscale == 0.f && g.dclip == 0.f, "nan contributes nothing");
  FqChannel c = make_channel(kModeAffine, -1.f, 2.6f, 0.f, qmin, qmax);
  EXPECT(c.s == kScaleMin && c.zp == 3.f, "sanitised scale / zp");
  c = make_channel(kModeAffine, NAN, NAN, 0.f, qmin, qmax);
  EXPECT(c.s == kScaleMin && c.zp == 0.f, "NaN scale / zp");
  c = make_channel(kModePact, 3.f, 0.f, 0.f, 0.f, 15.f);
  EXPECT(c.clip == 3.f && c.s == 0.2f, "pact");
}

int main() {
  test_rounding();
  test_half();
  test_bf16();
  test_forward_backward();
  return q2ext_test::exit_code("fake_quant_math");
}
