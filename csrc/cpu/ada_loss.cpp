// CPU kernels of q2ext::ada_loss / q2ext::ada_loss_backward (Q-ADA).
//
// A row is one (sample, channel): L = H*W contiguous elements of a contiguous input.
// Rows are independent, so the work is split over rows; each row is processed from a
// per-task scratch of 2L compute-type values (a few KB, stays in L1/L2), which replaces
// the dozen full-size temporaries of the composite.
//  forward, per row: mean and population std of student and teacher (two passes each),
//    scores -> weights of both sides into the scratch, their sums, then one pass writing P
//    and the per-element divergence terms (into the scratch), summed afterwards;
//  backward, per row: one pass recomputing the student's weights and dL/dS, keeping the
//    two per-element terms of the mean/std derivatives in the scratch, their sums, one
//    pass writing dx.  The teacher enters only through the saved P.
// The row loops are compiled for AVX-512, AVX2 and the baseline (target attributes on the
// row drivers) and picked by q2ext's CPU ISA switch, like the fake-quant kernels.
// Sums use kLanes independent accumulators (vectorisable without reassociation) folded
// into double every kBlock elements; row losses are added in row order, so the results
// depend neither on the thread count nor on the ISA path.  Scratch and row buffers are
// torch allocations so that memory profiling sees them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "q2ext/ada_math.h"
#include "q2ext/cpu_isa.h"
#include "q2ext/huge_pages.h"
#include "q2ext/storage_dispatch.h"

namespace q2ext {

// Shared with csrc/cuda/ada_loss.cu (declared there): the checks behind every q2ext ADA
// kernel, mirroring q2ext/_ops_ada.py's check_ada_args.
void check_ada_args(const at::Tensor& student, const at::Tensor& teacher,
                    const std::optional<at::Tensor>& student_q,
                    const std::optional<at::Tensor>& teacher_q, const std::optional<at::Tensor>& step,
                    double gamma, double kappa, int64_t divergence, int64_t normalize,
                    double temperature) {
  const auto st = student.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "ada_loss: student must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(student.dim() >= 3,
              "ada_loss: student must be [N, C, *spatial] with >= 1 spatial dim, got ",
              student.sizes());
  int64_t spatial = 1;
  for (int64_t d = 2; d < student.dim(); ++d) spatial *= student.size(d);
  TORCH_CHECK(spatial > 0, "ada_loss: student's spatial size must be > 0, got shape ", student.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == st, "ada_loss: ", name, " must have the student's dtype ", st,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == student.sizes(), "ada_loss: ", name, " must have the student's shape ",
                student.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.device() == student.device(), "ada_loss: ", name, " is on ", t.device(),
                " but student is on ", student.device());
  };
  same(teacher, "teacher");
  if (student_q.has_value()) same(*student_q, "student_q");
  if (teacher_q.has_value()) same(*teacher_q, "teacher_q");
  TORCH_CHECK(student_q.has_value() == teacher_q.has_value(),
              "ada_loss: pass both student_q and teacher_q (the same quantizer) or neither");
  if (step.has_value()) {
    const int64_t c = student.size(1);
    TORCH_CHECK(step->scalar_type() == at::kFloat || step->scalar_type() == at::kDouble,
                "ada_loss: step must be float32 or float64, got ", step->scalar_type());
    TORCH_CHECK(step->dim() <= 1 && (step->numel() == 1 || step->numel() == c),
                "ada_loss: step must have shape [1] or [", c, "], got ", step->sizes());
    TORCH_CHECK(step->device() == student.device(), "ada_loss: step is on ", step->device(),
                " but student is on ", student.device());
  }
  TORCH_CHECK(gamma >= 0, "ada_loss: gamma must be >= 0, got ", gamma);
  TORCH_CHECK(kappa > 0, "ada_loss: kappa must be > 0, got ", kappa);
  TORCH_CHECK(temperature > 0, "ada_loss: temperature must be > 0, got ", temperature);
  TORCH_CHECK(divergence == ada::kDivJs || divergence == ada::kDivKl,
              "ada_loss: unknown divergence code ", divergence);
  TORCH_CHECK(normalize == ada::kNormSigmoid || normalize == ada::kNormSoftmax,
              "ada_loss: unknown normalize code ", normalize);
}

