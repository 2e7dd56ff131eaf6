// CUDA kernels of q2ext::fake_quant / q2ext::fake_quant_backward.
//
// The input is walked as [outer, C, inner] in memory order (fq_geometry) with one of two
// traversals, each shared by the forward and the backward:
//  * runs:    the channel axis is not innermost (per-tensor, NCHW activations, conv and
//             linear weights).  A work unit is one warp streaming a contiguous piece of one
//             channel's elements, so the channel constants are computed once per unit from
//             the raw device-side parameters (no prologue kernel, no host round trip) and
//             the unit's sums belong to exactly one channel.
//  * columns: the channel axis is innermost (channels_last, last-axis per-channel).  Memory
//             is viewed as rows of `tw` elements, tw a multiple of C and of the vector
//             width, so a thread keeps the same channels for every row it visits.
// All per-element math is fake_quant_math.h, the code the CPU kernels (and tests) run.
//
// Determinism: no atomics.  The partition depends only on the tensor geometry and the
// device (SM count, occupancy: cached per device, device_cache.cuh); every unit writes its
// (scale, clip) sums to its own slot of a partial buffer and finalize_kernel adds a
// channel's slots in a fixed order.
// Accuracy: fp32 sums only within one vector (runs) or over at most kMaxRowsPerThread
// rows (columns, like the CPU's row blocks); double from there on.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <type_traits>

#include "device_cache.cuh"
#include "q2ext/fake_quant_args.h"

namespace q2ext::fake_quant::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kWaves = 4;                  // blocks per launch ~ kWaves full waves: short tail
constexpr int kColLanes = 4;               // columns: channels per thread (register budget)
constexpr int64_t kMinVecsPerLane = 4;     // runs: amortises the per-unit setup
constexpr int64_t kMinRowsPerThread = 8;   // columns: keeps the partial buffer small
constexpr int64_t kMaxRowsPerThread = 64;  // columns: bounds the fp32 partial sums

__host__ __device__ inline int64_t imin(int64_t a, int64_t b) { return a < b ? a : b; }

template <typename T, int V>
struct Pack {
  T v[V];
};

// Packs move as one 16/8/4/2-byte word, so the 2-byte storage structs get single wide
// accesses too; the host only picks V > 1 for suitably aligned data.
template <int kBytes>
using Word = std::conditional_t<kBytes == 16, uint4, std::conditional_t<kBytes == 8, uint2,
             std::conditional_t<kBytes == 4, unsigned int, unsigned short>>>;

template <typename T, int V>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  using W = Word<sizeof(Pack<T, V>)>;
  const W u = __ldg(reinterpret_cast<const W*>(p));
  Pack<T, V> r;
  memcpy(&r, &u, sizeof(r));
  return r;
}

template <typename T, int V>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& r) {
  using W = Word<sizeof(Pack<T, V>)>;
  W u;
  memcpy(&u, &r, sizeof(r));
  *reinterpret_cast<W*>(p) = u;
}

template <typename T>
struct Args {
  const T* x;
  const T* dy;  // backward only
  T* out;       // y, or dx (null when dx is not requested)
  const float* scale;
  const float* zp;   // null when absent
  const float* off;  // null when absent
  int64_t mode;
  float qmin, qmax;
  int64_t numel, C, inner;
  double* partial;  // backward: 2 doubles per slot; null when no parameter grad is wanted
  int64_t per_channel, chunk, pieces, units, step_o, step_i;  // runs
  int64_t tw, rows, rows_per_piece, tiles;                    // columns
  int tile_w, rpb;
};

template <typename T>
__device__ __forceinline__ FqChannel load_channel(const Args<T>& a, int64_t c) {
  return make_channel(a.mode, a.scale[c], a.zp ? a.zp[c] : 0.0f, a.off ? a.off[c] : 0.0f,
                      a.qmin, a.qmax);
}

__device__ __forceinline__ double warp_sum(double v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}

