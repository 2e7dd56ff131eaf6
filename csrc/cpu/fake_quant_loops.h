// ISA-independent element loops of the CPU fake-quant kernels.
//
// This header is compiled three times (fake_quant_isa_*.cpp), each time under a
// different `#pragma GCC target`, and relies on the compiler's auto-vectoriser: the
// loops are branch-free per element and the reductions keep kLanes independent fp32
// accumulators, so vectorising needs no reassociation and every ISA path produces
// bit-identical results.  No torch or std header may be included here (see
// numerics.h on why everything has internal linkage).
#pragma once

#include <cstdint>

#include "q2ext/fake_quant_math.h"

namespace q2ext {
namespace fake_quant {
namespace cpu {

// One argument block for every loop: x/y/dy/dx point at the first element of the
// segment; chan_* at the per-channel arrays, already offset to the segment's first
// channel when `per_element` is set (innermost-axis layout: element i has channel i),
// otherwise only chan_*[0] is used.
struct SegmentArgs {
  const void* x;
  const void* dy;
  void* out;  // y (forward) or dx (backward)
  int64_t n;
  const float* s;
  const float* inv;
  const float* zp;
  const float* off;
  const float* clip;
  bool per_element;
  int64_t mode;
  float qmin, qmax;
  float* acc_scale;  // backward: per-channel (per_element) or [1] sums, accumulated into
  float* acc_clip;
};

constexpr int kLanes = 16;

template <typename T>
static void forward_segment(const SegmentArgs& a) {
  const T* __restrict x = static_cast<const T*>(a.x);
  T* __restrict y = static_cast<T*>(a.out);
  const float qmin = a.qmin, qmax = a.qmax;
  if (a.per_element) {
    for (int64_t i = 0; i < a.n; ++i) {
      from_f32(fq_forward(to_f32(x[i]), a.s[i], a.inv[i], a.zp[i], a.off[i], qmin, qmax),
               &y[i]);
    }
  } else {
    const float s = a.s[0], inv = a.inv[0], zp = a.zp[0], off = a.off[0];
    for (int64_t i = 0; i < a.n; ++i) {
      from_f32(fq_forward(to_f32(x[i]), s, inv, zp, off, qmin, qmax), &y[i]);
    }
  }
}

// Backward of one segment that shares a single channel: lane accumulators, summed in a
// fixed order at the end so results do not depend on the vector width.  Parameters come
// in as plain values (not through SegmentArgs) - with them behind a reference GCC 12
// refuses to if-convert the lane loop.
template <typename T, int64_t kMode>
static void backward_lanes(const T* __restrict x, const T* __restrict dy, T* __restrict dx,
                           int64_t n, float s, float inv, float zp, float off, float clip,
                           float qmin, float qmax, float* __restrict out_s,
                           float* __restrict out_c) {
  float acc_s[kLanes] = {0}, acc_c[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    // ivdep: without it GCC versions this loop on a run-time alias check between dx and
    // the lane arrays that fails, and the scalar fallback runs.
#pragma GCC ivdep
    for (int l = 0; l < kLanes; ++l) {
      FqGrad g = fq_backward<kMode>(to_f32(dy[i + l]), to_f32(x[i + l]), s, inv, zp, off,
                                    clip, qmin, qmax);
      from_f32(g.dx, &dx[i + l]);
      acc_s[l] += g.dscale;
      acc_c[l] += g.dclip;
    }
  }
  // Tail (< kLanes elements) into scalars: indexing the lane arrays with a run-time
  // index would stop GCC from keeping them in registers in the main loop.
  float ts = 0.f, tc = 0.f;
  for (; i < n; ++i) {
    FqGrad g = fq_backward<kMode>(to_f32(dy[i]), to_f32(x[i]), s, inv, zp, off, clip, qmin,
                                  qmax);
    from_f32(g.dx, &dx[i]);
    ts += g.dscale;
    tc += g.dclip;
  }
  for (int l = 0; l < kLanes; ++l) {
    ts += acc_s[l];
    tc += acc_c[l];
  }
  *out_s += ts;
  *out_c += tc;
}

template <typename T, int64_t kMode>
static void backward_segment_shared(const SegmentArgs& a) {
  backward_lanes<T, kMode>(static_cast<const T*>(a.x), static_cast<const T*>(a.dy),
                           static_cast<T*>(a.out), a.n, a.s[0], a.inv[0], a.zp[0], a.off[0],
                           a.clip[0], a.qmin, a.qmax, a.acc_scale, a.acc_clip);
}

// Backward of one row of the innermost-axis layout: element i belongs to channel i.
template <typename T, int64_t kMode>
static void backward_segment_per_element(const SegmentArgs& a) {
  const T* __restrict x = static_cast<const T*>(a.x);
  const T* __restrict dy = static_cast<const T*>(a.dy);
  T* __restrict dx = static_cast<T*>(a.out);
  float* __restrict acc_s = a.acc_scale;
  float* __restrict acc_c = a.acc_clip;
  const float qmin = a.qmin, qmax = a.qmax;
  for (int64_t i = 0; i < a.n; ++i) {
    FqGrad g = fq_backward<kMode>(to_f32(dy[i]), to_f32(x[i]), a.s[i], a.inv[i], a.zp[i],
                           a.off[i], a.clip[i], qmin, qmax);
    from_f32(g.dx, &dx[i]);
    acc_s[i] += g.dscale;
    acc_c[i] += g.dclip;
  }
}

template <typename T>
static void backward_segment(const SegmentArgs& a) {
  if (a.mode == kModePact) {
    a.per_element ? backward_segment_per_element<T, kModePact>(a)
                  : backward_segment_shared<T, kModePact>(a);
  } else if (a.mode == kModeLsq) {
    a.per_element ? backward_segment_per_element<T, kModeLsq>(a)
                  : backward_segment_shared<T, kModeLsq>(a);
  } else {
    a.per_element ? backward_segment_per_element<T, kModeAffine>(a)
                  : backward_segment_shared<T, kModeAffine>(a);
  }
}

}  // namespace cpu
}  // namespace fake_quant
}  // namespace q2ext