namespace cpu {
namespace {

using namespace q2ext::ada;

constexpr int kLanes = 16;
constexpr int64_t kBlock = 2048;  // elements per fp32 lane pass before folding into double
constexpr int64_t kGrainElems = 1 << 15;

// Everything below down to the row drivers is always_inline: the drivers are compiled once
// per ISA (target attributes, see "Row drivers"), and only code inlined into them is
// compiled for that ISA.  Nothing here is emitted out of line, so no AVX code can leak
// into a shared inline copy.
#define Q2A_INLINE inline __attribute__((always_inline))

// Element functors for lane_sum (lambdas would be out-of-line default-target functions).
template <typename T, typename F>
struct LoadOp {
  const T* __restrict x;
  Q2A_INLINE F operator()(int64_t i) const { return load(x[i]); }
};
template <typename T, typename F>
struct SqDevOp {
  const T* __restrict x;
  F m;
  Q2A_INLINE F operator()(int64_t i) const {
    const F d = load(x[i]) - m;
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
    for (int l = 0; l < kLanes; ++l) acc[l] = acc[l] < v[i + l] ? v[i + l] : acc[l];
  }
  for (; i < n; ++i) acc[0] = acc[0] < v[i] ? v[i] : acc[0];
  F m = acc[0];
  for (int l = 1; l < kLanes; ++l) m = m < acc[l] ? acc[l] : m;
  return m;
}

struct Config {
  int64_t rows, channels, length;
  double gamma, kappa, inv_temp;
  bool js, softmax;
};

template <typename T>
struct Inputs {
  const T* xs;
  const T* xsq;  // nullptr without quantized values
  const T* xt;
  const T* xtq;
  const double* step;  // per channel (already broadcast), nullptr: use sigma
};

template <typename T, typename F>
Q2A_INLINE void mean_std(const T* __restrict x, int64_t n, F* mu, F* sigma) {
  const F m = static_cast<F>(lane_sum<F>(n, LoadOp<T, F>{x}) / n);
  const double var = lane_sum<F>(n, SqDevOp<T, F>{x, m}) / n;
  *mu = m;
  *sigma = static_cast<F>(__builtin_sqrt(var));
}

template <typename F>
Q2A_INLINE RowConsts<F> row_consts(F mu, F sigma, const double* step, int64_t c, const Config& cfg) {
  const F kappa = static_cast<F>(cfg.kappa);
  const F s = step ? static_cast<F>(step[c]) : sigma;
  return RowConsts<F>{mu, F(1) / (sigma + kappa), F(1) / (s + kappa), static_cast<F>(cfg.gamma)};
}

// Element loops: plain pointer arguments, every per-call choice a template parameter, so
// that GCC vectorises each loop.

template <bool kHasQ, typename T, typename F>
Q2A_INLINE void scores(const T* __restrict x, const T* __restrict xq, int64_t n, const RowConsts<F> rc,
                       F* __restrict out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = score_of<kHasQ>(load(x[i]), kHasQ ? load(xq[i]) : F(0), rc).score;
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
                               const Config& cfg, F* w, F* max_score) {
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
Q2A_INLINE void forward_body(const Inputs<T>& in, const Config& cfg, F* p_out, F* stats, double* row_loss,
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
                                          row_consts(mu_s, sg_s, in.step, c, cfg), cfg, ws, &ms);
    const double zt = side_weights<kHasQ>(in.xt + off, kHasQ ? in.xtq + off : nullptr, n,
                                          row_consts(mu_t, sg_t, in.step, c, cfg), cfg, wt, &mt);
    double kl_rm = 0.0;
    if (cfg.js) {
      divergence_terms<true>(ws, wt, p_out + off, n, static_cast<F>(zs), static_cast<F>(zt));
      kl_rm = array_sum(wt, n);
    } else {
      divergence_terms<false>(ws, wt, p_out + off, n, static_cast<F>(zs), static_cast<F>(zt));
    }
    row_loss[row] = array_sum(ws, n);
    F* sr = stats + row * kRowStats;
    sr[0] = mu_s;
    sr[1] = sg_s;
    sr[2] = static_cast<F>(zs);
    sr[3] = ms;
    sr[4] = static_cast<F>(kl_rm);
  }
}

// Constants of one student row in the backward.
template <typename F>
struct BackRow {
  RowConsts<F> rc;
  F max_score, inv_t, z, kl_rm, g0, gamma2_sigma;  // gamma2_sigma: 2 gamma if s = sigma, else 0
};

// sgz[i] <- sign(d) dL/dz (through mu), ts[i] <- dL/dz z + [s = sigma] dL/dr r (through sigma).
template <bool kHasQ, bool kJs, bool kSoftmax, typename T, typename F>
Q2A_INLINE void backward_terms(const T* __restrict x, const T* __restrict xq, const F* __restrict p,
                               int64_t n, const BackRow<F> b, F* __restrict sgz, F* __restrict ts) {
  for (int64_t i = 0; i < n; ++i) {
    const Score<F> s = score_of<kHasQ>(load(x[i]), kHasQ ? load(xq[i]) : F(0), b.rc);
    const F w = weight_of(s.score, kSoftmax, b.max_score, b.inv_t);
    const F g = b.g0 * dscore_of(p[i], w / b.z, w, kJs, b.kl_rm, kSoftmax, b.inv_t);
    const F gz = g * F(2) * s.z / s.uz;
    sgz[i] = sign_of(s.d) * gz;
    F t = gz * s.z;
    if constexpr (kHasQ) t = t + g * b.gamma2_sigma * s.r2 / s.ur;
    ts[i] = t;
  }
}

template <typename T, typename F>
Q2A_INLINE void write_dx(const T* __restrict x, const F* __restrict sgz, int64_t n, F mu, F qz, F mean1,
                         F coef, T* __restrict dx) {
  for (int64_t i = 0; i < n; ++i) {
    const F d = load(x[i]) - mu;
    store(qz * (sgz[i] - mean1 - coef * d), &dx[i]);
  }
}

struct BackInputs {
  const void* xs;
  const void* xsq;
  const double* step;
  const void* p;
  const void* stats;
  double grad;
  void* dx;
};

// Backward of rows [begin, end); scratch: 2L values.
template <bool kHasQ, bool kJs, bool kSoftmax, typename T, typename F>
Q2A_INLINE void backward_body(const BackInputs& in, const Config& cfg, int64_t begin, int64_t end, F* scratch) {
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
    BackRow<F> b;
    b.rc = row_consts(mu, sigma, in.step, c, cfg);
    b.max_score = sr[3];
    b.inv_t = static_cast<F>(cfg.inv_temp);
    b.z = sr[2];
    b.kl_rm = sr[4];
    b.g0 = static_cast<F>(in.grad / static_cast<double>(cfg.rows));
    b.gamma2_sigma = in.step == nullptr ? static_cast<F>(2.0 * cfg.gamma) : F(0);
    const T* x = xs + off;
    backward_terms<kHasQ, kJs, kSoftmax>(x, kHasQ ? xsq + off : nullptr, p_all + off, n, b, sgz, ts);
    const double a1 = array_sum(sgz, n), a2 = array_sum(ts, n);
    const F mean1 = static_cast<F>(a1 / n);
    const F coef = sigma > F(0) ? static_cast<F>(a2 / (static_cast<double>(n) * sigma)) : F(0);
    write_dx(x, sgz, n, mu, b.rc.qz, mean1, coef, dx_out + off);
  }
}

