// CUDA kernels of q2ext::gb_fusion_forward / gb_fusion_backward / gb_fusion_update.
//
// One thread owns one pixel (grid-stride) and walks its fused channels.  In NCHW,
// neighbouring threads read neighbouring pixels of a channel plane, so every load is
// coalesced.  In channels_last each thread reads its own contiguous channel row; the
// sectors it touches are reused from L1 on the following channels (a warp-per-pixel
// variant would coalesce better).
//
// Forward: one read of the branches for the pixel's statistics (gb_moments_*: sums shifted
// by the pixel's first fused value and accumulated in double, which stays accurate when
// that value is an outlier; the CPU tests run the same header code), one more read to
// normalise and write.  Backward: one read for the two channel means of the LN gradient,
// one to write every branch gradient, accumulating ||dx_i||^2 per thread in double
// registers (branch loops are unrolled to kGbMaxBranches with a guard so the array stays
// in registers).  The optional affine gradients (dweight, dbias) are sums over all pixels
// per channel: a 2-D grid of (channel tile, pixel slice) blocks, laid out so that loads
// coalesce in either layout, and a finalize kernel over the slices.
//
// No atomics and no host sync: each block reduces its sums in a fixed shuffle/shared
// order into its own slot of a partial buffer, a small kernel adds the slots in order
// (deterministic for a given device), and gb_fusion_update runs the controller law in a
// one-thread kernel on the same stream.  alpha = softmax(lam) is computed per block from
// lam on the device.  The per-element math is gb_fusion_math.h, shared with the CPU.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "device_cache.cuh"
#include "q2ext/gb_fusion_args.h"
#include "q2ext/gb_fusion_math.h"

namespace q2ext::gb_fusion::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBlocksPerSm = 8;

struct Params {
  const void* x[kGbMaxBranches];
  void* dx[kGbMaxBranches];
  int64_t c[kGbMaxBranches];
  int64_t off[kGbMaxBranches];
  int k, mode;
  bool nhwc;
  int64_t hw, c_out, total;
};

// Element (n, c, p) of a tensor with `ch` channels, in the op's layout.
__device__ __forceinline__ int64_t at_idx(const Params& P, int64_t n, int64_t c, int64_t p, int64_t ch) {
  return P.nhwc ? (n * P.hw + p) * ch + c : (n * ch + c) * P.hw + p;
}

template <typename T>
__device__ __forceinline__ typename ComputeType<T>::type ld(const void* base, int64_t i) {
  return to_compute(static_cast<const T*>(base)[i]);
}

// Calls f(co, h) for every fused channel of pixel (n, p), in channel order.
template <typename T, typename A, typename F>
__device__ __forceinline__ void visit_h(const Params& P, const float* alpha, int64_t n, int64_t p, F&& f) {
  if (P.mode == kGbConcat) {
#pragma unroll
    for (int i = 0; i < kGbMaxBranches; ++i) {
      if (i >= P.k) break;
      const A al = static_cast<A>(alpha[i]);
      for (int64_t c = 0; c < P.c[i]; ++c) f(P.off[i] + c, al * ld<T>(P.x[i], at_idx(P, n, c, p, P.c[i])));
    }
  } else {
    for (int64_t c = 0; c < P.c_out; ++c) {
      A h = static_cast<A>(alpha[0]) * ld<T>(P.x[0], at_idx(P, n, c, p, P.c_out));
#pragma unroll
      for (int i = 1; i < kGbMaxBranches; ++i) {
        if (i >= P.k) break;
        h = h + static_cast<A>(alpha[i]) * ld<T>(P.x[i], at_idx(P, n, c, p, P.c_out));
      }
      f(c, h);
    }
  }
}

__device__ __forceinline__ void block_alpha(const float* src, bool softmax, int k, float* s_alpha,
                                            float* alpha_out) {
  if (threadIdx.x == 0) {
    if (softmax) {
      gb_softmax(src, s_alpha, k);
    } else {
      for (int i = 0; i < k; ++i) s_alpha[i] = src[i];
    }
    if (alpha_out != nullptr && blockIdx.x == 0)
      for (int i = 0; i < k; ++i) alpha_out[i] = s_alpha[i];
  }
  __syncthreads();
}

