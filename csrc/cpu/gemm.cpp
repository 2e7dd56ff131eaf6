// CPU kernels of the int8 / int4 inference GEMMs:
//   q2ext::quantize_activation, q2ext::w8a8_mm, q2ext::w8a8_linear, q2ext::w4a16_mm.
// Semantics: q2ext/reference/gemm.py; schemas and argument rules: q2ext/_ops/gemm.py.
//
// This file checks arguments, packs/widens operands and splits the work; the tiles run
// in the ISA translation units (gemm_isa_{avx512vnni,avx2,scalar}.cpp) picked per call
// from q2ext's CPU path (set_cpu_isa / Q2EXT_CPU_ISA): 'avx512' uses the VNNI tiles when
// the CPU has AVX512-VNNI and the AVX2 tiles otherwise; bf16 W4A16 inputs additionally
// take the AVX512-BF16 tile (gemm_isa_avx512bf16.cpp) where the CPU has it (its
// numerics: q2ext/reference/gemm.py).  Work items (panel x row chunk)
// are fixed by the shapes, and every output is computed by exactly one item, so results
// do not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <cstring>

#include "q2ext/cpu_isa.h"
#include "q2ext/gemm_args.h"
#include "gemm_loops.h"

Q2EXT_DECLARE_GEMM_ENTRY_POINTS(scalar)
Q2EXT_DECLARE_QUANT_ENTRY_POINT(scalar)
#if defined(__x86_64__) || defined(__i386__)
Q2EXT_DECLARE_GEMM_ENTRY_POINTS(avx2)
Q2EXT_DECLARE_QUANT_ENTRY_POINT(avx2)
Q2EXT_DECLARE_GEMM_ENTRY_POINTS(avx512vnni)
Q2EXT_DECLARE_QUANT_ENTRY_POINT(avx512vnni)
#endif

namespace q2ext {
namespace gemm {
namespace cpu {
namespace {

struct Kernels {
  W8A8TileFn w8a8;
  W4A16TileFn w4a16;
  void (*quant)(const QuantArgs&, int64_t, int64_t);
  W4A16TileFn w4a16_bf16;  // bf16-x tile with factored group constants, or nullptr
  // xsum of the w4a16 tile, or nullptr when it does not factor the group constants;
  // false: x is not finite, use w4a16_plain (dequantises each weight)
  bool (*w4a16_sums)(const float*, int64_t, int64_t, int64_t, int64_t, float*);
  W4A16TileFn w4a16_plain;
};

Kernels kernels() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool vnni = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512vnni") != 0;
  }();
  static const bool bf16 = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi");
  }();
  const CpuIsa isa = active_cpu_isa();
  if (isa == CpuIsa::kAvx512 && vnni)
    return {avx512vnni::w8a8_tile, avx512vnni::w4a16_tile, avx512vnni::quantize_rows,
            bf16 ? avx512bf16::w4a16_tile : nullptr, avx512vnni::w4a16_group_sums,
            avx2::w4a16_tile};
  if (isa != CpuIsa::kScalar)
    return {avx2::w8a8_tile, avx2::w4a16_tile, avx2::quantize_rows, nullptr, nullptr,
            avx2::w4a16_tile};
#endif
  return {scalar::w8a8_tile, scalar::w4a16_tile, scalar::quantize_rows, nullptr, nullptr,
          scalar::w4a16_tile};
}

constexpr int64_t kRowChunk = 48;  // rows per work item: a multiple of every tile height

// Repacks B [N, K] int8 into the VNNI panels (gemm_kernels.h); `flip` stores B + 128.
at::Tensor pack_b(const at::Tensor& b, bool flip) {
  const int64_t N = b.size(0), K = b.size(1), kq = ceil_div(K, 4);
  const int64_t panels = ceil_div(N, kNB8);
  at::Tensor out = at::zeros({panels * kq * kNB8 * 4}, b.options().dtype(at::kByte));
  const uint8_t* src = static_cast<const uint8_t*>(b.data_ptr());
  uint8_t* dst = out.data_ptr<uint8_t>();
  const uint8_t x = flip ? 0x80 : 0;
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      uint8_t* d = dst + (n / kNB8) * kq * kNB8 * 4 + (n % kNB8) * 4;
      const uint8_t* s = src + n * b.stride(0);
      for (int64_t k = 0; k < K; ++k) d[(k >> 2) * kNB8 * 4 + (k & 3)] = s[k] ^ x;
    }
  });
  return out;
}

