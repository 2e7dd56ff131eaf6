// Device side of the W8A8 GEMM (csrc/cuda/gemm_w8a8.cu, the only file that includes this):
// the operand formats, the shared epilogue, the tensor-core (mma) and dp4a kernels, the
// K-split epilogue and the b [N, K] -> panel repacking.  See gemm_w8a8.cu for the design.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "q2ext/gemm_math.h"

namespace q2ext::gemm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 128, kBN = 128, kBK = 64;  // MMA block tile (kBN = 2 panels)
constexpr int kAStride = kBK / 4 + 4;  // words per A row in shared memory: the 4-word pad
                                       // makes the fragment loads bank-conflict free
constexpr int kBStride = kBN + 8;      // words per B quad row, same reason
constexpr int kDpRows = 4;             // dp4a: output rows per block
constexpr int64_t kGemvMaxM = 16;      // dp4a below, MMA above (on sm_80+)
constexpr int64_t kMinQuadsPerSplit = 64;

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
  int out_kind;  // OutKind
  void* out;     // [M, N] contiguous
};

// The fused epilogue of one output (the CPU's w8a8_store does the same through the same
// helper); int32 outputs are the raw accumulator.
__device__ __forceinline__ void store_out(const GemmArgs& g, int64_t m, int64_t n, int32_t acc) {
  const int64_t o = m * g.N + n;
  if (g.out_kind == kOutI32) {
    static_cast<int32_t*>(g.out)[o] = acc;
    return;
  }
  const float y = w8a8_epilogue(acc, g.a_scale[g.a_scale_per_row ? m : 0], g.b_scale[n],
                                      g.bias != nullptr, g.bias ? g.bias[n] : 0.0f, g.relu);
  if (g.out_kind == kOutF32) {
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

}  // namespace
}  // namespace q2ext::gemm::cuda
