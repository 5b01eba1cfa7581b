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
// fingerprint). Sources and destinations at any byte offset are read/written in place (the
// kernel uses element-wise loads and stores where a 16-byte vector would be misaligned): no
// clone of a misaligned view. With hash=false only the copy is done and an empty tensor is
// returned. `device` is the common device of all tensors, checked by the caller.
at::Tensor msfp1_run(const c10::Device& device, at::TensorList tensors, at::IntArrayRef first_pairs, bool finalize,
                     const char* op, at::TensorList dst = {}, bool hash = true) {
  TORCH_CHECK(device.is_cuda(), "memstate.", op, ": tensors[0] is on ", device, " in a CUDA call");
  c10::cuda::CUDAGuard guard(device);
  auto ts = contiguous_bytes_views(tensors, op, device, dst.empty() && hash ? "tensors" : "src");
  const auto firsts = checked_first_pairs(first_pairs, ts.size(), op);
  std::vector<unsigned char*> dptr;
  if (!dst.empty() || hash == false) dptr = checked_copy_targets(ts, dst, op);
  std::vector<Msfp1Task> tasks(ts.size());
  std::vector<Msfp1Chunk> chunks;
  for (size_t i = 0; i < ts.size(); ++i) {
    const int64_t nb = nbytes_of(ts[i]);
    tasks[i] = {static_cast<const unsigned char*>(ts[i].const_data_ptr()), static_cast<uint64_t>(nb), firsts[i],
                dptr.empty() ? nullptr : dptr[i]};
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
  c10::Device device(c10::kCUDA);
  if (!common_device("fingerprint", {{"tensors", tensors}}, device)) return at::zeros({0, 2}, at::kLong);
  return msfp1_run(device, tensors, {}, /*finalize=*/true, "fingerprint");
}

at::Tensor fingerprint_sums_cuda(at::TensorList tensors, at::IntArrayRef first_pairs) {
  c10::Device device(c10::kCUDA);
  if (!common_device("fingerprint_sums", {{"tensors", tensors}}, device)) return at::zeros({0, 2}, at::kLong);
  return msfp1_run(device, tensors, first_pairs, /*finalize=*/false, "fingerprint_sums");
}

at::Tensor copy_fingerprint_cuda(at::TensorList src, at::TensorList dst, bool fingerprint) {
  c10::Device device(c10::kCUDA);
  if (!common_device("copy_fingerprint", {{"src", src}, {"dst", dst}}, device)) return at::zeros({0, 2}, at::kLong);
  TORCH_CHECK(dst.size() == src.size(), "memstate.copy_fingerprint: ", src.size(), " sources but ", dst.size(),
              " destinations");
  return msfp1_run(device, src, {}, /*finalize=*/true, "copy_fingerprint", dst, fingerprint);
}

}  // namespace

}  // namespace cuda
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CUDA, m) {
  m.impl("fingerprint", &memstate::cuda::fingerprint_cuda);
  m.impl("fingerprint_sums", &memstate::cuda::fingerprint_sums_cuda);
  m.impl("copy_fingerprint", &memstate::cuda::copy_fingerprint_cuda);
}
