// ATen-level helpers shared by the CPU and CUDA glue (tier 2). Kernels never include this.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace memstate {

// A named tensor list argument of an op, for checks whose errors name "arg[index]".
using NamedList = std::pair<const char*, at::TensorList>;

// Bytes of its storage a non-empty strided tensor reaches: up to its last element.
inline int64_t storage_bytes_needed(const at::Tensor& t) {
  const int64_t item = static_cast<int64_t>(t.element_size());
  if (t.is_contiguous()) return (t.storage_offset() + t.numel()) * item;
  int64_t last = t.storage_offset();
  const c10::IntArrayRef sizes = t.sizes(), strides = t.strides();
  for (size_t d = 0; d < sizes.size(); ++d) last += (sizes[d] - 1) * std::abs(strides[d]);
  return (last + 1) * item;
}

// Why a defined tensor has no memory an op may touch, as the end of a sentence naming it ("has
// layout ...", "is a meta tensor ...", "needs N bytes of storage but ..."), or "" when it has.
// Shared by common_device and the optimizers' whole-step check (ops.cpp, step_memory_problem).
inline std::string memory_problem(const at::Tensor& t) {
  if (t.layout() != at::kStrided) return c10::str("has layout ", t.layout(), "; only dense strided tensors are supported");
  if (t.is_meta()) return "is a meta tensor; it has no data to read or write";
  if (t.has_storage() && t.numel() > 0) {  // a freed or shrunk storage (e.g. resize_(0)): no memory to touch
    const int64_t need = storage_bytes_needed(t);
    if (static_cast<int64_t>(t.storage().nbytes()) < need) {
      return c10::str("needs ", need, " bytes of storage but its storage holds ", t.storage().nbytes(),
                      " (was it freed or resized?)");
    }
  }
  return {};
}

// Prefetch hints for passes over many scattered tensors, whose TensorImpls and StorageImpls are
// chains of cache misses: ask for a TensorImpl some tensors ahead, and for its StorageImpl once
// the TensorImpl has arrived (fewer tensors ahead). Hints only: nothing is dereferenced but the
// TensorImpl's storage field.
inline void prefetch_tensor_impl(const c10::TensorImpl* t) {
  const char* q = reinterpret_cast<const char*>(t);
  for (size_t b = 0; b < sizeof(c10::TensorImpl); b += 64) __builtin_prefetch(q + b);
}

inline void prefetch_storage_impl(const c10::TensorImpl* t) {
  const c10::Storage& s = t->unsafe_storage();
  if (s) __builtin_prefetch(s.unsafeGetStorageImpl());
}

// The device of the first tensor over `lists` (in order), after checking that every tensor of
// every list is dense, strided, not a meta tensor, has the storage memory its elements need
// and is on that device. Errors name the argument
// and index of the first offender, and the first tensor's. Returns false (and leaves `device`)
// when every list is empty. Runs before any device guard, so a CPU tensor in a CUDA call fails
// here, with a message, and not deep inside CUDAGuard.
inline bool common_device(const char* op, std::initializer_list<NamedList> lists, c10::Device& device,
                          const char** first_name_out = nullptr, size_t* first_index_out = nullptr) {
  const char* first_name = nullptr;
  size_t first_index = 0;
  for (const auto& [name, list] : lists) {
    for (size_t i = 0; i < list.size(); ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.defined(), "memstate.", op, ": ", name, "[", i, "] is an undefined tensor");
      const std::string problem = memory_problem(t);
      TORCH_CHECK(problem.empty(), "memstate.", op, ": ", name, "[", i, "] ", problem);
      if (first_name == nullptr) {
        first_name = name;
        first_index = i;
        device = t.device();
      }
      TORCH_CHECK(t.device() == device, "memstate.", op, ": ", name, "[", i, "] is on ", t.device(),
                  " but ", first_name, "[", first_index, "] is on ", device, "; pass one device per call");
    }
  }
  if (first_name_out != nullptr) *first_name_out = first_name;
  if (first_index_out != nullptr) *first_index_out = first_index;
  return first_name != nullptr;
}

// Dtypes the non-finite scan understands: every floating and complex dtype whose elements are
// IEEE float32/float64/bfloat16/float16. Other floating dtypes (float8, complex32) are refused
// with the same RuntimeError on every device, before anything runs.
inline bool nonfinite_scannable(at::ScalarType st) {
  switch (st) {
    case at::kFloat:
    case at::kDouble:
    case at::kBFloat16:
    case at::kHalf:
    case at::kComplexFloat:
    case at::kComplexDouble: return true;
    default: return false;
  }
}

