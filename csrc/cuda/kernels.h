// Torch-free CUDA launchers (tier 1): declared here, defined in *.cu files that include no torch
// headers, so `nvcc -c` compile-checks them in seconds. The ATen glue in *_cuda.cpp calls them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace memstate {
namespace cuda {

// One tensor's bytes for the msfp1 kernels. `data` must be 16-byte aligned.
struct Msfp1Task {
  const unsigned char* data;
  uint64_t nbytes;
  uint64_t first_pair;  // global pair index of the first 8 bytes (0 unless a shard)
};

// One block's work: bytes [index * kMsfp1ChunkBytes, ...) of task `task`.
struct Msfp1Chunk {
  int32_t task;
  int32_t index;
};

constexpr int64_t kMsfp1ChunkBytes = 64 * 1024;

// Adds each task's msfp1 sums into sums[2*task], sums[2*task+1] (zeroed by the caller).
// All pointers are device pointers. Integer atomics only: the result is independent of the
// launch configuration and of the order in which blocks run.
void launch_msfp1_sums(const Msfp1Task* tasks, const Msfp1Chunk* chunks, int64_t nchunks,
                       unsigned long long* sums, cudaStream_t stream);

// sums[2t], sums[2t+1] := finalised lanes F_0, F_1 of task t, with L = tasks[t].nbytes.
void launch_msfp1_finalize(const Msfp1Task* tasks, int64_t ntasks, unsigned long long* sums,
                           cudaStream_t stream);

// Last CUDA error as text, or nullptr when there was none (clears it).
const char* last_error();

}  // namespace cuda
}  // namespace memstate
