// CPU kernels of q2ext::gb_fusion_forward / gb_fusion_backward / gb_fusion_update.
//
// LayerNorm runs over the fused channels of each pixel.  Two traversals:
//  * NCHW: a work block is up to kPix consecutive pixels of one image.  The fused values
//    h[c][p] of the block go to an fp32 scratch tile (channel-major, pixel inner, L1/L2
//    resident), and every pass (mean, variance, normalise; backward: the two channel
//    means, dx) is a loop over pixels: contiguous, branch-free, vectorised across pixels.
//  * NHWC (channels_last): one pixel's channels are contiguous, so the loops run across
//    channels with kLanes independent accumulators folded in a fixed order.
// Both are compiled three times (AVX-512, AVX2, baseline) by inlining the always-inline
// templates into functions with a target attribute; the choice follows active_cpu_isa().
// -ffp-contract=off and the fixed reduction orders make every ISA path bit-identical.
//
// Determinism of the backward's reductions (g_sq, dweight, dbias): blocks are grouped
// into at most kMaxChunks chunks fixed by the geometry (not by the thread count); each
// chunk sums into its own double slots, then the chunks are added in order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "q2ext/cpu_isa.h"
#include "q2ext/gb_fusion_args.h"
#include "q2ext/gb_fusion_math.h"
#include "q2ext/huge_pages.h"