template <typename T>
__global__ void __launch_bounds__(kThreads) forward_kernel(Params P, const float* __restrict lam,
    float* __restrict alpha_out, const typename ComputeType<T>::type* __restrict w,
    const typename ComputeType<T>::type* __restrict b, T* __restrict out, typename ComputeType<T>::type* __restrict mean_out,
    typename ComputeType<T>::type* __restrict rstd_out, double eps) {
  using A = typename ComputeType<T>::type;
  __shared__ float s_alpha[kGbMaxBranches];
  block_alpha(lam, true, P.k, s_alpha, alpha_out);
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < P.total; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = q / P.hw, p = q % P.hw;
    GbMoments mom = gb_moments_init();
    visit_h<T, A>(P, s_alpha, n, p, [&](int64_t co, A h) { gb_moments_add(mom, static_cast<double>(h), co == 0); });
    const GbStats<A> st = gb_moments_stats<A>(mom, P.c_out, eps);
    const A mean = st.mean, rstd = st.rstd;
    visit_h<T, A>(P, s_alpha, n, p, [&](int64_t co, A h) {
      A y = (h - mean) * rstd;
      if (w != nullptr) y = y * w[co] + b[co];
      store_compute(y, &out[at_idx(P, n, co, p, P.c_out)]);
    });
    mean_out[q] = mean;
    rstd_out[q] = rstd;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_kernel(Params P, const float* __restrict alpha,
    const T* __restrict grad, const typename ComputeType<T>::type* __restrict w,
    const typename ComputeType<T>::type* __restrict mean_in, const typename ComputeType<T>::type* __restrict rstd_in,
    double* __restrict partial) {
  using A = typename ComputeType<T>::type;
  __shared__ float s_alpha[kGbMaxBranches];
  __shared__ double s_red[kWarps][kGbMaxBranches];
  block_alpha(alpha, false, P.k, s_alpha, nullptr);
  const A inv_c = A(1) / static_cast<A>(P.c_out);
  double sq[kGbMaxBranches];  // ||dx_i||^2: double across the grid-stride loop, like the CPU's sums
#pragma unroll
  for (int i = 0; i < kGbMaxBranches; ++i) sq[i] = 0.0;
  for (int64_t q = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; q < P.total; q += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = q / P.hw, p = q % P.hw;
    const A mean = mean_in[q], rstd = rstd_in[q];
    A m1 = A(0), m2 = A(0);
    visit_h<T, A>(P, s_alpha, n, p, [&](int64_t co, A h) {
      const A y = (h - mean) * rstd;
      const A gy = to_compute(grad[at_idx(P, n, co, p, P.c_out)]) * (w != nullptr ? w[co] : A(1));
      m1 += gy;
      m2 += gy * y;
    });
    m1 = m1 * inv_c;
    m2 = m2 * inv_c;
    if (P.mode == kGbConcat) {
#pragma unroll
      for (int i = 0; i < kGbMaxBranches; ++i) {
        if (i >= P.k) break;
        const A al = static_cast<A>(s_alpha[i]);
        for (int64_t c = 0; c < P.c[i]; ++c) {
          const int64_t co = P.off[i] + c, xi = at_idx(P, n, c, p, P.c[i]);
          const A y = (al * ld<T>(P.x[i], xi) - mean) * rstd;
          const A gy = to_compute(grad[at_idx(P, n, co, p, P.c_out)]) * (w != nullptr ? w[co] : A(1));
          const A d = al * gb_ln_grad<A>(gy, y, m1, m2, rstd);
          store_compute(d, &static_cast<T*>(P.dx[i])[xi]);
          sq[i] += static_cast<double>(d) * static_cast<double>(d);
        }
      }
    } else {
      for (int64_t c = 0; c < P.c_out; ++c) {
        const int64_t xi = at_idx(P, n, c, p, P.c_out);
        A h = A(0);
#pragma unroll
        for (int i = 0; i < kGbMaxBranches; ++i)
          if (i < P.k) h = h + static_cast<A>(s_alpha[i]) * ld<T>(P.x[i], xi);
        const A gy = to_compute(grad[xi]) * (w != nullptr ? w[c] : A(1));
        const A dh = gb_ln_grad<A>(gy, (h - mean) * rstd, m1, m2, rstd);
#pragma unroll
        for (int i = 0; i < kGbMaxBranches; ++i) {
          if (i < P.k) {
            const A d = static_cast<A>(s_alpha[i]) * dh;
            store_compute(d, &static_cast<T*>(P.dx[i])[xi]);
            sq[i] += static_cast<double>(d) * static_cast<double>(d);
          }
        }
      }
    }
  }
  // Block reduction of the squares: xor-shuffles (fixed pattern), then warps in order.
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < kGbMaxBranches; ++i) {
    if (i >= P.k) break;
    double v = sq[i];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) s_red[warp][i] = v;
  }
  __syncthreads();
  if (threadIdx.x < P.k) {
    double t = 0.0;
    for (int wi = 0; wi < kWarps; ++wi) t += s_red[wi][threadIdx.x];
    partial[blockIdx.x * int64_t(P.k) + threadIdx.x] = t;
  }
}