inline void check_nonfinite_dtypes(at::TensorList tensors) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::ScalarType st = tensors[i].scalar_type();
    if (!at::isFloatingType(st) && !at::isComplexType(st)) continue;  // integers: never non-finite
    TORCH_CHECK(nonfinite_scannable(st), "memstate.nonfinite_any: tensors[", i, "] has dtype ", st,
                "; supported floating dtypes: float32, float64, bfloat16, float16, complex64, complex128");
  }
}

// The bytes [begin, end) an op reads or writes of one tensor, named for errors.
struct ByteRange {
  uintptr_t begin;
  uintptr_t end;
  const char* name;
  size_t index;
  bool written;
};

inline ByteRange byte_range(const at::Tensor& t, const char* name, size_t index, bool written) {
  const auto b = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  return {b, b + static_cast<uintptr_t>(t.numel()) * static_cast<uintptr_t>(t.element_size()), name, index,
          written};
}

// The first overlap check_no_overlap refuses: a written range that overlaps another range
// (written or read), as {the range, the earlier range it hits}; {nullptr, nullptr} when there
// is none. Reads may overlap each other; empty ranges are ignored. Sorts `ranges`. O(n log n).
inline std::pair<const ByteRange*, const ByteRange*> find_overlap(std::vector<ByteRange>& ranges) {
  ranges.erase(std::remove_if(ranges.begin(), ranges.end(), [](const ByteRange& r) { return r.end <= r.begin; }),
               ranges.end());
  std::sort(ranges.begin(), ranges.end(), [](const ByteRange& a, const ByteRange& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.written > b.written;
  });
  const ByteRange* far_any = nullptr;      // earlier range reaching furthest
  const ByteRange* far_written = nullptr;  // earlier written range reaching furthest
  for (const ByteRange& r : ranges) {
    const ByteRange* hit = r.written ? far_any : far_written;
    if (hit != nullptr && hit->end > r.begin) return {&r, hit};
    if (far_any == nullptr || r.end > far_any->end) far_any = &r;
    if (r.written && (far_written == nullptr || r.end > far_written->end)) far_written = &r;
  }
  return {nullptr, nullptr};
}

// Refuses any written range that overlaps another range (written or read): the kernels split
// tensors into chunks processed in any order, so an overlap would race. The error names both
// arguments.
inline void check_no_overlap(std::vector<ByteRange> ranges, const char* op) {
  const auto [r, hit] = find_overlap(ranges);
  if (r == nullptr) return;
  const bool same = hit->begin == r->begin && hit->end == r->end;
  TORCH_CHECK(false, "memstate.", op, ": ", r->name, "[", r->index, "] ", same ? "is the same memory as " : "overlaps ",
              hit->name, "[", hit->index, "]; ",
              r->written && hit->written ? "a destination may be written only once per call"
                                         : "a destination may not overlap a source");
}

// Validates a tensor list for a byte-level op and returns dense, contiguous tensors whose bytes
// are the logical row-major bytes of the inputs (conjugate and negative views materialised).
// Every tensor must be strided and live on `device`; errors name the offending index.
inline std::vector<at::Tensor> contiguous_bytes_views(at::TensorList tensors, const char* op,
                                                      const c10::Device& device, const char* name = "tensors") {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.layout() == at::kStrided, "memstate.", op, ": ", name, "[", i,
                     "] has layout ", t.layout(), "; only dense strided tensors are supported");
    TORCH_CHECK(t.device() == device, "memstate.", op, ": ", name, "[", i, "] is on ", t.device(),
                " but ", name, "[0] is on ", device, "; pass one device per call");
    try {
      out.push_back(t.resolve_conj().resolve_neg().contiguous());
    } catch (const c10::Error& e) {  // e.g. a huge expanded view the allocator refuses
      TORCH_CHECK(false, "memstate.", op, ": ", name, "[", i, "] (shape ", t.sizes(), ", ", t.scalar_type(),
                  ") could not be made contiguous: ", e.what_without_backtrace());
    }
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
// on src's device and hold exactly as many bytes as src[i]; no destination may overlap another
// destination or any source, except that dst[i] may be exactly src[i]'s memory (an in-place
// copy, as torch's copy_ allows). `src` are the contiguous views actually read. Errors name
// the argument and index.
inline std::vector<unsigned char*> checked_copy_targets(at::TensorList src,
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
  std::vector<ByteRange> ranges;
  for (size_t i = 0; i < src.size(); ++i) {
    ByteRange d = byte_range(dst[i], "dst", i, true);
    ByteRange s = byte_range(src[i], "src", i, false);
    ranges.push_back(d);
    if (s.begin != d.begin || s.end != d.end) ranges.push_back(s);  // in place: one range
  }
  check_no_overlap(std::move(ranges), op);
  return out;
}

}  // namespace memstate