namespace q2ext {
namespace cpu {
namespace {

// Pixels per NCHW block: each channel row is read in kPix-long contiguous pieces, so
// longer blocks mean fewer, longer streams for the prefetcher (C rows per branch are
// in flight at once); the fp32 tiles (2 * C * kPix) still fit in L2 for C <= 512.
constexpr int64_t kPix = 128;
constexpr int64_t kLanes = 16;      // NHWC lane accumulators
constexpr int64_t kMaxChunks = 256;

struct Branch {
  const void* x;
  void* dx;
  int64_t c, off;
  double alpha;
};

struct Geom {
  int64_t n, hw, c_out, k, mode;
  bool nhwc;
  Branch br[kGbMaxBranches];
  int64_t blocks_per_image() const { return nhwc ? 0 : (hw + kPix - 1) / kPix; }
  int64_t blocks() const { return nhwc ? (n * hw + kPix - 1) / kPix : n * blocks_per_image(); }
};

struct Args {
  Geom g;
  const void* grad;  // backward
  void* out;         // forward
  const void* w;     // [C] compute type, or null
  const void* b;
  void* mean;        // (N, H, W) compute type (backward: read)
  void* rstd;
  double eps;
  bool stream;       // write the NCHW outputs with non-temporal stores (see store_row)
};

// Per-chunk reduction slots of the backward.
struct Sums {
  double* g_sq;  // [K]
  double* dw;    // [C] or null
  double* db;
};

#define GB_INLINE inline __attribute__((always_inline))

// ---------------------------------------------------------------- NCHW, pixel-vectorised

// A block reads (and writes) kPix-long pieces of C rows per tensor: hundreds of streams,
// far more than the hardware prefetchers track, so every piece would start with a cache
// miss.  Each row continues at the same row of the next block (same image), so while a
// piece is used the next piece of that row is requested ahead.
#if defined(__x86_64__) || defined(__i386__)
__attribute__((target("avx512f"), noinline)) void stream_row_f32(float* o, const float* v) {
  for (int64_t p = 0; p < kPix; p += 16) _mm512_stream_ps(o + p, _mm512_loadu_ps(v + p));
}
#endif

// Writes one computed row piece.  Outputs much larger than the caches are written with
// non-temporal stores on the AVX-512 path: a normal store first reads the line it
// overwrites (read-for-ownership), which adds a third to the traffic of a kernel that
// is bound by memory bandwidth.  Needs a full, 64-byte aligned fp32 piece; otherwise,
// and for small outputs (still in cache for their consumer), plain stores.
template <bool kStream, typename T, typename A>
GB_INLINE void store_row(T* __restrict o, const A* __restrict v, int64_t np, bool stream) {
#if defined(__x86_64__) || defined(__i386__)
  if constexpr (kStream && std::is_same_v<T, float>) {
    if (stream && np == kPix && (reinterpret_cast<std::uintptr_t>(o) & 63) == 0) {
      stream_row_f32(o, v);
      return;
    }
  }
#endif
  for (int64_t p = 0; p < np; ++p) gb_store(v[p], &o[p]);
}

template <typename T>
GB_INLINE void prefetch_next(const T* row, bool has_next, int rw) {
  if (!has_next) return;
  constexpr int64_t kStep = 64 / static_cast<int64_t>(sizeof(T));  // elements per cache line
  for (int64_t p = kPix; p < 2 * kPix; p += kStep)
    rw ? __builtin_prefetch(row + p, 1, 3) : __builtin_prefetch(row + p, 0, 3);
}

// Fills tile[c][p] (c over the fused channels) with h = cat / sum of alpha_i * x_i.
template <typename T, typename A>
GB_INLINE void load_tile(const Geom& g, int64_t n, int64_t p0, int64_t np, A* __restrict tile) {
  for (int64_t i = 0; i < g.k; ++i) {
    const Branch& b = g.br[i];
    const T* __restrict x = static_cast<const T*>(b.x) + n * b.c * g.hw + p0;
    const A al = static_cast<A>(b.alpha);
    const bool first = g.mode == kGbConcat || i == 0;
    for (int64_t c = 0; c < b.c; ++c) {
      A* __restrict row = tile + (b.off + c) * kPix;
      const T* __restrict xr = x + c * g.hw;
      prefetch_next(xr, p0 + kPix < g.hw, 0);
      if (first) {
        for (int64_t p = 0; p < np; ++p) row[p] = al * gb_load(xr[p]);
      } else {
        for (int64_t p = 0; p < np; ++p) row[p] = row[p] + al * gb_load(xr[p]);
      }
    }
  }
}

template <bool kStream, typename T, typename A>
GB_INLINE void forward_nchw(const Args& a, int64_t blk0, int64_t blk1, A* __restrict tile) {
  const Geom& g = a.g;
  const int64_t C = g.c_out, bpi = g.blocks_per_image();
  const A inv_c = A(1) / static_cast<A>(C), eps = static_cast<A>(a.eps);
  const A* __restrict w = static_cast<const A*>(a.w);
  const A* __restrict bb = static_cast<const A*>(a.b);
  A mean[kPix], rstd[kPix];
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t n = blk / bpi, p0 = (blk % bpi) * kPix, np = std::min(kPix, g.hw - p0);
    load_tile<T, A>(g, n, p0, np, tile);
    for (int64_t p = 0; p < kPix; ++p) mean[p] = A(0), rstd[p] = A(0);
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < np; ++p) mean[p] += tile[c * kPix + p];
    for (int64_t p = 0; p < np; ++p) mean[p] = mean[p] * inv_c;
    for (int64_t c = 0; c < C; ++c)
      for (int64_t p = 0; p < np; ++p) {
        const A d = tile[c * kPix + p] - mean[p];
        rstd[p] += d * d;
      }
    for (int64_t p = 0; p < np; ++p) rstd[p] = gb_rstd(rstd[p], inv_c, eps);
    T* __restrict out = static_cast<T*>(a.out) + n * C * g.hw + p0;
    for (int64_t c = 0; c < C; ++c) {
      A* __restrict row = tile + c * kPix;
      T* __restrict o = out + c * g.hw;
      if (!a.stream) prefetch_next(o, p0 + kPix < g.hw, 1);
      const A wc = w ? w[c] : A(1), bc = w ? bb[c] : A(0);
      for (int64_t p = 0; p < np; ++p) row[p] = (row[p] - mean[p]) * rstd[p] * wc + bc;
      store_row<kStream, T, A>(o, row, np, a.stream);
    }
    A* __restrict ms = static_cast<A*>(a.mean) + n * g.hw + p0;
    A* __restrict rs = static_cast<A*>(a.rstd) + n * g.hw + p0;
    for (int64_t p = 0; p < np; ++p) ms[p] = mean[p], rs[p] = rstd[p];
  }
}

template <bool kStream, typename T, typename A>
GB_INLINE void backward_nchw(const Args& a, int64_t blk0, int64_t blk1, A* __restrict tile,
                             const Sums& s) {
  const Geom& g = a.g;
  const int64_t C = g.c_out, bpi = g.blocks_per_image();
  const A inv_c = A(1) / static_cast<A>(C);
  const A* __restrict w = static_cast<const A*>(a.w);
  alignas(64) A m1[kPix], m2[kPix], dh[kPix], d[kPix];
  A sq[kGbMaxBranches][kPix];
  A* __restrict gtile = tile + C * kPix;
  for (int64_t blk = blk0; blk < blk1; ++blk) {
    const int64_t n = blk / bpi, p0 = (blk % bpi) * kPix, np = std::min(kPix, g.hw - p0);
    const A* __restrict mean = static_cast<const A*>(a.mean) + n * g.hw + p0;
    const A* __restrict rstd = static_cast<const A*>(a.rstd) + n * g.hw + p0;
    const T* __restrict grad = static_cast<const T*>(a.grad) + n * C * g.hw + p0;
    load_tile<T, A>(g, n, p0, np, tile);
    for (int64_t p = 0; p < kPix; ++p) m1[p] = A(0), m2[p] = A(0);
    // tile becomes y, gtile gets gy (so the grad is read from memory once); the two
    // channel means of the LN gradient.
    for (int64_t c = 0; c < C; ++c) {
      A* __restrict row = tile + c * kPix;
      A* __restrict grow = gtile + c * kPix;
      const T* __restrict gr = grad + c * g.hw;
      prefetch_next(gr, p0 + kPix < g.hw, 0);
      const A wc = w ? w[c] : A(1);
      for (int64_t p = 0; p < np; ++p) {
        const A y = (row[p] - mean[p]) * rstd[p];
        const A gy = gb_load(gr[p]) * wc;
        row[p] = y;
        grow[p] = gy;
        m1[p] += gy;
        m2[p] += gy * y;
      }
      if (s.dw) {  // optional affine: ordered scalar sums over the block's pixels
        A sw = A(0), sb = A(0);
        for (int64_t p = 0; p < np; ++p) {
          const A gv = gb_load(gr[p]);
          sw += gv * row[p];
          sb += gv;
        }
        s.dw[c] += sw;
        s.db[c] += sb;
      }
    }
    for (int64_t p = 0; p < np; ++p) m1[p] = m1[p] * inv_c, m2[p] = m2[p] * inv_c;
    // dx: concat walks each branch's channels; add computes dh once per channel and
    // scales it for every branch.  Squares go to per-branch pixel lanes (vectorisable,
    // fixed order), summed at the end of the block.
    const int64_t k_sq = g.k;
    for (int64_t j = 0; j < k_sq; ++j)
      for (int64_t p = 0; p < kPix; ++p) sq[j][p] = A(0);
    for (int64_t i = 0; i < (g.mode == kGbAdd ? 1 : g.k); ++i) {
      const Branch& b = g.br[i];
      for (int64_t c = 0; c < b.c; ++c) {
        const int64_t co = b.off + c;
        const A* __restrict row = tile + co * kPix;
        const A* __restrict grow = gtile + co * kPix;
        for (int64_t p = 0; p < np; ++p) dh[p] = gb_ln_grad<A>(grow[p], row[p], m1[p], m2[p], rstd[p]);
        const int64_t j_end = g.mode == kGbAdd ? g.k : i + 1;
        for (int64_t j = i; j < j_end; ++j) {
          const Branch& bj = g.br[j];
          const A al = static_cast<A>(bj.alpha);
          T* __restrict dx = static_cast<T*>(bj.dx) + (n * bj.c + c) * g.hw + p0;
          if (!a.stream) prefetch_next(dx, p0 + kPix < g.hw, 1);
          A* __restrict sj = sq[j];
          for (int64_t p = 0; p < np; ++p) {
            d[p] = al * dh[p];
            sj[p] += d[p] * d[p];
          }
          store_row<kStream, T, A>(dx, d, np, a.stream);
        }
      }
    }
    for (int64_t j = 0; j < k_sq; ++j) {
      A acc = A(0);
      for (int64_t p = 0; p < np; ++p) acc += sq[j][p];
      s.g_sq[j] += acc;
    }
  }
}

// ---------------------------------------------------------------- NHWC, channel-vectorised

template <typename A>
GB_INLINE A lane_sum(const A* __restrict v, int64_t n) {
  A acc[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) acc[l] += v[c + l];
  A t = A(0);
  for (; c < n; ++c) t += v[c];
  for (int64_t l = 0; l < kLanes; ++l) t += acc[l];
  return t;
}

template <typename T, typename A>
GB_INLINE void load_row(const Geom& g, int64_t q, A* __restrict row) {
  for (int64_t i = 0; i < g.k; ++i) {
    const Branch& b = g.br[i];
    const T* __restrict x = static_cast<const T*>(b.x) + q * b.c;
    const A al = static_cast<A>(b.alpha);
    A* __restrict r = row + b.off;
    if (g.mode == kGbConcat || i == 0) {
      for (int64_t c = 0; c < b.c; ++c) r[c] = al * gb_load(x[c]);
    } else {
      for (int64_t c = 0; c < b.c; ++c) r[c] = r[c] + al * gb_load(x[c]);
    }
  }
}

template <typename T, typename A>
GB_INLINE void forward_nhwc(const Args& a, int64_t blk0, int64_t blk1, A* __restrict row) {
  const Geom& g = a.g;
  const int64_t C = g.c_out, total = g.n * g.hw;
  const A inv_c = A(1) / static_cast<A>(C), eps = static_cast<A>(a.eps);
  const A* __restrict w = static_cast<const A*>(a.w);
  const A* __restrict bb = static_cast<const A*>(a.b);
  A* __restrict tmp = row + C;
  for (int64_t q = blk0 * kPix; q < std::min(total, blk1 * kPix); ++q) {
    load_row<T, A>(g, q, row);
    const A mean = lane_sum(row, C) * inv_c;
    for (int64_t c = 0; c < C; ++c) {
      const A d = row[c] - mean;
      tmp[c] = d * d;
    }
    const A rstd = gb_rstd(lane_sum(tmp, C), inv_c, eps);
    T* __restrict o = static_cast<T*>(a.out) + q * C;
    if (w) {
      for (int64_t c = 0; c < C; ++c) gb_store((row[c] - mean) * rstd * w[c] + bb[c], &o[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) gb_store((row[c] - mean) * rstd, &o[c]);
    }
    static_cast<A*>(a.mean)[q] = mean;
    static_cast<A*>(a.rstd)[q] = rstd;
  }
}

template <typename T, typename A>
GB_INLINE void backward_nhwc(const Args& a, int64_t blk0, int64_t blk1, A* __restrict row,
                             const Sums& s) {
  const Geom& g = a.g;
  const int64_t C = g.c_out, total = g.n * g.hw;
  const A inv_c = A(1) / static_cast<A>(C);
  const A* __restrict w = static_cast<const A*>(a.w);
  A* __restrict gy = row + C;
  A* __restrict tmp = row + 2 * C;
  for (int64_t q = blk0 * kPix; q < std::min(total, blk1 * kPix); ++q) {
    const A mean = static_cast<const A*>(a.mean)[q], rstd = static_cast<const A*>(a.rstd)[q];
    const T* __restrict gr = static_cast<const T*>(a.grad) + q * C;
    load_row<T, A>(g, q, row);
    for (int64_t c = 0; c < C; ++c) {
      const A y = (row[c] - mean) * rstd;
      const A gv = gb_load(gr[c]);
      row[c] = y;
      gy[c] = w ? gv * w[c] : gv;
      tmp[c] = gy[c] * y;
    }
    if (s.dw) {
      for (int64_t c = 0; c < C; ++c) {
        const A gv = gb_load(gr[c]);
        s.dw[c] += gv * row[c];
        s.db[c] += gv;
      }
    }
    const A m1 = lane_sum(gy, C) * inv_c, m2 = lane_sum(tmp, C) * inv_c;
    for (int64_t c = 0; c < C; ++c) tmp[c] = gb_ln_grad<A>(gy[c], row[c], m1, m2, rstd);
    for (int64_t i = 0; i < g.k; ++i) {
      const Branch& b = g.br[i];
      const A al = static_cast<A>(b.alpha);
      T* __restrict dx = static_cast<T*>(b.dx) + q * b.c;
      const A* __restrict d = tmp + b.off;
      for (int64_t c = 0; c < b.c; ++c) {
        const A v = al * d[c];
        gb_store(v, &dx[c]);
        gy[c] = v * v;  // gy is free again: reuse it for the squares
      }
      s.g_sq[i] += lane_sum(gy, b.c);
    }
  }
}

// ---------------------------------------------------------------- ISA instantiation

template <bool kStream, typename T, typename A>
GB_INLINE void forward_range(const Args& a, int64_t b0, int64_t b1, A* scratch) {
  a.g.nhwc ? forward_nhwc<T, A>(a, b0, b1, scratch)
           : forward_nchw<kStream, T, A>(a, b0, b1, scratch);
}
template <bool kStream, typename T, typename A>
GB_INLINE void backward_range(const Args& a, int64_t b0, int64_t b1, A* scratch, const Sums& s) {
  a.g.nhwc ? backward_nhwc<T, A>(a, b0, b1, scratch, s)
           : backward_nchw<kStream, T, A>(a, b0, b1, scratch, s);
}

using FwdFn = void (*)(const Args&, int64_t, int64_t, void*);
using BwdFn = void (*)(const Args&, int64_t, int64_t, void*, const Sums&);

#define GB_DEFINE_ISA(isa, attr, stream)                                                \
  template <typename T>                                                                 \
  attr void fwd_##isa(const Args& a, int64_t b0, int64_t b1, void* s) {                 \
    using A = typename GbAcc<T>::type;                                                  \
    forward_range<stream, T, A>(a, b0, b1, static_cast<A*>(s));                         \
  }                                                                                     \
  template <typename T>                                                                 \
  attr void bwd_##isa(const Args& a, int64_t b0, int64_t b1, void* s, const Sums& sums) { \
    using A = typename GbAcc<T>::type;                                                  \
    backward_range<stream, T, A>(a, b0, b1, static_cast<A*>(s), sums);                  \
  }

