// CUDA kernels of q2ext::ada_loss / q2ext::ada_loss_backward (Q-ADA).
//
// One thread block per row (sample, channel; L = H*W contiguous elements of a contiguous
// input).  Rows are typically 400..25600 elements, small enough that the repeated passes
// over a row below hit L2, and N*C (hundreds to thousands) fills the GPU.
//  forward:  pass 1 sums (means), pass 2 centred squares (population std), pass 3 maxima
//            of the scores (softmax only), pass 4 the weights of both sides - the
//            teacher's parked in the P output - and their sums, pass 5 P = w_t / sum and
//            the divergence.  The student's weights are recomputed rather than stored:
//            a row does not fit in shared memory and a full-size buffer is what the op
//            exists to avoid.  A second, single-block kernel adds the row losses.
//  backward: pass 1 dL/dS per element and the two row sums of the mean/std derivatives,
//            pass 2 writes dx.  For fp32/fp64 pass 1 parks sign(d) dL/dz in dx itself (the
//            same thread reads it back), for 16-bit storage it is recomputed.
// Determinism: no atomics; per-thread sums in double, combined by a fixed shuffle tree
// and a fixed warp order; row losses are summed by one block in a fixed order.
// Everything stays on the device: the incoming gradient is read through its pointer.
// The per-element math is csrc/include/q2ext/ada_loss_math.h (same code as the CPU kernel).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "q2ext/ada_loss_args.h"
#include "q2ext/storage_dispatch.h"

namespace q2ext::ada_loss::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Block-wide sum; every thread gets the result.  `sh` holds kWarps + 1 doubles.
__device__ __forceinline__ double block_sum(double v, double* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = 0.0;
    for (int w = 0; w < kWarps; ++w) t += sh[w];
    sh[kWarps] = t;
  }
  __syncthreads();
  const double r = sh[kWarps];
  __syncthreads();  // sh is reused by the next reduction
  return r;
}

// Block-wide maximum that propagates NaN (max_nan), as the reference's amax.
template <typename F>
__device__ __forceinline__ F block_max(F v, double* sh) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = max_nan(v, static_cast<F>(__shfl_down_sync(0xffffffffu, v, o)));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) sh[warp] = static_cast<double>(v);
  __syncthreads();
  if (threadIdx.x == 0) {
    double t = sh[0];
    for (int w = 1; w < kWarps; ++w) t = max_nan(t, sh[w]);
    sh[kWarps] = t;
  }
  __syncthreads();
  const F r = static_cast<F>(sh[kWarps]);
  __syncthreads();
  return r;
}

template <typename T, bool kHasQ>
__global__ void __launch_bounds__(kThreads)
    ada_forward_kernel(const T* __restrict__ xs, const T* __restrict__ xsq, const T* __restrict__ xt,
                       const T* __restrict__ xtq, RowConfig a,
                       typename ComputeType<T>::type* __restrict__ p_out,
                       typename ComputeType<T>::type* __restrict__ stats, double* __restrict__ row_loss) {
  using F = typename ComputeType<T>::type;
  __shared__ double sh[kWarps + 1];
  const int64_t row = blockIdx.x, n = a.length, off = row * n, c = row % a.channels;
  xs += off;
  xt += off;
  if constexpr (kHasQ) {
    xsq += off;
    xtq += off;
  }
  F* p = p_out + off;

  double ss = 0.0, st = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    ss += static_cast<double>(to_compute(xs[i]));
    st += static_cast<double>(to_compute(xt[i]));
  }
  const F mu_s = static_cast<F>(block_sum(ss, sh) / n), mu_t = static_cast<F>(block_sum(st, sh) / n);
  ss = 0.0;
  st = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const F ds = to_compute(xs[i]) - mu_s, dt = to_compute(xt[i]) - mu_t;
    ss += static_cast<double>(ds * ds);
    st += static_cast<double>(dt * dt);
  }
  const F sg_s = static_cast<F>(sqrt(block_sum(ss, sh) / n));
  const F sg_t = static_cast<F>(sqrt(block_sum(st, sh) / n));
  const RowConsts<F> rs = row_consts(mu_s, sg_s, c, a), rt = row_consts(mu_t, sg_t, c, a);
  auto score_s = [&](int64_t i) { return score_of<kHasQ>(to_compute(xs[i]), kHasQ ? to_compute(xsq[i]) : F(0), rs).score; };
  auto score_t = [&](int64_t i) { return score_of<kHasQ>(to_compute(xt[i]), kHasQ ? to_compute(xtq[i]) : F(0), rt).score; };

  F ms = F(0), mt = F(0);
  if (a.softmax) {
    F ls = -static_cast<F>(kInfF), lt = -static_cast<F>(kInfF);
    for (int64_t i = threadIdx.x; i < n; i += kThreads) {
      const F vs = score_s(i), vt = score_t(i);
      ls = max_nan(ls, vs);
      lt = max_nan(lt, vt);
    }
    ms = block_max(ls, sh);
    mt = block_max(lt, sh);
  }
  const F inv_t = static_cast<F>(a.inv_temp);
  ss = 0.0;
  st = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const F ws = weight_of(score_s(i), a.softmax, ms, inv_t);
    const F wt = weight_of(score_t(i), a.softmax, mt, inv_t);
    p[i] = wt;
    ss += static_cast<double>(ws);
    st += static_cast<double>(wt);
  }
  const double zs = block_sum(ss, sh), zt = block_sum(st, sh);
  const F zs_f = static_cast<F>(zs), zt_f = static_cast<F>(zt);  // divided by, as the reference
  double loss = 0.0, kl_rm = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    const F pi = p[i] / zt_f;  // written by this same thread in the previous pass
    p[i] = pi;
    const F ri = weight_of(score_s(i), a.softmax, ms, inv_t) / zs_f;
    if (a.js) {
      const DivTerm<F> t = js_term(pi, ri);
      loss += static_cast<double>(t.loss);
      kl_rm += static_cast<double>(t.r_log_rm);
    } else {
      loss += static_cast<double>(kl_term(pi, ri));
    }
  }
  loss = block_sum(loss, sh);
  kl_rm = block_sum(kl_rm, sh);
  if (threadIdx.x == 0) {
    store_row_stats(stats + row * kRowStats, mu_s, sg_s, zs, ms, kl_rm);
    row_loss[row] = loss;
  }
}