// ------------------------------------------------------------------ row drivers
// Each body is instantiated three times: AVX-512 and AVX2 through target attributes (the
// same strings as the fake-quant ISA translation units), and the baseline.  No FMA
// contraction anywhere (-ffp-contract=off), so all paths give identical bits; the path
// follows q2ext's CPU ISA choice (set_cpu_isa / Q2EXT_CPU_ISA).
#define Q2A_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")))
#define Q2A_AVX2 __attribute__((target("avx2,fma,bmi2")))

template <typename T, typename F>
using ForwardFn = void (*)(const Inputs<T>&, const Config&, F*, F*, double*, int64_t, int64_t, F*);
using BackwardFn = void (*)(const BackInputs&, const Config&, int64_t, int64_t, void*);

#define Q2A_FORWARD_DRIVER(suffix, attr)                                                             \
  template <bool kHasQ, typename T, typename F>                                                      \
  attr void forward_rows_##suffix(const Inputs<T>& in, const Config& cfg, F* p, F* st, double* rl, \
                                  int64_t b, int64_t e, F* scratch) {                                \
    forward_body<kHasQ, T, F>(in, cfg, p, st, rl, b, e, scratch);                                    \
  }
#define Q2A_BACKWARD_DRIVER(suffix, attr)                                                       \
  template <bool kHasQ, bool kJs, bool kSoftmax, typename T>                                    \
  attr void backward_rows_##suffix(const BackInputs& in, const Config& cfg, int64_t b, int64_t e, \
                                   void* scratch) {                                             \
    using F = typename Compute<T>::type;                                                        \
    backward_body<kHasQ, kJs, kSoftmax, T, F>(in, cfg, b, e, static_cast<F*>(scratch));         \
  }