W8A8Args base_args(const at::Tensor& a_bytes, bool a_signed, const int32_t* comp,
                   const uint8_t* panels, int64_t N, const at::Tensor& a_scale,
                   const at::Tensor& b_scale, const std::optional<at::Tensor>& bias, bool relu,
                   int out_kind, at::Tensor& out) {
  W8A8Args a{};
  a.a = static_cast<const uint8_t*>(a_bytes.data_ptr());
  a.lda = a_bytes.stride(0);
  a.a_signed = a_signed;
  a.a_comp = comp;
  a.b_panels = panels;
  a.M = a_bytes.size(0);
  a.N = N;
  a.K = a_bytes.size(1);
  a.kq = ceil_div(a.K, 4);
  a.a_scale = a_scale.data_ptr<float>();
  a.a_scale_per_row = a_scale.numel() == a.M && a.M != 1;
  a.b_scale = b_scale.data_ptr<float>();
  a.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  a.relu = relu;
  a.out_kind = out_kind;
  a.out = out.data_ptr();
  a.ldc = N;
  return a;
}

void run_w8a8(const W8A8Args& a) {
  if (a.M == 0 || a.N == 0) return;
  const W8A8TileFn tile = kernels().w8a8;
  const int64_t chunks = ceil_div(a.M, kRowChunk), panels = ceil_div(a.N, kNB8);
  at::parallel_for(0, panels * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = (i % chunks) * kRowChunk;
      tile(a, i / chunks, m0, std::min(a.M, m0 + kRowChunk));
    }
  });
}

at::Tensor contiguous_rows(const at::Tensor& t) {
  return t.stride(-1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

at::Tensor w8a8_mm_cpu(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                       const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                       std::optional<at::ScalarType> out_dtype, bool relu) {
  const at::ScalarType od = check_w8a8_mm(a, b, a_scale, b_scale, bias, out_dtype, relu);
  const int64_t M = a.size(0), N = w8a8_mm_n(b, b_scale);
  const bool a_signed = a.scalar_type() == at::kChar;
  at::Tensor ac = contiguous_rows(a);
  if (a.size(1) % 4 != 0 && M > 0) {
    // The VNNI tile reads whole k-quads of A: give it rows of 4 * kq bytes (the extra
    // bytes meet zero B padding, so their value does not matter).
    at::Tensor padded = at::zeros({M, ceil_div(a.size(1), 4) * 4}, a.options());
    padded.narrow(1, 0, a.size(1)).copy_(ac);
    ac = padded.narrow(1, 0, a.size(1));
  }
  at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor out = at::empty({M, N}, a.options().dtype(od));
  if (M == 0 || N == 0) return out;
  at::Tensor comp = at::zeros({M}, a.options().dtype(at::kInt));
  if (a_signed) {
    int32_t* cp = comp.data_ptr<int32_t>();
    const int8_t* ap = static_cast<const int8_t*>(ac.data_ptr());
    const int64_t K = ac.size(1), lda = ac.stride(0);
    at::parallel_for(0, M, 64, [&](int64_t m0, int64_t m1) {
      for (int64_t m = m0; m < m1; ++m) {
        int32_t s = 0;
        for (int64_t k = 0; k < K; ++k) s += ap[m * lda + k];
        cp[m] = 128 * s;
      }
    });
  }
  // A packed b (pack_int8_weight, checked above) already is the tiles' layout.
  at::Tensor panels = b.dim() == 4 ? b : pack_b(contiguous_rows(b), a_signed);
  const int kind = od == at::kFloat ? kOutF32 : (od == at::kBFloat16 ? kOutBF16 : kOutI32);
  const auto* panel_bytes = static_cast<const uint8_t*>(panels.data_ptr());  // uint8 or int8
  run_w8a8(base_args(ac, a_signed, comp.data_ptr<int32_t>(), panel_bytes, N, as, bs, bias_c, relu,
                     kind, out));
  return out;
}

// Quantises x row by row into `q`; returns the effective scales ([M] or [1]).
at::Tensor quantize_into(const at::Tensor& xc, const std::optional<at::Tensor>& scale,
                         int64_t qmin, int64_t qmax, at::Tensor& q, int32_t* comp) {
  const int64_t M = xc.size(0);
  const bool per_row = scale.has_value() && scale->numel() == M && M != 1;
  at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  at::Tensor s_out = at::empty({(!scale.has_value() || per_row) ? M : 1},
                               xc.options().dtype(at::kFloat));
  QuantArgs qa{};
  qa.x = xc.data_ptr();
  qa.x_bf16 = xc.scalar_type() == at::kBFloat16;
  qa.ldx = xc.stride(0);
  qa.K = xc.size(1);
  qa.scale = sc.defined() ? sc.data_ptr<float>() : nullptr;
  qa.per_row = per_row;
  qa.qmin = static_cast<float>(qmin);
  qa.qmax = static_cast<float>(qmax);
  qa.q = static_cast<uint8_t*>(q.data_ptr());
  qa.ldq = q.stride(0);
  qa.comp = comp;
  qa.scale_out = s_out.data_ptr<float>();
  const auto fn = kernels().quant;
  if (M == 0) {
    if (sc.defined() && !per_row) s_out.fill_(sanitize_scale(sc.data_ptr<float>()[0]));
    return s_out;
  }
  at::parallel_for(0, M, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, qa.K)),
                   [&](int64_t m0, int64_t m1) { fn(qa, m0, m1); });
  return s_out;
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_cpu(
    const at::Tensor& x, const std::optional<at::Tensor>& scale, int64_t quant_min,
    int64_t quant_max) {
  check_quantize_activation(x, scale, quant_min, quant_max);
  at::Tensor xc = contiguous_rows(x);
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(quant_min < 0 ? at::kChar : at::kByte));
  at::Tensor s = quantize_into(xc, scale, quant_min, quant_max, q, nullptr);
  return {q, s};
}

