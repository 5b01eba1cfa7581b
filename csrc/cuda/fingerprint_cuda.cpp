// CUDA glue for the msfp1 ops (tier 2): validates tensors, builds the task and chunk tables,
// ships them to the device in one pinned, stream-ordered copy, and launches the torch-free
// kernels of fingerprint_kernels.cu on the current stream. No host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../tensor_util.h"
#include "glue_util.h"
#include "kernels.h"

namespace memstate {
namespace cuda {

namespace {

// Sums of every tensor into an int64 [N, 2] device tensor; finalised when `finalize`.
// With `dst`, each tensor's bytes are also copied to dst[i] in the same pass (fused copy +
// fingerprint); a destination that is not 16-byte aligned is filled by an ATen copy instead.
// With hash=false only the copy is done and an empty tensor is returned.
at::Tensor msfp1_run(at::TensorList tensors, at::IntArrayRef first_pairs, bool finalize,
                     const char* op, at::TensorList dst = {}, bool hash = true) {
  const c10::Device device = tensors[0].device();
  c10::cuda::CUDAGuard guard(device);
  auto ts = contiguous_bytes_views(tensors, op, device);
  const auto firsts = checked_first_pairs(first_pairs, ts.size(), op);
  std::vector<unsigned char*> dptr;
  if (!dst.empty() || hash == false) dptr = checked_copy_targets(ts, dst, op);
  std::vector<Msfp1Task> tasks(ts.size());
  std::vector<Msfp1Chunk> chunks;
  for (size_t i = 0; i < ts.size(); ++i) {
    // The kernel reads 16-byte vectors: give it an aligned copy of an oddly offset view.
    if (reinterpret_cast<uintptr_t>(ts[i].const_data_ptr()) % 16 != 0) ts[i] = ts[i].clone();
    const int64_t nb = nbytes_of(ts[i]);
    unsigned char* to = dptr.empty() ? nullptr : dptr[i];
    if (to != nullptr && reinterpret_cast<uintptr_t>(to) % 16 != 0) {
      dst[i].view({-1}).view(at::kByte).copy_(ts[i].view({-1}).view(at::kByte));
      to = nullptr;  // copied; the kernel only hashes
    }
    tasks[i] = {static_cast<const unsigned char*>(ts[i].const_data_ptr()),
                static_cast<uint64_t>(nb), firsts[i], to};
    const int64_t n = (nb + kMsfp1ChunkBytes - 1) / kMsfp1ChunkBytes;
    TORCH_CHECK(n < (int64_t{1} << 31), "memstate.", op, ": tensors[", i, "] is too large");
    for (int64_t c = 0; c < n; ++c) chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
  }
  const auto tables = upload_tables(tasks, chunks, device);

  at::Tensor out = at::zeros({hash ? static_cast<int64_t>(ts.size()) : 0, 2},
                             at::TensorOptions().dtype(at::kLong).device(device));
  auto* sums = hash ? reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()) : nullptr;
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  launch_msfp1_sums(tables.a, tables.b, static_cast<int64_t>(chunks.size()), sums, stream);
  check_launch(op);
  if (!hash) return at::empty({0}, at::TensorOptions().dtype(at::kLong).device(device));
  if (finalize) {
    launch_msfp1_finalize(tables.a, static_cast<int64_t>(tasks.size()), sums, stream);
    check_launch(op);
  }
  return out;
}

at::Tensor fingerprint_cuda(at::TensorList tensors) {
  if (tensors.empty()) return at::zeros({0, 2}, at::kLong);
  return msfp1_run(tensors, {}, /*finalize=*/true, "fingerprint");
}

at::Tensor fingerprint_sums_cuda(at::TensorList tensors, at::IntArrayRef first_pairs) {
  if (tensors.empty()) return at::zeros({0, 2}, at::kLong);
  return msfp1_run(tensors, first_pairs, /*finalize=*/false, "fingerprint_sums");
}

at::Tensor copy_fingerprint_cuda(at::TensorList src, at::TensorList dst, bool fingerprint) {
  if (src.empty()) return at::zeros({0, 2}, at::kLong);
  return msfp1_run(src, {}, /*finalize=*/true, "copy_fingerprint", dst, fingerprint);
}

}  // namespace

}  // namespace cuda
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CUDA, m) {
  m.impl("fingerprint", &memstate::cuda::fingerprint_cuda);
  m.impl("fingerprint_sums", &memstate::cuda::fingerprint_sums_cuda);
  m.impl("copy_fingerprint", &memstate::cuda::copy_fingerprint_cuda);
}
