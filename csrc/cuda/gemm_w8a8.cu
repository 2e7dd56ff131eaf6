// CUDA kernels of q2ext::quantize_activation, q2ext::w8a8_mm and q2ext::w8a8_linear.
// Semantics: q2ext/gemm_reference.py; argument rules: gemm_args.h (shared with the CPU).
//
// Operand formats inside this file:
//  * A: [M, lda] bytes whose rows start 16-byte aligned (lda % 16 == 0).  w8a8_linear
//    quantises x straight into such a buffer; w8a8_mm uses `a` as it is when it already
//    qualifies and copies it otherwise.  Bytes past K are never read as data: the MMA
//    loads zero-fill them (cp.async src-size) and the dp4a loads mask them.
//  * B: the panels of pack_int8_weight, [ceil(N/64), kq, 64, 4]: each 32-bit word is one
//    k-quad of one output column, which is exactly one register of the B fragment of
//    mma.m16n8k32 and one operand of dp4a.  w8a8_linear reads its w_packed directly
//    (undoing the +128 of the signed-activation packing with a XOR per word); w8a8_mm
//    packs b [N, K] into the same layout first (one pass over B, any strides).
// Two GEMM kernels share that format and the epilogue (gemm_math.h, also the CPU's):
//  * mma: 128x128x64 block tile, 8 warps of 64x32, int8 tensor-core MMA (sm_80+), two
//    cp.async stages.  Used from M > kGemvMaxM on sm_80+.
//  * dp4a: one lane per output column, warps and grid.z split K.  The GEMV regime
//    (memory bound: what matters is streaming B once, with enough blocks in flight) and
//    the path of pre-sm_80 devices.  With a K split, partial sums go to an int32
//    workspace with atomicAdd - exact and order independent, since int32 addition wraps.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "q2ext/gemm_args.h"
#include "q2ext/gemm_math.h"