// V whole elements at m.  Loading and computing are separate steps so that a thread can
// have several vectors in flight before it waits on the first.  chan(j) is the channel
// of element m + j; the backward adds into fs/fc[j] (kPerLane) or into one fp32 chain in
// lane order (fewer live registers).
template <typename T, int V, bool kBwd>
struct Vec {
  Pack<T, V> x, dy;
  __device__ __forceinline__ void load(const Args<T>& a, int64_t m) {
    x = load_pack<T, V>(a.x + m);
    if constexpr (kBwd) dy = load_pack<T, V>(a.dy + m);
  }
  template <int64_t kMode, bool kPerLane, typename Chan>
  __device__ __forceinline__ void run(const Args<T>& a, int64_t m, Chan chan, float* fs,
                                      float* fc) const {
    Pack<T, V> y;
#pragma unroll
    for (int j = 0; j < V; ++j) {
      const FqChannel ch = chan(j);
      if constexpr (kBwd) {
        const FqGrad g = fq_backward<kMode>(to_f32(dy.v[j]), to_f32(x.v[j]), ch.s, ch.inv,
                                            ch.zp, ch.off, ch.clip, a.qmin, a.qmax);
        from_f32(g.dx, &y.v[j]);
        fs[kPerLane ? j : 0] += g.dscale;
        fc[kPerLane ? j : 0] += g.dclip;
      } else {
        from_f32(fq_forward(to_f32(x.v[j]), ch.s, ch.inv, ch.zp, ch.off, a.qmin, a.qmax),
                 &y.v[j]);
      }
    }
    if (a.out) store_pack<T, V>(a.out + m, y);
  }
};

// One element, for tails and unaligned data.
template <int64_t kMode, bool kBwd, typename T>
__device__ __forceinline__ void one(const Args<T>& a, int64_t m, const FqChannel& ch,
                                    float* fs, float* fc) {
  Vec<T, 1, kBwd> e;
  e.load(a, m);
  e.template run<kMode, false>(a, m, [&](int) { return ch; }, fs, fc);
}

// One warp per (channel, piece).  A vector never straddles two runs: the host picks V > 1
// only when inner % V == 0, or per-tensor, where the single partial vector is the tail.
template <typename T, int V, bool kBwd, int64_t kMode>
__global__ void __launch_bounds__(kThreads) runs_kernel(const Args<T> a) {
  const int lane = threadIdx.x & 31;
  const int64_t unit = static_cast<int64_t>(blockIdx.x) * kWarps + (threadIdx.x >> 5);
  if (unit >= a.units) return;  // whole warps leave: the shuffles below stay full-warp
  const int64_t c = unit / a.pieces;
  const FqChannel ch = load_channel(a, c);
  const int64_t v_begin = (unit % a.pieces) * a.chunk;
  const int64_t v_end = imin(v_begin + a.chunk, a.per_channel);
  // v indexes the channel's own elements; (o, i) = (run, offset in run) advances
  // incrementally so that the loop has no 64-bit division.
  int64_t v = v_begin + lane * V;
  int64_t o = v / a.inner, i = v % a.inner;
  double ds = 0.0, dc = 0.0;
  for (; v < v_end; v += 32 * V) {
    const int64_t m = (o * a.C + c) * a.inner + i;
    float fs = 0.0f, fc = 0.0f;
    if (v + V <= v_end) {
      Vec<T, V, kBwd> e;
      e.load(a, m);
      e.template run<kMode, false>(a, m, [&](int) { return ch; }, &fs, &fc);
    } else {
#pragma unroll 1
      for (int64_t k = m; k < m + (v_end - v); ++k) one<kMode, kBwd>(a, k, ch, &fs, &fc);
    }
    ds += fs;
    dc += fc;
    i += a.step_i;
    if (i >= a.inner) {
      i -= a.inner;
      ++o;
    }
    o += a.step_o;
  }
  if constexpr (kBwd) {
    if (a.partial == nullptr) return;
    ds = warp_sum(ds);
    dc = warp_sum(dc);
    if (lane == 0) {
      a.partial[2 * unit] = ds;
      a.partial[2 * unit + 1] = dc;
    }
  }
}

