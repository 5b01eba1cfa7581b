// Helpers shared by the CUDA glue files (tier 2, ATen level; kernels never include this).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstring>
#include <utility>
#include <vector>

#include "kernels.h"

namespace memstate {
namespace cuda {

// Throws naming `what` if the last kernel launch failed.
inline void check_launch(const char* what) {
  const char* err = last_error();
  TORCH_CHECK(err == nullptr, "memstate.", what, ": CUDA kernel launch failed: ", err);
}

// Copies `bytes` of host data into a fresh device buffer, ordered on the current stream. The
// staging buffer is pinned, so the copy is asynchronous; the caching host allocator keeps it
// alive until the copy has run.
inline at::Tensor upload(const void* host, size_t bytes, const c10::Device& device) {
  at::Tensor pinned =
      at::empty({static_cast<int64_t>(bytes)}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(pinned.data_ptr(), host, bytes);
  return pinned.to(device, /*non_blocking=*/true);
}

// Two host tables (a task table and a chunk table) in one device buffer, each 16-byte aligned.
// `meta` owns the memory: keep it alive until the kernels that read the tables are enqueued
// (the caching allocator orders its reuse on the stream).
template <class A, class B>
struct DeviceTables {
  at::Tensor meta;
  const A* a = nullptr;
  const B* b = nullptr;
};

// Ships both tables with one pinned, stream-ordered copy (one copy instead of two).
template <class A, class B>
DeviceTables<A, B> upload_tables(const std::vector<A>& a, const std::vector<B>& b,
                                 const c10::Device& device) {
  const size_t a_bytes = a.size() * sizeof(A);
  const size_t b_off = (a_bytes + 15) / 16 * 16;
  std::vector<unsigned char> blob(b_off + b.size() * sizeof(B));
  if (!a.empty()) std::memcpy(blob.data(), a.data(), a_bytes);
  if (!b.empty()) std::memcpy(blob.data() + b_off, b.data(), b.size() * sizeof(B));
  DeviceTables<A, B> t;
  if (blob.empty()) return t;
  t.meta = upload(blob.data(), blob.size(), device);
  const auto* base = static_cast<const unsigned char*>(t.meta.const_data_ptr());
  t.a = reinterpret_cast<const A*>(base);
  t.b = reinterpret_cast<const B*>(base + b_off);
  return t;
}

}  // namespace cuda
}  // namespace memstate
