// ATen-level helpers shared by the CPU and CUDA glue (tier 2). Kernels never include this.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>
#include <vector>

namespace memstate {

// Validates a tensor list for a byte-level op and returns dense, contiguous tensors whose bytes
// are the logical row-major bytes of the inputs (conjugate and negative views materialised).
// Every tensor must be strided and live on `device`; errors name the offending index.
inline std::vector<at::Tensor> contiguous_bytes_views(at::TensorList tensors, const char* op,
                                                      const c10::Device& device) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK_TYPE(t.layout() == at::kStrided, "memstate.", op, ": tensors[", i,
                     "] has layout ", t.layout(), "; only dense strided tensors are supported");
    TORCH_CHECK(t.device() == device, "memstate.", op, ": tensors[", i, "] is on ", t.device(),
                " but tensors[0] is on ", device, "; pass one device per call");
    out.push_back(t.resolve_conj().resolve_neg().contiguous());
  }
  return out;
}

inline int64_t nbytes_of(const at::Tensor& t) {
  return static_cast<int64_t>(t.numel()) * static_cast<int64_t>(t.element_size());
}

// first_pairs is empty (all zero) or has one entry per tensor, each >= 0.
inline std::vector<uint64_t> checked_first_pairs(at::IntArrayRef first_pairs, size_t n,
                                                 const char* op) {
  std::vector<uint64_t> out(n, 0);
  if (first_pairs.empty()) return out;
  TORCH_CHECK(first_pairs.size() == n, "memstate.", op, ": got ", first_pairs.size(),
              " first_pairs for ", n, " tensors");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(first_pairs[i] >= 0, "memstate.", op, ": first_pairs[", i, "] = ",
                first_pairs[i], " is negative");
    out[i] = static_cast<uint64_t>(first_pairs[i]);
  }
  return out;
}

}  // namespace memstate
