// FusedAdamW on the CPU with OpenMP: one call updates every tensor of a param group (see
// qlora_kernels/reference/adamw.py for the math; IEEE sqrt/div and true fmas, like the Triton kernel).
//
// Work is cut into chunks of kChunk elements across all tensors and spread over the threads. The fp32
// core has an AVX2+FMA path picked at run time (setup.py builds with plain -O3) and a scalar one.
// bf16/fp16 params go through fp32 scratch chunks.
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define QK_MULTIVERSION __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QK_MULTIVERSION
#endif

namespace qlora_kernels {
namespace {

constexpr int64_t kChunk = 16384;

struct Hyper {
  float decay, lerp_coef, one_minus_b2, beta2, eps, grad_scale;
  bool lerp_from_m;   // torch's lerp(m, g, w): fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
  bool amsgrad;
};

// p *= decay; m = lerp(m, g, 1-b1); v = fma((1-b2) g, g, v b2); p += (step_size m) / (sqrt(v)/bc2_sqrt + eps)
// amsgrad: vmax = max(vmax, v) (NaN propagates, as torch.maximum), used in place of v.
inline void adamw_scalar(float* p, const float* g, float* m, float* v, float* vmax, int64_t i, const Hyper& h,
                         float step_size, float bc2_sqrt) {
  const float gi = g[i] * h.grad_scale;
  const float pi = p[i] * h.decay;
  const float mi = std::fma(h.lerp_coef, gi - m[i], h.lerp_from_m ? m[i] : gi);
  float vi = std::fma(h.one_minus_b2 * gi, gi, v[i] * h.beta2);
  m[i] = mi;
  v[i] = vi;
  if (h.amsgrad) {
    vi = (std::isnan(vi) || std::isnan(vmax[i])) ? vi + vmax[i] : std::max(vmax[i], vi);
    vmax[i] = vi;
  }
  p[i] = pi + (step_size * mi) / (std::sqrt(vi) / bc2_sqrt + h.eps);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define QK_HAVE_AVX2 1
// AVX2 + FMA by hand: GCC will not vectorize std::sqrt without -fno-math-errno, which setup.py does not pass
// (and the optimize pragma/attribute does not set). Same operations, same order, same IEEE results.
__attribute__((target("avx2,fma"))) void adamw_avx2(float* p, const float* g, float* m, float* v, float* vmax,
                                                    int64_t n, Hyper h, float step_size, float bc2_sqrt) {
  const __m256 decay = _mm256_set1_ps(h.decay), coef = _mm256_set1_ps(h.lerp_coef),
               omb2 = _mm256_set1_ps(h.one_minus_b2), b2 = _mm256_set1_ps(h.beta2), eps = _mm256_set1_ps(h.eps),
               scale = _mm256_set1_ps(h.grad_scale), ss = _mm256_set1_ps(step_size), bc2 = _mm256_set1_ps(bc2_sqrt);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 gi = _mm256_mul_ps(_mm256_loadu_ps(g + i), scale);
    const __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
    const __m256 m0 = _mm256_loadu_ps(m + i);
    const __m256 mi = _mm256_fmadd_ps(coef, _mm256_sub_ps(gi, m0), h.lerp_from_m ? m0 : gi);
    __m256 vi = _mm256_fmadd_ps(_mm256_mul_ps(omb2, gi), gi, _mm256_mul_ps(_mm256_loadu_ps(v + i), b2));
    _mm256_storeu_ps(m + i, mi);
    _mm256_storeu_ps(v + i, vi);
    if (h.amsgrad) {
      const __m256 vm = _mm256_loadu_ps(vmax + i);
      const __m256 nan = _mm256_or_ps(_mm256_cmp_ps(vi, vi, _CMP_UNORD_Q), _mm256_cmp_ps(vm, vm, _CMP_UNORD_Q));
      vi = _mm256_blendv_ps(_mm256_max_ps(vm, vi), _mm256_add_ps(vi, vm), nan);
      _mm256_storeu_ps(vmax + i, vi);
    }
    const __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2), eps);
    _mm256_storeu_ps(p + i, _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(ss, mi), denom)));
  }
  for (; i < n; ++i) adamw_scalar(p, g, m, v, vmax, i, h, step_size, bc2_sqrt);
}
#endif

void adamw_core(float* p, const float* g, float* m, float* v, float* vmax, int64_t n, const Hyper& h,
                float step_size, float bc2_sqrt) {
#ifdef QK_HAVE_AVX2
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (avx2) {
    adamw_avx2(p, g, m, v, vmax, n, h, step_size, bc2_sqrt);
    return;
  }
#endif
  for (int64_t i = 0; i < n; ++i) adamw_scalar(p, g, m, v, vmax, i, h, step_size, bc2_sqrt);
}