Q2A_FORWARD_DRIVER(avx512, Q2A_AVX512)
Q2A_FORWARD_DRIVER(avx2, Q2A_AVX2)
Q2A_FORWARD_DRIVER(scalar, )
Q2A_BACKWARD_DRIVER(avx512, Q2A_AVX512)
Q2A_BACKWARD_DRIVER(avx2, Q2A_AVX2)
Q2A_BACKWARD_DRIVER(scalar, )

template <bool kHasQ, typename T, typename F>
ForwardFn<T, F> pick_forward() {
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512: return &forward_rows_avx512<kHasQ, T, F>;
    case CpuIsa::kAvx2: return &forward_rows_avx2<kHasQ, T, F>;
    default: return &forward_rows_scalar<kHasQ, T, F>;
  }
}

template <bool kHasQ, bool kJs, bool kSoftmax, typename T>
BackwardFn pick_backward() {
  switch (active_cpu_isa()) {
    case CpuIsa::kAvx512: return &backward_rows_avx512<kHasQ, kJs, kSoftmax, T>;
    case CpuIsa::kAvx2: return &backward_rows_avx2<kHasQ, kJs, kSoftmax, T>;
    default: return &backward_rows_scalar<kHasQ, kJs, kSoftmax, T>;
  }
}

template <typename T>
BackwardFn pick_backward(bool has_q, bool js, bool softmax) {
  const int k = (has_q ? 4 : 0) + (js ? 2 : 0) + (softmax ? 1 : 0);
  switch (k) {
    case 0: return pick_backward<false, false, false, T>();
    case 1: return pick_backward<false, false, true, T>();
    case 2: return pick_backward<false, true, false, T>();
    case 3: return pick_backward<false, true, true, T>();
    case 4: return pick_backward<true, false, false, T>();
    case 5: return pick_backward<true, false, true, T>();
    case 6: return pick_backward<true, true, false, T>();
    default: return pick_backward<true, true, true, T>();
  }
}

// Rows are split over threads; each task gets its scratch as a torch allocation (memory
// profiling sees it).
template <typename F, typename Fn>
void for_rows(const Config& cfg, Fn&& fn) {
  const int64_t n = cfg.length;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  at::parallel_for(0, cfg.rows, grain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({2 * n}, at::CppTypeToScalarType<F>::value);
    fn(begin, end, scratch.data_ptr<F>());
  });
}

std::vector<double> step_values(const std::optional<at::Tensor>& step, int64_t channels) {
  std::vector<double> v;
  if (!step.has_value()) return v;
  at::Tensor s = step->to(at::kDouble).contiguous().reshape({-1});
  const double* sp = s.data_ptr<double>();
  v.resize(channels);
  for (int64_t c = 0; c < channels; ++c) v[c] = sp[s.numel() == 1 ? 0 : c];
  return v;
}

