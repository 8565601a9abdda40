// Launchers of the CUDA kernels: raw pointers, sizes and a cudaStream_t passed as void*, so the
// binding can call them without CUDA headers and the .cu needs no torch headers.
#pragma once
#include <cstdint>

namespace qlora_kernels {

enum class FloatType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Each launcher returns null, or the launch error's message (bad configuration, no kernel image for the
// card, ...): the binding raises it at once instead of leaving the output unwritten.

// x (n,) -> packed (ceil(n/2),), absmax (ceil(n/blocksize),) fp32.
const char* nf4_quantize_cuda(const void* x, FloatType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                              float* absmax, void* stream);

// packed -> out (n,) in dtype. Plain scales: `scales` is fp32 absmax and absmax2/code2/offset are null.
// Double quant: `scales` is the uint8 codes, scale = code2[q] * absmax2[b / nested_blocksize] + *offset.
const char* nf4_dequantize_cuda(const uint8_t* packed, const void* scales, const float* absmax2, const float* code2,
                                const float* offset, int64_t n, int64_t blocksize, int64_t nested_blocksize, void* out,
                                FloatType dtype, void* stream);

// Decode (one token) of nf4_lora_linear: y (n_out,) = dequant(W) x + lora_b xa + bias, with x (k,), xa (r,),
// lora_b (n_out, r) at the given strides and y all in dtype, bias fp32 or null; scales as for dequantize;
// code the 16 fp32 NF4 values. k % 32 == 0, k % blocksize == 0, blocksize and nested_blocksize powers of
// two, blocksize >= 32; x, packed 16-byte aligned.
const char* nf4_lora_gemv_cuda(const void* x, const uint8_t* packed, const void* scales, const float* absmax2,
                               const float* code2, const float* offset, const float* code, const void* xa,
                               const void* lora_b, int64_t stride_bn, int64_t stride_br, int64_t r, const float* bias,
                               void* y, FloatType dtype, int64_t n_out, int64_t k, int64_t blocksize,
                               int64_t nested_blocksize, void* stream);

// Whether this build holds code of the decode kernel that runs on `device` (its archs: QLORA_KERNELS_CUDA_ARCHS
// at install time, SASS only): the default decode path asks before taking it (e.g. no image for sm_100).
bool nf4_lora_gemv_cuda_has_image(int device);

// Cross-entropy of rows of logits (n_rows, V) at stride_row, one row per cluster of up to 8 CTAs (sm_90+):
// loss and lse (n_rows,) fp32, and when grad is not null the gradient of the summed loss (times
// 1 / max(*count, 1) when mean) into grad (may equal logits) at grad_stride_row; ignored rows get loss 0,
// lse 0 and (write_ignored) a zero gradient. cap > 0: softcap. V and both strides multiples of a 16-byte
// vector, pointers 16-byte aligned, V / vector <= kCrossEntropyMaxVectors. Returns null, or the launch
// error's message (a cluster launch can be refused, e.g. under MIG).
constexpr int64_t kCrossEntropyMaxVectors = 8 * 256 * 16;
const char* cross_entropy_cluster_cuda(const void* logits, void* grad, FloatType dtype, const int64_t* labels,
                                       float* loss, float* lse, const int32_t* count, int64_t n_rows, int64_t V,
                                       int64_t stride_row, int64_t grad_stride_row, int64_t ignore_index,
                                       float smoothing, float z_loss, float cap, bool mean, bool write_ignored,
                                       void* stream);

// Whether this build holds code of the cluster kernel for `device` (an sm_80-only build, or a newer card, does
// not: the Python side then keeps the split path).
bool cross_entropy_cluster_cuda_has_image(int device);

}  // namespace qlora_kernels