at::Tensor w8a8_linear_cpu(const at::Tensor& x, const at::Tensor& w_packed,
                           const at::Tensor& w_scale, const std::optional<at::Tensor>& x_scale,
                           const std::optional<at::Tensor>& bias, int64_t quant_min,
                           int64_t quant_max, bool relu) {
  const int64_t N = check_w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max);
  const bool a_signed = quant_min < 0;
  const int64_t M = x.size(0), K = x.size(1), kq = ceil_div(K, 4);
  at::Tensor xc = contiguous_rows(x);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  // The activation is read once: quantised (with the VNNI compensation) into an
  // L2-sized int8 copy that the GEMM then streams.
  at::Tensor q = at::empty({M, kq * 4}, x.options().dtype(at::kByte)).narrow(1, 0, K);
  at::Tensor comp = at::zeros({M}, x.options().dtype(at::kInt));
  at::Tensor s = quantize_into(xc, x_scale, quant_min, quant_max, q,
                               a_signed ? comp.data_ptr<int32_t>() : nullptr);
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  at::Tensor ws = w_scale.contiguous();
  const int kind = x.scalar_type() == at::kFloat ? kOutF32 : kOutBF16;
  run_w8a8(base_args(q, a_signed, comp.data_ptr<int32_t>(),
                     static_cast<const uint8_t*>(w_packed.data_ptr()), N, s, ws, bias_c, relu,
                     kind, out));
  return out;
}

// Runs scan(m0, m1) over rows [0, M) in 16-row pieces split between threads (each
// row's results are the same whichever thread scans it); true when every call was.
template <typename Scan>
bool scan_rows(int64_t M, int64_t K, Scan&& scan) {
  std::atomic<bool> ok{true};
  const int64_t pieces = ceil_div(M, 16);
  at::parallel_for(0, pieces, std::max<int64_t>(1, 65536 / (16 * std::max<int64_t>(K, 1))),
                   [&](int64_t p0, int64_t p1) {
                     if (!scan(p0 * 16, std::min(M, p1 * 16))) ok = false;
                   });
  return ok;
}

