// Loop templates of the CPU Q-GBFusion kernels (csrc/cpu/gb_fusion.cpp, the only file that
// includes this): work geometry, the NCHW (pixel-vectorised) and NHWC (channel-vectorised)
// forward/backward traversals.  See gb_fusion.cpp for the design; every function is
// always-inline so that gb_fusion.cpp can compile it once per ISA under a target attribute.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "q2ext/gb_fusion_math.h"

namespace q2ext {
namespace gb_fusion {
namespace cpu {

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
  bool stream;        // write the NCHW outputs with non-temporal stores (see store_row)
  const void* y;     // backward: the forward's output when it equals y (no affine), or null
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
inline __attribute__((target("avx512f"), noinline)) void stream_row_f32(float* o, const float* v) {
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
  for (int64_t p = 0; p < np; ++p) store_compute(v[p], &o[p]);
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
        for (int64_t p = 0; p < np; ++p) row[p] = al * to_compute(xr[p]);
      } else {
        for (int64_t p = 0; p < np; ++p) row[p] = row[p] + al * to_compute(xr[p]);
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
    // The saved output is y itself: one tensor to read instead of K branches.
    const T* __restrict ysrc = a.y ? static_cast<const T*>(a.y) + n * C * g.hw + p0 : nullptr;
    if (!ysrc) load_tile<T, A>(g, n, p0, np, tile);
    for (int64_t p = 0; p < kPix; ++p) m1[p] = A(0), m2[p] = A(0);
    // tile becomes y, gtile gets gy (so the grad is read from memory once); the two
    // channel means of the LN gradient.
    for (int64_t c = 0; c < C; ++c) {
      A* __restrict row = tile + c * kPix;
      A* __restrict grow = gtile + c * kPix;
      const T* __restrict gr = grad + c * g.hw;
      prefetch_next(gr, p0 + kPix < g.hw, 0);
      if (ysrc) {
        const T* __restrict yr = ysrc + c * g.hw;
        prefetch_next(yr, p0 + kPix < g.hw, 0);
        for (int64_t p = 0; p < np; ++p) row[p] = to_compute(yr[p]);
      } else {
        for (int64_t p = 0; p < np; ++p) row[p] = (row[p] - mean[p]) * rstd[p];
      }
      const A wc = w ? w[c] : A(1);
      for (int64_t p = 0; p < np; ++p) {
        const A gy = to_compute(gr[p]) * wc;
        grow[p] = gy;
        m1[p] += gy;
        m2[p] += gy * row[p];
      }
      if (s.dw) {  // optional affine: ordered scalar sums over the block's pixels
        A sw = A(0), sb = A(0);
        for (int64_t p = 0; p < np; ++p) {
          const A gv = to_compute(gr[p]);
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
      for (int64_t c = 0; c < b.c; ++c) r[c] = al * to_compute(x[c]);
    } else {
      for (int64_t c = 0; c < b.c; ++c) r[c] = r[c] + al * to_compute(x[c]);
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
      for (int64_t c = 0; c < C; ++c) store_compute((row[c] - mean) * rstd * w[c] + bb[c], &o[c]);
    } else {
      for (int64_t c = 0; c < C; ++c) store_compute((row[c] - mean) * rstd, &o[c]);
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
    if (a.y) {
      const T* __restrict yr = static_cast<const T*>(a.y) + q * C;
      for (int64_t c = 0; c < C; ++c) row[c] = to_compute(yr[c]);
    } else {
      load_row<T, A>(g, q, row);
      for (int64_t c = 0; c < C; ++c) row[c] = (row[c] - mean) * rstd;
    }
    for (int64_t c = 0; c < C; ++c) {
      const A y = row[c];
      const A gv = to_compute(gr[c]);
      gy[c] = w ? gv * w[c] : gv;
      tmp[c] = gy[c] * y;
    }
    if (s.dw) {
      for (int64_t c = 0; c < C; ++c) {
        const A gv = to_compute(gr[c]);
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
        store_compute(v, &dx[c]);
        gy[c] = v * v;  // gy is free again: reuse it for the squares
      }
      s.g_sq[i] += lane_sum(gy, b.c);
    }
  }
}


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

}  // namespace cpu
}  // namespace gb_fusion
}  // namespace q2ext
