// CUDA kernel of q2ext::w4a16_mm: y = x @ w.T with w dequantised from pack_int4's layout,
// w[n, k] = (q - 8) * scales[k / g, n] + zeros[k / g, n].  Semantics:
// q2ext/reference/gemm.py; argument rules: gemm_args.h (shared with the CPU).
//
// Small M (<= kGemvMaxM, the decode regime) is memory bound: the kernel has to stream the
// packed weight once at full bandwidth.  A block owns one 16-column block of the packed
// weight ([K, 8] bytes, contiguous) and kRows rows of x; its threads take consecutive
// pairs of k rows (one 16-byte load = 2 x 16 codes, so a warp's loads are one contiguous
// 512-byte span), kUnroll loads in flight each, and dequantise in registers with the
// helpers the CPU kernels use (gemm_math.h).  Consecutive pairs mean a new group for
// almost every pair of a thread, so the block first stages the scales and shifted zeros
// of the groups its current chunk of pairs covers in shared memory (coalesced 64-byte
// reads, one w4_shifted_zero per group and column); per pair a thread then reads them
// with eight 16-byte shared loads instead of 32 scalar global ones.  Partial sums are
// reduced across the warp by shuffles and across warps in a fixed order: deterministic.
//
// Larger M: the weight is dequantised once to fp32 (same helpers) and the product is an
// fp32 cuBLAS GEMM, which is what the reference computes.  A tensor-core kernel that
// dequantises into shared memory (Marlin-style) would avoid the [N, K] fp32 buffer; it is
// the next step if large-M w4a16 matters.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>

#include "q2ext/gemm_args.h"
#include "q2ext/gemm_math.h"

namespace q2ext::gemm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kGemvMaxM = 16;

struct W4Args {
  const void* x;  // [M, ldx] fp32 / bf16, unit column stride
  int64_t ldx, M, K, N;
  const uint4* w;  // pack_int4 output, 16-byte aligned: pair p of block b is w[b * K / 2 + p]
  const float* scales;
  const float* zeros;
  int64_t group;
  void* out;  // [M, N] contiguous, x's dtype
};

// acc[r][c] += x[r] * w[c] for one k row of 8 packed bytes (two 32-bit words).
template <int kRows>
__device__ __forceinline__ void fma_row(float (*acc)[kNB4], const float* xv, uint32_t w0, uint32_t w1,
                                        const float* s, const float* z) {
#pragma unroll
  for (int j = 0; j < 8; ++j) {
    const uint32_t byte = ((j < 4 ? w0 : w1) >> (8 * (j & 3))) & 0xffu;
    const float lo = w4_dequant(w4_lo(byte), s[j], z[j]);
    const float hi = w4_dequant(w4_hi(byte), s[j + 8], z[j + 8]);
#pragma unroll
    for (int r = 0; r < kRows; ++r) {
      acc[r][j] = fmaf(xv[r], lo, acc[r][j]);
      acc[r][j + 8] = fmaf(xv[r], hi, acc[r][j + 8]);
    }
  }
}

// kRows rows of x per block: 1 for M = 1 (16 accumulators, so several blocks fit on an
// SM), 4 otherwise (the weight is then read ceil(M / 4) times, mostly from L2).  kUnroll
// 16-byte weight loads are in flight per thread; with 4 rows the accumulators leave room
// for fewer without spilling at two blocks per SM.
// Scales and shifted zeros of the groups of k rows [k0, k0 + rows) for the 16 columns of
// the block from n0 (0 past N: the codes of padding columns then dequantise to 0 and their
// sums are never stored), into s_s / s_z [group - k0 / group_size][column].
__device__ __forceinline__ void stage_groups(const W4Args& a, int64_t n0, int64_t k0, int64_t rows,
                                             float (*s_s)[kNB4], float (*s_z)[kNB4]) {
  const int64_t g0 = k0 / a.group;
  const int64_t groups = (a.K - k0 < rows ? a.K - k0 : rows) / a.group;
  for (int64_t i = threadIdx.x; i < groups * kNB4; i += kThreads) {
    const int64_t gl = i / kNB4, j = i % kNB4, n = n0 + j, g = g0 + gl;
    const float sc = n < a.N ? __ldg(a.scales + g * a.N + n) : 0.0f;
    s_s[gl][j] = sc;
    s_z[gl][j] = n < a.N ? w4_shifted_zero(sc, __ldg(a.zeros + g * a.N + n)) : 0.0f;
  }
}

