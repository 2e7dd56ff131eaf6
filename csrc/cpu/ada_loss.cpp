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
// The row loops (ada_loss_loops.h) are compiled for AVX-512, AVX2 and the baseline (target
// attributes on the row drivers below) and picked by q2ext's CPU ISA switch, like the
// fake-quant kernels.
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

#include "ada_loss_loops.h"
#include "huge_pages.h"
#include "q2ext/ada_loss_args.h"
#include "q2ext/cpu_isa.h"
#include "q2ext/storage_dispatch.h"

namespace q2ext {
namespace ada_loss {
namespace cpu {
namespace {

constexpr int64_t kGrainElems = 1 << 15;

// ------------------------------------------------------------------ row drivers
// Each body is instantiated three times: AVX-512 and AVX2 through target attributes (the
// same strings as the fake-quant ISA translation units), and the baseline.  No FMA
// contraction anywhere (-ffp-contract=off), so all paths give identical bits; the path
// follows q2ext's CPU ISA choice (set_cpu_isa / Q2EXT_CPU_ISA).
#define Q2A_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2")))
#define Q2A_AVX2 __attribute__((target("avx2,fma,bmi2")))

template <typename T, typename F>
using ForwardFn = void (*)(const Inputs<T>&, const RowConfig&, F*, F*, double*, int64_t, int64_t, F*);
using BackwardFn = void (*)(const BackInputs&, const RowConfig&, int64_t, int64_t, void*);

#define Q2A_FORWARD_DRIVER(suffix, attr)                                                             \
  template <bool kHasQ, typename T, typename F>                                                      \
  attr void forward_rows_##suffix(const Inputs<T>& in, const RowConfig& cfg, F* p, F* st, double* rl, \
                                  int64_t b, int64_t e, F* scratch) {                                \
    forward_body<kHasQ, T, F>(in, cfg, p, st, rl, b, e, scratch);                                    \
  }
#define Q2A_BACKWARD_DRIVER(suffix, attr)                                                       \
  template <bool kHasQ, bool kJs, bool kSoftmax, typename T>                                    \
  attr void backward_rows_##suffix(const BackInputs& in, const RowConfig& cfg, int64_t b, int64_t e, \
                                   void* scratch) {                                             \
    using F = typename ComputeType<T>::type;                                                    \
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
void for_rows(const RowConfig& cfg, Fn&& fn) {
  const int64_t n = cfg.length;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / n);
  at::parallel_for(0, cfg.rows, grain, [&](int64_t begin, int64_t end) {
    at::Tensor scratch = at::empty({2 * n}, at::CppTypeToScalarType<F>::value);
    fn(begin, end, scratch.data_ptr<F>());
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ada_loss_cpu(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& student_q,
    const std::optional<at::Tensor>& teacher_q, const std::optional<at::Tensor>& step, double gamma,
    double kappa, int64_t divergence, int64_t normalize, double temperature) {
  check_ada_args(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize,
                 temperature);
  const at::Tensor step_d = step_as_double(step);
  const RowConfig cfg = make_row_config(student, step_d, gamma, kappa, divergence, normalize,
                                        temperature);
  const bool has_q = student_q.has_value();
  const at::Tensor xs = student.contiguous(), xt = teacher.contiguous();
  const at::Tensor xsq = has_q ? student_q->contiguous() : at::Tensor();
  const at::Tensor xtq = has_q ? teacher_q->contiguous() : at::Tensor();
  const auto ct = compute_dtype(student);
  const auto opts = student.options().dtype(ct);
  at::Tensor p = at::empty(student.sizes(), opts);
  advise_huge_pages(p);
  at::Tensor stats = at::empty({student.size(0), student.size(1), kRowStats}, opts);
  at::Tensor row_loss = at::empty({cfg.rows}, student.options().dtype(at::kDouble));
  if (cfg.rows > 0) {
    dispatch_storage(student.scalar_type(), [&](auto tag) {
      using T = decltype(tag);
      using F = typename ComputeType<T>::type;
      Inputs<T> in{static_cast<const T*>(xs.data_ptr()),
                   has_q ? static_cast<const T*>(xsq.data_ptr()) : nullptr,
                   static_cast<const T*>(xt.data_ptr()),
                   has_q ? static_cast<const T*>(xtq.data_ptr()) : nullptr};
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
  check_ada_backward_args(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa,
                          divergence, normalize, temperature);
  const at::Tensor step_d = step_as_double(step);
  const RowConfig cfg = make_row_config(student, step_d, gamma, kappa, divergence, normalize,
                                        temperature);
  const bool has_q = student_q.has_value();
  const at::Tensor xs = student.contiguous();
  const at::Tensor xsq = has_q ? student_q->contiguous() : at::Tensor();
  const at::Tensor p = teacher_dist.contiguous(), stats = row_stats.contiguous();
  at::Tensor dx = at::empty(student.sizes(), student.options());
  advise_huge_pages(dx);
  // The incoming gradient lives on the CPU like everything here: reading it is not a sync.
  const double g = *grad.to(at::kDouble).contiguous().data_ptr<double>();
  if (cfg.rows == 0) return dx;
  dispatch_storage(student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using F = typename ComputeType<T>::type;
    const BackInputs in{xs.data_ptr(), has_q ? xsq.data_ptr() : nullptr, p.data_ptr(),
                        stats.data_ptr(), g, dx.data_ptr()};
    const BackwardFn fn = pick_backward<T>(has_q, cfg.js, cfg.softmax);
    for_rows<F>(cfg, [&](int64_t b, int64_t e, F* scratch) { fn(in, cfg, b, e, scratch); });
  });
  return dx;
}

}  // namespace
}  // namespace cpu
}  // namespace ada_loss
}  // namespace q2ext

TORCH_LIBRARY_IMPL(q2ext, CPU, m) {
  m.impl("ada_loss", &q2ext::ada_loss::cpu::ada_loss_cpu);
  m.impl("ada_loss_backward", &q2ext::ada_loss::cpu::ada_loss_backward_cpu);
}
