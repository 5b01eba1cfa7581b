// msfp1 CUDA kernels. Torch-free: compile-check with `nvcc -c -arch=sm_90`.
//
// One block per 64 KiB chunk of one tensor (many tensors per launch). Each thread reads 16-byte
// vectors, accumulates both lanes in registers with the shared inline math, the block reduces
// with warp shuffles, and one thread folds the block's sums into the tensor's with 64-bit
// integer atomics, which are order-free.
#include "kernels.h"

#include <cuda_runtime.h>

#include "memstate/cuda_vec.h"
#include "memstate/msfp1.h"

namespace memstate {
namespace cuda {

namespace {

constexpr int kThreads = 256;

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Reduces (s0, s1) over the block; thread 0 adds the totals to out[0], out[1].
__device__ __forceinline__ void block_fold(uint64_t s0, uint64_t s1, unsigned long long* out) {
  __shared__ unsigned long long w0[kThreads / 32], w1[kThreads / 32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  unsigned long long a = warp_sum(s0), b = warp_sum(s1);
  if (lane == 0) {
    w0[warp] = a;
    w1[warp] = b;
  }
  __syncthreads();
  if (warp == 0) {
    a = lane < kThreads / 32 ? w0[lane] : 0ull;
    b = lane < kThreads / 32 ? w1[lane] : 0ull;
    a = warp_sum(a);
    b = warp_sum(b);
    if (lane == 0) {
      atomicAdd(out, a);
      atomicAdd(out + 1, b);
    }
  }
}

__global__ void __launch_bounds__(kThreads)
    msfp1_sums_kernel(const Msfp1Task* __restrict__ tasks, const Msfp1Chunk* __restrict__ chunks,
                      unsigned long long* __restrict__ sums) {
  MEMSTATE_NUMERICS_GUARD();
  const Msfp1Chunk ch = chunks[blockIdx.x];
  const Msfp1Task t = tasks[ch.task];
  const uint64_t start = static_cast<uint64_t>(ch.index) * kMsfp1ChunkBytes;
  const uint64_t len = min(static_cast<uint64_t>(kMsfp1ChunkBytes), t.nbytes - start);
  const unsigned char* base = t.data + start;
  const uint64_t pair0 = t.first_pair + start / msfp1::kPairBytes;
  const uint64_t nvec = len / 16;  // two pairs per 16-byte vector
  unsigned char* to = t.dst != nullptr ? t.dst + start : nullptr;
  // Chunks start at multiples of 64 KiB, so a chunk is as aligned as its tensor.
  const int src_align = address_align(base);
  const int dst_align = to != nullptr ? address_align(to) : 16;
  uint64_t s0 = 0, s1 = 0;
  if (src_align == 16 && dst_align == 16) {
    const uint4* vec = reinterpret_cast<const uint4*>(base);
    uint4* out = reinterpret_cast<uint4*>(to);
#pragma unroll 4
    for (uint64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const uint4 w = __ldcs(vec + i);  // streamed once: do not keep in cache
      if (out != nullptr) __stcs(out + i, w);
      msfp1::accumulate_pair(w.x, w.y, pair0 + 2 * i, s0, s1);
      msfp1::accumulate_pair(w.z, w.w, pair0 + 2 * i + 1, s0, s1);
    }
  } else {
    // A misaligned view (or destination): the same 16 bytes per step, read and written in
    // place with word or byte accesses. Slower per byte, but no clone of the whole tensor.
    for (uint64_t i = threadIdx.x; i < nvec; i += kThreads) {
      uint32_t w[4];
      load_words16(base + 16 * i, src_align, w);
      if (to != nullptr) store_words16(to + 16 * i, dst_align, w);
      msfp1::accumulate_pair(w[0], w[1], pair0 + 2 * i, s0, s1);
      msfp1::accumulate_pair(w[2], w[3], pair0 + 2 * i + 1, s0, s1);
    }
  }
  if (threadIdx.x == 0 && nvec * 16 < len) {
    if (to != nullptr) {
      for (uint64_t b = nvec * 16; b < len; ++b) to[b] = base[b];
    }
    msfp1::accumulate_bytes(base + nvec * 16, len - nvec * 16, pair0 + 2 * nvec, s0, s1);
  }
  if (sums == nullptr) return;
  block_fold(s0, s1, sums + 2 * ch.task);
}

__global__ void msfp1_finalize_kernel(const Msfp1Task* __restrict__ tasks, int64_t ntasks,
                                      unsigned long long* __restrict__ sums) {
  MEMSTATE_NUMERICS_GUARD();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= ntasks) return;
  const uint64_t nb = tasks[i].nbytes;
  sums[2 * i] = msfp1::finalize_lane0(sums[2 * i], nb);
  sums[2 * i + 1] = msfp1::finalize_lane1(sums[2 * i + 1], nb);
}

}  // namespace

void launch_msfp1_sums(const Msfp1Task* tasks, const Msfp1Chunk* chunks, int64_t nchunks,
                       unsigned long long* sums, cudaStream_t stream) {
  if (nchunks <= 0) return;
  msfp1_sums_kernel<<<static_cast<unsigned int>(nchunks), kThreads, 0, stream>>>(tasks, chunks,
                                                                                 sums);
}

void launch_msfp1_finalize(const Msfp1Task* tasks, int64_t ntasks, unsigned long long* sums,
                           cudaStream_t stream) {
  if (ntasks <= 0) return;
  const int threads = 128;
  const auto blocks = static_cast<unsigned int>((ntasks + threads - 1) / threads);
  msfp1_finalize_kernel<<<blocks, threads, 0, stream>>>(tasks, ntasks, sums);
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace memstate
