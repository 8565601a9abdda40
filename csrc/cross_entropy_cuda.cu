// Cross-entropy over a large vocabulary that reads each labelled row of logits once (sm_90 thread-block
// clusters): per row the loss, the lse and the gradient of the summed loss. No torch headers.
//
// Why CUDA: the Triton split path reads the labelled logits twice (statistics, then gradient: 1.5x the
// read-once-write-once floor), and its fused variant, which kept a chunk in registers across a per-row
// barrier in global memory, measured slower still: its waiting programs spin on one atomic while holding
// their SM. Here a row belongs to a cluster of up to 8 CTAs, which the hardware schedules together. Each
// CTA keeps its slice of the row in registers, publishes (max, sum of exp, sum of z, z[label]) in its
// shared memory, and after one hardware cluster barrier every CTA combines the slices' statistics through
// distributed shared memory and writes its gradient from registers.
//
// Math per row, with z = cap * tanh(x / cap) (or z = x), lse = logsumexp(z), eps = label smoothing, as the
// Triton kernels (kernels/cross_entropy.py):
//   loss = lse - (1 - eps) z[y] - eps / V sum(z) + z_loss lse^2
//   grad = (softmax(z) (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]) * scale * dz/dx
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_launchers.h"
#include "device_helpers.cuh"

namespace qlora_kernels {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxRanks = 8;   // the portable cluster size

// Device code for sm_90+ only (clusters); an sm_80 build keeps empty kernels the launcher never reaches.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
constexpr int kWarps = kThreads / 32;

struct Stats {  // of a slice of one row
  float max, sum_exp, sum_z, z_label;
};

constexpr float kLog2e = 1.4426950408889634f;

// 2^x, flushing results below 2^-126 to 0: one MUFU.EX2 (the non-flushing form adds a range fix-up per call).
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// (max, sum of exp relative to max) of two slices as one; an empty slice is (-inf, 0).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
  const float mn = fmaxf(m, m2);
  s = mn == -INFINITY ? 0.f : s * exp2_ftz((m - mn) * kLog2e) + s2 * exp2_ftz((m2 - mn) * kLog2e);
  m = mn;
}

__device__ __forceinline__ Stats warp_merge(Stats t) {
#pragma unroll
  for (int o = 16; o > 0; o /= 2) {
    merge(t.max, t.sum_exp, __shfl_xor_sync(0xffffffffu, t.max, o), __shfl_xor_sync(0xffffffffu, t.sum_exp, o));
    t.sum_z += __shfl_xor_sync(0xffffffffu, t.sum_z, o);
    t.z_label += __shfl_xor_sync(0xffffffffu, t.z_label, o);
  }
  return t;
}

// cap * tanh(x / cap) as the Triton kernels compute it (kernels/cross_entropy.py _softcap): 2 sigmoid(2u) - 1,
// except for |u| < 0.2, where that cancels (absolute error ~ cap * 2^-23, 0.09 at cap 1e6) and the odd
// Taylor series to u^9 runs instead
__device__ __forceinline__ float softcapped(float x, float cap) {
  const float u = x / cap, u2 = u * u;
  const float series =
      u * (1.f + u2 * (-1.f / 3.f + u2 * (2.f / 15.f + u2 * (-17.f / 315.f + u2 * (62.f / 2835.f)))));
  return cap * (fabsf(u) < 0.2f ? series : 2.f / (1.f + __expf(-2.f * u)) - 1.f);
}

// The values of one 16-byte vector of T as z (fp32, softcapped when kSoftcap).
template <typename T, bool kSoftcap>
__device__ __forceinline__ void load_z(const uint4& u, float cap, float (&z)[16 / sizeof(T)]) {
  const T* h = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int j = 0; j < 16 / int(sizeof(T)); ++j) {
    const float x = to_float(h[j]);
    z[j] = kSoftcap ? softcapped(x, cap) : x;
  }
}

// Hides what u holds from the compiler, so the gradient pass converts the 16-byte vectors again instead of
// keeping every converted fp32 value alive across the cluster barrier (twice the registers, half the CTAs).
__device__ __forceinline__ void launder(uint4& u) {
  asm volatile("" : "+r"(u.x), "+r"(u.y), "+r"(u.z), "+r"(u.w));
}

#endif