#if defined(__x86_64__) || defined(__i386__)
GB_DEFINE_ISA(avx512, __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,bmi2"))), true)
GB_DEFINE_ISA(avx2, __attribute__((target("avx2,fma,bmi2"))), false)
#endif
GB_DEFINE_ISA(scalar, , false)

struct Table {
  FwdFn fwd[4];  // f32, bf16, f16, f64
  BwdFn bwd[4];
};

#define GB_TABLE(isa)                                                              \
  Table {                                                                          \
    {fwd_##isa<float>, fwd_##isa<bf16_t>, fwd_##isa<f16_t>, fwd_##isa<double>},    \
        {bwd_##isa<float>, bwd_##isa<bf16_t>, bwd_##isa<f16_t>, bwd_##isa<double>} \
  }

const Table& table() {
#if defined(__x86_64__) || defined(__i386__)
  static const Table t[3] = {GB_TABLE(scalar), GB_TABLE(avx2), GB_TABLE(avx512)};
  return t[static_cast<int>(active_cpu_isa())];
#else
  static const Table t = GB_TABLE(scalar);
  return t;
#endif
}

int dtype_slot(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return 0;
    case at::kBFloat16: return 1;
    case at::kHalf: return 2;
    default: return 3;
  }
}

// ---------------------------------------------------------------- op entry points

using gb::acc_type;
using gb::check_vec;

// Validates the branches and lays them out like branches[0] (NHWC or NCHW, dense).
Geom make_geom(const at::TensorList& branches, int64_t mode, std::vector<at::Tensor>& dense) {
  TORCH_CHECK(mode == kGbConcat || mode == kGbAdd,
              "q2ext gb_fusion: mode must be 0 (concat) or 1 (add), got ", mode);
  const int64_t k = static_cast<int64_t>(branches.size());
  TORCH_CHECK(k >= 2, "q2ext gb_fusion: branches must hold at least 2 tensors, got ", k);
  TORCH_CHECK(k <= kGbMaxBranches, "q2ext gb_fusion: branches holds ", k, " tensors; at most ",
              kGbMaxBranches, " are supported");
  const at::Tensor& x0 = branches[0];
  TORCH_CHECK(x0.dim() == 4, "q2ext gb_fusion: branches[0] must be 4-D (N, C, H, W), got ",
              x0.sizes());
  const auto st = x0.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "q2ext gb_fusion: branches[0] must be float32/16, bfloat16 or float64, got ", st);
  const bool nhwc = x0.is_contiguous(at::MemoryFormat::ChannelsLast) && !x0.is_contiguous();
  const auto fmt = nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  Geom g{};
  g.n = x0.size(0);
  g.hw = x0.size(2) * x0.size(3);
  g.k = k;
  g.mode = mode;
  g.nhwc = nhwc;
  int64_t c = 0;
  for (int64_t i = 0; i < k; ++i) {
    const at::Tensor& x = branches[i];
    TORCH_CHECK(x.dim() == 4, "q2ext gb_fusion: branches[", i, "] must be 4-D, got ", x.sizes());
    const char* dims = "NCHW";
    for (int d : {0, 2, 3})
      TORCH_CHECK(x.size(d) == x0.size(d), "q2ext gb_fusion: branches[", i, "] has ", dims[d], "=",
                  x.size(d), " but branches[0] has ", dims[d], "=", x0.size(d));
    TORCH_CHECK(x.scalar_type() == st, "q2ext gb_fusion: branches[", i, "] is ", x.scalar_type(),
                " but branches[0] is ", st);
    TORCH_CHECK(x.device() == x0.device(), "q2ext gb_fusion: branches[", i, "] is on ",
                x.device(), " but branches[0] is on ", x0.device());
    TORCH_CHECK(mode != kGbAdd || x.size(1) == x0.size(1),
                "q2ext gb_fusion: mode add needs equal channels: branches[", i, "] has C=",
                x.size(1), ", branches[0] has C=", x0.size(1));
    dense.push_back(x.contiguous(fmt));
    g.br[i].x = dense.back().data_ptr();
    g.br[i].c = x.size(1);
    g.br[i].off = mode == kGbConcat ? c : 0;
    c = mode == kGbConcat ? c + x.size(1) : x.size(1);
  }
  g.c_out = c;
  return g;
}

// Non-temporal stores pay off when an output is well beyond what the caches keep for its
// consumer (this also covers the backward's branch gradients, all as large as grads[0]
// or larger in add mode, and NCHW concat pieces of any size: they are only advice).
bool stream_outputs(const at::Tensor& t) {
  constexpr int64_t kStreamBytes = int64_t{4} << 20;
  return t.scalar_type() == at::kFloat && t.nbytes() >= kStreamBytes;
}

// Makes this thread's non-temporal stores visible before the op returns.
void store_fence() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_sfence();
#endif
}