// Block = tile_w column vectors x rpb rows, over one piece of rows.  Neighbouring threads
// touch neighbouring vectors and consecutive rows are adjacent, so a warp reads one
// contiguous span.  The V channels' constants a thread keeps in registers limit
// occupancy (hence kColLanes), so two rows are loaded per step to keep bytes in flight.
template <typename T, int V, bool kBwd, int64_t kMode>
__global__ void __launch_bounds__(kThreads) columns_kernel(const Args<T> a) {
  const int t = threadIdx.x;
  const int rr = t / a.tile_w;
  const int64_t tile = blockIdx.x % a.tiles, piece = blockIdx.x / a.tiles;
  const int64_t col = (tile * a.tile_w + t % a.tile_w) * V;
  const bool active = col < a.tw;
  FqChannel ch[V];
  float fs[V], fc[V];
#pragma unroll
  for (int j = 0; j < V; ++j) {
    ch[j] = load_channel(a, active ? (col + j) % a.C : 0);  // tw % C == 0
    fs[j] = fc[j] = 0.0f;
  }
  const auto chan = [&](int j) { return ch[j]; };
  const int64_t r_end = imin((piece + 1) * a.rows_per_piece, a.rows);
  for (int64_t r = piece * a.rows_per_piece + rr; active && r < r_end; r += 2 * a.rpb) {
    const int64_t m0 = r * a.tw + col, m1 = m0 + a.rpb * a.tw;
    if (r + a.rpb < r_end && m1 + V <= a.numel) {
      Vec<T, V, kBwd> e0, e1;
      e0.load(a, m0);
      e1.load(a, m1);
      e0.template run<kMode, true>(a, m0, chan, fs, fc);
      e1.template run<kMode, true>(a, m1, chan, fs, fc);
    } else {  // the piece's last row, or the data's last (maybe partial) row
      const int n_rows = r + a.rpb < r_end ? 2 : 1;
#pragma unroll 1
      for (int k = 0; k < n_rows; ++k) {
        const int64_t m = k == 0 ? m0 : m1;
#pragma unroll
        for (int j = 0; j < V; ++j)
          if (m + j < a.numel) one<kMode, kBwd>(a, m + j, ch[j], fs + j, fc + j);
      }
    }
  }
  if constexpr (kBwd) {
    if (a.partial == nullptr) return;  // uniform over the block: no barrier is skipped
    __shared__ double sh[2][kThreads];
#pragma unroll
    for (int j = 0; j < V; ++j) {
      sh[0][t] = fs[j];
      sh[1][t] = fc[j];
      __syncthreads();
      if (rr == 0 && active) {  // the rows of one column, in a fixed order
        double s = 0.0, cl = 0.0;
        for (int k = 0; k < a.rpb; ++k) {
          s += sh[0][k * a.tile_w + t];
          cl += sh[1][k * a.tile_w + t];
        }
        double* p = a.partial + 2 * (piece * a.tw + col + j);
        p[0] = s;
        p[1] = cl;
      }
      __syncthreads();
    }
  }
}

struct FinArgs {
  const double* partial;
  int64_t C, P, K, cs, ps, ks;  // channel c's slots: c*cs + p*ps + k*ks, p < P, k < K
  const float *scale, *zp;
  int64_t mode;
  float qmin, qmax;
  double gf;
  float *d_scale, *d_third;  // null when not requested (d_third: or absent)
};