// Grid: ranks x n_rows CTAs, clusters of `ranks` consecutive CTAs, one row each. CTA `rank` holds columns
// [rank * span, min(V, (rank + 1) * span)) in kVecs 16-byte vectors per thread. logits and grad may alias.
template <typename T, int kVecs, bool kSoftcap>
__global__ void __launch_bounds__(kThreads, kVecs > 8 ? 1 : 3) ce_cluster_kernel(
    const T* logits, T* grad, const int64_t* __restrict__ labels, float* __restrict__ loss,
    float* __restrict__ lse_out, const int32_t* __restrict__ count, int64_t V, int64_t span, int64_t stride_row,
    int64_t grad_stride_row, int64_t ignore_index, float smoothing, float z_loss, float cap, bool mean,
    bool write_ignored) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr int kPack = 16 / sizeof(T);
  namespace cg = cooperative_groups;
  const cg::cluster_group cluster = cg::this_cluster();
  const unsigned rank = cluster.block_rank();
  const int64_t row = blockIdx.x / cluster.num_blocks();
  const int64_t y = labels[row];
  const int64_t begin = rank * span, end = min(V, begin + span);
  const auto col_of = [&](int k) { return begin + (int64_t(k) * kThreads + threadIdx.x) * kPack; };
  T* dst = grad == nullptr ? nullptr : grad + row * grad_stride_row;
  if (y == ignore_index) {   // the whole cluster takes this branch: no barrier is skipped by a part of it
    if (dst != nullptr && write_ignored) {
#pragma unroll
      for (int k = 0; k < kVecs; ++k) {
        if (col_of(k) < end) __stcs(reinterpret_cast<uint4*>(dst + col_of(k)), make_uint4(0, 0, 0, 0));
      }
    }
    if (rank == 0 && threadIdx.x == 0) {
      loss[row] = 0.f;
      lse_out[row] = 0.f;
    }
    return;
  }
  // the slice: every load issued before any is used (kVecs x 16 bytes in flight per thread), streamed
  const T* src = logits + row * stride_row;
  uint4 v[kVecs];
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    if (col_of(k) < end) v[k] = __ldcs(reinterpret_cast<const uint4*>(src + col_of(k)));
  }
  Stats t{-INFINITY, 0.f, 0.f, 0.f};
#pragma unroll
  for (int k = 0; k < kVecs; ++k) {
    if (col_of(k) >= end) continue;
    float z[kPack];
    load_z<T, kSoftcap>(v[k], cap, z);
    float vm = z[0], e = 0.f;
#pragma unroll
    for (int j = 1; j < kPack; ++j) vm = fmaxf(vm, z[j]);
    const float shift = vm == -INFINITY ? 0.f : vm * kLog2e;
#pragma unroll
    for (int j = 0; j < kPack; ++j) {
      e += exp2_ftz(fmaf(z[j], kLog2e, -shift));
      t.sum_z += z[j];
    }
    merge(t.max, t.sum_exp, vm, e);   // one rescale per vector, not per value
    const int64_t at = y - col_of(k);
    if (at >= 0 && at < kPack) {      // the label's column (one thread per row; none for a bad label)
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (at == j) t.z_label = z[j];
      }
    }
  }
  __shared__ Stats warp_stats[kWarps];
  __shared__ Stats cta_stats;
  __shared__ float row_lse;
  t = warp_merge(t);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) warp_stats[warp] = t;
  __syncthreads();
  if (warp == 0) {
    t = lane < kWarps ? warp_stats[lane] : Stats{-INFINITY, 0.f, 0.f, 0.f};
    t = warp_merge(t);
    if (lane == 0) cta_stats = t;
  }
  cluster.sync();   // every CTA's cta_stats written and visible to the cluster
  if (warp == 0) {  // lane r reads CTA r's statistics through distributed shared memory
    t = lane < int(cluster.num_blocks()) ? *cluster.map_shared_rank(&cta_stats, lane)
                                         : Stats{-INFINITY, 0.f, 0.f, 0.f};
    t = warp_merge(t);
    if (lane == 0) {
      const float lse = t.max + __logf(t.sum_exp);   // sum_exp >= 1: the max contributes 1
      row_lse = lse;
      if (rank == 0) {
        const bool bad = y < 0 || y >= V;   // not ignore_index, outside [0, V): NaN, never a read
        // the smoothing term only when smoothing > 0: sum(z) is -inf with a masked logit, and 0 * -inf is NaN
        const float smooth = smoothing > 0.f ? smoothing / V * t.sum_z : 0.f;
        loss[row] = bad ? NAN : lse - (1.f - smoothing) * t.z_label - smooth + z_loss * lse * lse;
        lse_out[row] = lse;
      }
    }
  }
  __syncthreads();
  // done with the other CTAs' shared memory; they may exit once every CTA has arrived (waited below)
  asm volatile("barrier.cluster.arrive.relaxed.aligned;\n" ::: "memory");
  if (dst != nullptr) {
    const float lse = row_lse, lse2 = lse * kLog2e;
    const float scale = mean ? 1.f / fmaxf(float(*count), 1.f) : 1.f;
    // g = (p (1 + 2 z_loss lse) - eps / V - (1 - eps) [j == y]) * scale, as one FMA per value
    const float a = (1.f + 2.f * z_loss * lse) * scale, b = -smoothing / V * scale, hit = (1.f - smoothing) * scale;
    const float inv_cap = kSoftcap ? 1.f / cap : 0.f;
#pragma unroll
    for (int k = 0; k < kVecs; ++k) {
      if (col_of(k) >= end) continue;
      float z[kPack], g[kPack];
      launder(v[k]);
      load_z<T, kSoftcap>(v[k], cap, z);
#pragma unroll
      for (int j = 0; j < kPack; ++j) g[j] = fmaf(exp2_ftz(fmaf(z[j], kLog2e, -lse2)), a, b);
      const int64_t at = y - col_of(k);
      if (at >= 0 && at < kPack) {
#pragma unroll
        for (int j = 0; j < kPack; ++j) {
          if (at == j) g[j] -= hit;
        }
      }
      uint4 out;
      T* o = reinterpret_cast<T*>(&out);
#pragma unroll
      for (int j = 0; j < kPack; ++j) {
        if (kSoftcap) {   // dz/dx = 1 - tanh^2
          const float u = z[j] * inv_cap;
          g[j] *= 1.f - u * u;
        }
        o[j] = from_float<T>(g[j]);
      }
      __stcs(reinterpret_cast<uint4*>(dst + col_of(k)), out);
    }
  }
  asm volatile("barrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#endif
}

