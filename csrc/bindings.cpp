// The one Python binding of qlora_kernels._C: CPU kernels always, CUDA launchers when built WITH_CUDA.
#include <torch/extension.h>

#include "cuda_launchers.h"

namespace qlora_kernels {

std::vector<torch::Tensor> nf4_quantize(const torch::Tensor& x, int64_t blocksize);
void nf4_dequantize(const torch::Tensor& packed, const torch::Tensor& absmax, int64_t blocksize, torch::Tensor& out);
torch::Tensor adamw_grad_stats_cpu(const std::vector<torch::Tensor>& grads);
void adamw_step_cpu(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                    const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                    const std::vector<torch::Tensor>& max_exp_avg_sqs, const std::vector<torch::Tensor>& steps,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                    bool maximize, double grad_scale, bool stochastic_rounding, int64_t seed);

#ifdef WITH_CUDA
namespace {

FloatType float_type(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat32: return FloatType::kFloat32;
    case torch::kFloat16: return FloatType::kFloat16;
    case torch::kBFloat16: return FloatType::kBFloat16;
    default: TORCH_CHECK(false, "expected a float32/float16/bfloat16 tensor, got ", t.scalar_type());
  }
}

void check_cuda(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
}

// stream: torch.cuda.current_stream().cuda_stream, passed from Python (no CUDA torch headers needed here)
void nf4_quantize_cuda_binding(const torch::Tensor& x, torch::Tensor& packed, torch::Tensor& absmax,
                               int64_t blocksize, int64_t stream) {
  check_cuda(x, "x");
  check_cuda(packed, "packed");
  check_cuda(absmax, "absmax");
  const char* err = nf4_quantize_cuda(x.data_ptr(), float_type(x), x.numel(), blocksize, packed.data_ptr<uint8_t>(),
                                      absmax.data_ptr<float>(), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "nf4_quantize_cuda: launch failed: ", err);
}

void nf4_dequantize_cuda_binding(const torch::Tensor& packed, const torch::Tensor& scales,
                                 const std::optional<torch::Tensor>& absmax2, const std::optional<torch::Tensor>& code2,
                                 const std::optional<torch::Tensor>& offset, torch::Tensor& out, int64_t blocksize,
                                 int64_t nested_blocksize, int64_t stream) {
  check_cuda(packed, "packed");
  check_cuda(scales, "scales");
  check_cuda(out, "out");
  const bool nested = absmax2.has_value();
  TORCH_CHECK(nested == (scales.scalar_type() == torch::kUInt8), "scales must be uint8 exactly when nested");
  const char* err = nf4_dequantize_cuda(
      packed.data_ptr<uint8_t>(), scales.data_ptr(), nested ? absmax2->data_ptr<float>() : nullptr,
      nested ? code2->data_ptr<float>() : nullptr, nested ? offset->data_ptr<float>() : nullptr, out.numel(),
      blocksize, nested_blocksize, out.data_ptr(), float_type(out), reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "nf4_dequantize_cuda: launch failed: ", err);
}

bool power_of_two(int64_t v) { return v > 0 && (v & (v - 1)) == 0; }

// One token of nf4_lora_linear: y (1, out) = x (1, in) @ dequant(W).T + xa (1, r) @ lora_B.T + bias (fp32).
void nf4_lora_gemv_cuda_binding(const torch::Tensor& x, const torch::Tensor& packed, const torch::Tensor& scales,
                                const std::optional<torch::Tensor>& absmax2, const std::optional<torch::Tensor>& code2,
                                const std::optional<torch::Tensor>& offset, const torch::Tensor& code,
                                const torch::Tensor& xa, const torch::Tensor& lora_B,
                                const std::optional<torch::Tensor>& bias, torch::Tensor& y, int64_t blocksize,
                                int64_t nested_blocksize, int64_t stream) {
  check_cuda(x, "x");
  check_cuda(packed, "packed");
  check_cuda(scales, "scales");
  check_cuda(code, "code");
  check_cuda(xa, "xa");
  check_cuda(y, "y");
  TORCH_CHECK(lora_B.is_cuda() && lora_B.dim() == 2, "lora_B must be a 2-D CUDA tensor");
  TORCH_CHECK(x.dim() == 2 && x.size(0) == 1 && y.dim() == 2 && y.size(0) == 1, "one token: x (1, in), y (1, out)");
  const int64_t k = x.size(1), n = y.size(1), r = xa.numel();
  TORCH_CHECK(k % 32 == 0 && blocksize >= 32 && power_of_two(blocksize) && k % blocksize == 0,
              "in_features must be a multiple of 32 and of blocksize, a power of two >= 32; got ", k, ", ", blocksize);
  TORCH_CHECK(packed.numel() == n * k / 2 && scales.numel() == n * k / blocksize, "packed / scales sizes");
  TORCH_CHECK(lora_B.size(0) == n && lora_B.size(1) == r, "lora_B must be (out, r)");
  TORCH_CHECK(xa.scalar_type() == x.scalar_type() && lora_B.scalar_type() == x.scalar_type() &&
                  y.scalar_type() == x.scalar_type(), "x, xa, lora_B and y must share a dtype");
  TORCH_CHECK(code.scalar_type() == torch::kFloat32 && code.numel() == 16, "code must be the 16 fp32 NF4 values");
  const auto aligned = [](const torch::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; };
  TORCH_CHECK(aligned(x) && aligned(packed), "x and packed must be 16-byte aligned");
  const bool nested = absmax2.has_value();
  TORCH_CHECK(nested == (scales.scalar_type() == torch::kUInt8), "scales must be uint8 exactly when nested");
  TORCH_CHECK(!nested || (code2.has_value() && offset.has_value() && power_of_two(nested_blocksize)),
              "double quant needs code2, offset and a power-of-two nested blocksize");
  if (bias.has_value()) {
    check_cuda(*bias, "bias");
    TORCH_CHECK(bias->scalar_type() == torch::kFloat32 && bias->numel() == n, "bias must be fp32 (out,)");
  }
  const char* err = nf4_lora_gemv_cuda(
      x.data_ptr(), packed.data_ptr<uint8_t>(), scales.data_ptr(), nested ? absmax2->data_ptr<float>() : nullptr,
      nested ? code2->data_ptr<float>() : nullptr, nested ? offset->data_ptr<float>() : nullptr,
      code.data_ptr<float>(), xa.data_ptr(), lora_B.data_ptr(), lora_B.stride(0), lora_B.stride(1), r,
      bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr(), float_type(x), n, k, blocksize,
      nested_blocksize, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "nf4_lora_gemv_cuda: launch failed: ", err);
}

// Cross-entropy rows of logits (N, V) (rows at any stride, columns contiguous): loss, lse (N,) fp32 and, when
// grad (N, V) is given (it may be logits itself), the gradient of the summed loss, / max(count, 1) when mean.
void cross_entropy_cluster_cuda_binding(const torch::Tensor& logits, const std::optional<torch::Tensor>& grad,
                                        const torch::Tensor& labels, torch::Tensor& loss, torch::Tensor& lse,
                                        const torch::Tensor& count, int64_t ignore_index, double smoothing,
                                        double z_loss, double softcap, bool mean, bool write_ignored, int64_t stream) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1, "logits must be (N, V) on CUDA with "
              "contiguous columns");
  const int64_t n = logits.size(0), V = logits.size(1), pack = 16 / logits.element_size();
  const auto aligned = [&](const torch::Tensor& t) {
    return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && (t.size(0) < 2 || t.stride(0) % pack == 0);
  };
  TORCH_CHECK(V > 0 && V % pack == 0 && V / pack <= kCrossEntropyMaxVectors && aligned(logits), "logits: V must be a "
              "multiple of ", pack, " and at most ", kCrossEntropyMaxVectors * pack, ", rows 16-byte aligned");
  if (grad.has_value()) {
    TORCH_CHECK(grad->is_cuda() && grad->sizes() == logits.sizes() && grad->stride(1) == 1 &&
                    grad->scalar_type() == logits.scalar_type() && aligned(*grad),
                "grad must be like logits, rows 16-byte aligned");
  }
  check_cuda(labels, "labels");
  check_cuda(loss, "loss");
  check_cuda(lse, "lse");
  check_cuda(count, "count");
  TORCH_CHECK(labels.scalar_type() == torch::kInt64 && labels.numel() == n, "labels must be int64 (N,)");
  TORCH_CHECK(loss.scalar_type() == torch::kFloat32 && loss.numel() == n && lse.scalar_type() == torch::kFloat32 &&
                  lse.numel() == n, "loss and lse must be fp32 (N,)");
  TORCH_CHECK(count.scalar_type() == torch::kInt32 && count.numel() == 1, "count must be one int32");
  const char* err = cross_entropy_cluster_cuda(
      logits.data_ptr(), grad.has_value() ? grad->data_ptr() : nullptr, float_type(logits), labels.data_ptr<int64_t>(),
      loss.data_ptr<float>(), lse.data_ptr<float>(), count.data_ptr<int32_t>(), n, V, logits.stride(0),
      grad.has_value() ? grad->stride(0) : 0, ignore_index, static_cast<float>(smoothing), static_cast<float>(z_loss),
      static_cast<float>(softcap), mean, write_ignored, reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == nullptr, "cross_entropy_cluster_cuda: launch failed: ", err);
}

}  // namespace
#endif

}  // namespace qlora_kernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qlora_kernels native kernels (CPU with OpenMP; CUDA when built with it)";
  m.def("nf4_quantize", &qlora_kernels::nf4_quantize, "NF4 quantize (CPU): x -> [packed, absmax]");
  m.def("nf4_dequantize", &qlora_kernels::nf4_dequantize, "NF4 dequantize (CPU) into out");
  m.def("adamw_grad_stats_cpu", &qlora_kernels::adamw_grad_stats_cpu, "AdamW (CPU): [sum of squares, non-finite count] of grads");
  m.def("adamw_step_cpu", &qlora_kernels::adamw_step_cpu, "AdamW (CPU): one step over a list of tensors");