// One warp per branch adds the blocks' partial sums in a fixed order.
__global__ void finalize_kernel(const double* __restrict partial, int blocks, int k, float* __restrict g_sq) {
  const int lane = threadIdx.x & 31, i = threadIdx.x >> 5;
  if (i >= k) return;
  double v = 0.0;
  for (int b = lane; b < blocks; b += 32) v += partial[int64_t(b) * k + i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (lane == 0) g_sq[i] = static_cast<float>(v);
}

// Optional affine LN: dw[c] = sum over pixels of g * y, db[c] = sum of g.  Block (x, y) owns
// `cols` fused channels and pixel slice y; thread t takes channel t % cols and every
// (kThreads / cols)-th pixel of the slice from t / cols.  channels_last: cols = 32, so a
// warp reads 32 consecutive channels of one pixel (one coalesced line); NCHW: cols = 1 and
// the block's threads read consecutive pixels of the channel's plane.  Each block writes its
// per-channel sums (double) to its own slot; affine_finalize_kernel adds the slices in order.
template <typename T>
__global__ void __launch_bounds__(kThreads) affine_grad_kernel(Params P, const float* __restrict alpha,
    const T* __restrict grad, const typename ComputeType<T>::type* __restrict mean_in,
    const typename ComputeType<T>::type* __restrict rstd_in, int cols, int64_t slice,
    double* __restrict partial) {
  using A = typename ComputeType<T>::type;
  __shared__ double s_w[kThreads], s_b[kThreads];
  const int col = threadIdx.x % cols, row = threadIdx.x / cols, rows = kThreads / cols;
  const int64_t co = static_cast<int64_t>(blockIdx.x) * cols + col;
  const int64_t q0 = static_cast<int64_t>(blockIdx.y) * slice;
  const int64_t q1 = q0 + slice < P.total ? q0 + slice : P.total;
  double sw = 0.0, sb = 0.0;
  if (co < P.c_out) {
    int bi = 0;  // concat: the branch owning channel co
    for (int i = 1; i < P.k; ++i)
      if (P.mode == kGbConcat && co >= P.off[i]) bi = i;
    for (int64_t q = q0 + row; q < q1; q += rows) {
      const int64_t n = q / P.hw, p = q % P.hw;
      A h;  // the fused value, formed as visit_h forms it
      if (P.mode == kGbConcat) {
        h = static_cast<A>(alpha[bi]) * ld<T>(P.x[bi], at_idx(P, n, co - P.off[bi], p, P.c[bi]));
      } else {
        h = static_cast<A>(alpha[0]) * ld<T>(P.x[0], at_idx(P, n, co, p, P.c_out));
        for (int i = 1; i < P.k; ++i) h = h + static_cast<A>(alpha[i]) * ld<T>(P.x[i], at_idx(P, n, co, p, P.c_out));
      }
      const A g = to_compute(grad[at_idx(P, n, co, p, P.c_out)]);
      sw += static_cast<double>(g * ((h - mean_in[q]) * rstd_in[q]));
      sb += static_cast<double>(g);
    }
  }
  s_w[threadIdx.x] = sw;
  s_b[threadIdx.x] = sb;
  __syncthreads();
  if (row == 0 && co < P.c_out) {  // the rows of one channel, in a fixed order
    double tw = 0.0, tb = 0.0;
    for (int r = 0; r < rows; ++r) tw += s_w[r * cols + col], tb += s_b[r * cols + col];
    double* out = partial + 2 * (static_cast<int64_t>(blockIdx.y) * P.c_out + co);
    out[0] = tw;
    out[1] = tb;
  }
}

template <typename A>
__global__ void affine_finalize_kernel(const double* __restrict partial, int64_t slices, int64_t c_out,
                                       A* __restrict dw, A* __restrict db) {
  const int64_t co = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (co >= c_out) return;
  double tw = 0.0, tb = 0.0;
  for (int64_t y = 0; y < slices; ++y) tw += partial[2 * (y * c_out + co)], tb += partial[2 * (y * c_out + co) + 1];
  dw[co] = static_cast<A>(tw);
  db[co] = static_cast<A>(tb);
}

__global__ void update_kernel(float* lam, float* g_ema, const float* g_sq, const float* tau, int k, float beta,
                              float eta, float eps, float lam_clip) {
  gb_update_law(lam, g_ema, g_sq, tau, k, beta, eta, eps, lam_clip);
}

// ---------------------------------------------------------------- host side

int grid_for(int64_t total, int device) {
  const int64_t want = (total + kThreads - 1) / kThreads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, int64_t(device_sm_count(device)) * kBlocksPerSm)));
}