// loss = mean of the row losses, summed in a fixed order by one block.
template <typename F>
__global__ void __launch_bounds__(kThreads) mean_kernel(const double* __restrict__ row_loss, int64_t rows,
                                                       F* __restrict__ loss) {
  __shared__ double sh[kWarps + 1];
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < rows; i += kThreads) s += row_loss[i];
  s = block_sum(s, sh);
  if (threadIdx.x == 0) loss[0] = static_cast<F>(s / static_cast<double>(rows));
}

template <typename T, bool kHasQ>
__global__ void __launch_bounds__(kThreads)
    ada_backward_kernel(const typename ComputeType<T>::type* __restrict__ grad, const T* __restrict__ xs,
                        const T* __restrict__ xsq, const typename ComputeType<T>::type* __restrict__ p_all,
                        const typename ComputeType<T>::type* __restrict__ stats, RowConfig a, T* __restrict__ dx) {
  using F = typename ComputeType<T>::type;
  constexpr bool kPark = std::is_same_v<T, F>;  // dx can hold an F: no recomputation
  __shared__ double sh[kWarps + 1];
  const int64_t row = blockIdx.x, n = a.length, off = row * n, c = row % a.channels;
  xs += off;
  if constexpr (kHasQ) xsq += off;
  const F* p = p_all + off;
  dx += off;
  const F* sr = stats + row * kRowStats;
  const F mu = sr[0], sigma = sr[1];
  const BackRow<F> b = back_row(sr, c, a, static_cast<double>(grad[0]));
  // sign(d) dL/dz and (dL/dz z + [s = sigma] dL/dr r) of element i.
  auto terms = [&](int64_t i, F* t_sigma) {
    return backward_terms_of<kHasQ>(to_compute(xs[i]), kHasQ ? to_compute(xsq[i]) : F(0), p[i], b,
                                    a.js, a.softmax, t_sigma);
  };
  double a1 = 0.0, a2 = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    F t;
    const F v = terms(i, &t);
    if constexpr (kPark) dx[i] = v;
    a1 += static_cast<double>(v);
    a2 += static_cast<double>(t);
  }
  a1 = block_sum(a1, sh);
  a2 = block_sum(a2, sh);
  const F mean1 = static_cast<F>(a1 / n);
  const F coef = sigma > F(0) ? static_cast<F>(a2 / (static_cast<double>(n) * sigma)) : F(0);
  for (int64_t i = threadIdx.x; i < n; i += kThreads) {
    F v;
    if constexpr (kPark) {
      v = dx[i];
    } else {
      F unused;
      v = terms(i, &unused);
    }
    const F d = to_compute(xs[i]) - mu;
    store_compute(b.rc.qz * (v - mean1 - coef * d), &dx[i]);
  }
}