// G threads per channel (a warp, or the block when a channel has many slots).
template <int G>
__global__ void __launch_bounds__(kThreads) finalize_kernel(const FinArgs f) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (kThreads / G) + threadIdx.x / G;
  double s = 0.0, cl = 0.0;
  for (int64_t q = threadIdx.x % G; c < f.C && q < f.P * f.K; q += G) {
    const int64_t slot = c * f.cs + (q / f.K) * f.ps + (q % f.K) * f.ks;
    s += f.partial[2 * slot];
    cl += f.partial[2 * slot + 1];
  }
  s = warp_sum(s);
  cl = warp_sum(cl);
  if constexpr (G > 32) {
    __shared__ double sh[2][kWarps];
    if (threadIdx.x % 32 == 0) sh[0][threadIdx.x / 32] = s, sh[1][threadIdx.x / 32] = cl;
    __syncthreads();
    s = cl = 0.0;
    for (int w = 0; w < kWarps; ++w) s += sh[0][w], cl += sh[1][w];
  }
  if (threadIdx.x % G != 0 || c >= f.C) return;
  // The CPU op's finalisation, in double: d(y)/d(zp) = -s_eff where clipped.
  if (f.d_scale) f.d_scale[c] = static_cast<float>(f.gf * (f.mode == kModePact ? cl : s));
  if (f.d_third && f.zp) {
    const float s_eff = make_channel(f.mode, f.scale[c], f.zp[c], 0.0f, f.qmin, f.qmax).s;
    f.d_third[c] = static_cast<float>(-f.gf * s_eff * cl);
  } else if (f.d_third) {
    f.d_third[c] = static_cast<float>(f.gf * cl);
  }
}

struct Plan {
  int64_t blocks, slots;
  int block;
  int64_t P, K, cs, ps, ks;  // slot layout, for finalize_kernel
};

template <typename T, typename WavesOf>
Plan make_plan(Args<T>& a, bool columns, int V, WavesOf waves_of) {
  Plan pl{};
  if (!columns) {
    pl.block = kThreads;
    a.per_channel = a.numel / a.C;
    const int64_t target = int64_t{kWaves} * waves_of(kThreads) * kWarps;
    int64_t pieces = std::min(ceil_div(target, a.C),
                              std::max<int64_t>(1, a.per_channel / (32 * V * kMinVecsPerLane)));
    a.chunk = ceil_div(ceil_div(a.per_channel, pieces), V) * V;  // pieces start aligned
    a.pieces = ceil_div(a.per_channel, a.chunk);
    a.units = a.C * a.pieces;
    a.step_o = (32 * V) / a.inner;
    a.step_i = (32 * V) % a.inner;
    pl.blocks = ceil_div(a.units, kWarps);
    pl.slots = a.units;
    pl.P = a.pieces, pl.K = 1, pl.cs = a.pieces, pl.ps = 1, pl.ks = 0;
    return pl;
  }
  // Row width: a multiple of lcm(C, V) near one warp of vectors, so that a small C leaves
  // no lanes idle; a wide row is split into balanced tiles of <= kThreads vectors.
  const int64_t base = a.C / std::gcd(a.C, int64_t{V}) * V;
  a.tw = base * std::max<int64_t>(1, 32 * V / base);
  const int64_t twv = a.tw / V;
  a.tiles = ceil_div(twv, kThreads);
  a.tile_w = static_cast<int>(ceil_div(twv, a.tiles));
  a.rpb = std::max(1, kThreads / a.tile_w);
  pl.block = a.tile_w * a.rpb;
  a.rows = ceil_div(a.numel, a.tw);
  const int64_t target = int64_t{kWaves} * waves_of(pl.block);
  int64_t pieces = std::min(ceil_div(target, a.tiles),
                            std::max<int64_t>(1, a.rows / (a.rpb * kMinRowsPerThread)));
  pieces = std::max(pieces, ceil_div(a.rows, a.rpb * kMaxRowsPerThread));
  a.rows_per_piece = ceil_div(a.rows, pieces);
  pieces = ceil_div(a.rows, a.rows_per_piece);
  pl.blocks = a.tiles * pieces;
  pl.slots = pieces * a.tw;
  pl.P = pieces, pl.K = a.tw / a.C, pl.cs = 1, pl.ps = a.tw, pl.ks = a.C;
  return pl;
}

bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

