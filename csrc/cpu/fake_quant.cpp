// CPU kernels of q2ext::fake_quant / q2ext::fake_quant_backward.
//
// One pass each way.  The backward writes grad_x and reduces the scale and
// clip (zero-point/offset/alpha) gradients in the same pass, into small per-work-item
// partial sums; work items are fixed by the tensor geometry (not by the thread count),
// so results are identical run to run and for any number of threads.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <array>
#include <cstdlib>
#include <string>
#include <vector>

#include "fake_quant_loops.h"
#include "q2ext/cpu_isa.h"
#include "q2ext/fake_quant_args.h"
#include "huge_pages.h"

Q2EXT_DECLARE_ISA_ENTRY_POINTS(avx512)
Q2EXT_DECLARE_ISA_ENTRY_POINTS(avx2)
Q2EXT_DECLARE_ISA_ENTRY_POINTS(scalar)

namespace q2ext {
namespace fake_quant {
namespace cpu {
namespace {

using SegmentFn = void (*)(const SegmentArgs&);

constexpr int64_t kChunk = 1 << 14;  // elements per work item (fixes the reduction order)

// Work below this many elements runs on the calling thread: for ~1 MB of memory-bound work
// waking the OpenMP workers costs about what they save, and on an oversubscribed machine a
// descheduled worker stalls the whole op for a scheduler time slice (~8 ms on the 2-vCPU CI
// VM).  Only the distribution of work items over threads depends on this, never the items
// themselves, so results stay independent of the thread count.
constexpr int64_t kParallelMinElems = 1 << 18;
int64_t grain_items(int64_t elems_per_item) {
  return std::max<int64_t>(1, kParallelMinElems / std::max<int64_t>(1, elems_per_item));
}

struct IsaTable {
  SegmentFn fwd[3];  // f32, bf16, f16
  SegmentFn bwd[3];
};

#define Q2EXT_TABLE(ns)                                                              \
  IsaTable {                                                                         \
    {ns::forward_segment_f32, ns::forward_segment_bf16, ns::forward_segment_f16},    \
        {ns::backward_segment_f32, ns::backward_segment_bf16, ns::backward_segment_f16} \
  }

const IsaTable& isa_table() {
  static const IsaTable tables[3] = {Q2EXT_TABLE(scalar), Q2EXT_TABLE(avx2),
                                     Q2EXT_TABLE(avx512)};
  return tables[static_cast<int>(active_cpu_isa())];
}

int dtype_slot(at::ScalarType t) {
  return t == at::kFloat ? 0 : (t == at::kBFloat16 ? 1 : 2);
}

// Per-channel constants, computed once per call (C values, not per element).
struct Channels {
  std::vector<float> s, inv, zp, off, clip;
};

Channels make_channels(const at::Tensor& scale, const std::optional<at::Tensor>& zero_point,
                       const std::optional<at::Tensor>& offset, int64_t mode, float qmin,
                       float qmax) {
  at::Tensor sc = scale.contiguous();
  at::Tensor zc = zero_point.has_value() ? zero_point->contiguous() : at::Tensor();
  at::Tensor oc = offset.has_value() ? offset->contiguous() : at::Tensor();
  const int64_t n = sc.numel();
  Channels c;
  for (auto* v : {&c.s, &c.inv, &c.zp, &c.off, &c.clip}) v->resize(n);
  const float* sp = sc.data_ptr<float>();
  const float* zpp = zc.defined() ? zc.data_ptr<float>() : nullptr;
  const float* op = oc.defined() ? oc.data_ptr<float>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    FqChannel ch = make_channel(mode, sp[i], zpp ? zpp[i] : 0.f, op ? op[i] : 0.f, qmin, qmax);
    c.s[i] = ch.s;
    c.inv[i] = ch.inv;
    c.zp[i] = ch.zp;
    c.off[i] = ch.off;
    c.clip[i] = ch.clip;
  }
  return c;
}

SegmentArgs base_args(const Channels& ch, int64_t channel, bool per_element, int64_t mode,
                      float qmin, float qmax) {
  SegmentArgs a{};
  a.s = ch.s.data() + channel;
  a.inv = ch.inv.data() + channel;
  a.zp = ch.zp.data() + channel;
  a.off = ch.off.data() + channel;
  a.clip = ch.clip.data() + channel;
  a.per_element = per_element;
  a.mode = mode;
  a.qmin = qmin;
  a.qmax = qmax;
  return a;
}

at::Tensor fake_quant_cpu(const at::Tensor& x, const at::Tensor& scale,
                          const std::optional<at::Tensor>& zero_point,
                          const std::optional<at::Tensor>& offset, int64_t quant_min,
                          int64_t quant_max, std::optional<int64_t> axis, int64_t mode,
                          double /*grad_factor: backward only*/) {
  check_fq_args(x, scale, zero_point, offset, quant_min, quant_max, axis, mode);
  at::Tensor xd = dense_input(x);
  at::Tensor y = at::empty_like(xd);
  advise_huge_pages(y);
  const FqGeometry g = fq_geometry(xd, axis);
  if (g.numel == 0) return y;
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  const Channels ch = make_channels(scale, zero_point, offset, mode, qmin, qmax);
  const SegmentFn fn = isa_table().fwd[dtype_slot(x.scalar_type())];
  const size_t esize = xd.element_size();
  const char* xp = static_cast<const char*>(xd.data_ptr());
  char* yp = static_cast<char*>(y.data_ptr());
  const bool innermost = g.inner == 1 && g.channels > 1;
  at::parallel_for(0, g.numel, grain_items(1), [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end;) {
      int64_t c, len;
      if (innermost) {
        c = m % g.channels;
        len = std::min(end - m, g.channels - c);
      } else {
        c = (m / g.inner) % g.channels;
        len = std::min(end - m, g.inner - m % g.inner);
      }
      SegmentArgs a = base_args(ch, c, innermost, mode, qmin, qmax);
      a.x = xp + m * esize;
      a.out = yp + m * esize;
      a.n = len;
      fn(a);
      m += len;
    }
  });
  return y;
}

// Sums over the whole tensor, per channel, in double.
struct Sums {
  std::vector<double> scale, clip;
};

// Layouts where the channel axis is not innermost: each work item is a piece (at most
// kChunk elements) of one run of `inner` elements sharing a channel.
Sums backward_runs(const SegmentFn fn, const Channels& ch, const FqGeometry& g,
                   const char* dyp, const char* xp, char* dxp, size_t esize, int64_t mode,
                   float qmin, float qmax) {
  const int64_t pieces = (g.inner + kChunk - 1) / kChunk;
  const int64_t runs = g.numel / g.inner;
  const int64_t items = runs * pieces;
  std::vector<float> part_s(items), part_c(items);
  at::parallel_for(0, items, grain_items(std::min(g.inner, kChunk)), [&](int64_t begin, int64_t end) {
    for (int64_t it = begin; it < end; ++it) {
      const int64_t run = it / pieces, piece = it % pieces;
      const int64_t start = run * g.inner + piece * kChunk;
      SegmentArgs a = base_args(ch, run % g.channels, false, mode, qmin, qmax);
      a.x = xp + start * esize;
      a.dy = dyp + start * esize;
      a.out = dxp + start * esize;
      a.n = std::min(kChunk, g.inner - piece * kChunk);
      float s = 0.f, c = 0.f;
      a.acc_scale = &s;
      a.acc_clip = &c;
      fn(a);
      part_s[it] = s;
      part_c[it] = c;
    }
  });
  Sums sums{std::vector<double>(g.channels, 0.0), std::vector<double>(g.channels, 0.0)};
  for (int64_t it = 0; it < items; ++it) {
    const int64_t c = (it / pieces) % g.channels;
    sums.scale[c] += part_s[it];
    sums.clip[c] += part_c[it];
  }
  return sums;
}

// Innermost channel axis (e.g. per-channel on channels_last activations): rows of C
// elements; each work item owns a block of channels and walks all rows, flushing its
// fp32 accumulators into double every kRowBlock rows.
Sums backward_rows(const SegmentFn fn, const Channels& ch, const FqGeometry& g,
                   const char* dyp, const char* xp, char* dxp, size_t esize, int64_t mode,
                   float qmin, float qmax) {
  constexpr int64_t kChannelBlock = 256, kRowBlock = 64;
  const int64_t rows = g.numel / g.channels;
  Sums sums{std::vector<double>(g.channels, 0.0), std::vector<double>(g.channels, 0.0)};
  const int64_t blocks = (g.channels + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, blocks, grain_items(rows * std::min(kChannelBlock, g.channels)),
                   [&](int64_t begin, int64_t end) {
    std::vector<float> acc_s(kChannelBlock), acc_c(kChannelBlock);
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c0 = b * kChannelBlock;
      const int64_t width = std::min(kChannelBlock, g.channels - c0);
      for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
        std::fill(acc_s.begin(), acc_s.end(), 0.f);
        std::fill(acc_c.begin(), acc_c.end(), 0.f);
        for (int64_t r = r0; r < std::min(rows, r0 + kRowBlock); ++r) {
          const int64_t start = r * g.channels + c0;
          SegmentArgs a = base_args(ch, c0, true, mode, qmin, qmax);
          a.x = xp + start * esize;
          a.dy = dyp + start * esize;
          a.out = dxp + start * esize;
          a.n = width;
          a.acc_scale = acc_s.data();
          a.acc_clip = acc_c.data();
          fn(a);
        }
        for (int64_t i = 0; i < width; ++i) {
          sums.scale[c0 + i] += acc_s[i];
          sums.clip[c0 + i] += acc_c[i];
        }
      }
    }
  });
  return sums;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fake_quant_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
    const std::optional<at::Tensor>& zero_point, const std::optional<at::Tensor>& offset,
    int64_t quant_min, int64_t quant_max, std::optional<int64_t> axis, int64_t mode,
    double grad_factor, std::array<bool, 3> output_mask) {
  check_fq_backward_args(grad, x, scale, zero_point, offset, quant_min, quant_max, axis, mode);
  at::Tensor xd = dense_input(x);
  at::Tensor dy = like_layout(grad, xd);
  at::Tensor dx = at::empty_like(xd);
  advise_huge_pages(dx);
  const FqGeometry g = fq_geometry(xd, axis);
  const float qmin = static_cast<float>(quant_min), qmax = static_cast<float>(quant_max);
  const Channels ch = make_channels(scale, zero_point, offset, mode, qmin, qmax);
  Sums sums{std::vector<double>(g.channels, 0.0), std::vector<double>(g.channels, 0.0)};
  if (g.numel > 0) {
    const SegmentFn fn = isa_table().bwd[dtype_slot(x.scalar_type())];
    const size_t es = xd.element_size();
    const char* xp = static_cast<const char*>(xd.data_ptr());
    const char* dyp = static_cast<const char*>(dy.data_ptr());
    char* dxp = static_cast<char*>(dx.data_ptr());
    sums = (g.inner == 1 && g.channels > 1)
               ? backward_rows(fn, ch, g, dyp, xp, dxp, es, mode, qmin, qmax)
               : backward_runs(fn, ch, g, dyp, xp, dxp, es, mode, qmin, qmax);
  }
  const at::Tensor& third_like =
      zero_point.has_value() ? *zero_point : (offset.has_value() ? *offset : scale);
  at::Tensor d_scale = at::empty_like(scale, at::MemoryFormat::Contiguous);
  at::Tensor d_third = at::empty_like(third_like, at::MemoryFormat::Contiguous);
  float* dsp = d_scale.data_ptr<float>();
  float* dtp = d_third.data_ptr<float>();
  const int64_t nparam = scale.numel();
  for (int64_t i = 0; i < nparam; ++i) {
    // Per-tensor parameters have one channel; per-channel ones one sum per channel.
    const int64_t c = g.channels == 1 ? 0 : i;
    dsp[i] = static_cast<float>(grad_factor * sums.scale[c]);
    if (mode == kModePact) dsp[i] = static_cast<float>(grad_factor * sums.clip[c]);
    // zero point: d/dzp of (clamp(q) - zp) * s is -s where clipped; offset: 1.
    dtp[i] = zero_point.has_value() ? static_cast<float>(-grad_factor * ch.s[i] * sums.clip[c])
                                    : static_cast<float>(grad_factor * sums.clip[c]);
  }
  // Each missing output is its own empty tensor: outputs of an op must never alias.
  auto empty = [&] { return at::empty({0}, scale.options()); };
  return {output_mask[0] ? dx : empty(), output_mask[1] ? d_scale : empty(),
          output_mask[2] && (zero_point.has_value() || offset.has_value()) ? d_third : empty()};
}

}  // namespace
}  // namespace cpu
}  // namespace fake_quant
}  // namespace q2ext

TORCH_LIBRARY_IMPL(q2ext, CPU, m) {
  m.impl("fake_quant", &q2ext::fake_quant::cpu::fake_quant_cpu);
  m.impl("fake_quant_backward", &q2ext::fake_quant::cpu::fake_quant_backward_cpu);
}
