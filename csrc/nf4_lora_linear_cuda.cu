// CUDA decode kernel of nf4_lora_linear (one token): y = dequant(W) x + B xa + bias, reading the 4-bit weight
// once at memory speed. No torch headers: raw pointers, sizes and a stream.
//
// Why not Triton: one token uses each dequantized weight once, so the kernel is bound by the instructions per
// weight; Triton's code lookups cost ~6 (PRMT) to ~19 (select tree) instructions per value. Here the 16 code
// values sit in shared memory once per lane (lut[q][lane]: lane l always reads bank l, so a lookup is one
// conflict-free LDS), and the block scale multiplies each lane's 32-weight partial sum instead of every
// weight: W x = sum over blocks of absmax * sum(code[q] * x). About 5 instructions per weight.
#include <cuda_runtime.h>

#include "cuda_launchers.h"
#include "device_helpers.cuh"

namespace qlora_kernels {
namespace {

constexpr int kWarps = 4;             // per CTA; warp w takes the K-slices w, w + kWarps, ...
constexpr int kRows = 8;              // output rows per CTA: a lane has 8 loads of 16 bytes in flight (128 registers)
constexpr int kSlice = 32 * 32;       // weights of one K-slice: 32 lanes x 32 weights (16 bytes)

__device__ __forceinline__ void load_x32(const float* x, float (&v)[32]) {
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    const float4 f = reinterpret_cast<const float4*>(x)[i];
    v[4 * i] = f.x;
    v[4 * i + 1] = f.y;
    v[4 * i + 2] = f.z;
    v[4 * i + 3] = f.w;
  }
}

template <typename T>  // bf16 / fp16: 8 values per 16-byte load
__device__ __forceinline__ void load_x32(const T* x, float (&v)[32]) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const uint4 u = reinterpret_cast<const uint4*>(x)[i];
    const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int j = 0; j < 8; ++j) v[8 * i + j] = to_float(h[j]);
  }
}