template <typename T, int kVecs, bool kSoftcap>
cudaError_t launch(const void* logits, void* grad, const int64_t* labels, float* loss, float* lse,
                   const int32_t* count, int64_t n_rows, int64_t V, int64_t span, unsigned ranks, int64_t stride_row,
                   int64_t grad_stride_row, int64_t ignore_index, float smoothing, float z_loss, float cap, bool mean,
                   bool write_ignored, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(ranks * n_rows));
  config.blockDim = dim3(kThreads);
  config.stream = stream;
  cudaLaunchAttribute cluster;
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim.x = ranks;
  cluster.val.clusterDim.y = 1;
  cluster.val.clusterDim.z = 1;
  config.attrs = &cluster;
  config.numAttrs = 1;
  return cudaLaunchKernelEx(&config, ce_cluster_kernel<T, kVecs, kSoftcap>, static_cast<const T*>(logits),
                     static_cast<T*>(grad), labels, loss, lse, count, V, span, stride_row, grad_stride_row,
                     ignore_index, smoothing, z_loss, cap, mean, write_ignored);
}

template <typename T>
cudaError_t launch_for(const void* logits, void* grad, const int64_t* labels, float* loss, float* lse,
                       const int32_t* count, int64_t n_rows, int64_t V, int64_t stride_row, int64_t grad_stride_row,
                       int64_t ignore_index, float smoothing, float z_loss, float cap, bool mean, bool write_ignored,
                       cudaStream_t stream) {
  // The fewest CTAs per row whose slices fit 8 vectors a thread (32 registers); past 8 CTAs, 16 vectors.
  const int64_t vectors = V / (16 / sizeof(T));
  unsigned ranks = 1;
  while (ranks < kMaxRanks && (vectors + ranks - 1) / ranks > 8 * kThreads) ranks *= 2;
  const int64_t per_cta = (vectors + ranks - 1) / ranks;
  const int64_t span = per_cta * (16 / sizeof(T));
  const auto go = [&](auto kernel_launch) {
    return kernel_launch(logits, grad, labels, loss, lse, count, n_rows, V, span, ranks, stride_row, grad_stride_row,
                  ignore_index, smoothing, z_loss, cap, mean, write_ignored, stream);
  };
  const bool softcap = cap > 0.f;
  if (per_cta <= 4 * kThreads) return softcap ? go(launch<T, 4, true>) : go(launch<T, 4, false>);
  if (per_cta <= 8 * kThreads) return softcap ? go(launch<T, 8, true>) : go(launch<T, 8, false>);
  return softcap ? go(launch<T, 16, true>) : go(launch<T, 16, false>);
}

}  // namespace

const char* cross_entropy_cluster_cuda(const void* logits, void* grad, FloatType dtype, const int64_t* labels,
                                       float* loss, float* lse, const int32_t* count, int64_t n_rows, int64_t V,
                                       int64_t stride_row, int64_t grad_stride_row, int64_t ignore_index,
                                       float smoothing, float z_loss, float cap, bool mean, bool write_ignored,
                                       void* stream) {
  if (n_rows == 0) return nullptr;
  int device = 0, major = 0;   // host-side queries, no synchronization
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess || major < 9) {
    return "thread-block clusters need compute capability 9.0 or newer";
  }
  auto s = static_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSuccess;
  switch (dtype) {
    case FloatType::kFloat32:
      err = launch_for<float>(logits, grad, labels, loss, lse, count, n_rows, V, stride_row, grad_stride_row,
                              ignore_index, smoothing, z_loss, cap, mean, write_ignored, s);
      break;
    case FloatType::kFloat16:
      err = launch_for<__half>(logits, grad, labels, loss, lse, count, n_rows, V, stride_row, grad_stride_row,
                               ignore_index, smoothing, z_loss, cap, mean, write_ignored, s);
      break;
    case FloatType::kBFloat16:
      err = launch_for<__nv_bfloat16>(logits, grad, labels, loss, lse, count, n_rows, V, stride_row,
                                      grad_stride_row, ignore_index, smoothing, z_loss, cap, mean, write_ignored, s);
      break;
  }
  if (err == cudaSuccess) return nullptr;
  cudaGetLastError();   // a refused launch also sets the runtime's last error: clear it, the binding raises this one
  return cudaGetErrorString(err);
}

bool cross_entropy_cluster_cuda_has_image(int device) {
  return kernel_has_image(ce_cluster_kernel<float, 4, false>, device);
}

}  // namespace qlora_kernels