template <typename T, int V, bool kBwd, int64_t kMode, bool kColumns>
Plan launch_v(Args<T> a, at::Tensor* partial, cudaStream_t st) {
  const auto kernel = [] {  // if constexpr: instantiate only the kernel that is used
    if constexpr (kColumns) return columns_kernel<T, V, kBwd, kMode>;
    else return runs_kernel<T, V, kBwd, kMode>;
  }();
  const int device = c10::cuda::current_device();
  const auto waves_of = [&](int block) {  // resident blocks of that size, whole device
    return int64_t{kernel_blocks_per_sm(kernel, block, device)} * device_sm_count(device);
  };
  const Plan pl = make_plan(a, kColumns, V, waves_of);
  TORCH_CHECK(pl.blocks < (int64_t{1} << 31), "q2ext fake quant (CUDA): tensor too large");
  if (partial != nullptr) {
    *partial = at::empty({2 * pl.slots}, at::dtype(at::kDouble).device(at::kCUDA, device));
    a.partial = partial->mutable_data_ptr<double>();
  }
  kernel<<<static_cast<unsigned>(pl.blocks), pl.block, 0, st>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return pl;
}

// Runs use 16-byte vectors; columns at most kColLanes lanes (see columns_kernel).  Vectors
// need aligned bases (views may start anywhere) and, for runs, runs of whole vectors.
template <typename T, bool kBwd, int64_t kMode>
Plan launch(const Args<T>& a, at::Tensor* partial, cudaStream_t st) {
  constexpr int Wr = 16 / sizeof(T), Wc = Wr < kColLanes ? Wr : kColLanes;
  const bool columns = a.inner == 1 && a.C > 1;
  const int W = columns ? Wc : Wr, bytes = W * static_cast<int>(sizeof(T));
  const bool vec = aligned(a.x, bytes) && aligned(a.dy, bytes) && aligned(a.out, bytes) &&
                   (columns || a.C == 1 || a.inner % W == 0);
  if (columns) {
    return vec ? launch_v<T, Wc, kBwd, kMode, true>(a, partial, st)
               : launch_v<T, 1, kBwd, kMode, true>(a, partial, st);
  }
  return vec ? launch_v<T, Wr, kBwd, kMode, false>(a, partial, st)
             : launch_v<T, 1, kBwd, kMode, false>(a, partial, st);
}

const float* fptr(const at::Tensor& t) { return t.defined() ? t.const_data_ptr<float>() : nullptr; }

// Parameters stay on the device: contiguous() is a no-op or an asynchronous device copy.
at::Tensor on_device(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

template <typename T>
Args<T> make_args(const at::Tensor& xd, const FqGeometry& g, const at::Tensor& sc,
                  const at::Tensor& zc, const at::Tensor& oc, int64_t mode, int64_t qmin,
                  int64_t qmax) {
  return Args<T>{.x = reinterpret_cast<const T*>(xd.const_data_ptr()), .dy = nullptr,
                 .out = nullptr, .scale = fptr(sc), .zp = fptr(zc), .off = fptr(oc),
                 .mode = mode, .qmin = static_cast<float>(qmin),
                 .qmax = static_cast<float>(qmax), .numel = g.numel, .C = g.channels,
                 .inner = g.inner};
}

#define Q2_DISPATCH_DTYPE(dtype, ...)                                   \
  switch (dtype) {                                                      \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }           \
    case at::kBFloat16: { using T = bf16_t; __VA_ARGS__; break; }       \
    default: { using T = f16_t; __VA_ARGS__; break; }                   \
  }