// Defines the entry points of one ISA path inside namespace q2ext::fake_quant::cpu::<ns>.
#define Q2EXT_DEFINE_ISA_ENTRY_POINTS(ns)                                          \
  namespace q2ext {                                                                \
  namespace fake_quant {                                                           \
  namespace cpu {                                                                  \
  namespace ns {                                                                   \
  void forward_segment_f32(const SegmentArgs& a) { forward_segment<float>(a); }    \
  void forward_segment_bf16(const SegmentArgs& a) { forward_segment<bf16_t>(a); }  \
  void forward_segment_f16(const SegmentArgs& a) { forward_segment<f16_t>(a); }    \
  void backward_segment_f32(const SegmentArgs& a) { backward_segment<float>(a); }  \
  void backward_segment_bf16(const SegmentArgs& a) { backward_segment<bf16_t>(a); } \
  void backward_segment_f16(const SegmentArgs& a) { backward_segment<f16_t>(a); }  \
  }                                                                                \
  }                                                                                \
  }                                                                                \
  }

// Declarations of the entry points for the dispatcher (fake_quant.cpp).
#define Q2EXT_DECLARE_ISA_ENTRY_POINTS(ns)                  \
  namespace q2ext {                                         \
  namespace fake_quant {                                    \
  namespace cpu {                                           \
  namespace ns {                                            \
  void forward_segment_f32(const SegmentArgs& a);           \
  void forward_segment_bf16(const SegmentArgs& a);          \
  void forward_segment_f16(const SegmentArgs& a);           \
  void backward_segment_f32(const SegmentArgs& a);          \
  void backward_segment_bf16(const SegmentArgs& a);         \
  void backward_segment_f16(const SegmentArgs& a);          \
  }                                                         \
  }                                                         \
  }                                                         \
  }