namespace q2ext {
namespace gpu_gemm8 {
namespace {

using gemm::kNB8;

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 128, kBN = 128, kBK = 64;  // MMA block tile (kBN = 2 panels)
constexpr int kAStride = kBK / 4 + 4;  // words per A row in shared memory: the 4-word pad
                                       // makes the fragment loads bank-conflict free
constexpr int kBStride = kBN + 8;      // words per B quad row, same reason
constexpr int kDpRows = 4;             // dp4a: output rows per block
constexpr int64_t kGemvMaxM = 16;      // dp4a below, MMA above (on sm_80+)
constexpr int64_t kMinQuadsPerSplit = 64;

__host__ __device__ inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct GemmArgs {
  const uint8_t* a;  // [M, lda], rows 16-byte aligned
  int64_t lda;
  const uint32_t* b;  // packed panels, word (panel * kq + quad) * 64 + column in panel
  uint32_t b_flip;    // 0x80808080 when the panels hold w + 128 (signed activations)
  int64_t M, N, K, kq;
  const float* a_scale;
  bool a_scale_per_row;
  const float* b_scale;
  const float* bias;  // or nullptr
  bool relu;
  int out_kind;  // gemm::OutKind
  void* out;     // [M, N] contiguous
};

// The fused epilogue of one output (the CPU's w8a8_store does the same through the same
// helper); int32 outputs are the raw accumulator.
__device__ __forceinline__ void store_out(const GemmArgs& g, int64_t m, int64_t n, int32_t acc) {
  const int64_t o = m * g.N + n;
  if (g.out_kind == gemm::kOutI32) {
    static_cast<int32_t*>(g.out)[o] = acc;
    return;
  }
  const float y = gemm::w8a8_epilogue(acc, g.a_scale[g.a_scale_per_row ? m : 0], g.b_scale[n],
                                      g.bias != nullptr, g.bias ? g.bias[n] : 0.0f, g.relu);
  if (g.out_kind == gemm::kOutF32) {
    static_cast<float*>(g.out)[o] = y;
  } else {
    from_f32(y, static_cast<bf16_t*>(g.out) + o);
  }
}

// ---- tensor-core path -------------------------------------------------------------------

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define Q2_HAS_MMA 1
// 16 bytes global -> shared; bytes [src_bytes, 16) of the destination are zero-filled and
// the source is not read there (src_bytes == 0 reads nothing).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_bytes) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

// D += A (16x32, row) * B (32x8, col) in int32 (wrapping, no .satfinite).
template <bool kASigned>
__device__ __forceinline__ void mma_16832(int32_t* d, const uint32_t* a, const uint32_t* b) {
  if constexpr (kASigned) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.u8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}
#endif

struct MmaSmem {
  uint32_t a[2][kBM * kAStride];         // [row][quad]
  uint32_t b[2][(kBK / 4) * kBStride];   // [quad][column]
};

// Stage k-tile kt of this block's A rows and B panels (every thread: 2 + 2 chunks).
__device__ __forceinline__ void mma_load_stage(const GemmArgs& g, MmaSmem& sm, int stage,
                                               int64_t kt, int64_t m_blk, int64_t n_blk) {
#ifdef Q2_HAS_MMA
  const int64_t k0 = kt * kBK;
  for (int i = threadIdx.x; i < kBM * (kBK / 16); i += kThreads) {
    const int r = i / (kBK / 16), c = i % (kBK / 16);
    const int64_t m = m_blk + r, k = k0 + 16 * c;
    const int64_t left = m < g.M ? g.K - k : 0;
    const int bytes = left <= 0 ? 0 : (left >= 16 ? 16 : static_cast<int>(left));
    cp_async16(&sm.a[stage][r * kAStride + 4 * c], bytes ? g.a + m * g.lda + k : g.a, bytes);
  }
  const int64_t panels = ceil_div(g.N, kNB8);
  for (int i = threadIdx.x; i < (kBK / 4) * 2 * (kNB8 / 4); i += kThreads) {
    const int q = i / (2 * kNB8 / 4), p = (i / (kNB8 / 4)) % 2, c = i % (kNB8 / 4);
    const int64_t quad = k0 / 4 + q, panel = n_blk / kNB8 + p;
    const bool ok = quad < g.kq && panel < panels;  // else zeros (meet zero A or no output)
    const uint32_t* src = ok ? g.b + (panel * g.kq + quad) * kNB8 + 4 * c : g.b;
    cp_async16(&sm.b[stage][q * kBStride + p * kNB8 + 4 * c], src, ok ? 16 : 0);
  }
#endif
}

template <bool kASigned>
__global__ void __launch_bounds__(kThreads) w8a8_mma_kernel(const GemmArgs g) {
#ifdef Q2_HAS_MMA
  __shared__ __align__(16) MmaSmem sm;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int gid = lane >> 2, tig = lane & 3;  // the fragment layout's groupID / thread in group
  const int wm = warp >> 2, wn = warp & 3;    // warp tile: rows 64*wm.., columns 32*wn..
  const int64_t m_blk = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t n_blk = static_cast<int64_t>(blockIdx.x) * kBN;
  int32_t acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0;

  const int64_t ktiles = ceil_div(g.K, kBK);
  if (ktiles > 0) mma_load_stage(g, sm, 0, 0, m_blk, n_blk);
  cp_async_commit();
  for (int64_t kt = 0; kt < ktiles; ++kt) {
    const int st = static_cast<int>(kt & 1);
    if (kt + 1 < ktiles) mma_load_stage(g, sm, st ^ 1, kt + 1, m_blk, n_blk);
    cp_async_commit();    // possibly empty: keeps "all groups but the newest" = stage kt
    cp_async_wait_one();
    __syncthreads();
    const uint32_t* As = sm.a[st];
    const uint32_t* Bs = sm.b[st];
#pragma unroll
    for (int ks = 0; ks < kBK / 32; ++ks) {
      const int q0 = ks * 8 + tig;  // A/B registers 0 (k 0..15) use quad q0, 1 use q0 + 4
      uint32_t af[4][4], bf[4][2];
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int r = wm * 64 + i * 16 + gid;
        af[i][0] = As[r * kAStride + q0];
        af[i][1] = As[(r + 8) * kAStride + q0];
        af[i][2] = As[r * kAStride + q0 + 4];
        af[i][3] = As[(r + 8) * kAStride + q0 + 4];
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int c = wn * 32 + j * 8 + gid;
        bf[j][0] = Bs[q0 * kBStride + c] ^ g.b_flip;
        bf[j][1] = Bs[(q0 + 4) * kBStride + c] ^ g.b_flip;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma_16832<kASigned>(acc[i][j], af[i], bf[j]);
    }
    __syncthreads();  // the next iteration refills this stage
  }
  // Accumulator e of tile (i, j): row gid (+8 for e >= 2), column 2 * tig + (e & 1).
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t m = m_blk + wm * 64 + i * 16 + gid + (e >= 2 ? 8 : 0);
        const int64_t n = n_blk + wn * 32 + j * 8 + 2 * tig + (e & 1);
        if (m < g.M && n < g.N) store_out(g, m, n, acc[i][j][e]);
      }
#else
  __trap();  // the host launches this only on sm_80+
#endif
}

// ---- dp4a path --------------------------------------------------------------------------

template <bool kASigned>
__device__ __forceinline__ int32_t dp4a(uint32_t a, uint32_t b, int32_t c) {
  int32_t d;
  if constexpr (kASigned) {
    asm("dp4a.s32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}

// k-quad q of row m of A, zero past K (the last quad of a row may be partial).
__device__ __forceinline__ uint32_t a_quad(const GemmArgs& g, int64_t m, int64_t q) {
  const uint8_t* p = g.a + m * g.lda + 4 * q;
  if (4 * q + 4 <= g.K) return __ldg(reinterpret_cast<const uint32_t*>(p));
  uint32_t w = 0;
  for (int64_t i = 0; 4 * q + i < g.K; ++i) w |= static_cast<uint32_t>(p[i]) << (8 * i);
  return w;
}

// Block: 32 columns (one per lane) x kDpRows rows; warp w of split z takes the quads
// q0 + w, q0 + w + 8, ... of [q0, q0 + quads_per_split).  A panel row of 32 columns is
// 128 contiguous bytes, so each warp load is coalesced; the A words are warp broadcasts.
// ws == nullptr: one split, the block applies the epilogue itself.
template <bool kASigned>
__global__ void __launch_bounds__(kThreads) w8a8_dp4a_kernel(const GemmArgs g, int32_t* ws,
                                                             int64_t quads_per_split) {
  __shared__ int32_t red[kWarps][kDpRows][32];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t n = static_cast<int64_t>(blockIdx.x) * 32 + lane;
  const int64_t m0 = static_cast<int64_t>(blockIdx.y) * kDpRows;
  const int64_t q_begin = static_cast<int64_t>(blockIdx.z) * quads_per_split;
  const int64_t q_end = q_begin + quads_per_split < g.kq ? q_begin + quads_per_split : g.kq;
  int32_t acc[kDpRows] = {};
  if (n < g.N) {
    const uint32_t* col = g.b + (n / kNB8) * g.kq * kNB8 + n % kNB8;
#pragma unroll 4
    for (int64_t q = q_begin + warp; q < q_end; q += kWarps) {
      const uint32_t w = __ldg(col + q * kNB8) ^ g.b_flip;
#pragma unroll
      for (int r = 0; r < kDpRows; ++r)
        if (m0 + r < g.M) acc[r] = dp4a<kASigned>(a_quad(g, m0 + r, q), w, acc[r]);
    }
  }
#pragma unroll
  for (int r = 0; r < kDpRows; ++r) red[warp][r][lane] = acc[r];
  __syncthreads();
  if (warp >= kDpRows) return;
  const int r = warp;  // warp r finishes row m0 + r
  const int64_t m = m0 + r;
  if (m >= g.M || n >= g.N) return;
  int32_t sum = 0;
  for (int w = 0; w < kWarps; ++w) sum += red[w][r][lane];
  if (ws != nullptr) {
    atomicAdd(ws + m * g.N + n, sum);
  } else {
    store_out(g, m, n, sum);
  }
}

// Epilogue of the K-split dp4a path.
__global__ void w8a8_epilogue_kernel(const GemmArgs g, const int32_t* ws) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < g.M * g.N) store_out(g, i / g.N, i % g.N, ws[i]);
}

// Repacks b [N, K] (any strides) into int8 panels: one thread per panel word.
__global__ void pack_b_kernel(const int8_t* b, int64_t sn, int64_t sk, int64_t N, int64_t K,
                              int64_t kq, uint32_t* out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t panels = ceil_div(N, kNB8);
  if (i >= panels * kq * kNB8) return;
  const int64_t j = i % kNB8, q = (i / kNB8) % kq, p = i / (kNB8 * kq);
  const int64_t n = p * kNB8 + j;
  uint32_t w = 0;
  if (n < N)
    for (int64_t e = 0; e < 4 && 4 * q + e < K; ++e)
      w |= static_cast<uint32_t>(static_cast<uint8_t>(b[n * sn + (4 * q + e) * sk])) << (8 * e);
  out[i] = w;
}

// ---- activation quantisation ------------------------------------------------------------

struct QuantArgs {
  const void* x;  // [M, ldx] fp32 / bf16
  int64_t ldx, M, K;
  const float* scale;  // [1] / [M] or nullptr (dynamic)
  bool per_row;
  float qmin, qmax;
  uint8_t* q;  // [M, ldq]
  int64_t ldq;
  float* scale_out;
};

// One block per row (grid.x = max(M, 1): a [1] scale is written even when M == 0).
template <typename T>
__global__ void quantize_kernel(const QuantArgs a) {
  __shared__ float wmax[kWarps];
  const int64_t m = blockIdx.x;
  const T* xr = static_cast<const T*>(a.x) + m * a.ldx;
  float s;
  if (a.scale == nullptr) {
    float mx = 0.0f;
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) mx = gemm::absmax_step(mx, to_f32(xr[k]));
    // mx >= 0 and never NaN here, so absmax_step also merges two maxima.
    for (int o = 16; o > 0; o >>= 1) mx = gemm::absmax_step(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = mx;
    __syncthreads();
    mx = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) mx = gemm::absmax_step(mx, wmax[w]);
    s = gemm::dynamic_scale(mx, a.qmax);
    if (threadIdx.x == 0) a.scale_out[m] = s;
  } else {
    s = sanitize_scale(a.scale[a.per_row ? m : 0]);
    if (threadIdx.x == 0 && (a.per_row || m == 0)) a.scale_out[a.per_row ? m : 0] = s;
  }
  if (m >= a.M) return;
  const float inv = gemm::quant_inv(s);
  uint8_t* qr = a.q + m * a.ldq;
  for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x)
    qr[k] = static_cast<uint8_t>(gemm::quant_code(to_f32(xr[k]), inv, a.qmin, a.qmax));
}

// ---- host side --------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

int sm_count(int device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

bool has_int8_mma(int device) {
  int major = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major >= 8;
}

// Quantises x into q ([M, >= K] bytes, row stride q.stride(0)); returns the scales.
at::Tensor quantize_into(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                         int64_t qmin, int64_t qmax, at::Tensor& q, cudaStream_t st) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xc = x.stride(1) == 1 || K <= 1 ? x : x.contiguous();
  const bool per_row = scale.has_value() && scale->numel() == M && M != 1;
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  at::Tensor s_out = at::empty({(!scale.has_value() || per_row) ? M : 1}, x.options().dtype(at::kFloat));
  const int64_t rows = scale.has_value() && !per_row ? std::max<int64_t>(M, 1) : M;
  if (rows == 0) return s_out;
  QuantArgs a{xc.const_data_ptr(), xc.stride(0), M, K, sc.defined() ? sc.const_data_ptr<float>() : nullptr,
              per_row, static_cast<float>(qmin), static_cast<float>(qmax),
              static_cast<uint8_t*>(q.data_ptr()), q.stride(0), s_out.mutable_data_ptr<float>()};
  const int threads = K >= 256 ? 256 : (K > 64 ? 128 : 32);
  TORCH_CHECK(rows <= INT32_MAX, "q2ext.quantize_activation: too many rows");
  if (x.scalar_type() == at::kFloat) {
    quantize_kernel<float><<<static_cast<unsigned>(rows), threads, 0, st>>>(a);
  } else {
    quantize_kernel<bf16_t><<<static_cast<unsigned>(rows), threads, 0, st>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s_out;
}

template <bool kASigned>
void launch_gemm(const GemmArgs& g, int device, cudaStream_t st) {
  if (g.M > kGemvMaxM && has_int8_mma(device)) {
    const dim3 grid(static_cast<unsigned>(ceil_div(g.N, kBN)), static_cast<unsigned>(ceil_div(g.M, kBM)));
    TORCH_CHECK(grid.y <= 65535, "q2ext.w8a8: M too large");
    w8a8_mma_kernel<kASigned><<<grid, kThreads, 0, st>>>(g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t bx = ceil_div(g.N, 32), by = ceil_div(g.M, kDpRows);
  TORCH_CHECK(by <= 65535, "q2ext.w8a8: M too large for the dp4a path");
  // Enough blocks for ~4 waves, but at least kMinQuadsPerSplit quads per split.
  const int64_t want = ceil_div(4 * sm_count(device), bx * by);
  int64_t splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, g.kq / kMinQuadsPerSplit));
  const int64_t qps = std::max<int64_t>(1, ceil_div(g.kq, splits));
  splits = std::max<int64_t>(1, ceil_div(g.kq, qps));
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(splits));
  if (splits == 1) {
    w8a8_dp4a_kernel<kASigned><<<grid, kThreads, 0, st>>>(g, nullptr, qps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool raw = g.out_kind == gemm::kOutI32;
  at::Tensor ws;
  int32_t* wp = static_cast<int32_t*>(g.out);
  if (!raw) {
    ws = at::empty({g.M, g.N}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
    wp = ws.mutable_data_ptr<int32_t>();
  }
  C10_CUDA_CHECK(cudaMemsetAsync(wp, 0, sizeof(int32_t) * g.M * g.N, st));
  w8a8_dp4a_kernel<kASigned><<<grid, kThreads, 0, st>>>(g, wp, qps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!raw) {
    w8a8_epilogue_kernel<<<static_cast<unsigned>(ceil_div(g.M * g.N, kThreads)), kThreads, 0, st>>>(g, wp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

GemmArgs make_gemm(const at::Tensor& a_rows, const uint8_t* a_ptr, int64_t N, int64_t K,
                   const at::Tensor& a_scale, const at::Tensor& b_scale,
                   const std::optional<at::Tensor>& bias, bool relu, int out_kind, at::Tensor& out) {
  GemmArgs g{};
  g.a = a_ptr;
  g.lda = a_rows.size(0) > 1 ? a_rows.stride(0) : 0;
  g.M = a_rows.size(0);
  g.N = N;
  g.K = K;
  g.kq = ceil_div(K, 4);
  g.a_scale = a_scale.const_data_ptr<float>();
  g.a_scale_per_row = a_scale.numel() == g.M && g.M != 1;
  g.b_scale = b_scale.const_data_ptr<float>();
  g.bias = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  g.relu = relu;
  g.out_kind = out_kind;
  g.out = out.mutable_data_ptr();
  return g;
}

void run_gemm(const GemmArgs& g, bool a_signed, int device, cudaStream_t st) {
  if (a_signed) {
    launch_gemm<true>(g, device, st);
  } else {
    launch_gemm<false>(g, device, st);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_cuda(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& scale,
                                                            int64_t quant_min, int64_t quant_max) {
  gemm::check_quantize_activation(x, scale, quant_min, quant_max);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(quant_min < 0 ? at::kChar : at::kByte));
  at::Tensor s = quantize_into(x, scale, quant_min, quant_max, q, c10::cuda::getCurrentCUDAStream());
  return {q, s};
}

at::Tensor w8a8_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                        const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                        std::optional<at::ScalarType> out_dtype, bool relu) {
  const at::ScalarType od = gemm::check_w8a8_mm(a, b, a_scale, b_scale, bias, out_dtype, relu);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), N = gemm::w8a8_mm_n(b, b_scale), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(od));
  if (M == 0 || N == 0) return out;
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  // A rows must start 16-byte aligned (see the header); otherwise copy into such rows.
  at::Tensor ac = a;
  const bool rows_ok = (a.stride(1) == 1 || K <= 1) && aligned16(a.const_data_ptr()) &&
                       (M == 1 || a.stride(0) % 16 == 0);
  if (!rows_ok) {
    ac = at::empty({M, ceil_div(K, 16) * 16}, a.options()).narrow(1, 0, K);
    ac.copy_(a);
  }
  const int64_t kq = ceil_div(K, 4);
  const bool packed = b.dim() == 4;  // pack_int8_weight output: the panels already
  at::Tensor panels = packed ? (aligned16(b.const_data_ptr()) ? b : b.clone())
                             : at::empty({ceil_div(N, kNB8) * kq * kNB8}, a.options().dtype(at::kInt));
  if (!packed && panels.numel() > 0) {
    pack_b_kernel<<<static_cast<unsigned>(ceil_div(panels.numel(), kThreads)), kThreads, 0, st>>>(
        static_cast<const int8_t*>(b.const_data_ptr()), b.stride(0), b.stride(1), N, K, kq,
        reinterpret_cast<uint32_t*>(panels.mutable_data_ptr<int32_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  const int kind = od == at::kFloat ? gemm::kOutF32 : (od == at::kBFloat16 ? gemm::kOutBF16 : gemm::kOutI32);
  GemmArgs g = make_gemm(ac, static_cast<const uint8_t*>(ac.const_data_ptr()), N, K, as, bs, bias_c, relu,
                         kind, out);
  g.b = static_cast<const uint32_t*>(panels.const_data_ptr());
  // Packed for int8 activations, the panels hold w + 128 (see w8a8_linear_cuda).
  g.b_flip = packed && a.scalar_type() == at::kChar ? 0x80808080u : 0u;
  run_gemm(g, a.scalar_type() == at::kChar, a.get_device(), st);
  return out;
}

at::Tensor w8a8_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& bias,
                            int64_t quant_min, int64_t quant_max, bool relu) {
  const int64_t N = gemm::check_w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  const bool a_signed = quant_min < 0;
  // The quantised activation goes to 16-byte aligned rows (padding never read as data).
  at::Tensor q = at::empty({M, ceil_div(K, 16) * 16}, x.options().dtype(at::kByte)).narrow(1, 0, K);
  const at::Tensor s = quantize_into(x, x_scale, quant_min, quant_max, q, st);
  // A packed weight that is a view at an odd offset is copied to aligned storage.
  const at::Tensor wp = aligned16(w_packed.const_data_ptr()) ? w_packed : w_packed.clone();
  const at::Tensor ws = w_scale.contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  GemmArgs g = make_gemm(q, static_cast<const uint8_t*>(q.const_data_ptr()), N, K, s, ws, bias_c, relu,
                         x.scalar_type() == at::kFloat ? gemm::kOutF32 : gemm::kOutBF16, out);
  g.b = static_cast<const uint32_t*>(wp.const_data_ptr());
  g.b_flip = a_signed ? 0x80808080u : 0u;  // signed activations: the panels hold w + 128
  run_gemm(g, a_signed, x.get_device(), st);
  return out;
}

}  // namespace
}  // namespace gpu_gemm8
}  // namespace q2ext

TORCH_LIBRARY_IMPL(q2ext, CUDA, m) {
  m.impl("quantize_activation", &q2ext::gpu_gemm8::quantize_activation_cuda);
  m.impl("w8a8_mm", &q2ext::gpu_gemm8::w8a8_mm_cuda);
  m.impl("w8a8_linear", &q2ext::gpu_gemm8::w8a8_linear_cuda);
}