at::Tensor fake_quant_cuda(const at::Tensor& x, const at::Tensor& scale,
                           const std::optional<at::Tensor>& zero_point,
                           const std::optional<at::Tensor>& offset, int64_t quant_min,
                           int64_t quant_max, std::optional<int64_t> axis, int64_t mode,
                           double /*grad_factor: backward only*/) {
  check_fq_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode);
  c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  const FqGeometry g = fq_geometry(xd, axis);
  if (g.numel == 0) return y;
  const at::Tensor sc = scale.contiguous(), zc = on_device(zero_point), oc = on_device(offset);
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  Q2_DISPATCH_DTYPE(x.scalar_type(), {
    Args<T> a = make_args<T>(xd, g, sc, zc, oc, mode, quant_min, quant_max);
    a.out = reinterpret_cast<T*>(y.mutable_data_ptr());
    launch<T, false, kModeAffine>(a, nullptr, st);  // the forward ignores kMode
  });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& offset,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, int64_t mode,
    double grad_factor, std::array<bool, 3> output_mask) {
  check_fq_backward_args(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode);
  c10::cuda::CUDAGuard guard(x.device());
  const bool want_dx = output_mask[0], want_ds = output_mask[1];
  const bool want_dt = output_mask[2] && (zero_point.has_value() || offset.has_value());
  // Each missing output is its own empty tensor: outputs of an op must never alias.
  const auto empty = [&] { return at::empty({0}, scale.options()); };
  const at::Tensor xd = dense_input(x);
  at::Tensor dx = want_dx ? at::empty_like(xd) : empty();
  at::Tensor d_scale = want_ds ? at::empty_like(scale, at::MemoryFormat::Contiguous) : empty();
  at::Tensor d_third = want_dt ? at::empty_like(zero_point.has_value() ? *zero_point : *offset,
                                                at::MemoryFormat::Contiguous)
                               : empty();
  const FqGeometry g = fq_geometry(xd, axis);
  if (g.numel == 0) {  // sums over no elements: zero, without launching anything of ours
    if (want_ds) d_scale.zero_();
    if (want_dt) d_third.zero_();
    return {dx, d_scale, d_third};
  }
  if (!want_dx && !want_ds && !want_dt) return {dx, d_scale, d_third};
  const at::Tensor dy = like_layout(grad, xd);
  const at::Tensor sc = scale.contiguous(), zc = on_device(zero_point), oc = on_device(offset);
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  const bool want_sums = want_ds || want_dt;
  at::Tensor partial;
  Plan pl{};
  Q2_DISPATCH_DTYPE(x.scalar_type(), {
    Args<T> a = make_args<T>(xd, g, sc, zc, oc, mode, quant_min, quant_max);
    a.dy = reinterpret_cast<const T*>(dy.const_data_ptr());
    a.out = want_dx ? reinterpret_cast<T*>(dx.mutable_data_ptr()) : nullptr;
    at::Tensor* pp = want_sums ? &partial : nullptr;
    pl = mode == kModePact  ? launch<T, true, kModePact>(a, pp, st)
         : mode == kModeLsq ? launch<T, true, kModeLsq>(a, pp, st)
                            : launch<T, true, kModeAffine>(a, pp, st);
  });
  if (!want_sums) return {dx, d_scale, d_third};
  const FinArgs f{.partial = partial.const_data_ptr<double>(), .C = g.channels, .P = pl.P,
                  .K = pl.K, .cs = pl.cs, .ps = pl.ps, .ks = pl.ks, .scale = fptr(sc),
                  .zp = fptr(zc), .mode = mode, .qmin = static_cast<float>(quant_min),
                  .qmax = static_cast<float>(quant_max), .gf = grad_factor,
                  .d_scale = want_ds ? d_scale.mutable_data_ptr<float>() : nullptr,
                  .d_third = want_dt ? d_third.mutable_data_ptr<float>() : nullptr};
  if (pl.P * pl.K >= 1024) {
    finalize_kernel<kThreads><<<static_cast<unsigned>(g.channels), kThreads, 0, st>>>(f);
  } else {
    const auto blocks = static_cast<unsigned>(ceil_div(g.channels, kWarps));
    finalize_kernel<32><<<blocks, kThreads, 0, st>>>(f);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dx, d_scale, d_third};
}

}  // namespace
}  // namespace q2ext::fake_quant::cuda

TORCH_LIBRARY_IMPL(q2ext, CUDA, m) {
  m.impl("fake_quant", &q2ext::fake_quant::cuda::fake_quant_cuda);
  m.impl("fake_quant_backward", &q2ext::fake_quant::cuda::fake_quant_backward_cuda);
}