void check_rows(const RowConfig& a) {
  TORCH_CHECK(a.rows <= std::numeric_limits<int32_t>::max(),
              "ada_loss: N * C must be < 2^31 on CUDA, got ", a.rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ada_loss_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& student_q,
    const std::optional<at::Tensor>& teacher_q, const std::optional<at::Tensor>& step, double gamma,
    double kappa, int64_t divergence, int64_t normalize, double temperature) {
  check_ada_args(student, teacher, student_q, teacher_q, step, gamma, kappa, divergence, normalize,
                 temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_q = student_q.has_value();
  const at::Tensor xs = student.contiguous(), xt = teacher.contiguous();
  const at::Tensor xsq = has_q ? student_q->contiguous() : at::Tensor();
  const at::Tensor xtq = has_q ? teacher_q->contiguous() : at::Tensor();
  const at::Tensor step_d = step_as_double(step);
  const RowConfig a = make_row_config(student, step_d, gamma, kappa, divergence, normalize, temperature);
  check_rows(a);
  const auto ct = compute_dtype(student);
  const auto opts = student.options().dtype(ct);
  at::Tensor p = at::empty(student.sizes(), opts);
  at::Tensor stats = at::empty({student.size(0), student.size(1), kRowStats}, opts);
  if (a.rows == 0) return {at::full({}, std::numeric_limits<double>::quiet_NaN(), opts), p, stats};
  at::Tensor loss = at::empty({}, opts);
  at::Tensor row_loss = at::empty({a.rows}, student.options().dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using F = typename ComputeType<T>::type;
    const T* s = static_cast<const T*>(xs.data_ptr());
    const T* t = static_cast<const T*>(xt.data_ptr());
    const T* sq = has_q ? static_cast<const T*>(xsq.data_ptr()) : nullptr;
    const T* tq = has_q ? static_cast<const T*>(xtq.data_ptr()) : nullptr;
    F* pp = static_cast<F*>(p.data_ptr());
    F* sp = static_cast<F*>(stats.data_ptr());
    double* lp = row_loss.data_ptr<double>();
    const dim3 grid(static_cast<unsigned>(a.rows));
    if (has_q) {
      ada_forward_kernel<T, true><<<grid, kThreads, 0, stream>>>(s, sq, t, tq, a, pp, sp, lp);
    } else {
      ada_forward_kernel<T, false><<<grid, kThreads, 0, stream>>>(s, sq, t, tq, a, pp, sp, lp);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    mean_kernel<F><<<1, kThreads, 0, stream>>>(lp, a.rows, static_cast<F*>(loss.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, p, stats};
}

at::Tensor ada_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student,
                                  const std::optional<at::Tensor>& student_q,
                                  const std::optional<at::Tensor>& step, const at::Tensor& teacher_dist,
                                  const at::Tensor& row_stats, double gamma, double kappa,
                                  int64_t divergence, int64_t normalize, double temperature) {
  check_ada_backward_args(grad, student, student_q, step, teacher_dist, row_stats, gamma, kappa,
                          divergence, normalize, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const bool has_q = student_q.has_value();
  const at::Tensor xs = student.contiguous();
  const at::Tensor xsq = has_q ? student_q->contiguous() : at::Tensor();
  const at::Tensor p = teacher_dist.contiguous(), stats = row_stats.contiguous();
  const at::Tensor g = grad.contiguous();
  const at::Tensor step_d = step_as_double(step);
  const RowConfig a = make_row_config(student, step_d, gamma, kappa, divergence, normalize, temperature);
  check_rows(a);
  at::Tensor dx = at::empty(student.sizes(), student.options());
  if (a.rows == 0) return dx;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_storage(student.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using F = typename ComputeType<T>::type;
    const T* s = static_cast<const T*>(xs.data_ptr());
    const T* sq = has_q ? static_cast<const T*>(xsq.data_ptr()) : nullptr;
    const F* gp = static_cast<const F*>(g.data_ptr());
    const F* pp = static_cast<const F*>(p.data_ptr());
    const F* sp = static_cast<const F*>(stats.data_ptr());
    T* out = static_cast<T*>(dx.data_ptr());
    const dim3 grid(static_cast<unsigned>(a.rows));
    if (has_q) {
      ada_backward_kernel<T, true><<<grid, kThreads, 0, stream>>>(gp, s, sq, pp, sp, a, out);
    } else {
      ada_backward_kernel<T, false><<<grid, kThreads, 0, stream>>>(gp, s, sq, pp, sp, a, out);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace q2ext::ada_loss::cuda

TORCH_LIBRARY_IMPL(q2ext, CUDA, m) {
  m.impl("ada_loss", &q2ext::ada_loss::cuda::ada_loss_cuda);
  m.impl("ada_loss_backward", &q2ext::ada_loss::cuda::ada_loss_backward_cuda);
}
