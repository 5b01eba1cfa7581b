// Torch-free CUDA launchers (tier 1): declared here, defined in *.cu files that include no torch
// headers, so `nvcc -c` compile-checks them in seconds. The ATen glue in *_cuda.cpp calls them.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

namespace memstate {
namespace cuda {

// One tensor's bytes for the msfp1 kernels (source and destination at any alignment).
struct Msfp1Task {
  const unsigned char* data;  // any alignment (16-byte aligned data takes the vector path)
  uint64_t nbytes;
  uint64_t first_pair;  // global pair index of the first 8 bytes (0 unless a shard)
  unsigned char* dst;   // when not null (any alignment): the bytes are also copied here
};

// One block's work: bytes [index * kMsfp1ChunkBytes, ...) of task `task`.
struct Msfp1Chunk {
  int32_t task;
  int32_t index;
};

constexpr int64_t kMsfp1ChunkBytes = 64 * 1024;

// Adds each task's msfp1 sums into sums[2*task], sums[2*task+1] (zeroed by the caller), and
// copies the task's bytes to its dst when that is set (fused copy + fingerprint). `sums` may be
// null for a plain copy.
// All pointers are device pointers. Integer atomics only: the result is independent of the
// launch configuration and of the order in which blocks run.
void launch_msfp1_sums(const Msfp1Task* tasks, const Msfp1Chunk* chunks, int64_t nchunks,
                       unsigned long long* sums, cudaStream_t stream);

// sums[2t], sums[2t+1] := finalised lanes F_0, F_1 of task t, with L = tasks[t].nbytes.
void launch_msfp1_finalize(const Msfp1Task* tasks, int64_t ntasks, unsigned long long* sums,
                           cudaStream_t stream);

// ---- Fused optimizer steps (optim_kernels.cu).

// Most tensors one optimizer element update touches (== optim::kMaxRoles).
constexpr int kOptimMaxRoles = 5;

// One tensor of a fused optimizer step: its roles (param, grad, state0, state1, state2; the
// functor's kRoles are used, the rest are null), all contiguous with `numel` elements of the
// step's storage type, plus its per-tensor scalars (optim::TensorScalars). s0/s1 hold values
// already rounded to the math type M on the host; a double holds a float exactly, so the kernel
// gets back the same M bits.
struct OptimTask {
  void* roles[kOptimMaxRoles];
  int64_t numel;
  double s0;
  double s1;
  int32_t flag;
  int32_t reserved;
};

// One block's work: elements [index * chunk_elems, ...) of task `task`. Also used by the
// non-finite scan, whose chunks are kNonfiniteChunkBytes bytes.
struct OptimChunk {
  int32_t task;
  int32_t index;
};

// Runs `op` (optim::SgdOp / optim::AdamOp) over every element of every task: one block per
// chunk, many tensors per launch. chunk_elems must be a positive multiple of 8 and the same
// value that cut `chunks`. Results are independent of chunk_elems and the launch
// configuration. With `sums` non-null (a zeroed uint64 [ntasks, Op::kRoles, 2] buffer), it ends
// holding the finalised msfp1 lanes (F_0, F_1) of every role of every task after the update.
// All pointers are device pointers; everything is ordered on `stream`, nothing syncs the host.
// Instantiated in optim_kernels.cu for the SgdOp/AdamOp combinations optim_ops.h uses.
template <class Op>
void launch_optim(const Op& op, const OptimTask* tasks, int64_t ntasks, const OptimChunk* chunks,
                  int64_t nchunks, int64_t chunk_elems, unsigned long long* sums,
                  cudaStream_t stream);

// One tensor of the non-finite scan: `nbytes` contiguous bytes of IEEE words of `width` bytes
// (2, 4 or 8; a complex number is two words), infinite or NaN iff all of `exp_mask` is set.
struct NonfiniteTask {
  const void* data;
  int64_t nbytes;
  uint64_t exp_mask;
  int32_t width;
  int32_t reserved;
};

// Bytes per block of the non-finite scan (a multiple of 16).
constexpr int64_t kNonfiniteChunkBytes = 64 * 1024;

// Sets *flag (device int, zeroed by the caller) to 1 if any word of any task is Inf or NaN.
void launch_nonfinite_any(const NonfiniteTask* tasks, const OptimChunk* chunks, int64_t nchunks,
                          int* flag, cudaStream_t stream);

// ---- Deterministic norm sums (norm_kernels.cu; the tree is defined in memstate/norm_math.h).

// One tensor of norm_sums: `numel` contiguous elements of storage `dtype` (0 float32, 1 float64,
// 2 bfloat16, 3 float16) whose leaves are leaves[leaf_begin .. leaf_begin + leaf_count).
struct NormTask {
  const void* data;
  int64_t numel;
  int64_t leaf_begin;
  int64_t leaf_count;
  int32_t dtype;
  int32_t reserved;
};

// out[t] := the tree over task t's leaves, for t < ntasks, then out[ntasks] := the tree over
// out[0 .. ntasks). `leaves` (nleaves doubles) and `scratch` (ntasks doubles) are device
// scratch buffers; `chunks` maps leaf g to (task, leaf index in the task). `kind` and `p` as
// in norm_math.h. Results are independent of the launch configuration; no host sync.
void launch_norm_sums(const NormTask* tasks, int64_t ntasks, const OptimChunk* chunks, int64_t nleaves,
                      int kind, double p, double* leaves, double* scratch, double* out, cudaStream_t stream);

// Last CUDA error as text, or nullptr when there was none (clears it).
const char* last_error();

}  // namespace cuda
}  // namespace memstate