#ifdef WITH_CUDA
  m.def("nf4_quantize_cuda", &qlora_kernels::nf4_quantize_cuda_binding, "NF4 quantize (CUDA)");
  m.def("nf4_dequantize_cuda", &qlora_kernels::nf4_dequantize_cuda_binding, "NF4 dequantize (CUDA)");
  m.def("nf4_lora_gemv_cuda", &qlora_kernels::nf4_lora_gemv_cuda_binding, "NF4 + LoRA linear, one token (CUDA)");
  m.def("nf4_lora_gemv_cuda_has_image", [](int64_t device) {
    return qlora_kernels::nf4_lora_gemv_cuda_has_image(static_cast<int>(device));
  }, "whether the one-token CUDA kernel was built for this device's architecture");
  m.def("cross_entropy_cluster_cuda", &qlora_kernels::cross_entropy_cluster_cuda_binding,
        "cross-entropy, one row per thread-block cluster (CUDA, sm_90+)");
  m.def("cross_entropy_cluster_cuda_has_image", [](int64_t device) {
    return qlora_kernels::cross_entropy_cluster_cuda_has_image(static_cast<int>(device));
  }, "whether the cluster cross-entropy kernel was built for this device's architecture");
#endif
  m.attr("with_cuda") =
#ifdef WITH_CUDA
      true;
#else
      false;
#endif
}
