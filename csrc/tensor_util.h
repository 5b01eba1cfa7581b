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

// Destination pointers of a byte copy src[i] -> dst[i]: every dst must be dense, contiguous,
// on src's device and hold exactly as many bytes as src[i]. Errors name the index.
inline std::vector<unsigned char*> checked_copy_targets(const std::vector<at::Tensor>& src,
                                                        at::TensorList dst, const char* op) {
  TORCH_CHECK(dst.size() == src.size(), "memstate.", op, ": ", src.size(), " sources but ",
              dst.size(), " destinations");
  std::vector<unsigned char*> out(src.size());
  for (size_t i = 0; i < src.size(); ++i) {
    const at::Tensor& d = dst[i];
    TORCH_CHECK(d.layout() == at::kStrided && d.is_contiguous() && !d.is_conj() && !d.is_neg(),
                "memstate.", op, ": dst[", i, "] must be a dense contiguous tensor");
    TORCH_CHECK(d.device() == src[i].device(), "memstate.", op, ": dst[", i, "] is on ",
                d.device(), " but src[", i, "] is on ", src[i].device());
    TORCH_CHECK(nbytes_of(d) == nbytes_of(src[i]), "memstate.", op, ": dst[", i, "] holds ",
                nbytes_of(d), " bytes but src[", i, "] has ", nbytes_of(src[i]));
    out[i] = static_cast<unsigned char*>(d.data_ptr());
  }
  return out;
}

}  // namespace memstate
