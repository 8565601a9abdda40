// NF4 quantize / dequantize on the CPU with OpenMP, in bitsandbytes' layout (see reference/nf4.py).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>

#include "nf4_codes.h"

namespace qlora_kernels {
namespace {

// Nearest NF4 code of a scaled value: the number of midpoints strictly below it (ties go down).
inline uint8_t nf4_code_of(float scaled, const float* midpoints) {
  uint8_t code = 0;
  for (int k = 0; k < 15; ++k) code += scaled > midpoints[k];
  return code;
}

template <typename T>
void quantize_blocks(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  float midpoints[15];
  for (int k = 0; k < 15; ++k) midpoints[k] = (kNF4Code[k] + kNF4Code[k + 1]) / 2.0f;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t start = b * blocksize, end = std::min(n, start + blocksize);
    float amax = 0.0f;
    for (int64_t i = start; i < end; ++i) amax = std::max(amax, std::fabs(static_cast<float>(x[i])));
    absmax[b] = amax;
    const float inv = 1.0f / std::max(amax, kMinAbsmax);
    for (int64_t i = start; i < end; i += 2) {  // start is even: blocksize is
      const uint8_t hi = nf4_code_of(static_cast<float>(x[i]) * inv, midpoints);
      const uint8_t lo = i + 1 < end ? nf4_code_of(static_cast<float>(x[i + 1]) * inv, midpoints) : kNF4Zero;
      packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
    }
  }
}

template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, T* out) {
  const int64_t nbytes = (n + 1) / 2;
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < nbytes; ++j) {
    const float scale = absmax[(2 * j) / blocksize];
    out[2 * j] = static_cast<T>(kNF4Code[packed[j] >> 4] * scale);
    if (2 * j + 1 < n) out[2 * j + 1] = static_cast<T>(kNF4Code[packed[j] & 0xF] * scale);
  }
}

}  // namespace

std::vector<torch::Tensor> nf4_quantize(const torch::Tensor& x, int64_t blocksize) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "nf4_quantize: x must be a contiguous CPU tensor");
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "nf4_quantize: blocksize must be even");
  const int64_t n = x.numel();
  auto packed = torch::empty({(n + 1) / 2}, x.options().dtype(torch::kUInt8));
  auto absmax = torch::empty({(n + blocksize - 1) / blocksize}, x.options().dtype(torch::kFloat32));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "nf4_quantize", [&] {
    quantize_blocks<scalar_t>(x.data_ptr<scalar_t>(), n, blocksize, packed.data_ptr<uint8_t>(),
                              absmax.data_ptr<float>());
  });
  return {packed, absmax};
}

void nf4_dequantize(const torch::Tensor& packed, const torch::Tensor& absmax, int64_t blocksize, torch::Tensor& out) {
  TORCH_CHECK(packed.device().is_cpu() && packed.is_contiguous() && packed.scalar_type() == torch::kUInt8,
              "nf4_dequantize: packed must be a contiguous CPU uint8 tensor");
  TORCH_CHECK(absmax.is_contiguous() && absmax.scalar_type() == torch::kFloat32, "nf4_dequantize: absmax must be fp32");
  TORCH_CHECK(out.is_contiguous() && packed.numel() == (out.numel() + 1) / 2, "nf4_dequantize: out size mismatch");
  TORCH_CHECK(absmax.numel() == (out.numel() + blocksize - 1) / blocksize, "nf4_dequantize: absmax size mismatch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "nf4_dequantize", [&] {
    dequantize_blocks<scalar_t>(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), out.numel(), blocksize,
                                out.data_ptr<scalar_t>());
  });
}

}  // namespace qlora_kernels
