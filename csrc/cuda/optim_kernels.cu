// Fused optimizer CUDA kernels and the non-finite scan. Torch-free: compile-check with
// `nvcc -c -arch=sm_90 -std=c++17 --fmad=false -O3 -Icsrc/include -Icsrc`.
//
// Multi-tensor apply, as Apex's multi_tensor_apply.cuh: one launcher template, each optimizer
// only a functor (optim_math.h, shared with the CPU path). One block per fixed-size chunk of one
// tensor, many tensors per launch. Each thread takes 16-byte vectors of every role, updates
// their elements with the functor in the math type, writes back every role but the gradient,
// and, when fingerprinting, adds the msfp1 terms of the bytes it just wrote (and of the
// gradient it read) from registers, so the fingerprint costs no second pass over memory. The
// block reduces its sums with warp shuffles and folds them into the tensor's with 64-bit
// integer atomics: addition mod 2^64 is order-free, so the result is the same whatever the
// chunk size, the launch configuration or the order in which blocks run.
//
// Bitwise equality with the CPU path: the same functor and scalars, nvcc --fmad=false (no FMA
// contraction), no fast-math (IEEE division and sqrt_rn), and the bit-exact conversions of
// precision.h.
#include <cuda_runtime.h>

#include "kernels.h"
#include "memstate/cuda_vec.h"
#include "memstate/msfp1.h"
#include "memstate/optim_math.h"
#include "memstate/precision.h"

namespace memstate {
namespace cuda {

static_assert(kOptimMaxRoles == optim::kMaxRoles, "OptimTask must hold every role");
static_assert(kNonfiniteChunkBytes % 16 == 0, "non-finite chunks must keep 16-byte alignment");

namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

__device__ __forceinline__ unsigned long long warp_sum(unsigned long long v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Reduces every thread's s[r][k] over the block and adds the totals to out[2r + k] with
// integer atomics (order-free).
template <int R>
__device__ __forceinline__ void block_fold(const uint64_t (&s)[R][2], unsigned long long* out) {
  __shared__ unsigned long long red[2 * R][kWarps];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const unsigned long long a = warp_sum(s[r][k]);
      if (lane == 0) red[2 * r + k][warp] = a;
    }
  }
  __syncthreads();
  if (threadIdx.x < 2 * R) {
    unsigned long long a = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) a += red[threadIdx.x][w];
    atomicAdd(out + threadIdx.x, a);
  }
}

// Loads `cnt` (1..kVec16Elems<T>) elements at p into v; elements past cnt are zero. `vec`: one
// 16-byte load (p 16-byte aligned and cnt full), else element loads.
template <typename T>
__device__ __forceinline__ void load_vec(Vec16<T>& v, const T* p, int cnt, bool vec) {
  if (vec) {
    const uint4 q = *reinterpret_cast<const uint4*>(p);
    v.w[0] = q.x;
    v.w[1] = q.y;
    v.w[2] = q.z;
    v.w[3] = q.w;
  } else {
    v.w[0] = v.w[1] = v.w[2] = v.w[3] = 0u;
#pragma unroll
    for (int j = 0; j < kVec16Elems<T>; ++j) {
      if (j < cnt) v.e[j] = p[j];
    }
  }
}

template <typename T>
__device__ __forceinline__ void store_vec(const Vec16<T>& v, T* p, int cnt, bool vec) {
  if (vec) {
    *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
  } else {
#pragma unroll
    for (int j = 0; j < kVec16Elems<T>; ++j) {
      if (j < cnt) p[j] = v.e[j];
    }
  }
}

// One block = one chunk: elements [begin, begin + len) of one task. Thread i takes the
// 16-byte slots i, i + kThreads, ... of the chunk; only the tensor's last slot may be partial.
template <class Op, bool kFingerprint>
__global__ void __launch_bounds__(kThreads)
    optim_kernel(const Op op, const OptimTask* __restrict__ tasks,
                 const OptimChunk* __restrict__ chunks, int64_t chunk_elems,
                 unsigned long long* __restrict__ sums) {
  MEMSTATE_NUMERICS_GUARD();
  using T = typename Op::storage_t;
  using M = typename Op::M;
  constexpr int R = Op::kRoles;
  constexpr int V = kVec16Elems<T>;

  const OptimChunk ch = chunks[blockIdx.x];
  const OptimTask& task = tasks[ch.task];
  T* ptr[R];
  bool aligned[R];  // per role: 16-byte vector loads/stores, else element loads/stores
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ptr[r] = static_cast<T*>(task.roles[r]);
    aligned[r] = (reinterpret_cast<uintptr_t>(ptr[r]) & 15u) == 0;
  }
  const optim::TensorScalars<M> ts{static_cast<M>(task.s0), static_cast<M>(task.s1), task.flag};
  // begin is a multiple of 8 elements, hence of V and of 16 bytes: every slot is a 16-byte
  // aligned piece of the tensor's bytes (when the base is) and starts on a pair boundary.
  const int64_t begin = static_cast<int64_t>(ch.index) * chunk_elems;
  const int64_t len = min(chunk_elems, task.numel - begin);
  const int64_t nslots = (len + V - 1) / V;

  uint64_t s[R][2];
