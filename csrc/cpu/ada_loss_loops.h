// Row loops of the CPU Q-ADA kernels (csrc/cpu/ada_loss.cpp, the only file that includes
// this): per-row statistics, scores and weights, the divergence terms and the backward's
// per-element terms, all over one row's scratch.  See ada_loss.cpp for the design.
#pragma once

#include <cstdint>

#include "q2ext/ada_loss_math.h"

namespace q2ext {
namespace ada_loss {
namespace cpu {

constexpr int kLanes = 16;
constexpr int64_t kBlock = 2048;  // elements per fp32 lane pass before folding into double

// Everything here is always_inline: the row drivers (ada_loss.cpp) are compiled once per
// ISA (target attributes), and only code inlined into them is compiled for that ISA.
// Nothing here is emitted out of line, so no AVX code can leak into a shared inline copy.
#define Q2A_INLINE inline __attribute__((always_inline))

// Element functors for lane_sum (lambdas would be out-of-line default-target functions).
template <typename T, typename F>
struct LoadOp {
  const T* __restrict x;
  Q2A_INLINE F operator()(int64_t i) const { return to_compute(x[i]); }
};
template <typename T, typename F>
struct SqDevOp {
  const T* __restrict x;
  F m;
  Q2A_INLINE F operator()(int64_t i) const {
    const F d = to_compute(x[i]) - m;
    return d * d;
  }
};

// sum_i f(i) over [0, n): lane partial sums in F, folded into double per block.  The lane
// order is fixed, so every ISA path gives the same bits.
template <typename F, typename Op>
Q2A_INLINE double lane_sum(int64_t n, const Op& f) {
  double total = 0.0;
  for (int64_t b = 0; b < n; b += kBlock) {
    const int64_t e = n < b + kBlock ? n : b + kBlock;
    F acc[kLanes] = {};
    int64_t i = b;
    for (; i + kLanes <= e; i += kLanes) {
#pragma GCC unroll 16
      for (int l = 0; l < kLanes; ++l) acc[l] += f(i + l);
    }
    for (; i < e; ++i) acc[0] += f(i);
    for (int l = 0; l < kLanes; ++l) total += static_cast<double>(acc[l]);
  }
  return total;
}

template <typename F>
Q2A_INLINE double array_sum(const F* __restrict v, int64_t n) {
  return lane_sum<F>(n, LoadOp<F, F>{v});
}

template <typename F>
Q2A_INLINE F row_max(const F* v, int64_t n) {
  F acc[kLanes];
  for (int l = 0; l < kLanes; ++l) acc[l] = v[0];
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
#pragma GCC unroll 16
    for (int l = 0; l < kLanes; ++l) acc[l] = max_nan(acc[l], v[i + l]);
  }
  for (; i < n; ++i) acc[0] = max_nan(acc[0], v[i]);
  F m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = max_nan(m, acc[l]);
  return m;
}

template <typename T>
struct Inputs {
  const T* xs;
  const T* xsq;  // nullptr without quantized values
  const T* xt;
  const T* xtq;
};

template <typename T, typename F>
Q2A_INLINE void mean_std(const T* __restrict x, int64_t n, F* mu, F* sigma) {
  const F m = static_cast<F>(lane_sum<F>(n, LoadOp<T, F>{x}) / n);
  const double var = lane_sum<F>(n, SqDevOp<T, F>{x, m}) / n;
  *mu = m;
  *sigma = static_cast<F>(__builtin_sqrt(var));
}

// Element loops: plain pointer arguments, every per-call choice a template parameter, so
// that GCC vectorises each loop.

template <bool kHasQ, typename T, typename F>
Q2A_INLINE void scores(const T* __restrict x, const T* __restrict xq, int64_t n, const RowConsts<F> rc,
                       F* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = score_of<kHasQ>(to_compute(x[i]), kHasQ ? to_compute(xq[i]) : F(0), rc).score;
  }
}

template <bool kSoftmax, typename F>
Q2A_INLINE void weights(F* __restrict w, int64_t n, F max_score, F inv_t) {
  for (int64_t i = 0; i < n; ++i) w[i] = weight_of(w[i], kSoftmax, max_score, inv_t);
}

// In place: ws[i] <- the element's divergence term, wt[i] <- R log(R/M) (JS); p <- P.
template <bool kJs, typename F>
Q2A_INLINE void divergence_terms(F* __restrict ws, F* __restrict wt, F* __restrict p, int64_t n, F zs,
                                 F zt) {
  for (int64_t i = 0; i < n; ++i) {
    const F pi = wt[i] / zt, ri = ws[i] / zs;  // divided, not scaled: one rounding, as the reference
    p[i] = pi;
    if constexpr (kJs) {
      const DivTerm<F> t = js_term(pi, ri);
      ws[i] = t.loss;
      wt[i] = t.r_log_rm;
    } else {
      ws[i] = kl_term(pi, ri);
    }
  }
}

// One side's weights in w; returns the sum of w and sets the max score.
template <bool kHasQ, typename T, typename F>
Q2A_INLINE double side_weights(const T* x, const T* xq, int64_t n, const RowConsts<F>& rc,
                               const RowConfig& cfg, F* w, F* max_score) {
  scores<kHasQ>(x, xq, n, rc, w);
  const F inv_t = static_cast<F>(cfg.inv_temp);
  F m = F(0);
  if (cfg.softmax) {
    m = row_max(w, n);
    weights<true>(w, n, m, inv_t);
  } else {
    weights<false>(w, n, m, inv_t);
  }
  *max_score = m;
  return array_sum(w, n);
}

// Forward of rows [begin, end); scratch: 2L values.
template <bool kHasQ, typename T, typename F>
Q2A_INLINE void forward_body(const Inputs<T>& in, const RowConfig& cfg, F* p_out, F* stats, double* row_loss,
                             int64_t begin, int64_t end, F* scratch) {
  const int64_t n = cfg.length;
  F* ws = scratch;
  F* wt = scratch + n;
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * n, c = row % cfg.channels;
    F mu_s, sg_s, mu_t, sg_t, ms, mt;
    mean_std(in.xs + off, n, &mu_s, &sg_s);
    mean_std(in.xt + off, n, &mu_t, &sg_t);
    const double zs = side_weights<kHasQ>(in.xs + off, kHasQ ? in.xsq + off : nullptr, n,
                                          row_consts(mu_s, sg_s, c, cfg), cfg, ws, &ms);
    const double zt = side_weights<kHasQ>(in.xt + off, kHasQ ? in.xtq + off : nullptr, n,
                                          row_consts(mu_t, sg_t, c, cfg), cfg, wt, &mt);
    double kl_rm = 0.0;
    if (cfg.js) {
      divergence_terms<true>(ws, wt, p_out + off, n, static_cast<F>(zs), static_cast<F>(zt));
      kl_rm = array_sum(wt, n);
    } else {
      divergence_terms<false>(ws, wt, p_out + off, n, static_cast<F>(zs), static_cast<F>(zt));
    }
    row_loss[row] = array_sum(ws, n);
    store_row_stats(stats + row * kRowStats, mu_s, sg_s, zs, ms, kl_rm);
  }
}