QK_MULTIVERSION
void sumsq_core(const float* __restrict g, int64_t n, double* sumsq, double* bad) {
  double s = 0.0, b = 0.0;
#pragma omp simd reduction(+ : s, b)
  for (int64_t i = 0; i < n; ++i) {
    s += static_cast<double>(g[i]) * static_cast<double>(g[i]);
    b += __builtin_isfinite(g[i]) ? 0.0 : 1.0;
  }
  *sumsq = s;
  *bad = b;
}

inline uint64_t mix64(uint64_t x) {  // splitmix64 finalizer
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

inline uint16_t bf16_stochastic(float x, uint64_t random) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  if (std::isnan(x)) return 0x7FC0;
  return static_cast<uint16_t>((bits + static_cast<uint32_t>(random & 0xFFFF)) >> 16);
}

template <typename T>
void to_f32(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

struct Work {
  int64_t tensor, start, len;
};

std::vector<Work> cut(const std::vector<torch::Tensor>& tensors) {
  std::vector<Work> work;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t)
    for (int64_t s = 0; s < tensors[t].numel(); s += kChunk)
      work.push_back({t, s, std::min(kChunk, tensors[t].numel() - s)});
  return work;
}

// The loops walk each tensor's storage flat: any dense layout works when every operand shares the param's.
bool same_dense_layout(const torch::Tensor& t, const torch::Tensor& like) {
  if (t.numel() == 0) return true;
  if (!t.is_non_overlapping_and_dense() || t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < t.dim(); ++d)
    if (t.size(d) != 1 && t.stride(d) != like.stride(d)) return false;
  return true;
}

void check_list(const std::vector<torch::Tensor>& ts, size_t n, const char* name, torch::ScalarType dtype,
                const std::vector<torch::Tensor>& like) {
  TORCH_CHECK(ts.size() == n, "adamw_step_cpu: ", name, " has ", ts.size(), " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(ts[i].device().is_cpu() && ts[i].scalar_type() == dtype,
                "adamw_step_cpu: ", name, "[", i, "] must be a CPU ", dtype, " tensor");
    TORCH_CHECK(same_dense_layout(ts[i], like[i]), "adamw_step_cpu: ", name, "[", i,
                "] must have its param's shape and strides");
  }
}

}  // namespace

// fp64 tensor [sum of squares, number of non-finite values] over every gradient.
torch::Tensor adamw_grad_stats_cpu(const std::vector<torch::Tensor>& grads) {
  // every check before the parallel region: an exception thrown inside it terminates the process
  for (const auto& g : grads) {
    TORCH_CHECK(g.device().is_cpu() && !g.is_sparse() && (g.numel() == 0 || g.is_non_overlapping_and_dense()),
                "adamw_grad_stats_cpu: grads must be dense CPU tensors without gaps");
    const auto dt = g.scalar_type();
    TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
                "adamw_grad_stats_cpu: grads must be float32, bfloat16 or float16, got ", dt);
  }
  const auto work = cut(grads);
  std::vector<double> partial(2 * work.size());
#pragma omp parallel
  {
    std::vector<float> scratch(kChunk);
#pragma omp for schedule(static)
    for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
      const auto& job = work[w];
      const auto& g = grads[job.tensor];
      const float* src;
      if (g.scalar_type() == torch::kFloat32) {
        src = g.data_ptr<float>() + job.start;
      } else if (g.scalar_type() == torch::kBFloat16) {
        to_f32(g.data_ptr<at::BFloat16>() + job.start, scratch.data(), job.len);
        src = scratch.data();
      } else {  // float16 (checked above)
        to_f32(g.data_ptr<at::Half>() + job.start, scratch.data(), job.len);
        src = scratch.data();
      }
      sumsq_core(src, job.len, &partial[2 * w], &partial[2 * w + 1]);
    }
  }
  double sumsq = 0.0, bad = 0.0;
  for (size_t w = 0; w < work.size(); ++w) {  // fixed order: deterministic
    sumsq += partial[2 * w];
    bad += partial[2 * w + 1];
  }
  auto out = torch::empty({2}, torch::TensorOptions().dtype(torch::kFloat64));
  out[0] = sumsq;
  out[1] = bad;
  return out;
}

