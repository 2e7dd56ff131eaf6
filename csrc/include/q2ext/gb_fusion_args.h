// Host-side argument checks shared by the CPU and CUDA Q-GBFusion ops (messages name the
// argument; the fake kernels of q2ext/_ops/gb_fusion.py make the same checks).
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <vector>

#include "q2ext/gb_fusion_math.h"

namespace q2ext::gb_fusion {

// Accumulation/compute type of the kernels (and of weight, bias, mean, rstd): fp64 for
// fp64 branches, else fp32.
inline at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A 1-D parameter or state vector of length n, dtype dt, on branches[0]'s device.
inline void check_vec(const char* name, const at::Tensor& t, int64_t n, at::ScalarType dt,
                      const at::Tensor& x0) {
  TORCH_CHECK(t.scalar_type() == dt, "q2ext gb_fusion: ", name, " must be ", dt, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == x0.device(), "q2ext gb_fusion: ", name, " is on ", t.device(),
              " but branches[0] is on ", x0.device());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, "q2ext gb_fusion: ", name, " must have shape [", n,
              "], got ", t.sizes());
}

// The branches, validated and made dense in branches[0]'s layout: channels_last (NHWC) when
// branches[0] is channels_last and not also contiguous, else NCHW.
struct BranchLayout {
  std::vector<at::Tensor> dense;  // owns the dense copies the kernels read
  bool nhwc = false;
  int64_t k = 0, c_out = 0;       // branches, fused channels
  int64_t c[kGbMaxBranches] = {};    // channels of branch i
  int64_t off[kGbMaxBranches] = {};  // its first fused channel (concat), else 0
  at::MemoryFormat format() const {
    return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  }
};

inline BranchLayout check_branches(at::TensorList branches, int64_t mode) {
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
  BranchLayout L;
  L.nhwc = x0.is_contiguous(at::MemoryFormat::ChannelsLast) && !x0.is_contiguous();
  L.k = k;
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
    L.dense.push_back(x.contiguous(L.format()));
    L.c[i] = x.size(1);
    L.off[i] = mode == kGbConcat ? c : 0;
    c = mode == kGbConcat ? c + x.size(1) : x.size(1);
  }
  L.c_out = c;
  return L;
}

// The forward's non-branch arguments, for K branches fusing into c_out channels.
inline void check_forward_params(const at::Tensor& x0, const at::Tensor& lam,
                                 const std::optional<at::Tensor>& weight,
                                 const std::optional<at::Tensor>& bias, int64_t k, int64_t c_out,
                                 double eps) {
  check_vec("lam", lam, k, at::kFloat, x0);
  TORCH_CHECK(weight.has_value() == bias.has_value(),
              "q2ext gb_fusion: pass both weight and bias, or neither");
  if (weight.has_value()) {
    check_vec("weight", *weight, c_out, acc_type(x0), x0);
    check_vec("bias", *bias, c_out, acc_type(x0), x0);
  }
  TORCH_CHECK(eps > 0, "q2ext gb_fusion: eps must be > 0, got ", eps);
}

// The backward's non-branch arguments (branches[0] = x0, c_out fused channels, k branches).
// `out` is the forward's output, an optional hint: with no affine and fp32/fp64 storage it
// holds exactly the normalised y, which the CPU kernel then reads instead of the branches.
// Returns whether it may be used.
inline bool check_backward_params(const at::Tensor& grad, const at::Tensor& x0, int64_t c_out,
                                  const at::Tensor& alpha, int64_t k, const at::Tensor& mean,
                                  const at::Tensor& rstd, const std::optional<at::Tensor>& weight,
                                  const std::optional<at::Tensor>& out) {
  const int64_t n = x0.size(0), h = x0.size(2), w = x0.size(3);
  TORCH_CHECK(grad.dim() == 4 && grad.size(0) == n && grad.size(1) == c_out && grad.size(2) == h &&
                  grad.size(3) == w && grad.scalar_type() == x0.scalar_type(),
              "q2ext gb_fusion_backward: grad must be ", x0.scalar_type(), " of shape [", n, ", ",
              c_out, ", ", h, ", ", w, "], got ", grad.scalar_type(), " ", grad.sizes());
  TORCH_CHECK(grad.device() == x0.device(), "q2ext gb_fusion_backward: grad is on ", grad.device(),
              " but branches[0] is on ", x0.device());
  check_vec("alpha", alpha, k, at::kFloat, x0);
  for (const auto* t : {&mean, &rstd})
    TORCH_CHECK(t->scalar_type() == acc_type(x0) && t->numel() == n * h * w &&
                    t->device() == x0.device(),
                "q2ext gb_fusion_backward: mean/rstd must be ", acc_type(x0), " of shape (N, H, W) on ",
                x0.device());
  if (weight.has_value()) check_vec("weight", *weight, c_out, acc_type(x0), x0);
  if (!out.has_value()) return false;
  TORCH_CHECK(out->sizes() == grad.sizes() && out->scalar_type() == grad.scalar_type() &&
                  out->device() == x0.device(),
              "q2ext gb_fusion_backward: out must be the forward's output, ", grad.scalar_type(), " ",
              grad.sizes(), " on ", x0.device(), "; got ", out->scalar_type(), " ", out->sizes(), " on ",
              out->device());
  const auto st = x0.scalar_type();
  return !weight.has_value() && (st == at::kFloat || st == at::kDouble);
}

// The controller state updated in place by gb_fusion_update; returns K.
inline int64_t check_update_args(const at::Tensor& lam, const at::Tensor& g_ema, const at::Tensor& g_sq,
                                 const std::optional<at::Tensor>& tau, double lam_clip) {
  TORCH_CHECK(lam.dim() == 1 && lam.scalar_type() == at::kFloat,
              "q2ext gb_fusion_update: lam must be fp32 [K], got ", lam.scalar_type(), " ", lam.sizes());
  const int64_t k = lam.size(0);
  TORCH_CHECK(k <= kGbMaxBranches, "q2ext gb_fusion_update: at most ", kGbMaxBranches, " branches");
  check_vec("g_ema", g_ema, k, at::kFloat, lam);
  check_vec("g_sq", g_sq, k, at::kFloat, lam);
  if (tau.has_value()) check_vec("tau", *tau, k, at::kFloat, lam);
  TORCH_CHECK(lam_clip > 0, "q2ext gb_fusion_update: lam_clip must be > 0, got ", lam_clip);
  TORCH_CHECK(lam.is_contiguous() && g_ema.is_contiguous(),
              "q2ext gb_fusion_update: lam and g_ema must be contiguous (updated in place)");
  return k;
}

}  // namespace q2ext::gb_fusion