#pragma unroll
  for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = 0;

  for (int64_t slot = threadIdx.x; slot < nslots; slot += kThreads) {
    const int64_t e0 = begin + slot * V;  // first element of the slot in the tensor
    const int cnt = static_cast<int>(min(static_cast<int64_t>(V), task.numel - e0));
    const bool full = cnt == V;
    Vec16<T> v[R];
#pragma unroll
    for (int r = 0; r < R; ++r) load_vec(v[r], ptr[r] + e0, cnt, full && aligned[r]);
#pragma unroll
    for (int j = 0; j < V; ++j) {
      if (j < cnt) {
        M x[R];
#pragma unroll
        for (int r = 0; r < R; ++r) x[r] = to_math(v[r].e[j]);
        op(x, ts);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (r != optim::kGrad) v[r].e[j] = to_storage<T>(x[r]);
        }
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r != optim::kGrad) store_vec(v[r], ptr[r] + e0, cnt, full && aligned[r]);
    }
    if (kFingerprint) {
      // The registers hold exactly the bytes now in memory (the gradient's as read), with the
      // elements past the tensor's end zero: the spec's zero padding of the last pair.
      const uint64_t pair0 = static_cast<uint64_t>(e0) * sizeof(T) / msfp1::kPairBytes;
      const int nbytes = cnt * static_cast<int>(sizeof(T));
#pragma unroll
      for (int r = 0; r < R; ++r) msfp1_accumulate_vec16(v[r].w, nbytes, pair0, s[r][0], s[r][1]);
    }
  }
  if (kFingerprint) block_fold<R>(s, sums + static_cast<int64_t>(ch.task) * (2 * R));
}

// sums[2i], sums[2i+1] := F_0, F_1 of entry i = task * nroles + role, L = numel * elem_bytes.
__global__ void optim_finalize_kernel(const OptimTask* __restrict__ tasks, int64_t nentries,
                                      int nroles, int64_t elem_bytes,
                                      unsigned long long* __restrict__ sums) {
  MEMSTATE_NUMERICS_GUARD();
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= nentries) return;
  const uint64_t nb = static_cast<uint64_t>(tasks[i / nroles].numel * elem_bytes);
  sums[2 * i] = msfp1::finalize_lane0(sums[2 * i], nb);
  sums[2 * i + 1] = msfp1::finalize_lane1(sums[2 * i + 1], nb);
}

__device__ __forceinline__ uint64_t load_word(const unsigned char* p, int width) {
  switch (width) {
    case 2: return *reinterpret_cast<const uint16_t*>(p);
    case 4: return *reinterpret_cast<const uint32_t*>(p);
    default: return *reinterpret_cast<const uint64_t*>(p);
  }
}

__global__ void __launch_bounds__(kThreads)
    nonfinite_kernel(const NonfiniteTask* __restrict__ tasks, const OptimChunk* __restrict__ chunks,
                     int* flag) {
  MEMSTATE_NUMERICS_GUARD();
  // Another block already found one: nothing left to learn (uniform exit for the whole block).
  __shared__ int done;
  if (threadIdx.x == 0) done = *reinterpret_cast<volatile int*>(flag);
  __syncthreads();
  if (done) return;

  const OptimChunk ch = chunks[blockIdx.x];
  const NonfiniteTask t = tasks[ch.task];
  const int64_t start = static_cast<int64_t>(ch.index) * kNonfiniteChunkBytes;
  const int64_t len = min(kNonfiniteChunkBytes, t.nbytes - start);
  const unsigned char* base = static_cast<const unsigned char*>(t.data) + start;
  bool bad = false;
  int64_t tail = 0;  // first byte left for element loads
  if ((reinterpret_cast<uintptr_t>(t.data) & 15u) == 0) {
    const int64_t nvec = len / 16;
    const uint4* vec = reinterpret_cast<const uint4*>(base);
    for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
      const uint4 q = __ldcs(vec + i);  // scanned once: do not keep in cache
      const uint64_t lo = static_cast<uint64_t>(q.x) | (static_cast<uint64_t>(q.y) << 32);
      const uint64_t hi = static_cast<uint64_t>(q.z) | (static_cast<uint64_t>(q.w) << 32);
      bad |= has_all_ones_lane(lo, t.width, t.exp_mask) | has_all_ones_lane(hi, t.width, t.exp_mask);
    }
    tail = nvec * 16;
  }
  for (int64_t b = tail + static_cast<int64_t>(threadIdx.x) * t.width; b < len;
       b += static_cast<int64_t>(kThreads) * t.width) {
    bad |= (load_word(base + b, t.width) & t.exp_mask) == t.exp_mask;
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicExch(flag, 1);
}

}  // namespace

