// Device helpers shared by the CUDA kernels: float conversions and the NF4 block scale.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace qlora_kernels {

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<float>(float v) { return v; }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// A double-quant block scale from its parts: two roundings, no FMA, as bitsandbytes dequantizes the nested
// absmax (code2[q] * absmax2) and then adds the offset.
__device__ __forceinline__ float nested_absmax(float code2_q, float absmax2, float offset) {
  return __fadd_rn(__fmul_rn(code2_q, absmax2), offset);
}

// The fp32 scale of NF4 block `block`: absmax, or with double quant code2[q] * absmax2[block / nested] + offset.
template <bool kDoubleQuant>
__device__ __forceinline__ float block_scale(const void* scales, const float* absmax2, const float* code2,
                                             const float* offset, int64_t block, int64_t nested_blocksize) {
  if (kDoubleQuant) {
    const uint8_t q = static_cast<const uint8_t*>(scales)[block];
    return nested_absmax(code2[q], absmax2[block / nested_blocksize], *offset);
  }
  return static_cast<const float*>(scales)[block];
}

// After a <<<>>> launch: null, or the message of the error it raised (the launchers' return value).
inline const char* last_launch_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// Whether this build holds code of `kernel` that runs on `device` (the builds are SASS only, for the archs of
// QLORA_KERNELS_CUDA_ARCHS at install time): the Python side asks before taking an optional CUDA path, so a newer
// card keeps the Triton one. Host-side queries only; any error they set is cleared (the caller did not launch).
template <typename Kernel>
bool kernel_has_image(Kernel* kernel, int device) {
  int previous = 0;
  if (cudaGetDevice(&previous) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  cudaFuncAttributes attributes;
  const bool found = cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess;
  cudaGetLastError();
  cudaSetDevice(previous);
  return found;
}

}  // namespace qlora_kernels