// Grid of affine_grad_kernel: channel tiles x pixel slices, about kBlocksPerSm blocks per
// SM in all, each thread with at least kAffineMinPixels pixels to sum.
struct AffinePlan {
  int cols;
  int64_t tiles, slices, slice;
};

AffinePlan affine_plan(const Params& P, int64_t channels, int device) {
  constexpr int64_t kAffineMinPixels = 16;
  AffinePlan ap;
  ap.cols = P.nhwc ? 32 : 1;
  ap.tiles = ceil_div(channels, ap.cols);
  const int64_t rows = kThreads / ap.cols;
  const int64_t want = ceil_div(int64_t(device_sm_count(device)) * kBlocksPerSm, ap.tiles);
  const int64_t most = std::max<int64_t>(1, ceil_div(P.total, rows * kAffineMinPixels));
  const int64_t slices = std::clamp<int64_t>(want, 1, std::min<int64_t>(most, 65535));
  ap.slice = std::max<int64_t>(1, ceil_div(P.total, slices));
  ap.slices = std::max<int64_t>(1, ceil_div(P.total, ap.slice));
  return ap;
}

// The kernels' view of the validated branches (check_branches keeps the dense copies).
Params make_params(const BranchLayout& L, const at::Tensor& x0, int64_t mode) {
  Params P{};
  P.nhwc = L.nhwc;
  P.k = static_cast<int>(L.k);
  P.mode = static_cast<int>(mode);
  P.hw = x0.size(2) * x0.size(3);
  P.total = x0.size(0) * P.hw;
  P.c_out = L.c_out;
  for (int64_t i = 0; i < L.k; ++i) {
    P.x[i] = L.dense[i].data_ptr();
    P.c[i] = L.c[i];
    P.off[i] = L.off[i];
  }
  return P;
}