int64_t scratch_elems(const Geom& g) { return g.nhwc ? 3 * g.c_out : 2 * g.c_out * kPix; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> gb_fusion_forward_cpu(
    at::TensorList branches, const at::Tensor& lam, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, int64_t mode, double eps) {
  std::vector<at::Tensor> dense;
  Geom g = make_geom(branches, mode, dense);
  const at::Tensor& x0 = branches[0];
  const auto at_acc = acc_type(x0);
  gb::check_forward_params(x0, lam, weight, bias, g.k, g.c_out, eps);
  const auto fmt = g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.n, g.c_out, x0.size(2), x0.size(3)}, x0.options(), fmt);
  advise_huge_pages(out);
  at::Tensor mean = at::empty({g.n, x0.size(2), x0.size(3)}, x0.options().dtype(at_acc));
  at::Tensor rstd = at::empty_like(mean);
  at::Tensor alpha = at::empty({g.k}, lam.options());
  at::Tensor lam_c = lam.contiguous();
  gb_softmax(lam_c.data_ptr<float>(), alpha.data_ptr<float>(), static_cast<int>(g.k));
  for (int64_t i = 0; i < g.k; ++i) g.br[i].alpha = alpha.data_ptr<float>()[i];
  at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  at::Tensor b = bias.has_value() ? bias->contiguous() : at::Tensor();
  Args a{g, nullptr, out.data_ptr(), w.defined() ? w.data_ptr() : nullptr,
         b.defined() ? b.data_ptr() : nullptr, mean.data_ptr(), rstd.data_ptr(), eps,
         stream_outputs(out)};
  const int64_t blocks = g.blocks();
  if (blocks == 0 || g.c_out == 0) return {out, mean, rstd, alpha};
  const FwdFn fn = table().fwd[dtype_slot(x0.scalar_type())];
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / (kPix * g.c_out));
  const size_t esz = x0.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
  at::parallel_for(0, blocks, grain, [&](int64_t b0, int64_t b1) {
    std::vector<char> scratch(scratch_elems(g) * esz);
    fn(a, b0, b1, scratch.data());
    store_fence();
  });
  return {out, mean, rstd, alpha};
}

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> gb_fusion_backward_cpu(
    const at::Tensor& grad, at::TensorList branches, const at::Tensor& alpha,
    const std::optional<at::Tensor>& weight, const at::Tensor& mean, const at::Tensor& rstd,
    int64_t mode) {
  std::vector<at::Tensor> dense;
  Geom g = make_geom(branches, mode, dense);
  const at::Tensor& x0 = branches[0];
  const auto at_acc = acc_type(x0);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == g.n && grad.size(1) == g.c_out &&
                  grad.size(2) == x0.size(2) && grad.size(3) == x0.size(3) &&
                  grad.scalar_type() == x0.scalar_type(),
              "q2ext gb_fusion_backward: grad must be ", x0.scalar_type(), " of shape [", g.n, ", ",
              g.c_out, ", ", x0.size(2), ", ", x0.size(3), "], got ", grad.scalar_type(), " ",
              grad.sizes());
  check_vec("alpha", alpha, g.k, at::kFloat, x0);
  for (const auto* t : {&mean, &rstd})
    TORCH_CHECK(t->scalar_type() == at_acc && t->numel() == g.n * g.hw,
                "q2ext gb_fusion_backward: mean/rstd must be ", at_acc, " of shape (N, H, W)");
  if (weight.has_value()) check_vec("weight", *weight, g.c_out, at_acc, x0);
  const auto fmt = g.nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor gd = grad.contiguous(fmt);
  at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous(), alpha_c = alpha.contiguous();
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < g.k; ++i) {
    grads.push_back(at::empty_like(dense[i], fmt));
    advise_huge_pages(grads.back());
    g.br[i].dx = grads.back().data_ptr();
    g.br[i].alpha = alpha_c.data_ptr<float>()[i];
  }
  at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  Args a{g, gd.data_ptr(), nullptr, w.defined() ? w.data_ptr() : nullptr, nullptr,
         mean_c.data_ptr(), rstd_c.data_ptr(), 0.0, stream_outputs(grads[0])};
  const int64_t blocks = g.blocks();
  const int64_t chunks = std::min(blocks, kMaxChunks);
  const bool affine = w.defined();
  const int64_t slot = g.k + (affine ? 2 * g.c_out : 0);
  std::vector<double> part(std::max<int64_t>(chunks, 1) * slot, 0.0);
  if (chunks > 0 && g.c_out > 0) {
    const BwdFn fn = table().bwd[dtype_slot(x0.scalar_type())];
    const size_t esz = x0.scalar_type() == at::kDouble ? sizeof(double) : sizeof(float);
    at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
      std::vector<char> scratch(scratch_elems(g) * esz);
      for (int64_t ch = c0; ch < c1; ++ch) {
        double* p = part.data() + ch * slot;
        Sums s{p, affine ? p + g.k : nullptr, affine ? p + g.k + g.c_out : nullptr};
        // Kernels accumulate in the compute type per block/pixel and add into these
        // doubles, so a chunk's sum does not lose precision with its length.
        fn(a, blocks * ch / chunks, blocks * (ch + 1) / chunks, scratch.data(), s);
      }
      store_fence();
    });
  }
  std::vector<double> tot(slot, 0.0);
  for (int64_t ch = 0; ch < chunks; ++ch)
    for (int64_t j = 0; j < slot; ++j) tot[j] += part[ch * slot + j];
  at::Tensor g_sq = at::empty({g.k}, alpha.options());
  for (int64_t i = 0; i < g.k; ++i) g_sq.data_ptr<float>()[i] = static_cast<float>(tot[i]);
  at::Tensor dw = at::empty({affine ? g.c_out : 0}, x0.options().dtype(at_acc));
  at::Tensor db = at::empty_like(dw);
  if (affine) {
    for (int64_t c = 0; c < g.c_out; ++c) {
      if (at_acc == at::kDouble) {
        dw.data_ptr<double>()[c] = tot[g.k + c];
        db.data_ptr<double>()[c] = tot[g.k + g.c_out + c];
      } else {
        dw.data_ptr<float>()[c] = static_cast<float>(tot[g.k + c]);
        db.data_ptr<float>()[c] = static_cast<float>(tot[g.k + g.c_out + c]);
      }
    }
  }
  return {grads, dw, db, g_sq};
}