// lut[q * 32 + lane] = code[q] sits at byte q * 128 + lane * 4: nibble p of `word` moved to bits 7..10 and
// or-ed with lane * 4 gives the byte offset in two instructions (a shift and a 3-input logic op), and the
// table's own address is the load's immediate. Lane l always reads bank l.
__device__ __forceinline__ float code_of(const float* lut, uint32_t lane4, uint32_t word, int p) {
  const int shift = 7 - 4 * p;
  const uint32_t moved = shift >= 0 ? word << shift : word >> -shift;
  return *reinterpret_cast<const float*>(reinterpret_cast<const char*>(lut) + ((moved & 0x780u) | lane4));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// x (k,), xa (r,), y (n_out,) in T; lora_b (n_out, r) strided in T; bias fp32 or null; packed row-major
// (n_out, k / 2), byte j of a row holding weights 2j (high nibble) and 2j + 1 (low nibble).
// k % 32 == 0, k % blocksize == 0, blocksize a power of two >= 32 (a lane's 32 weights share one scale), the
// nested blocksize a power of two; x and packed 16-byte aligned.
template <typename T, bool kDoubleQuant>
__global__ void __launch_bounds__(kWarps * 32)
    nf4_lora_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ packed, const void* scales,
                         const float* absmax2, const float* code2, const float* offset, const float* __restrict__ code,
                         const T* __restrict__ xa, const T* __restrict__ lora_b, int64_t stride_bn, int64_t stride_br,
                         int64_t r, const float* __restrict__ bias, T* __restrict__ y, int64_t n_out, int64_t k,
                         int log2_blocksize, int log2_nested) {
  __shared__ float lut[16 * 32];
  __shared__ float partial[kWarps][kRows];
  __shared__ float lora[kRows];
  const uint32_t lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  for (int i = threadIdx.x; i < 16 * 32; i += blockDim.x) lut[i] = code[i / 32];
  __syncthreads();

  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;
  float acc[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) acc[i] = 0.0f;
  const int64_t row_bytes = k / 2;
  const int64_t row_blocks = k >> log2_blocksize;
  const int last = static_cast<int>(min(static_cast<int64_t>(kRows), n_out - row0)) - 1;
  const float nested_offset = kDoubleQuant ? *offset : 0.0f;
  for (int64_t k0 = static_cast<int64_t>(warp) * kSlice + lane * 32; k0 < k; k0 += kWarps * kSlice) {
    float xv[32];
    load_x32(x + k0, xv);
    const uint8_t* bytes = packed + row0 * row_bytes + k0 / 2;
    const int64_t block = row0 * row_blocks + (k0 >> log2_blocksize);
    uint4 w[kRows];
    float s[kRows];
#pragma unroll
    for (int i = 0; i < kRows; ++i) {  // every row's load issued before any is used; rows past the end
      const int row = min(i, last);     // re-read the last one (no branch), their sums are never stored
      w[i] = *reinterpret_cast<const uint4*>(bytes + row * row_bytes);
      const int64_t b = block + row * row_blocks;
      if (kDoubleQuant) {  // block_scale's formula, with a shift and the offset held in a register
        s[i] = nested_absmax(code2[static_cast<const uint8_t*>(scales)[b]], absmax2[b >> log2_nested],
                             nested_offset);
      } else {
        s[i] = static_cast<const float*>(scales)[b];
      }
    }
#pragma unroll
    for (int i = 0; i < kRows; ++i) {
      const uint32_t words[4] = {w[i].x, w[i].y, w[i].z, w[i].w};
      float sum = 0.0f;
#pragma unroll
      for (int j = 0; j < 16; ++j) {  // byte j: weight 2j in its high nibble, 2j + 1 in its low one
        sum = fmaf(code_of(lut, lane * 4, words[j / 4], 2 * (j % 4) + 1), xv[2 * j], sum);
        sum = fmaf(code_of(lut, lane * 4, words[j / 4], 2 * (j % 4)), xv[2 * j + 1], sum);
      }
      acc[i] = fmaf(sum, s[i], acc[i]);
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const float v = warp_sum(acc[i]);
    if (lane == 0) partial[warp][i] = v;
  }
  for (int i = warp; i < kRows; i += kWarps) {  // LoRA: B[n] . xa, the lanes splitting r
    const int64_t n = row0 + i;
    float v = 0.0f;
    if (n < n_out) {
      for (int64_t j = lane; j < r; j += 32) {
        v = fmaf(to_float(xa[j]), to_float(lora_b[n * stride_bn + j * stride_br]), v);
      }
    }
    v = warp_sum(v);
    if (lane == 0) lora[i] = v;
  }
  __syncthreads();
  if (threadIdx.x < kRows) {
    const int64_t n = row0 + threadIdx.x;
    if (n < n_out) {
      float v = lora[threadIdx.x];
#pragma unroll
      for (int i = 0; i < kWarps; ++i) v += partial[i][threadIdx.x];
      if (bias != nullptr) v += bias[n];
      y[n] = from_float<T>(v);
    }
  }
}

template <typename T>
void launch_gemv(const void* x, const uint8_t* packed, const void* scales, const float* absmax2, const float* code2,
                 const float* offset, const float* code, const void* xa, const void* lora_b, int64_t stride_bn,
                 int64_t stride_br, int64_t r, const float* bias, void* y, int64_t n_out, int64_t k, int64_t blocksize,
                 int64_t nested_blocksize, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((n_out + kRows - 1) / kRows);
  const auto args = [&](auto kernel) {
    kernel<<<grid, kWarps * 32, 0, stream>>>(static_cast<const T*>(x), packed, scales, absmax2, code2, offset, code,
                                             static_cast<const T*>(xa), static_cast<const T*>(lora_b), stride_bn,
                                             stride_br, r, bias, static_cast<T*>(y), n_out, k,
                                             __builtin_ctzll(blocksize), __builtin_ctzll(nested_blocksize));
  };
  if (absmax2 != nullptr) {
    args(nf4_lora_gemv_kernel<T, true>);
  } else {
    args(nf4_lora_gemv_kernel<T, false>);
  }
}

}  // namespace

const char* nf4_lora_gemv_cuda(const void* x, const uint8_t* packed, const void* scales, const float* absmax2,
                               const float* code2, const float* offset, const float* code, const void* xa,
                               const void* lora_b, int64_t stride_bn, int64_t stride_br, int64_t r, const float* bias,
                               void* y, FloatType dtype, int64_t n_out, int64_t k, int64_t blocksize,
                               int64_t nested_blocksize, void* stream) {
  if (n_out == 0) return nullptr;
  auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case FloatType::kFloat32:
      launch_gemv<float>(x, packed, scales, absmax2, code2, offset, code, xa, lora_b, stride_bn, stride_br, r, bias, y,
                         n_out, k, blocksize, nested_blocksize, s);
      break;
    case FloatType::kFloat16:
      launch_gemv<__half>(x, packed, scales, absmax2, code2, offset, code, xa, lora_b, stride_bn, stride_br, r, bias,
                          y, n_out, k, blocksize, nested_blocksize, s);
      break;
    case FloatType::kBFloat16:
      launch_gemv<__nv_bfloat16>(x, packed, scales, absmax2, code2, offset, code, xa, lora_b, stride_bn, stride_br, r,
                                 bias, y, n_out, k, blocksize, nested_blocksize, s);
      break;
  }
  return last_launch_error();
}

bool nf4_lora_gemv_cuda_has_image(int device) {
  return kernel_has_image(nf4_lora_gemv_kernel<float, false>, device);
}

}  // namespace qlora_kernels