// sgz[i] <- sign(d) dL/dz (through mu), ts[i] <- dL/dz z + [s = sigma] dL/dr r (through sigma).
template <bool kHasQ, bool kJs, bool kSoftmax, typename T, typename F>
Q2A_INLINE void backward_terms(const T* __restrict x, const T* __restrict xq, const F* __restrict p,
                               int64_t n, const BackRow<F> b, F* __restrict sgz, F* __restrict ts) {
  for (int64_t i = 0; i < n; ++i) {
    F t;
    sgz[i] = backward_terms_of<kHasQ>(to_compute(x[i]), kHasQ ? to_compute(xq[i]) : F(0), p[i], b,
                                      kJs, kSoftmax, &t);
    ts[i] = t;
  }
}

template <typename T, typename F>
Q2A_INLINE void write_dx(const T* __restrict x, const F* __restrict sgz, int64_t n, F mu, F qz, F mean1,
                         F coef, T* __restrict dx) {
  for (int64_t i = 0; i < n; ++i) {
    const F d = to_compute(x[i]) - mu;
    store_compute(qz * (sgz[i] - mean1 - coef * d), &dx[i]);
  }
}

struct BackInputs {
  const void* xs;
  const void* xsq;
  const void* p;
  const void* stats;
  double grad;
  void* dx;
};

// Backward of rows [begin, end); scratch: 2L values.
template <bool kHasQ, bool kJs, bool kSoftmax, typename T, typename F>
Q2A_INLINE void backward_body(const BackInputs& in, const RowConfig& cfg, int64_t begin, int64_t end, F* scratch) {
  const int64_t n = cfg.length;
  F* sgz = scratch;
  F* ts = scratch + n;
  const T* xs = static_cast<const T*>(in.xs);
  const T* xsq = static_cast<const T*>(in.xsq);
  const F* p_all = static_cast<const F*>(in.p);
  const F* stats = static_cast<const F*>(in.stats);
  T* dx_out = static_cast<T*>(in.dx);
  for (int64_t row = begin; row < end; ++row) {
    const int64_t off = row * n, c = row % cfg.channels;
    const F* sr = stats + row * kRowStats;
    const F mu = sr[0], sigma = sr[1];
    const BackRow<F> b = back_row(sr, c, cfg, in.grad);
    const T* x = xs + off;
    backward_terms<kHasQ, kJs, kSoftmax>(x, kHasQ ? xsq + off : nullptr, p_all + off, n, b, sgz, ts);
    const double a1 = array_sum(sgz, n), a2 = array_sum(ts, n);
    const F mean1 = static_cast<F>(a1 / n);
    const F coef = sigma > F(0) ? static_cast<F>(a2 / (static_cast<double>(n) * sigma)) : F(0);
    write_dx(x, sgz, n, mu, b.rc.qz, mean1, coef, dx_out + off);
  }
}

}  // namespace cpu
}  // namespace ada_loss
}  // namespace q2ext
