// CUDA NF4 quantize / dequantize kernels. No torch headers: raw pointers, sizes and a stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "nf4_codes.h"
#include "cuda_launchers.h"
#include "device_helpers.cuh"

namespace qlora_kernels {
namespace {

// Initialized at compile time: every device's copy of the module has them (a runtime upload reached only the
// device current at the first call, and a first call under stream capture would break the capture).
#define QK_MID(k) ((kNF4Code[k] + kNF4Code[k + 1]) / 2.0f)
__constant__ float kCode[16] = {kNF4Code[0],  kNF4Code[1],  kNF4Code[2],  kNF4Code[3],  kNF4Code[4],  kNF4Code[5],
                                kNF4Code[6],  kNF4Code[7],  kNF4Code[8],  kNF4Code[9],  kNF4Code[10], kNF4Code[11],
                                kNF4Code[12], kNF4Code[13], kNF4Code[14], kNF4Code[15]};
__constant__ float kMidpoints[15] = {QK_MID(0), QK_MID(1), QK_MID(2),  QK_MID(3),  QK_MID(4),
                                     QK_MID(5), QK_MID(6), QK_MID(7),  QK_MID(8),  QK_MID(9),
                                     QK_MID(10), QK_MID(11), QK_MID(12), QK_MID(13), QK_MID(14)};
#undef QK_MID

constexpr int kQuantThreads = 256;

// One CTA per scale block: max |x| by a shared-memory reduction, then codes for pairs of elements.
template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, int64_t n, int64_t blocksize, uint8_t* __restrict__ packed,
                                float* __restrict__ absmax) {
  __shared__ float partial[kQuantThreads];
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blocksize;
  const int64_t end = min(n, start + blocksize);
  float amax = 0.0f;
  // a NaN is kept (unlike fmaxf) so the caller can reject the input from absmax alone
  auto nan_max = [](float a, float b) { return (b > a || b != b) ? b : a; };
  for (int64_t i = start + threadIdx.x; i < end; i += blockDim.x) amax = nan_max(amax, fabsf(to_float(x[i])));
  partial[threadIdx.x] = amax;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] = nan_max(partial[threadIdx.x], partial[threadIdx.x + stride]);
    __syncthreads();
  }
  amax = partial[0];
  if (threadIdx.x == 0) absmax[blockIdx.x] = amax;
  const float inv = __frcp_rn(fmaxf(amax, kMinAbsmax));
  for (int64_t i = start + 2 * threadIdx.x; i < end; i += 2 * blockDim.x) {
    const float s0 = __fmul_rn(to_float(x[i]), inv);
    uint8_t hi = 0, lo = kNF4Zero;
    for (int k = 0; k < 15; ++k) hi += s0 > kMidpoints[k];
    if (i + 1 < end) {
      const float s1 = __fmul_rn(to_float(x[i + 1]), inv);
      lo = 0;
      for (int k = 0; k < 15; ++k) lo += s1 > kMidpoints[k];
    }
    packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
  }
}

// Each thread expands 4 packed bytes (8 outputs), read as one word (packed 4-byte aligned: the Python launcher
// copies storage viewed at an odd offset); blocksize >= 32 keeps them in one scale block.
template <typename T, bool kDoubleQuant>
__global__ void dequantize_kernel(const uint8_t* __restrict__ packed, const void* scales, const float* absmax2,
                                  const float* code2, const float* offset, int64_t n, int64_t blocksize,
                                  int64_t nested_blocksize, T* __restrict__ out) {
  const int64_t quad = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t first = quad * 8;
  if (first >= n) return;
  const float scale = block_scale<kDoubleQuant>(scales, absmax2, code2, offset, first / blocksize, nested_blocksize);
  if (first + 8 <= n) {
    const uchar4 b = *reinterpret_cast<const uchar4*>(packed + quad * 4);
    const uint8_t bytes[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[first + 2 * j] = from_float<T>(kCode[bytes[j] >> 4] * scale);
      out[first + 2 * j + 1] = from_float<T>(kCode[bytes[j] & 0xF] * scale);
    }
    return;
  }
  for (int64_t i = first; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    out[i] = from_float<T>(kCode[(i % 2 == 0) ? (byte >> 4) : (byte & 0xF)] * scale);
  }
}

template <typename T>
void launch_dequantize(const uint8_t* packed, const void* scales, const float* absmax2, const float* code2,
                       const float* offset, int64_t n, int64_t blocksize, int64_t nested_blocksize, void* out,
                       cudaStream_t stream) {
  const int threads = 256;
  const int64_t quads = (n + 7) / 8;
  const unsigned grid = static_cast<unsigned>((quads + threads - 1) / threads);
  if (absmax2 != nullptr) {
    dequantize_kernel<T, true><<<grid, threads, 0, stream>>>(packed, scales, absmax2, code2, offset, n, blocksize,
                                                             nested_blocksize, static_cast<T*>(out));
  } else {
    dequantize_kernel<T, false><<<grid, threads, 0, stream>>>(packed, scales, absmax2, code2, offset, n, blocksize,
                                                              nested_blocksize, static_cast<T*>(out));
  }
}

}  // namespace

const char* nf4_quantize_cuda(const void* x, FloatType dtype, int64_t n, int64_t blocksize, uint8_t* packed,
                              float* absmax, void* stream) {
  if (n == 0) return nullptr;
  const unsigned grid = static_cast<unsigned>((n + blocksize - 1) / blocksize);
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FloatType::kFloat32:
      quantize_kernel<<<grid, kQuantThreads, 0, s>>>(static_cast<const float*>(x), n, blocksize, packed, absmax);
      break;
    case FloatType::kFloat16:
      quantize_kernel<<<grid, kQuantThreads, 0, s>>>(static_cast<const __half*>(x), n, blocksize, packed, absmax);
      break;
    case FloatType::kBFloat16:
      quantize_kernel<<<grid, kQuantThreads, 0, s>>>(static_cast<const __nv_bfloat16*>(x), n, blocksize, packed,
                                                     absmax);
      break;
  }
  return last_launch_error();
}

const char* nf4_dequantize_cuda(const uint8_t* packed, const void* scales, const float* absmax2, const float* code2,
                                const float* offset, int64_t n, int64_t blocksize, int64_t nested_blocksize, void* out,
                                FloatType dtype, void* stream) {
  if (n == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FloatType::kFloat32:
      launch_dequantize<float>(packed, scales, absmax2, code2, offset, n, blocksize, nested_blocksize, out, s);
      break;
    case FloatType::kFloat16:
      launch_dequantize<__half>(packed, scales, absmax2, code2, offset, n, blocksize, nested_blocksize, out, s);
      break;
    case FloatType::kBFloat16:
      launch_dequantize<__nv_bfloat16>(packed, scales, absmax2, code2, offset, n, blocksize, nested_blocksize, out,
                                       s);
      break;
  }
  return last_launch_error();
}

}  // namespace qlora_kernels