template <class Op>
void launch_optim(const Op& op, const OptimTask* tasks, int64_t ntasks, const OptimChunk* chunks,
                  int64_t nchunks, int64_t chunk_elems, unsigned long long* sums,
                  cudaStream_t stream) {
  if (nchunks > 0) {
    const auto grid = static_cast<unsigned int>(nchunks);
    if (sums != nullptr) {
      optim_kernel<Op, true><<<grid, kThreads, 0, stream>>>(op, tasks, chunks, chunk_elems, sums);
    } else {
      optim_kernel<Op, false><<<grid, kThreads, 0, stream>>>(op, tasks, chunks, chunk_elems, sums);
    }
  }
  if (sums != nullptr && ntasks > 0) {
    const int64_t nentries = ntasks * Op::kRoles;
    const int threads = 128;
    const auto blocks = static_cast<unsigned int>((nentries + threads - 1) / threads);
    optim_finalize_kernel<<<blocks, threads, 0, stream>>>(
        tasks, nentries, Op::kRoles, static_cast<int64_t>(sizeof(typename Op::storage_t)), sums);
  }
}

void launch_nonfinite_any(const NonfiniteTask* tasks, const OptimChunk* chunks, int64_t nchunks,
                          int* flag, cudaStream_t stream) {
  if (nchunks <= 0) return;
  nonfinite_kernel<<<static_cast<unsigned int>(nchunks), kThreads, 0, stream>>>(tasks, chunks, flag);
}

// Every Op that optim_ops.h dispatches to, for every storage type.
#define MEMSTATE_INSTANTIATE_OPTIM(...)                                                        \
  template void launch_optim<__VA_ARGS__>(const __VA_ARGS__&, const OptimTask*, int64_t,       \
                                          const OptimChunk*, int64_t, int64_t,                 \
                                          unsigned long long*, cudaStream_t);
#define MEMSTATE_INSTANTIATE_OPTIM_FOR(T)                          \
  MEMSTATE_INSTANTIATE_OPTIM(optim::SgdOp<T, false, false>)        \
  MEMSTATE_INSTANTIATE_OPTIM(optim::SgdOp<T, true, false>)         \
  MEMSTATE_INSTANTIATE_OPTIM(optim::SgdOp<T, true, true>)          \
  MEMSTATE_INSTANTIATE_OPTIM(optim::AdamOp<T, false, false>)       \
  MEMSTATE_INSTANTIATE_OPTIM(optim::AdamOp<T, false, true>)        \
  MEMSTATE_INSTANTIATE_OPTIM(optim::AdamOp<T, true, false>)        \
  MEMSTATE_INSTANTIATE_OPTIM(optim::AdamOp<T, true, true>)         \
  MEMSTATE_INSTANTIATE_OPTIM(optim::RmspropOp<T, false, false>)    \
  MEMSTATE_INSTANTIATE_OPTIM(optim::RmspropOp<T, false, true>)     \
  MEMSTATE_INSTANTIATE_OPTIM(optim::RmspropOp<T, true, false>)     \
  MEMSTATE_INSTANTIATE_OPTIM(optim::RmspropOp<T, true, true>)      \
  MEMSTATE_INSTANTIATE_OPTIM(optim::AdagradOp<T>)                  \
  MEMSTATE_INSTANTIATE_OPTIM(optim::LionOp<T>)                    \
  MEMSTATE_INSTANTIATE_OPTIM(optim::LambStage1Op<T, false>)        \
  MEMSTATE_INSTANTIATE_OPTIM(optim::LambStage1Op<T, true>)         \
  MEMSTATE_INSTANTIATE_OPTIM(optim::LambStage2Op<T>)

MEMSTATE_INSTANTIATE_OPTIM_FOR(float)
MEMSTATE_INSTANTIATE_OPTIM_FOR(double)
MEMSTATE_INSTANTIATE_OPTIM_FOR(bf16_bits)
MEMSTATE_INSTANTIATE_OPTIM_FOR(f16_bits)

#undef MEMSTATE_INSTANTIATE_OPTIM_FOR
#undef MEMSTATE_INSTANTIATE_OPTIM

}  // namespace cuda
}  // namespace memstate