// The 16 columns' constants of staged group gl, as 16-byte shared loads.
__device__ __forceinline__ void read_group(const float (*s_s)[kNB4], const float (*s_z)[kNB4], int64_t gl,
                                           float* s, float* z) {
#pragma unroll
  for (int q = 0; q < kNB4 / 4; ++q) {
    const float4 sv = reinterpret_cast<const float4*>(s_s[gl])[q];
    const float4 zv = reinterpret_cast<const float4*>(s_z[gl])[q];
    s[4 * q] = sv.x, s[4 * q + 1] = sv.y, s[4 * q + 2] = sv.z, s[4 * q + 3] = sv.w;
    z[4 * q] = zv.x, z[4 * q + 1] = zv.y, z[4 * q + 2] = zv.z, z[4 * q + 3] = zv.w;
  }
}

template <typename T, int kRows>
__global__ void __launch_bounds__(kThreads, 2) w4a16_gemv_kernel(const W4Args a) {
  constexpr int kUnroll = kRows == 1 ? 4 : 1;
  // A chunk (one iteration of the loop below) covers 2 * kChunkPairs k rows: a whole number
  // of groups (group_size 32, 64 or 128 divides it), at most kChunkGroups of them.
  constexpr int kChunkPairs = kThreads * kUnroll;
  constexpr int kChunkGroups = 2 * kChunkPairs / 32;
  __shared__ float red[kWarps][kRows * kNB4];
  __shared__ __align__(16) float s_s[kChunkGroups][kNB4];
  __shared__ __align__(16) float s_z[kChunkGroups][kNB4];
  const int64_t b = blockIdx.x, n0 = b * kNB4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kRows;
  const int64_t pairs = a.K / 2;  // K is a multiple of group_size >= 32: even
  const uint4* wb = a.w + b * pairs;
  const T* x = static_cast<const T*>(a.x);
  float acc[kRows][kNB4];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < kNB4; ++j) acc[r][j] = 0.0f;
  for (int64_t base = 0; base < pairs; base += kChunkPairs) {
    uint4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * kThreads + threadIdx.x;
      if (p < pairs) v[u] = __ldg(wb + p);
    }
    __syncthreads();  // the previous chunk's constants are no longer read
    stage_groups(a, n0, 2 * base, 2 * kChunkPairs, s_s, s_z);
    __syncthreads();
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t p = base + u * kThreads + threadIdx.x;
      if (p >= pairs) break;  // later u only go further
      const int64_t k = 2 * p;  // rows k and k + 1 share a group (group_size is even)
      float s[kNB4], z[kNB4];
      read_group(s_s, s_z, (k - 2 * base) / a.group, s, z);
#pragma unroll
      for (int kk = 0; kk < 2; ++kk) {
        float xv[kRows];
#pragma unroll
        for (int r = 0; r < kRows; ++r)
          xv[r] = m0 + r < a.M ? to_f32(x[(m0 + r) * a.ldx + k + kk]) : 0.0f;
        fma_row<kRows>(acc, xv, kk ? v[u].z : v[u].x, kk ? v[u].w : v[u].y, s, z);
      }
    }
  }
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int j = 0; j < kNB4; ++j) {
      float t = acc[r][j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
      if (lane == 0) red[warp][r * kNB4 + j] = t;
    }
  __syncthreads();
  const int i = threadIdx.x;
  if (i >= kRows * kNB4) return;
  const int64_t m = m0 + i / kNB4, n = n0 + i % kNB4;
  if (m >= a.M || n >= a.N) return;
  float y = 0.0f;
  for (int w = 0; w < kWarps; ++w) y += red[w][i];
  from_f32(y, static_cast<T*>(a.out) + m * a.N + n);
}

