// Argument checks and memory geometry shared by the CPU and CUDA fake-quant ops.
// The Python wrappers check the same things with friendlier messages; these checks keep
// direct torch.ops.q2ext.* calls safe.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "q2ext/fake_quant_math.h"

namespace q2ext {
namespace fake_quant {

// A dense tensor is walked in memory order as [outer, C, inner]: for any
// non-overlapping dense layout (contiguous, channels_last, permuted) the index along
// `axis` of the element at memory offset m is (m / stride[axis]) % size[axis].
struct FqGeometry {
  int64_t numel;
  int64_t channels;  // 1 for per-tensor
  int64_t inner;     // memory stride of the channel axis (numel for per-tensor)
};

inline at::Tensor dense_input(const at::Tensor& x) {
  return x.is_non_overlapping_and_dense() ? x : x.contiguous();
}

// The incoming gradient is read in x's memory order.
inline at::Tensor like_layout(const at::Tensor& t, const at::Tensor& ref) {
  if (t.strides() == ref.strides()) return t;
  at::Tensor out = at::empty_like(ref, t.options());
  out.copy_(t);
  return out;
}

inline FqGeometry fq_geometry(const at::Tensor& xd, std::optional<int64_t> axis) {
  FqGeometry g{xd.numel(), 1, xd.numel()};
  if (axis.has_value() && xd.size(*axis) > 1) {
    g.channels = xd.size(*axis);
    g.inner = xd.stride(*axis);
  }
  return g;
}

inline void check_fq_args(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point,
                          const std::optional<at::Tensor>& offset, int64_t quant_min,
                          int64_t quant_max, std::optional<int64_t> axis, int64_t mode) {
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "q2ext fake quant: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(mode == kModeAffine || mode == kModePact || mode == kModeLsq,
              "q2ext fake quant: unknown mode ", mode);
  TORCH_CHECK(quant_min < quant_max, "q2ext fake quant: quant_min (", quant_min,
              ") must be < quant_max (", quant_max, ")");
  TORCH_CHECK(quant_min >= -65536 && quant_max <= 65535,
              "q2ext fake quant: quant_min/quant_max must lie in [-65536, 65535]");
  int64_t channels = 1;
  if (axis.has_value()) {
    TORCH_CHECK(*axis >= 0 && *axis < x.dim(), "q2ext fake quant: axis ", *axis,
                " out of range for x with ", x.dim(), " dims");
    channels = x.size(*axis);
  }
  auto check_param = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == at::kFloat, "q2ext fake quant: ", name,
                " must be float32, got ", t.scalar_type());
    TORCH_CHECK(t.device() == x.device(), "q2ext fake quant: ", name, " is on ",
                t.device(), " but x is on ", x.device());
    TORCH_CHECK(t.dim() <= 1 && t.numel() == channels, "q2ext fake quant: ", name,
                " must have shape [", channels, "], got ", t.sizes());
  };
  check_param(scale, "scale");
  if (zero_point.has_value()) check_param(*zero_point, "zero_point");
  if (offset.has_value()) check_param(*offset, "offset");
  TORCH_CHECK(!(zero_point.has_value() && offset.has_value()),
              "q2ext fake quant: pass zero_point or offset, not both");
  TORCH_CHECK(mode != kModePact || (quant_min == 0 && !zero_point.has_value() &&
                                    !offset.has_value()),
              "q2ext fake quant: PACT takes quant_min = 0 and no zero_point/offset");
  TORCH_CHECK(mode != kModeLsq || !zero_point.has_value(),
              "q2ext fake quant: LSQ takes no zero_point (use offset for LSQ+)");
}

// The backward's arguments: the forward's, plus a grad like x (shape, dtype, device).
inline void check_fq_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                   const std::optional<at::Tensor>& zero_point,
                                   const std::optional<at::Tensor>& offset, int64_t quant_min,
                                   int64_t quant_max, std::optional<int64_t> axis, int64_t mode) {
  check_fq_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type(),
              "q2ext fake quant backward: grad must match x in shape and dtype");
  TORCH_CHECK(grad.device() == x.device(), "q2ext fake quant backward: grad is on ",
              grad.device(), " but x is on ", x.device());
}

}  // namespace fake_quant
}  // namespace q2ext
