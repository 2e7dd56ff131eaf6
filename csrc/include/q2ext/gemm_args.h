// Argument checks of the int8/int4 GEMM ops, shared by the CPU (csrc/cpu/gemm.cpp) and
// CUDA (csrc/cuda/gemm_*.cu) kernels so that both reject the same inputs with the same
// messages as the Python checks of q2ext/_ops/gemm.py (which the fake kernels run).
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "q2ext/gemm_math.h"

namespace q2ext {
namespace gemm {

// A float32 vector [n] (or [1] when allow_one) on the device of `like` (named like_name).
inline void check_f32_vec(const at::Tensor& t, const char* fn, const char* name, int64_t n,
                          bool allow_one, const at::Tensor& like, const char* like_name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, "q2ext.", fn, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == like.device(), "q2ext.", fn, ": ", name, " is on ", t.device(),
              " but ", like_name, " on ", like.device());
  TORCH_CHECK(t.dim() <= 1 && (t.numel() == n || (allow_one && t.numel() == 1)), "q2ext.", fn,
              ": ", name, " must have shape [", n, "]", allow_one ? " or [1]" : "", ", got ",
              t.sizes());
}

inline void check_act_range(int64_t qmin, int64_t qmax, const char* fn) {
  TORCH_CHECK(qmin < qmax && ((qmin >= -128 && qmax <= 127) || (qmin >= 0 && qmax <= 255)),
              "q2ext.", fn, ": [quant_min, quant_max] = [", qmin, ", ", qmax,
              "] must lie in [-128, 127] (int8) or [0, 255] (uint8)");
}

inline void check_x(const at::Tensor& x, const char* fn) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "q2ext.", fn, ": x must be a 2-D float32 or bfloat16 tensor, got ", x.scalar_type(),
              " ", x.sizes());
}

inline void check_quantize_activation(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                                      int64_t quant_min, int64_t quant_max) {
  check_x(x, "quantize_activation");
  check_act_range(quant_min, quant_max, "quantize_activation");
  if (scale.has_value())
    check_f32_vec(*scale, "quantize_activation", "scale", x.size(0), true, x, "x");
}

// Returns the output dtype.
// N of w8a8_mm: rows of a 2-D b, else (a packed b) the length of b_scale.
inline int64_t w8a8_mm_n(const at::Tensor& b, const at::Tensor& b_scale) {
  return b.dim() == 4 ? b_scale.numel() : b.size(0);
}

inline at::ScalarType check_w8a8_mm(const at::Tensor& a, const at::Tensor& b,
                                    const at::Tensor& a_scale, const at::Tensor& b_scale,
                                    const std::optional<at::Tensor>& bias,
                                    std::optional<at::ScalarType> out_dtype, bool relu) {
  const char* fn = "w8a8_mm";
  TORCH_CHECK(a.dim() == 2 && (a.scalar_type() == at::kChar || a.scalar_type() == at::kByte),
              "q2ext.w8a8_mm: a must be a 2-D int8 or uint8 tensor, got ", a.scalar_type(), " ",
              a.sizes());
  TORCH_CHECK(b.device() == a.device(), "q2ext.w8a8_mm: b is on ", b.device(), " but a on ",
              a.device());
  const int64_t N = w8a8_mm_n(b, b_scale);
  if (b.dim() == 4) {  // pack_int8_weight(w, signed_act) output: packed once, reused per call
    const int64_t K = a.size(1), kq = ceil_div(K, 4);
    const bool a_signed = a.scalar_type() == at::kChar;
    TORCH_CHECK(b.size(0) == ceil_div(N, kNB8) && b.size(1) == kq && b.size(2) == kNB8 &&
                    b.size(3) == 4 && b.is_contiguous(),
                "q2ext.w8a8_mm: a packed b must be the contiguous output of pack_int8_weight, shape [",
                ceil_div(N, kNB8), ", ", kq, ", 64, 4] for N=b_scale.numel()=", N, ", K=", K,
                "; got ", b.sizes());
    TORCH_CHECK(b.scalar_type() == (a_signed ? at::kByte : at::kChar),
                "q2ext.w8a8_mm: the packed b was packed for ", a_signed ? "unsigned" : "signed",
                " activations but a is ", a.scalar_type(), " (pack_int8_weight(w, signed_act=",
                a_signed ? "True" : "False", "))");
  } else {
    TORCH_CHECK(b.dim() == 2 && b.scalar_type() == at::kChar,
                "q2ext.w8a8_mm: b must be a 2-D int8 tensor [N, K] or the output of pack_int8_weight, got ",
                b.scalar_type(), " ", b.sizes());
    TORCH_CHECK(a.size(1) == b.size(1), "q2ext.w8a8_mm: a is [M, K=", a.size(1),
                "] but b is [N, K=", b.size(1), "]");
  }
  check_f32_vec(a_scale, fn, "a_scale", a.size(0), true, a, "a");
  check_f32_vec(b_scale, fn, "b_scale", N, false, a, "a");
  if (bias.has_value()) check_f32_vec(*bias, fn, "bias", N, false, a, "a");
  const at::ScalarType od = out_dtype.value_or(at::kFloat);
  TORCH_CHECK(od == at::kFloat || od == at::kBFloat16 || od == at::kInt,
              "q2ext.w8a8_mm: out_dtype must be float32, bfloat16 or int32, got ", od);
  TORCH_CHECK(od != at::kInt || (!bias.has_value() && !relu),
              "q2ext.w8a8_mm: out_dtype=int32 returns the raw accumulator: no bias or relu");
  return od;
}