// One AdamW step over every tensor of a param group; `steps` (0-d fp32) are advanced first, as torch does.
void adamw_step_cpu(const std::vector<torch::Tensor>& params, const std::vector<torch::Tensor>& grads,
                    const std::vector<torch::Tensor>& exp_avgs, const std::vector<torch::Tensor>& exp_avg_sqs,
                    const std::vector<torch::Tensor>& max_exp_avg_sqs, const std::vector<torch::Tensor>& steps,
                    double lr, double beta1, double beta2, double eps, double weight_decay, bool amsgrad,
                    bool maximize, double grad_scale, bool stochastic_rounding, int64_t seed) {
  const size_t n = params.size();
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(params[i].device().is_cpu() && same_dense_layout(params[i], params[i]), "adamw_step_cpu: params[",
                i, "] must be a CPU tensor covering its storage without gaps");
    const auto dt = params[i].scalar_type();
    TORCH_CHECK(dt == torch::kFloat32 || dt == torch::kBFloat16 || dt == torch::kFloat16,
                "adamw_step_cpu: params must be float32, bfloat16 or float16, got ", dt);
  }
  TORCH_CHECK(grads.size() == n, "adamw_step_cpu: grads has ", grads.size(), " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i)
    TORCH_CHECK(grads[i].device().is_cpu() && !grads[i].is_sparse() &&
                    grads[i].scalar_type() == params[i].scalar_type() && same_dense_layout(grads[i], params[i]),
                "adamw_step_cpu: grads[", i, "] must be a dense CPU tensor with its param's dtype, shape and strides");
  check_list(exp_avgs, n, "exp_avgs", torch::kFloat32, params);
  check_list(exp_avg_sqs, n, "exp_avg_sqs", torch::kFloat32, params);
  if (amsgrad) check_list(max_exp_avg_sqs, n, "max_exp_avg_sqs", torch::kFloat32, params);
  TORCH_CHECK(steps.size() == n, "adamw_step_cpu: steps has ", steps.size(), " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i)   // all of them before any is advanced: a refused call changes nothing
    TORCH_CHECK(steps[i].device().is_cpu() && steps[i].scalar_type() == torch::kFloat32 && steps[i].numel() == 1,
                "adamw_step_cpu: steps[", i, "] must be a 0-d float32 CPU tensor");

  Hyper h;
  h.decay = static_cast<float>(1.0 - lr * weight_decay);
  const float one_minus_b1 = static_cast<float>(1.0 - beta1);
  h.lerp_from_m = one_minus_b1 < 0.5f;
  h.lerp_coef = h.lerp_from_m ? one_minus_b1 : one_minus_b1 - 1.f;
  h.one_minus_b2 = static_cast<float>(1.0 - beta2);
  h.beta2 = static_cast<float>(beta2);
  h.eps = static_cast<float>(eps);
  // maximize: -(g * scale) == g * (-scale) exactly
  h.grad_scale = maximize ? -static_cast<float>(grad_scale) : static_cast<float>(grad_scale);
  h.amsgrad = amsgrad;
  std::vector<float> step_size(n), bc2_sqrt(n);
  for (size_t i = 0; i < n; ++i) {
    float* s = steps[i].data_ptr<float>();
    *s += 1.0f;
    const double t = *s;
    step_size[i] = static_cast<float>(-(lr / (1.0 - std::pow(beta1, t))));  // as torch: in double, then fp32
    bc2_sqrt[i] = static_cast<float>(std::pow(1.0 - std::pow(beta2, t), 0.5));
  }

  const auto work = cut(params);
#pragma omp parallel
  {
    std::vector<float> pbuf, gbuf;
#pragma omp for schedule(static)
    for (int64_t w = 0; w < static_cast<int64_t>(work.size()); ++w) {
      const auto& job = work[w];
      const auto t = job.tensor;
      float* m = exp_avgs[t].data_ptr<float>() + job.start;
      float* v = exp_avg_sqs[t].data_ptr<float>() + job.start;
      float* vmax = amsgrad ? max_exp_avg_sqs[t].data_ptr<float>() + job.start : nullptr;
      const auto dt = params[t].scalar_type();
      if (dt == torch::kFloat32) {
        adamw_core(params[t].data_ptr<float>() + job.start, grads[t].data_ptr<float>() + job.start, m, v, vmax,
                   job.len, h, step_size[t], bc2_sqrt[t]);
        continue;
      }
      pbuf.resize(kChunk);
      gbuf.resize(kChunk);
      if (dt == torch::kBFloat16) {
        auto* p = params[t].data_ptr<at::BFloat16>() + job.start;
        to_f32(p, pbuf.data(), job.len);
        to_f32(grads[t].data_ptr<at::BFloat16>() + job.start, gbuf.data(), job.len);
        adamw_core(pbuf.data(), gbuf.data(), m, v, vmax, job.len, h, step_size[t], bc2_sqrt[t]);
        if (stochastic_rounding) {
          const uint64_t stream = mix64(static_cast<uint64_t>(seed) * 0x100000001B3ull + static_cast<uint64_t>(t));
          for (int64_t i = 0; i < job.len; ++i) {
            const uint16_t bits = bf16_stochastic(pbuf[i], mix64(stream ^ static_cast<uint64_t>(job.start + i)));
            std::memcpy(p + i, &bits, 2);
          }
        } else {
          for (int64_t i = 0; i < job.len; ++i) p[i] = at::BFloat16(pbuf[i]);  // round to nearest even
        }
      } else {
        auto* p = params[t].data_ptr<at::Half>() + job.start;
        to_f32(p, pbuf.data(), job.len);
        to_f32(grads[t].data_ptr<at::Half>() + job.start, gbuf.data(), job.len);
        adamw_core(pbuf.data(), gbuf.data(), m, v, vmax, job.len, h, step_size[t], bc2_sqrt[t]);
        for (int64_t i = 0; i < job.len; ++i) p[i] = at::Half(pbuf[i]);
      }
    }
  }
}

}  // namespace qlora_kernels
