// CUDA kernels of q2ext::quantize_activation, q2ext::w8a8_mm and q2ext::w8a8_linear.
// Semantics: q2ext/reference/gemm.py; argument rules: gemm_args.h (shared with the CPU).
//
// Operand formats inside this file:
//  * A: [M, lda] bytes whose rows start 16-byte aligned (lda % 16 == 0).  w8a8_linear
//    quantises x straight into such a buffer; w8a8_mm uses `a` as it is when it already
//    qualifies and copies it otherwise.  Bytes past K are never read as data: the MMA
//    loads zero-fill them (cp.async src-size) and the dp4a loads mask them.
//  * B: the panels of pack_int8_weight, [ceil(N/64), kq, 64, 4]: each 32-bit word is one
//    k-quad of one output column, which is exactly one register of the B fragment of
//    mma.m16n8k32 and one operand of dp4a.  w8a8_linear reads its w_packed directly
//    (undoing the +128 of the signed-activation packing with a XOR per word); w8a8_mm
//    packs b [N, K] into the same layout first (one pass over B, any strides).
// Two GEMM kernels share that format and the epilogue (gemm_math.h, also the CPU's):
//  * mma: 128x128x64 block tile, 8 warps of 64x32, int8 tensor-core MMA (sm_80+), two
//    cp.async stages.  Used from M > kGemvMaxM on sm_80+.
//  * dp4a: one lane per output column, warps and grid.z split K.  The GEMV regime
//    (memory bound: what matters is streaming B once, with enough blocks in flight) and
//    the path of pre-sm_80 devices.  With a K split, partial sums go to an int32
//    workspace with atomicAdd - exact and order independent, since int32 addition wraps.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>

#include "device_cache.cuh"
#include "gemm_w8a8_kernels.cuh"
#include "q2ext/gemm_args.h"