at::Tensor w4a16_mm_cpu(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& scales,
                        const at::Tensor& zeros, int64_t group_size) {
  const int64_t N = check_w4a16_mm(x, w_packed, scales, zeros, group_size);
  const int64_t M = x.size(0), K = x.size(1);
  const int64_t G = K / group_size;
  at::Tensor sc = scales.contiguous(), zc = zeros.contiguous();
  at::Tensor out = at::empty({M, N}, x.options().dtype(at::kFloat));
  // K = 0: y = 0 (the factored tiles write outputs per group, and there is none).
  if (M == 0 || N == 0 || K == 0) return out.zero_().to(x.scalar_type());
  W4A16Args a{nullptr, M, K, N, w_packed.data_ptr<uint8_t>(), sc.data_ptr<float>(),
              zc.data_ptr<float>(), group_size, out.data_ptr<float>(), nullptr, nullptr};
  const Kernels ks = kernels();
  W4A16TileFn tile = nullptr;
  at::Tensor xc, xsum, xpairs;
  if (ks.w4a16_bf16 && x.scalar_type() == at::kBFloat16) {
    xc = x.contiguous();
    xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
    xpairs = at::empty({K / 2, M}, x.options().dtype(at::kInt));
    a.xsum = xsum.data_ptr<float>();
    a.xpairs = xpairs.data_ptr<int32_t>();
#if defined(__x86_64__) || defined(__i386__)
    const uint16_t* xb = reinterpret_cast<const uint16_t*>(xc.data_ptr());
    float* xs = xsum.data_ptr<float>();
    int32_t* xp = xpairs.data_ptr<int32_t>();
    if (scan_rows(M, K, [&](int64_t m0, int64_t m1) {
          return avx512bf16::w4a16_prepare_bf16(xb, M, K, group_size, m0, m1, xs, xp);
        }))
      tile = ks.w4a16_bf16;
#endif
  }
  if (!tile) {
    xc = x.to(at::kFloat).contiguous();
    tile = ks.w4a16;
    if (ks.w4a16_sums) {
      xsum = at::empty({M, G}, x.options().dtype(at::kFloat));
      a.xsum = xsum.data_ptr<float>();
      const float* xf = xc.data_ptr<float>();
      float* xs = xsum.data_ptr<float>();
      if (!scan_rows(M, K, [&](int64_t m0, int64_t m1) {
            return ks.w4a16_sums(xf, K, group_size, m0, m1, xs);
          }))
        tile = ks.w4a16_plain;
    }
    xpairs = xc.view({M, K / 2, 2}).permute({1, 0, 2}).contiguous();  // w4_x_index
    a.x = xpairs.data_ptr<float>();
  }
  // Work items are (row chunk, 16-column block): at M = 1 the N / 16 blocks keep every
  // thread busy, and each output belongs to exactly one item.  Blocks vary fastest: a
  // thread's row chunk of x (64 rows) then stays in L2 while the weights stream past it;
  // the other way round all of x was read again for every block.
  constexpr int64_t kRows = 64;
  const int64_t blocks = ceil_div(N, kNB4), chunks = ceil_div(M, kRows);
  at::parallel_for(0, blocks * chunks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t m0 = (i / blocks) * kRows;
      tile(a, i % blocks, m0, std::min(M, m0 + kRows));
    }
  });
  return x.scalar_type() == at::kFloat ? out : out.to(x.scalar_type());
}

}  // namespace
}  // namespace cpu
}  // namespace gemm
}  // namespace q2ext

TORCH_LIBRARY_IMPL(q2ext, CPU, m) {
  m.impl("quantize_activation", &q2ext::gemm::cpu::quantize_activation_cpu);
  m.impl("w8a8_mm", &q2ext::gemm::cpu::w8a8_mm_cpu);
  m.impl("w8a8_linear", &q2ext::gemm::cpu::w8a8_linear_cpu);
  m.impl("w4a16_mm", &q2ext::gemm::cpu::w4a16_mm_cpu);
}
