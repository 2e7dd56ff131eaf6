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
#include <vector>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include "gb_fusion_loops.h"
#include "q2ext/cpu_isa.h"
#include "q2ext/gb_fusion_args.h"
#include "q2ext/gb_fusion_math.h"
#include "huge_pages.h"

namespace q2ext {
namespace gb_fusion {
namespace cpu {
namespace {

// ---------------------------------------------------------------- ISA instantiation

using FwdFn = void (*)(const Args&, int64_t, int64_t, void*);
using BwdFn = void (*)(const Args&, int64_t, int64_t, void*, const Sums&);

#define GB_DEFINE_ISA(isa, attr, stream)                                                \
  template <typename T>                                                                 \
  attr void fwd_##isa(const Args& a, int64_t b0, int64_t b1, void* s) {                 \
    using A = typename ComputeType<T>::type;                                                  \
    forward_range<stream, T, A>(a, b0, b1, static_cast<A*>(s));                         \
  }                                                                                     \
  template <typename T>                                                                 \
  attr void bwd_##isa(const Args& a, int64_t b0, int64_t b1, void* s, const Sums& sums) { \
    using A = typename ComputeType<T>::type;                                                  \
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

// The kernels' view of the validated branches (check_branches keeps the dense copies).
Geom make_geom(const BranchLayout& L, const at::Tensor& x0, int64_t mode) {
  Geom g{};
  g.n = x0.size(0);
  g.hw = x0.size(2) * x0.size(3);
  g.k = L.k;
  g.mode = mode;
  g.nhwc = L.nhwc;
  g.c_out = L.c_out;
  for (int64_t i = 0; i < L.k; ++i) {
    g.br[i].x = L.dense[i].data_ptr();
    g.br[i].c = L.c[i];
    g.br[i].off = L.off[i];
  }
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
  const BranchLayout L = check_branches(branches, mode);
  const at::Tensor& x0 = branches[0];
  Geom g = make_geom(L, x0, mode);
  const auto at_acc = acc_type(x0);
  check_forward_params(x0, lam, weight, bias, g.k, g.c_out, eps);
  const auto fmt = L.format();
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
         stream_outputs(out), nullptr};
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
    int64_t mode, const std::optional<at::Tensor>& out) {
  const BranchLayout L = check_branches(branches, mode);
  const at::Tensor& x0 = branches[0];
  Geom g = make_geom(L, x0, mode);
  const auto at_acc = acc_type(x0);
  const bool use_y =
      check_backward_params(grad, x0, g.c_out, alpha, g.k, mean, rstd, weight, out);
  const auto fmt = L.format();
  at::Tensor gd = grad.contiguous(fmt);
  at::Tensor y = use_y ? out->contiguous(fmt) : at::Tensor();
  at::Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous(), alpha_c = alpha.contiguous();
  std::vector<at::Tensor> grads;
  for (int64_t i = 0; i < g.k; ++i) {
    grads.push_back(at::empty_like(L.dense[i], fmt));
    advise_huge_pages(grads.back());
    g.br[i].dx = grads.back().data_ptr();
    g.br[i].alpha = alpha_c.data_ptr<float>()[i];
  }
  at::Tensor w = weight.has_value() ? weight->contiguous() : at::Tensor();
  Args a{g, gd.data_ptr(), nullptr, w.defined() ? w.data_ptr() : nullptr, nullptr,
         mean_c.data_ptr(), rstd_c.data_ptr(), 0.0, stream_outputs(grads[0]),
         use_y ? y.data_ptr() : nullptr};
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
  const int64_t k = check_update_args(lam, g_ema, g_sq, tau, lam_clip);
  at::Tensor gs = g_sq.contiguous();
  at::Tensor tc = tau.has_value() ? tau->contiguous() : at::Tensor();
  gb_update_law(lam.data_ptr<float>(), g_ema.data_ptr<float>(), gs.data_ptr<float>(),
                tc.defined() ? tc.data_ptr<float>() : nullptr, static_cast<int>(k),
                static_cast<float>(beta), static_cast<float>(eta), static_cast<float>(eps),
                static_cast<float>(lam_clip));
}

}  // namespace
}  // namespace cpu
}  // namespace gb_fusion
}  // namespace q2ext

TORCH_LIBRARY_IMPL(q2ext, CPU, m) {
  m.impl("gb_fusion_forward", &q2ext::gb_fusion::cpu::gb_fusion_forward_cpu);
  m.impl("gb_fusion_backward", &q2ext::gb_fusion::cpu::gb_fusion_backward_cpu);
  m.impl("gb_fusion_update", &q2ext::gb_fusion::cpu::gb_fusion_update_cpu);
}