template <typename F>
void dispatch_dtype(at::ScalarType st, F&& f) {
  switch (st) {
    case at::kFloat: f(float{}); break;
    case at::kBFloat16: f(bf16_t{}); break;
    case at::kHalf: f(f16_t{}); break;
    default: f(double{}); break;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gb_fusion_forward_cuda(
    at::TensorList branches, const at::Tensor& lam, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t mode, double eps) {
  const BranchLayout L = check_branches(branches, mode);
  const at::Tensor& x0 = branches[0];
  Params P = make_params(L, x0, mode);
  c10::cuda::CUDAGuard guard(x0.device());
  const auto acc = acc_type(x0);
  check_forward_params(x0, lam, weight, bias, P.k, P.c_out, eps);
  const auto fmt = L.format();
  at::Tensor out = at::empty({x0.size(0), P.c_out, x0.size(2), x0.size(3)}, x0.options(), fmt);
  at::Tensor mean = at::empty({x0.size(0), x0.size(2), x0.size(3)}, x0.options().dtype(acc));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor alpha = at::empty({P.k}, lam.options());
  at::Tensor lam_c = lam.contiguous();
  at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (P.total == 0 || P.c_out == 0) {
    // Still produce alpha: one block with nothing to do but the softmax.
    P.total = 0;
  }
  const int grid = grid_for(P.total, x0.get_device());
  dispatch_dtype(x0.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    forward_kernel<T><<<grid, kThreads, 0, stream>>>(
        P, lam_c.data_ptr<float>(), alpha.data_ptr<float>(), w.defined() ? static_cast<const A*>(w.data_ptr()) : nullptr,
        b.defined() ? static_cast<const A*>(b.data_ptr()) : nullptr, static_cast<T*>(out.data_ptr()),
        static_cast<A*>(mean.data_ptr()), static_cast<A*>(rstd.data_ptr()), eps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, mean, rstd, alpha};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> gb_fusion_backward_cuda(
    const at::Tensor& grad, at::TensorList branches, const at::Tensor& alpha, const std::optional<at::Tensor>& weight,
    const at::Tensor& mean, const at::Tensor& rstd, int64_t mode, const std::optional<at::Tensor>& out) {
  const BranchLayout L = check_branches(branches, mode);
  const at::Tensor& x0 = branches[0];
  Params P = make_params(L, x0, mode);
  c10::cuda::CUDAGuard guard(x0.device());
  // The CUDA kernel recomputes y from the branches; `out` is only validated (see the header).
  check_backward_params(grad, x0, P.c_out, alpha, P.k, mean, rstd, weight, out);
  const auto acc = acc_type(x0);
  const auto fmt = L.format();
  at::Tensor gd = grad.contiguous(fmt), mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  at::Tensor alpha_c = alpha.contiguous();
  std::vector<at::Tensor> grads;
  for (int i = 0; i < P.k; ++i) {
    grads.push_back(at::empty_like(L.dense[i], fmt));
    P.dx[i] = grads.back().data_ptr();
  }
  at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  const int64_t cw = w.defined() ? P.c_out : 0;
  at::Tensor dw = at::empty({cw}, x0.options().dtype(acc)), db = at::empty({cw}, x0.options().dtype(acc));
  at::Tensor g_sq = at::empty({P.k}, alpha.options());
  const int grid = grid_for(P.total, x0.get_device());
  at::Tensor partial = at::empty({grid, P.k}, alpha.options().dtype(at::kDouble));
  auto stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(x0.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    using A = typename ComputeType<T>::type;
    const A* wp = w.defined() ? static_cast<const A*>(w.data_ptr()) : nullptr;
    backward_kernel<T><<<grid, kThreads, 0, stream>>>(P, alpha_c.data_ptr<float>(), static_cast<const T*>(gd.data_ptr()),
                                                      wp, static_cast<const A*>(mean_c.data_ptr()),
                                                      static_cast<const A*>(rstd_c.data_ptr()), partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    finalize_kernel<<<1, 32 * P.k, 0, stream>>>(partial.data_ptr<double>(), grid, P.k, g_sq.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (cw > 0) {
      const AffinePlan ap = affine_plan(P, cw, x0.get_device());
      at::Tensor part = at::empty({ap.slices, cw, 2}, alpha.options().dtype(at::kDouble));
      affine_grad_kernel<T><<<dim3(static_cast<unsigned>(ap.tiles), static_cast<unsigned>(ap.slices)), kThreads, 0,
                              stream>>>(P, alpha_c.data_ptr<float>(), static_cast<const T*>(gd.data_ptr()),
                                        static_cast<const A*>(mean_c.data_ptr()), static_cast<const A*>(rstd_c.data_ptr()),
                                        ap.cols, ap.slice, part.data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      affine_finalize_kernel<A><<<static_cast<unsigned>(ceil_div(cw, kThreads)), kThreads, 0, stream>>>(
          part.data_ptr<double>(), ap.slices, cw, static_cast<A*>(dw.data_ptr()), static_cast<A*>(db.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grads, dw, db, g_sq};
}

void gb_fusion_update_cuda(const at::Tensor& lam, const at::Tensor& g_ema, const at::Tensor& g_sq,
                           const std::optional<at::Tensor>& tau, double beta, double eta, double eps, double lam_clip) {
  const int64_t k = check_update_args(lam, g_ema, g_sq, tau, lam_clip);
  c10::cuda::CUDAGuard guard(lam.device());
  at::Tensor gs = g_sq.contiguous();
  at::Tensor tc = tau.has_value() ? tau->contiguous() : at::Tensor();
  update_kernel<<<1, 1, 0, c10::cuda::getCurrentCUDAStream()>>>(
      lam.data_ptr<float>(), g_ema.data_ptr<float>(), gs.data_ptr<float>(), tc.defined() ? tc.data_ptr<float>() : nullptr,
      static_cast<int>(k), static_cast<float>(beta), static_cast<float>(eta), static_cast<float>(eps),
      static_cast<float>(lam_clip));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace q2ext::gb_fusion::cuda

TORCH_LIBRARY_IMPL(q2ext, CUDA, m) {
  m.impl("gb_fusion_forward", &q2ext::gb_fusion::cuda::gb_fusion_forward_cuda);
  m.impl("gb_fusion_backward", &q2ext::gb_fusion::cuda::gb_fusion_backward_cuda);
  m.impl("gb_fusion_update", &q2ext::gb_fusion::cuda::gb_fusion_update_cuda);
}
