// Deterministic norm sums on CUDA. Torch-free: compile-check with
// `nvcc -c -arch=sm_90 -std=c++17 --fmad=false -O3 -Icsrc/include -Icsrc`.
//
// The reduction tree is memstate/norm_math.h's, evaluated exactly as the CPU does: one warp per
// leaf, lane j adding the terms of elements k*32 + j in order of k, then the halving fold with
// warp shuffles (lane j < s takes lane j + s's value); then the strided pairwise trees, one block
// per tensor, and one block over the tensors. No atomics on floating point, so the bits do not
// depend on the launch configuration or on the order in which blocks run.
#include <cuda_runtime.h>

#include "kernels.h"
#include "memstate/norm_math.h"
#include "memstate/precision.h"

namespace memstate {
namespace cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kLeavesPerBlock = kThreads / norm::kLanes;

template <int Kind, class T>
__device__ __forceinline__ double lane_sum(const T* x, int64_t start, int64_t numel, int lane, double p) {
  double acc = 0.0;
  for (int k = 0; k < norm::kLanes; ++k) {
    const int64_t idx = start + k * norm::kLanes + lane;
    acc = norm::combine<Kind>(acc, idx < numel ? norm::element_term<Kind>(x[idx], p) : 0.0);
  }
  return acc;
}

template <int Kind>
__global__ void __launch_bounds__(kThreads) norm_leaves_kernel(const NormTask* tasks, const OptimChunk* chunks,
                                                               int64_t nleaves, double p, double* leaves) {
  MEMSTATE_NUMERICS_GUARD();
  const int64_t g = static_cast<int64_t>(blockIdx.x) * kLeavesPerBlock + threadIdx.x / norm::kLanes;
  if (g >= nleaves) return;  // whole warps return together
  const int lane = threadIdx.x % norm::kLanes;
  const OptimChunk c = chunks[g];
  const NormTask t = tasks[c.task];
  const int64_t start = static_cast<int64_t>(c.index) * norm::kLeafElems;
  double acc;
  switch (t.dtype) {
    case 0: acc = lane_sum<Kind>(static_cast<const float*>(t.data), start, t.numel, lane, p); break;
    case 1: acc = lane_sum<Kind>(static_cast<const double*>(t.data), start, t.numel, lane, p); break;
    case 2: acc = lane_sum<Kind>(static_cast<const bf16_bits*>(t.data), start, t.numel, lane, p); break;
    default: acc = lane_sum<Kind>(static_cast<const f16_bits*>(t.data), start, t.numel, lane, p); break;
  }
  for (int s = norm::kLanes / 2; s >= 1; s /= 2) {
    const double other = __shfl_down_sync(0xffffffffu, acc, s);
    if (lane < s) acc = norm::combine<Kind>(acc, other);
  }
  if (lane == 0) leaves[t.leaf_begin + c.index] = acc;
}

// The strided pairwise tree over v[0 .. n) by one block, in place; the root is returned to
// thread 0 (0 for n == 0).
template <int Kind>
__device__ double block_tree(double* v, int64_t n) {
  for (int64_t s = 1; s < n; s *= 2) {
    for (int64_t i = static_cast<int64_t>(threadIdx.x) * 2 * s; i + s < n; i += static_cast<int64_t>(blockDim.x) * 2 * s)
      v[i] = norm::combine<Kind>(v[i], v[i + s]);
    __syncthreads();
  }
  return n > 0 ? canonical_nan(v[0]) : 0.0;
}

template <int Kind>
__global__ void __launch_bounds__(kThreads) norm_tensor_kernel(const NormTask* tasks, double* leaves, double* out) {
  MEMSTATE_NUMERICS_GUARD();
  const NormTask t = tasks[blockIdx.x];
  const double r = block_tree<Kind>(leaves + t.leaf_begin, t.leaf_count);
  if (threadIdx.x == 0) out[blockIdx.x] = r;
}

template <int Kind>
__global__ void __launch_bounds__(kThreads) norm_total_kernel(int64_t ntasks, double* scratch, double* out) {
  MEMSTATE_NUMERICS_GUARD();
  for (int64_t i = threadIdx.x; i < ntasks; i += blockDim.x) scratch[i] = out[i];
  __syncthreads();
  const double r = block_tree<Kind>(scratch, ntasks);
  if (threadIdx.x == 0) out[ntasks] = r;
}

}  // namespace

void launch_norm_sums(const NormTask* tasks, int64_t ntasks, const OptimChunk* chunks, int64_t nleaves,
                      int kind, double p, double* leaves, double* scratch, double* out, cudaStream_t stream) {
  norm::dispatch_kind(kind, [&](auto tag) {
    constexpr int K = decltype(tag)::value;
    if (nleaves > 0) {
      const int64_t blocks = (nleaves + kLeavesPerBlock - 1) / kLeavesPerBlock;
      norm_leaves_kernel<K><<<static_cast<unsigned int>(blocks), kThreads, 0, stream>>>(tasks, chunks, nleaves, p,
                                                                                       leaves);
    }
    if (ntasks > 0) norm_tensor_kernel<K><<<static_cast<unsigned int>(ntasks), kThreads, 0, stream>>>(tasks, leaves, out);
    norm_total_kernel<K><<<1, kThreads, 0, stream>>>(ntasks, scratch, out);
  });
}

}  // namespace cuda
}  // namespace memstate
