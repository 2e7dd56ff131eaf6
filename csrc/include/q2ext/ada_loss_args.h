// Host-side argument checks and row configuration shared by the CPU and CUDA Q-ADA ops,
// mirroring check_ada_args of q2ext/_ops/ada_loss.py (which the fake kernels run), so
// that direct torch.ops.q2ext.ada_loss* calls reject the same inputs with the same
// messages on every device.
#pragma once

#include <ATen/ATen.h>

#include <optional>

#include "q2ext/ada_loss_math.h"

namespace q2ext::ada_loss {

// Compute dtype of the kernels (and of teacher_dist, row_stats, the loss): fp64 for fp64
// inputs, else fp32.
inline at::ScalarType compute_dtype(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline void check_ada_args(const at::Tensor& student, const at::Tensor& teacher,
                           const std::optional<at::Tensor>& student_q,
                           const std::optional<at::Tensor>& teacher_q,
                           const std::optional<at::Tensor>& step, double gamma, double kappa,
                           int64_t divergence, int64_t normalize, double temperature) {
  const auto st = student.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16 || st == at::kDouble,
              "ada_loss: student must be float32, float16, bfloat16 or float64, got ", st);
  TORCH_CHECK(student.dim() >= 3,
              "ada_loss: student must be [N, C, *spatial] with >= 1 spatial dim, got ",
              student.sizes());
  int64_t spatial = 1;
  for (int64_t d = 2; d < student.dim(); ++d) spatial *= student.size(d);
  TORCH_CHECK(spatial > 0, "ada_loss: student's spatial size must be > 0, got shape ", student.sizes());
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.scalar_type() == st, "ada_loss: ", name, " must have the student's dtype ", st,
                ", got ", t.scalar_type());
    TORCH_CHECK(t.sizes() == student.sizes(), "ada_loss: ", name, " must have the student's shape ",
                student.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.device() == student.device(), "ada_loss: ", name, " is on ", t.device(),
                " but student is on ", student.device());
  };
  same(teacher, "teacher");
  if (student_q.has_value()) same(*student_q, "student_q");
  if (teacher_q.has_value()) same(*teacher_q, "teacher_q");
  TORCH_CHECK(student_q.has_value() == teacher_q.has_value(),
              "ada_loss: pass both student_q and teacher_q (the same quantizer) or neither");
  if (step.has_value()) {
    const int64_t c = student.size(1);
    TORCH_CHECK(step->scalar_type() == at::kFloat || step->scalar_type() == at::kDouble,
                "ada_loss: step must be float32 or float64, got ", step->scalar_type());
    TORCH_CHECK(step->dim() <= 1 && (step->numel() == 1 || step->numel() == c),
                "ada_loss: step must have shape [1] or [", c, "], got ", step->sizes());
    TORCH_CHECK(step->device() == student.device(), "ada_loss: step is on ", step->device(),
                " but student is on ", student.device());
  }
  TORCH_CHECK(gamma >= 0, "ada_loss: gamma must be >= 0, got ", gamma);
  TORCH_CHECK(kappa > 0, "ada_loss: kappa must be > 0, got ", kappa);
  TORCH_CHECK(temperature > 0, "ada_loss: temperature must be > 0, got ", temperature);
  TORCH_CHECK(divergence == kDivJs || divergence == kDivKl,
              "ada_loss: unknown divergence code ", divergence);
  TORCH_CHECK(normalize == kNormSigmoid || normalize == kNormSoftmax,
              "ada_loss: unknown normalize code ", normalize);
}

// The backward's arguments: the forward's for the student side, plus the incoming gradient
// (a 0-dim compute-dtype tensor on the student's device, read there without a host sync)
// and the forward's saved teacher distribution and row statistics.
inline void check_ada_backward_args(const at::Tensor& grad, const at::Tensor& student,
                                    const std::optional<at::Tensor>& student_q,
                                    const std::optional<at::Tensor>& step,
                                    const at::Tensor& teacher_dist, const at::Tensor& row_stats,
                                    double gamma, double kappa, int64_t divergence,
                                    int64_t normalize, double temperature) {
  check_ada_args(student, student, student_q, student_q, step, gamma, kappa, divergence, normalize,
                 temperature);
  const auto ct = compute_dtype(student);
  TORCH_CHECK(grad.dim() == 0 && grad.scalar_type() == ct && grad.device() == student.device(),
              "ada_loss_backward: grad must be a 0-dim ", ct, " tensor on the student's device");
  TORCH_CHECK(teacher_dist.sizes() == student.sizes() && teacher_dist.scalar_type() == ct,
              "ada_loss_backward: teacher_dist must be ", ct, " of shape ", student.sizes());
  TORCH_CHECK(row_stats.dim() == 3 && row_stats.size(0) == student.size(0) &&
                  row_stats.size(1) == student.size(1) && row_stats.size(2) == kRowStats &&
                  row_stats.scalar_type() == ct,
              "ada_loss_backward: row_stats must be ", ct, " of shape [N, C, ", kRowStats, "]");
}

// The step as a contiguous double tensor on its device (undefined without a step); it must
// outlive the RowConfig that points into it.
inline at::Tensor step_as_double(const std::optional<at::Tensor>& step) {
  return step.has_value() ? step->to(at::kDouble).contiguous() : at::Tensor();
}

inline RowConfig make_row_config(const at::Tensor& x, const at::Tensor& step_d, double gamma,
                                 double kappa, int64_t divergence, int64_t normalize,
                                 double temperature) {
  RowConfig cfg;
  cfg.channels = x.size(1);
  cfg.rows = x.size(0) * x.size(1);
  cfg.length = cfg.rows == 0 ? 0 : x.numel() / cfg.rows;
  cfg.gamma = gamma;
  cfg.kappa = kappa;
  cfg.inv_temp = 1.0 / temperature;
  cfg.js = divergence == kDivJs;
  cfg.softmax = normalize == kNormSoftmax;
  cfg.step = step_d.defined() ? step_d.const_data_ptr<double>() : nullptr;
  cfg.step_numel = step_d.defined() ? step_d.numel() : 0;
  return cfg;
}

}  // namespace q2ext::ada_loss
