// Launchers of the CUDA NF4 kernels: raw pointers, sizes and a cudaStream_t passed as void*, so the
// binding can call them without CUDA headers and the .cu needs no torch headers.
#pragma once
#include <cstdint>

namespace qlora_kernels {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// x (n,) -> packed (ceil(n/2),), absmax (ceil(n/blocksize),) fp32.
void nf4_quantize_cuda(const void* x, FloatType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                       float* absmax, void* stream);

// packed -> out (n,) in dtype. Plain scales: `scales` is fp32 absmax and absmax2/code2/offset are null.
// Double quant: `scales` is the uint8 codes, scale = code2[q] * absmax2[b / nested_blocksize] + *offset.
void nf4_dequantize_cuda(const uint8_t* packed, const void* scales, const float* absmax2, const float* code2,
                         const float* offset, int64_t n, int64_t blocksize, int64_t nested_blocksize, void* out,
                         FloatType dtype, void* stream);

}  // namespace qlora_kernels