namespace q2ext::gemm::cuda {
namespace {

// ---- activation quantisation ------------------------------------------------------------

struct QuantArgs {
  const void* x;  // [M, ldx] fp32 / bf16
  int64_t ldx, M, K;
  const float* scale;  // [1] / [M] or nullptr (dynamic)
  bool per_row;
  float qmin, qmax;
  uint8_t* q;  // [M, ldq]
  int64_t ldq;
  float* scale_out;
};

// One block per row (grid.x = max(M, 1): a [1] scale is written even when M == 0).
template <typename T>
__global__ void quantize_kernel(const QuantArgs a) {
  __shared__ float wmax[kWarps];
  const int64_t m = blockIdx.x;
  const T* xr = static_cast<const T*>(a.x) + m * a.ldx;
  float s;
  if (a.scale == nullptr) {
    float mx = 0.0f;
    for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x) mx = absmax_step(mx, to_f32(xr[k]));
    // mx >= 0 and never NaN here, so absmax_step also merges two maxima.
    for (int o = 16; o > 0; o >>= 1) mx = absmax_step(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = mx;
    __syncthreads();
    mx = 0.0f;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) mx = absmax_step(mx, wmax[w]);
    s = dynamic_scale(mx, a.qmax);
    if (threadIdx.x == 0) a.scale_out[m] = s;
  } else {
    s = sanitize_scale(a.scale[a.per_row ? m : 0]);
    if (threadIdx.x == 0 && (a.per_row || m == 0)) a.scale_out[a.per_row ? m : 0] = s;
  }
  if (m >= a.M) return;
  const float inv = quant_inv(s);
  uint8_t* qr = a.q + m * a.ldq;
  for (int64_t k = threadIdx.x; k < a.K; k += blockDim.x)
    qr[k] = static_cast<uint8_t>(quant_code(to_f32(xr[k]), inv, a.qmin, a.qmax));
}

// ---- host side --------------------------------------------------------------------------

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

bool has_int8_mma(int device) { return device_cc_major(device) >= 8; }

// Quantises x into q ([M, >= K] bytes, row stride q.stride(0)); returns the scales.
at::Tensor quantize_into(const at::Tensor& x, const std::optional<at::Tensor>& scale,
                         int64_t qmin, int64_t qmax, at::Tensor& q, cudaStream_t st) {
  const int64_t M = x.size(0), K = x.size(1);
  const at::Tensor xc = x.stride(1) == 1 || K <= 1 ? x : x.contiguous();
  const bool per_row = scale.has_value() && scale->numel() == M && M != 1;
  const at::Tensor sc = scale.has_value() ? scale->contiguous() : at::Tensor();
  at::Tensor s_out = at::empty({(!scale.has_value() || per_row) ? M : 1}, x.options().dtype(at::kFloat));
  const int64_t rows = scale.has_value() && !per_row ? std::max<int64_t>(M, 1) : M;
  if (rows == 0) return s_out;
  QuantArgs a{xc.const_data_ptr(), xc.stride(0), M, K, sc.defined() ? sc.const_data_ptr<float>() : nullptr,
              per_row, static_cast<float>(qmin), static_cast<float>(qmax),
              static_cast<uint8_t*>(q.data_ptr()), q.stride(0), s_out.mutable_data_ptr<float>()};
  const int threads = K >= 256 ? 256 : (K > 64 ? 128 : 32);
  TORCH_CHECK(rows <= INT32_MAX, "q2ext.quantize_activation: too many rows");
  if (x.scalar_type() == at::kFloat) {
    quantize_kernel<float><<<static_cast<unsigned>(rows), threads, 0, st>>>(a);
  } else {
    quantize_kernel<bf16_t><<<static_cast<unsigned>(rows), threads, 0, st>>>(a);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return s_out;
}

template <bool kASigned>
void launch_gemm(const GemmArgs& g, int device, cudaStream_t st) {
  if (g.M > kGemvMaxM && has_int8_mma(device)) {
    const dim3 grid(static_cast<unsigned>(ceil_div(g.N, kBN)), static_cast<unsigned>(ceil_div(g.M, kBM)));
    TORCH_CHECK(grid.y <= 65535, "q2ext.w8a8: M too large");
    w8a8_mma_kernel<kASigned><<<grid, kThreads, 0, st>>>(g);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const int64_t bx = ceil_div(g.N, 32), by = ceil_div(g.M, kDpRows);
  TORCH_CHECK(by <= 65535, "q2ext.w8a8: M too large for the dp4a path");
  // Enough blocks for ~4 waves, but at least kMinQuadsPerSplit quads per split.
  const int64_t want = ceil_div(4 * device_sm_count(device), bx * by);
  int64_t splits = std::clamp<int64_t>(want, 1, std::max<int64_t>(1, g.kq / kMinQuadsPerSplit));
  const int64_t qps = std::max<int64_t>(1, ceil_div(g.kq, splits));
  splits = std::max<int64_t>(1, ceil_div(g.kq, qps));
  const dim3 grid(static_cast<unsigned>(bx), static_cast<unsigned>(by), static_cast<unsigned>(splits));
  if (splits == 1) {
    w8a8_dp4a_kernel<kASigned><<<grid, kThreads, 0, st>>>(g, nullptr, qps);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  const bool raw = g.out_kind == kOutI32;
  at::Tensor ws;
  int32_t* wp = static_cast<int32_t*>(g.out);
  if (!raw) {
    ws = at::empty({g.M, g.N}, at::TensorOptions().dtype(at::kInt).device(at::kCUDA, device));
    wp = ws.mutable_data_ptr<int32_t>();
  }
  C10_CUDA_CHECK(cudaMemsetAsync(wp, 0, sizeof(int32_t) * g.M * g.N, st));
  w8a8_dp4a_kernel<kASigned><<<grid, kThreads, 0, st>>>(g, wp, qps);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!raw) {
    w8a8_epilogue_kernel<<<static_cast<unsigned>(ceil_div(g.M * g.N, kThreads)), kThreads, 0, st>>>(g, wp);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

GemmArgs make_gemm(const at::Tensor& a_rows, const uint8_t* a_ptr, int64_t N, int64_t K,
                   const at::Tensor& a_scale, const at::Tensor& b_scale,
                   const std::optional<at::Tensor>& bias, bool relu, int out_kind, at::Tensor& out) {
  GemmArgs g{};
  g.a = a_ptr;
  g.lda = a_rows.size(0) > 1 ? a_rows.stride(0) : 0;
  g.M = a_rows.size(0);
  g.N = N;
  g.K = K;
  g.kq = ceil_div(K, 4);
  g.a_scale = a_scale.const_data_ptr<float>();
  g.a_scale_per_row = a_scale.numel() == g.M && g.M != 1;
  g.b_scale = b_scale.const_data_ptr<float>();
  g.bias = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  g.relu = relu;
  g.out_kind = out_kind;
  g.out = out.mutable_data_ptr();
  return g;
}

void run_gemm(const GemmArgs& g, bool a_signed, int device, cudaStream_t st) {
  if (a_signed) {
    launch_gemm<true>(g, device, st);
  } else {
    launch_gemm<false>(g, device, st);
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_activation_cuda(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& scale,
                                                            int64_t quant_min, int64_t quant_max) {
  check_quantize_activation(x, scale, quant_min, quant_max);
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor q = at::empty(x.sizes(), x.options().dtype(quant_min < 0 ? at::kChar : at::kByte));
  at::Tensor s = quantize_into(x, scale, quant_min, quant_max, q, c10::cuda::getCurrentCUDAStream());
  return {q, s};
}

at::Tensor w8a8_mm_cuda(const at::Tensor& a, const at::Tensor& b, const at::Tensor& a_scale,
                        const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                        std::optional<at::ScalarType> out_dtype, bool relu) {
  const at::ScalarType od = check_w8a8_mm(a, b, a_scale, b_scale, bias, out_dtype, relu);
  c10::cuda::CUDAGuard guard(a.device());
  const int64_t M = a.size(0), N = w8a8_mm_n(b, b_scale), K = a.size(1);
  at::Tensor out = at::empty({M, N}, a.options().dtype(od));
  if (M == 0 || N == 0) return out;
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  // A rows must start 16-byte aligned (see the header); otherwise copy into such rows.
  at::Tensor ac = a;
  const bool rows_ok = (a.stride(1) == 1 || K <= 1) && aligned16(a.const_data_ptr()) &&
                       (M == 1 || a.stride(0) % 16 == 0);
  if (!rows_ok) {
    ac = at::empty({M, ceil_div(K, 16) * 16}, a.options()).narrow(1, 0, K);
    ac.copy_(a);
  }
  const int64_t kq = ceil_div(K, 4);
  const bool packed = b.dim() == 4;  // pack_int8_weight output: the panels already
  at::Tensor panels = packed ? (aligned16(b.const_data_ptr()) ? b : b.clone())
                             : at::empty({ceil_div(N, kNB8) * kq * kNB8}, a.options().dtype(at::kInt));
  if (!packed && panels.numel() > 0) {
    pack_b_kernel<<<static_cast<unsigned>(ceil_div(panels.numel(), kThreads)), kThreads, 0, st>>>(
        static_cast<const int8_t*>(b.const_data_ptr()), b.stride(0), b.stride(1), N, K, kq,
        reinterpret_cast<uint32_t*>(panels.mutable_data_ptr<int32_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const at::Tensor as = a_scale.contiguous(), bs = b_scale.contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  const int kind = od == at::kFloat ? kOutF32 : (od == at::kBFloat16 ? kOutBF16 : kOutI32);
  GemmArgs g = make_gemm(ac, static_cast<const uint8_t*>(ac.const_data_ptr()), N, K, as, bs, bias_c, relu,
                         kind, out);
  g.b = static_cast<const uint32_t*>(panels.const_data_ptr());
  // Packed for int8 activations, the panels hold w + 128 (see w8a8_linear_cuda).
  g.b_flip = packed && a.scalar_type() == at::kChar ? 0x80808080u : 0u;
  run_gemm(g, a.scalar_type() == at::kChar, a.get_device(), st);
  return out;
}

at::Tensor w8a8_linear_cuda(const at::Tensor& x, const at::Tensor& w_packed, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& x_scale, const std::optional<at::Tensor>& bias,
                            int64_t quant_min, int64_t quant_max, bool relu) {
  const int64_t N = check_w8a8_linear(x, w_packed, w_scale, x_scale, bias, quant_min, quant_max);
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t M = x.size(0), K = x.size(1);
  at::Tensor out = at::empty({M, N}, x.options());
  if (M == 0) return out;
  const cudaStream_t st = c10::cuda::getCurrentCUDAStream();
  const bool a_signed = quant_min < 0;
  // The quantised activation goes to 16-byte aligned rows (padding never read as data).
  at::Tensor q = at::empty({M, ceil_div(K, 16) * 16}, x.options().dtype(at::kByte)).narrow(1, 0, K);
  const at::Tensor s = quantize_into(x, x_scale, quant_min, quant_max, q, st);
  // A packed weight that is a view at an odd offset is copied to aligned storage.
  const at::Tensor wp = aligned16(w_packed.const_data_ptr()) ? w_packed : w_packed.clone();
  const at::Tensor ws = w_scale.contiguous();
  std::optional<at::Tensor> bias_c;
  if (bias.has_value()) bias_c = bias->contiguous();
  GemmArgs g = make_gemm(q, static_cast<const uint8_t*>(q.const_data_ptr()), N, K, s, ws, bias_c, relu,
                         x.scalar_type() == at::kFloat ? kOutF32 : kOutBF16, out);
  g.b = static_cast<const uint32_t*>(wp.const_data_ptr());
  g.b_flip = a_signed ? 0x80808080u : 0u;  // signed activations: the panels hold w + 128
  run_gemm(g, a_signed, x.get_device(), st);
  return out;
}

}  // namespace
}  // namespace q2ext::gemm::cuda

TORCH_LIBRARY_IMPL(q2ext, CUDA, m) {
  m.impl("quantize_activation", &q2ext::gemm::cuda::quantize_activation_cuda);
  m.impl("w8a8_mm", &q2ext::gemm::cuda::w8a8_mm_cuda);
  m.impl("w8a8_linear", &q2ext::gemm::cuda::w8a8_linear_cuda);
}