Config make_config(const at::Tensor& x, double gamma, double kappa, int64_t divergence,
                   int64_t normalize, double temperature) {
  Config cfg;
  cfg.channels = x.size(1);
  cfg.rows = x.size(0) * x.size(1);
  cfg.length = cfg.rows == 0 ? 0 : x.numel() / cfg.rows;
  cfg.gamma = gamma;
  cfg.kappa = kappa;
  cfg.inv_temp = 1.0 / temperature;
  cfg.js = divergence == kDivJs;
  cfg.softmax = normalize == kNormSoftmax;
  return cfg;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ada_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& student_q,
    const std::optional<at::Tensor>& teacher_q, const std::optional<at::Tensor>& step, double gamma,
    double kappa, int64_t divergence, int64_t normalize, double temperature) {
  check_ada_args(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize,
                 temperature);
  const Config cfg = make_config(student, gamma, kappa, divergence, normalize, temperature);
  const bool has_q = student_q.has_value();
  const at::Tensor xs = student.contiguous(), xt = teacher.contiguous();
  const at::Tensor xsq = has_q ? student_q->contiguous() : at::Tensor();
  const at::Tensor xtq = has_q ? teacher_q->contiguous() : at::Tensor();
  const auto ct = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto opts = student.options().dtype(ct);
  at::Tensor p = at::empty(student.sizes(), opts);
  advise_huge_pages(p);
  at::Tensor stats = at::empty({student.size(0), student.size(1), kRowStats}, opts);
  at::Tensor row_loss = at::empty({cfg.rows}, student.options().dtype(at::kDouble));
  const std::vector<double> steps = step_values(step, cfg.channels);
  if (cfg.rows > 0) {
    dispatch_storage(student.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using F = typename Compute<T>::type;
      Inputs<T> in{static_cast<const T*>(xs.data_ptr()),
                   has_q ? static_cast<const T*>(xsq.data_ptr()) : nullptr,
                   static_cast<const T*>(xt.data_ptr()),
                   has_q ? static_cast<const T*>(xtq.data_ptr()) : nullptr,
                   steps.empty() ? nullptr : steps.data()};
      F* pp = static_cast<F*>(p.data_ptr());
      F* sp = static_cast<F*>(stats.data_ptr());
      double* lp = row_loss.data_ptr<double>();
      const ForwardFn<T, F> fn = has_q ? pick_forward<true, T, F>() : pick_forward<false, T, F>();
      for_rows<F>(cfg, [&](int64_t b, int64_t e, F* scratch) { fn(in, cfg, pp, sp, lp, b, e, scratch); });
    });
  }
  // Mean over rows in row order: deterministic for any thread count (0/0 = NaN for no rows,
  // as torch.mean of an empty tensor).
  const double* lp = row_loss.data_ptr<double>();
  double total = 0.0;
  for (int64_t r = 0; r < cfg.rows; ++r) total += lp[r];
  at::Tensor loss = at::empty({}, opts);
  if (ct == at::kDouble) {
    *loss.data_ptr<double>() = total / static_cast<double>(cfg.rows);
  } else {
    *loss.data_ptr<float>() = static_cast<float>(total / static_cast<double>(cfg.rows));
  }
  return {loss, p, stats};
}

at::Tensor ada_loss_backward_cpu(const at::Tensor& grad, const at::Tensor& student,
                                 const std::optional<at::Tensor>& student_q,
                                 const std::optional<at::Tensor>& step, const at::Tensor& teacher_dist,
                                 const at::Tensor& row_stats, double gamma, double kappa,
                                 int64_t divergence, int64_t normalize, double temperature) {
  check_ada_args(student, student, student_q, student_q, step, gamma, kappa, divergence, normalize,
                 temperature);
  const auto ct = student.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad.dim() == 0 && grad.scalar_type() == ct,
              "ada_loss_backward: grad must be a 0-dim ", ct, " tensor");
  TORCH_CHECK(teacher_dist.sizes() == student.sizes() && teacher_dist.scalar_type() == ct,
              "ada_loss_backward: teacher_dist must be ", ct, " of shape ", student.sizes());
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == student.size(0) &&
                  row_stats.size(1) == student.size(1) && row_stats.size(2) == kRowStats &&
                  row_stats.scalar_type() == ct,
              "ada_loss_backward: row_stats must be ", ct, " of shape [N, C, ", kRowStats, "]");
  const Config cfg = make_config(student, gamma, kappa, divergence, normalize, temperature);
  const bool has_q = student_q.has_value();
  const at::Tensor xs = student.contiguous();
  const at::Tensor xsq = has_q ? student_q->contiguous() : at::Tensor();
  const at::Tensor p = teacher_dist.contiguous(), stats = row_stats.contiguous();
  at::Tensor dx = at::empty(student.sizes(), student.options());
  advise_huge_pages(dx);
  const std::vector<double> steps = step_values(step, cfg.channels);
  // The incoming gradient lives on the CPU like everything here: reading it is not a sync.
  const double g = *grad.to(at::kDouble).contiguous().data_ptr<double>();
  if (cfg.rows == 0) return dx;
  dispatch_storage(student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using F = typename Compute<T>::type;
    const BackInputs in{xs.data_ptr(), has_q ? xsq.data_ptr() : nullptr,
                        steps.empty() ? nullptr : steps.data(), p.data_ptr(), stats.data_ptr(), g,
                        dx.data_ptr()};
    const BackwardFn fn = pick_backward<T>(has_q, cfg.js, cfg.softmax);
    for_rows<F>(cfg, [&](int64_t b, int64_t e, F* scratch) { fn(in, cfg, b, e, scratch); });
  });
  return dx;
}

}  // namespace

TORCH_LIBRARY_IMPL(q2ext, CPU, m) {
  m.impl("ada_loss", &ada_loss_cpu);
  m.impl("ada_loss_backward", &ada_loss_backward_cpu);
}

}  // namespace cpu
}  // namespace q2ext
