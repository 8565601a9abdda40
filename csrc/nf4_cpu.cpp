// NF4 quantize / dequantize on the CPU with OpenMP, in bitsandbytes' layout (see reference/nf4.py).
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "nf4_codes.h"

namespace qlora_kernels {
namespace {

constexpr int64_t kMaxBlocksize = 4096;

// absmax[b] = max |x| over the block (NaN when the block holds a NaN, so callers can reject it);
// code = the number of midpoints strictly below x / absmax (nearest code, ties go down). Loops are laid out
// so the compiler vectorizes them: one pass per midpoint over the whole block.
template <typename T>
void quantize_blocks(const T* x, int64_t n, int64_t blocksize, uint8_t* packed, float* absmax) {
  float midpoints[15];
  for (int k = 0; k < 15; ++k) midpoints[k] = (kNF4Code[k] + kNF4Code[k + 1]) / 2.0f;
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    alignas(64) float scaled[kMaxBlocksize];
    alignas(64) uint8_t codes[kMaxBlocksize];
    const int64_t start = b * blocksize, len = std::min(n, start + blocksize) - start;
    float amax = 0.0f;
    bool has_nan = false;
    for (int64_t i = 0; i < len; ++i) {
      scaled[i] = static_cast<float>(x[start + i]);
      const float a = std::fabs(scaled[i]);
      amax = a > amax ? a : amax;
      has_nan |= a != a;
    }
    absmax[b] = has_nan ? NAN : amax;
    const float inv = 1.0f / std::max(amax, kMinAbsmax);
    for (int64_t i = 0; i < len; ++i) {
      scaled[i] *= inv;
      codes[i] = 0;
    }
    for (int k = 0; k < 15; ++k)
      for (int64_t i = 0; i < len; ++i) codes[i] += scaled[i] > midpoints[k];
    if (len % 2) codes[len] = kNF4Zero;  // only the last block of an odd-sized tensor
    for (int64_t j = 0; j < (len + 1) / 2; ++j)
      packed[start / 2 + j] = static_cast<uint8_t>((codes[2 * j] << 4) | codes[2 * j + 1]);
  }
}

#if defined(__x86_64__) && defined(__GNUC__)
// 16-bit outputs, 64 per step: the 16-entry table split into low and high bytes, looked up with pshufb.
// Returns how many leading bytes of `bytes` it expanded (a multiple of 32).
__attribute__((target("avx2"))) int64_t expand_avx2(const uint8_t* bytes, int64_t nbytes, const uint16_t* table,
                                                   uint16_t* dst) {
  alignas(16) uint8_t low[16], high[16];
  for (int k = 0; k < 16; ++k) {
    low[k] = static_cast<uint8_t>(table[k]);
    high[k] = static_cast<uint8_t>(table[k] >> 8);
  }
  const __m256i tab_lo = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(low)));
  const __m256i tab_hi = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(high)));
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  int64_t j = 0;
  for (; j + 32 <= nbytes; j += 32) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(bytes + j));
    const __m256i even = _mm256_and_si256(_mm256_srli_epi16(b, 4), nibble);  // element 2i: high nibble
    const __m256i odd = _mm256_and_si256(b, nibble);
    // codes in element order, per 128-bit lane; the permutes put the lanes back in order
    const __m256i c_lo = _mm256_unpacklo_epi8(even, odd), c_hi = _mm256_unpackhi_epi8(even, odd);
    const __m256i codes[2] = {_mm256_permute2x128_si256(c_lo, c_hi, 0x20), _mm256_permute2x128_si256(c_lo, c_hi, 0x31)};
    for (int h = 0; h < 2; ++h) {
      const __m256i lo = _mm256_shuffle_epi8(tab_lo, codes[h]), hi = _mm256_shuffle_epi8(tab_hi, codes[h]);
      const __m256i v0 = _mm256_unpacklo_epi8(lo, hi), v1 = _mm256_unpackhi_epi8(lo, hi);
      __m256i* o = reinterpret_cast<__m256i*>(dst + 2 * j + 32 * h);
      _mm256_storeu_si256(o, _mm256_permute2x128_si256(v0, v1, 0x20));
      _mm256_storeu_si256(o + 1, _mm256_permute2x128_si256(v0, v1, 0x31));
    }
  }
  return j;
}
#define QK_HAVE_AVX2_DEQUANT 1
#endif

// Per block, the 16 possible outputs are computed once (code * scale, rounded to T): the same single
// rounding as per element, then every byte is two table reads (pshufb on AVX2 for 16-bit outputs).
template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* absmax, int64_t n, int64_t blocksize, T* out) {
  const int64_t nblocks = (n + blocksize - 1) / blocksize;
#ifdef QK_HAVE_AVX2_DEQUANT
  static const bool avx2 = __builtin_cpu_supports("avx2");
#endif
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < nblocks; ++b) {
    T table[16];
    for (int k = 0; k < 16; ++k) table[k] = static_cast<T>(kNF4Code[k] * absmax[b]);
    const int64_t start = b * blocksize, len = std::min(n, start + blocksize) - start;
    const uint8_t* bytes = packed + start / 2;  // start is even: blocksize is
    T* dst = out + start;
    int64_t j = 0;
#ifdef QK_HAVE_AVX2_DEQUANT
    if constexpr (sizeof(T) == 2) {
      if (avx2) j = expand_avx2(bytes, len / 2, reinterpret_cast<const uint16_t*>(table), reinterpret_cast<uint16_t*>(dst));
    }
#endif
    for (; j < len / 2; ++j) {
      dst[2 * j] = table[bytes[j] >> 4];
      dst[2 * j + 1] = table[bytes[j] & 0xF];
    }
    if (len % 2) dst[len - 1] = table[bytes[len / 2] >> 4];
  }
}

}  // namespace

std::vector<torch::Tensor> nf4_quantize(const torch::Tensor& x, int64_t blocksize) {
  TORCH_CHECK(x.device().is_cpu() && x.is_contiguous(), "nf4_quantize: x must be a contiguous CPU tensor");
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0 && blocksize <= kMaxBlocksize,
              "nf4_quantize: blocksize must be even and at most ", kMaxBlocksize);
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
  TORCH_CHECK(blocksize > 0 && blocksize % 2 == 0, "nf4_dequantize: blocksize must be even and positive, got ",
              blocksize);
  TORCH_CHECK(absmax.device().is_cpu() && absmax.is_contiguous() && absmax.scalar_type() == torch::kFloat32,
              "nf4_dequantize: absmax must be a contiguous CPU fp32 tensor");
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && packed.numel() == (out.numel() + 1) / 2,
              "nf4_dequantize: out must be a contiguous CPU tensor of the packed size");
  TORCH_CHECK(absmax.numel() == (out.numel() + blocksize - 1) / blocksize, "nf4_dequantize: absmax size mismatch");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "nf4_dequantize", [&] {
    dequantize_blocks<scalar_t>(packed.data_ptr<uint8_t>(), absmax.data_ptr<float>(), out.numel(), blocksize,
                                out.data_ptr<scalar_t>());
  });
}

}  // namespace qlora_kernels