// w [N, K] fp32 from the packed codes; thread i -> (block, byte j, k) with k fastest, so
// the writes of a warp are contiguous.
__global__ void dequant_kernel(const W4Args a, float* w) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t blocks = ceil_div(a.N, kNB4);
  if (i >= blocks * 8 * a.K) return;
  const int64_t k = i % a.K, j = (i / a.K) % 8, b = i / (8 * a.K);
  const uint32_t byte = reinterpret_cast<const uint8_t*>(a.w)[(b * a.K + k) * 8 + j];
  const int64_t g = k / a.group;
  const int64_t n_lo = b * kNB4 + j, n_hi = n_lo + 8;
  if (n_lo < a.N) {
    const float s = a.scales[g * a.N + n_lo];
    w[n_lo * a.K + k] = w4_dequant(w4_lo(byte), s, w4_shifted_zero(s, a.zeros[g * a.N + n_lo]));
  }
  if (n_hi < a.N) {
    const float s = a.scales[g * a.N + n_hi];
    w[n_hi * a.K + k] = w4_dequant(w4_hi(byte), s, w4_shifted_zero(s, a.zeros[g * a.N + n_hi]));
  }
}

at::Tensor w4a16_mm_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t group_size) {
  const int64_t N = check_w4a16_mm(x, w_packed, scales, zeros, group_size);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  if (K == 0) return out.zero_();
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  const at::Tensor xc = x.stride(1) == 1 ? x : x.contiguous();
  // 16-byte weight loads: a view at an odd offset is copied to aligned storage.
  const bool w_aligned = reinterpret_cast<uintptr_t>(w_packed.const_data_ptr()) % 16 == 0;
  const at::Tensor wp = w_aligned ? w_packed : w_packed.clone();
  const at::Tensor sc = scales.contiguous(), zc = zeros.contiguous();
  W4Args a{xc.const_data_ptr(), M > 1 ? xc.stride(0) : 0, M, K, N,
           static_cast<const uint4*>(wp.const_data_ptr()), sc.const_data_ptr<float>(),
           zc.const_data_ptr<float>(), group_size, out.mutable_data_ptr()};
  if (M > kGemvMaxM) {
    at::Tensor w = at::empty({N, K}, x.options().dtype(at::kFloat));
    const int64_t total = ceil_div(N, kNB4) * 8 * K;
    dequant_kernel<<<static_cast<unsigned>(ceil_div(total, kThreads)), kThreads, 0, st>>>(
        a, w.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor y = at::mm(xc.to(at::kFloat), w.t());
    out.copy_(y);  // fp32 -> bf16 rounds to nearest even, like the reference's .to()
    return out;
  }
  const int rows = M == 1 ? 1 : 4;
  const dim3 grid(static_cast<unsigned>(ceil_div(N, kNB4)), static_cast<unsigned>(ceil_div(M, rows)));
  if (x.scalar_type() == at::kFloat) {
    if (rows == 1) w4a16_gemv_kernel<float, 1><<<grid, kThreads, 0, st>>>(a);
    else w4a16_gemv_kernel<float, 4><<<grid, kThreads, 0, st>>>(a);
  } else {
    if (rows == 1) w4a16_gemv_kernel<bf16_t, 1><<<grid, kThreads, 0, st>>>(a);
    else w4a16_gemv_kernel<bf16_t, 4><<<grid, kThreads, 0, st>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace q2ext::gemm::cuda

TORCH_LIBRARY_IMPL(q2ext, CUDA, m) { m.impl("w4a16_mm", &q2ext::gemm::cuda::w4a16_mm_cuda); }