// Returns N.
inline int64_t check_w8a8_linear(const at::Tensor& x, const at::Tensor& w_packed,
                                 const at::Tensor& w_scale, const std::optional<at::Tensor>& x_scale,
                                 const std::optional<at::Tensor>& bias, int64_t quant_min,
                                 int64_t quant_max) {
  const char* fn = "w8a8_linear";
  check_x(x, fn);
  check_act_range(quant_min, quant_max, fn);
  const bool a_signed = quant_min < 0;
  const int64_t M = x.size(0), K = x.size(1), kq = ceil_div(K, 4);
  TORCH_CHECK(w_scale.dim() == 1 && w_scale.numel() > 0,
              "q2ext.w8a8_linear: w_scale must be a 1-D float32 tensor [N]");
  const int64_t N = w_scale.numel();
  check_f32_vec(w_scale, fn, "w_scale", N, false, x, "x");
  TORCH_CHECK(w_packed.dim() == 4 && w_packed.size(0) == ceil_div(N, kNB8) &&
                  w_packed.size(1) == kq && w_packed.size(2) == kNB8 && w_packed.size(3) == 4 &&
                  w_packed.is_contiguous(),
              "q2ext.w8a8_linear: w_packed must be the contiguous output of pack_int8_weight, "
              "shape [", ceil_div(N, kNB8), ", ", kq, ", 64, 4] for N=", N, ", K=", K, "; got ",
              w_packed.sizes());
  TORCH_CHECK(w_packed.scalar_type() == (a_signed ? at::kByte : at::kChar),
              "q2ext.w8a8_linear: w_packed was packed for ", a_signed ? "unsigned" : "signed",
              " activations but quant_min=", quant_min, " (pack_int8_weight(w, signed_act=",
              a_signed ? "True" : "False", "))");
  TORCH_CHECK(w_packed.device() == x.device(), "q2ext.w8a8_linear: w_packed is on ",
              w_packed.device(), " but x on ", x.device());
  if (x_scale.has_value()) check_f32_vec(*x_scale, fn, "x_scale", M, true, x, "x");
  if (bias.has_value()) check_f32_vec(*bias, fn, "bias", N, false, x, "x");
  return N;
}

// Returns N.
inline int64_t check_w4a16_mm(const at::Tensor& x, const at::Tensor& w_packed,
                              const at::Tensor& scales, const at::Tensor& zeros,
                              int64_t group_size) {
  check_x(x, "w4a16_mm");
  const int64_t K = x.size(1);
  TORCH_CHECK(group_size == 32 || group_size == 64 || group_size == 128,
              "q2ext.w4a16_mm: group_size must be 32, 64 or 128, got ", group_size);
  TORCH_CHECK(K % group_size == 0, "q2ext.w4a16_mm: K=", K,
              " (x.shape[1]) must be a multiple of group_size=", group_size);
  TORCH_CHECK(scales.dim() == 2 && scales.scalar_type() == at::kFloat,
              "q2ext.w4a16_mm: scales must be a 2-D float32 tensor [K / group_size, N], got ",
              scales.scalar_type(), " ", scales.sizes());
  const int64_t G = K / group_size, N = scales.size(1);
  TORCH_CHECK(scales.size(0) == G, "q2ext.w4a16_mm: scales must have K / group_size = ", G,
              " rows, got ", scales.size(0));
  TORCH_CHECK(zeros.scalar_type() == at::kFloat && zeros.sizes() == scales.sizes(),
              "q2ext.w4a16_mm: zeros must be float32 with the shape of scales ", scales.sizes(),
              ", got ", zeros.scalar_type(), " ", zeros.sizes());
  TORCH_CHECK(w_packed.scalar_type() == at::kByte && w_packed.dim() == 3 &&
                  w_packed.size(0) == ceil_div(N, kNB4) && w_packed.size(1) == K &&
                  w_packed.size(2) == 8 && w_packed.is_contiguous(),
              "q2ext.w4a16_mm: w_packed must be the contiguous uint8 output of pack_int4, shape [",
              ceil_div(N, kNB4), ", ", K, ", 8] for N=", N, ", K=", K, "; got ",
              w_packed.scalar_type(), " ", w_packed.sizes(), " (unpacked weights? use pack_int4)");
  const at::Tensor* others[] = {&w_packed, &scales, &zeros};
  const char* names[] = {"w_packed", "scales", "zeros"};
  for (int i = 0; i < 3; ++i)
    TORCH_CHECK(others[i]->device() == x.device(), "q2ext.w4a16_mm: ", names[i], " is on ",
                others[i]->device(), " but x on ", x.device());
  return N;
}

}  // namespace gemm
}  // namespace q2ext