void gb_fusion_update_cpu(const at::Tensor& lam, const at::Tensor& g_ema, const at::Tensor& g_sq,
                          const std::optional<at::Tensor>& tau, double beta, double eta, double eps,
                          double lam_clip) {
  const int64_t k = gb::check_update_args(lam, g_ema, g_sq, tau, lam_clip, kGbMaxBranches);
  at::Tensor gs = g_sq.contiguous();
  at::Tensor tc = tau.has_value() ? tau->contiguous() : at::Tensor();
  gb_update_law(lam.data_ptr<float>(), g_ema.data_ptr<float>(), gs.data_ptr<float>(),
                tc.defined() ? tc.data_ptr<float>() : nullptr, static_cast<int>(k),
                static_cast<float>(beta), static_cast<float>(eta), static_cast<float>(eps),
                static_cast<float>(lam_clip));
}

}  // namespace
}  // namespace cpu
}  // namespace q2ext

TORCH_LIBRARY_IMPL(q2ext, CPU, m) {
  m.impl("gb_fusion_forward", &q2ext::cpu::gb_fusion_forward_cpu);
  m.impl("gb_fusion_backward", &q2ext::cpu::gb_fusion_backward_cpu);
  m.impl("gb_fusion_update", &q2ext::cpu::gb_fusion_update_cpu);
}
