// CPU implementation of the msfp1 ops: splits every tensor's bytes into fixed-size chunks,
// spreads the chunks over threads with at::parallel_for, and adds the per-chunk sums. The
// result never depends on the thread count or the chunk size: the sums are integers mod 2^64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../tensor_util.h"
#include "../copy_plan.h"
#include "kernels.h"
#include "memstate/msfp1.h"

namespace memstate {
namespace cpu {

namespace {

int64_t g_chunk_bytes = int64_t{1} << 19;  // 512 KiB per work item

// The bytes an op reads, one pass over the tensors: pointer and byte count of each. When every
// tensor already is dense bytes (contiguous, no lazy conjugate or negation: the common case)
// they are read in place, without contiguous_bytes_views' two dispatcher calls (resolve_conj,
// resolve_neg) and tensor handle copy per tensor: in a call over ~1,000 small tensors those were
// a large part of the per-tensor host cost. Otherwise `owned` holds the materialised views and
// the pointers are theirs. Callers have run common_device (layout and device checked).
struct SourceBytes {
  std::vector<const unsigned char*> ptr;
  std::vector<int64_t> nbytes;
  std::vector<at::Tensor> owned;  // the materialised views, when some tensor was not dense bytes

  SourceBytes(at::TensorList tensors, const char* op, const c10::Device& device, const char* name = "tensors")
      : ptr(tensors.size()), nbytes(tensors.size()) {
    for (size_t i = 0; i < tensors.size(); ++i) {
      const at::Tensor& t = tensors[i];
      if (!t.is_contiguous() || t.is_conj() || t.is_neg()) {
        owned = contiguous_bytes_views(tensors, op, device, name);
        fill(owned);
        return;
      }
      ptr[i] = static_cast<const unsigned char*>(t.const_data_ptr());
      nbytes[i] = nbytes_of(t);
    }
  }

  int64_t size() const { return static_cast<int64_t>(ptr.size()); }

  // The tensors read: `tensors` itself or the materialised views.
  at::TensorList read(at::TensorList tensors) const { return owned.empty() ? tensors : at::TensorList(owned); }

 private:
  void fill(at::TensorList ts) {
    for (size_t i = 0; i < ts.size(); ++i) {
      ptr[i] = static_cast<const unsigned char*>(ts[i].const_data_ptr());
      nbytes[i] = nbytes_of(ts[i]);
    }
  }
};

// Sums of every source as an int64 [N, 2] tensor holding the uint64 bit patterns (finalised when
// `finalize`). When `dst` is given, each chunk of source i is first copied to dst[i] and the copy
// is hashed while in cache: a fused copy + fingerprint in one pass over memory; `hash` false
// copies only (the rows stay zero).
at::Tensor msfp1_rows(const SourceBytes& src, const uint64_t* first_pairs, bool finalize,
                      const std::vector<unsigned char*>* dst = nullptr, bool hash = true) {
  const int64_t n = src.size();
  const int64_t chunk = g_chunk_bytes;
  std::vector<int64_t> chunk_begin;
  msfp1_chunk_table(src.nbytes.data(), n, chunk, chunk_begin);
  at::Tensor out = at::zeros({n, 2}, at::kLong);
  auto* rows = hash ? reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>()) : nullptr;
  msfp1_ranges(n, src.ptr.data(), dst != nullptr ? dst->data() : nullptr, src.nbytes.data(), first_pairs,
               chunk_begin.data(), chunk, rows);
  if (finalize && rows != nullptr) msfp1_finalize_rows(rows, src.nbytes.data(), n);
  return out;
}

at::Tensor fingerprint_sums_cpu(at::TensorList tensors, at::IntArrayRef first_pairs) {
  c10::Device device(c10::kCPU);
  common_device("fingerprint_sums", {{"tensors", tensors}}, device);
  const SourceBytes src(tensors, "fingerprint_sums", device);
  return msfp1_rows(src, checked_first_pairs(first_pairs, tensors.size(), "fingerprint_sums").data(), false);
}

at::Tensor copy_fingerprint_cpu(at::TensorList src, at::TensorList dst, bool fingerprint) {
  c10::Device device(c10::kCPU);
  common_device("copy_fingerprint", {{"src", src}, {"dst", dst}}, device);
  TORCH_CHECK(dst.size() == src.size(), "memstate.copy_fingerprint: ", src.size(), " sources but ", dst.size(),
              " destinations");
  const SourceBytes bytes(src, "copy_fingerprint", device, "src");
  const auto dptr = checked_copy_targets(bytes.read(src), dst, "copy_fingerprint");
  at::Tensor out = msfp1_rows(bytes, nullptr, true, &dptr, fingerprint);
  return fingerprint ? out : at::empty({0}, at::kLong);
}

}  // namespace

at::Tensor fingerprint_rows_cpu(at::TensorList tensors) {
  c10::Device device(c10::kCPU);
  common_device("fingerprint", {{"tensors", tensors}}, device);
  return msfp1_rows(SourceBytes(tensors, "fingerprint", device), nullptr, true);
}

// Copies of at least this many bytes in all use non-temporal stores (as memcpy does for large
// copies): the destination is not read first and does not evict the cache.
constexpr int64_t kStreamBytes = int64_t{8} << 20;

void msfp1_chunk_table(const int64_t* nbytes, int64_t n, int64_t chunk, std::vector<int64_t>& chunk_begin) {
  chunk_begin.assign(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) chunk_begin[i + 1] = chunk_begin[i] + (nbytes[i] + chunk - 1) / chunk;
}

void msfp1_ranges(int64_t n, const unsigned char* const* src, unsigned char* const* dst, const int64_t* nbytes,
                  const uint64_t* first_pairs, const int64_t* chunk_begin, int64_t chunk, uint64_t* out) {
  const int64_t nchunks = chunk_begin[n];
  int64_t total_bytes = 0;
  for (int64_t i = 0; i < n; ++i) total_bytes += nbytes[i];
  // per-chunk sums, in a buffer this thread keeps: a large call reuses its pages instead of
  // mapping and faulting in new ones every time
  thread_local std::vector<uint64_t> buffer;
  buffer.assign(out != nullptr ? 2 * nchunks : 0, 0);
  uint64_t* partial = buffer.data();  // (the workers must use this thread's buffer, not their own)
  const bool stream = total_bytes >= kStreamBytes;
  at::parallel_for(0, nchunks, chunk_grain(nchunks, total_bytes), [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(chunk_begin, chunk_begin + n + 1, begin) - chunk_begin - 1;
    for (int64_t c = begin; c < end; ++c) {
      while (chunk_begin[t + 1] <= c) ++t;
      const int64_t start = (c - chunk_begin[t]) * chunk;
      const int64_t len = std::min(chunk, nbytes[t] - start);
      const unsigned char* data = src[t] + start;
      const uint64_t pair = (first_pairs != nullptr ? first_pairs[t] : 0) +
                            static_cast<uint64_t>(start / msfp1::kPairBytes);
      if (dst != nullptr && out != nullptr) {  // copy and hash from the same registers
        msfp1_copy_accumulate(data, dst[t] + start, static_cast<uint64_t>(len), pair, partial[2 * c],
                              partial[2 * c + 1], stream);
      } else if (dst != nullptr) {
        std::memcpy(dst[t] + start, data, static_cast<size_t>(len));
      } else if (out != nullptr) {
        msfp1_accumulate(data, static_cast<uint64_t>(len), pair, partial[2 * c], partial[2 * c + 1]);
      }
    }
  });
  if (out == nullptr) return;
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = chunk_begin[i]; c < chunk_begin[i + 1]; ++c) {
      out[2 * i] += partial[2 * c];
      out[2 * i + 1] += partial[2 * c + 1];
    }
  }
}

void msfp1_finalize_rows(uint64_t* rows, const int64_t* nbytes, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const auto nb = static_cast<uint64_t>(nbytes[i]);
    rows[2 * i] = msfp1::finalize_lane0(rows[2 * i], nb);
    rows[2 * i + 1] = msfp1::finalize_lane1(rows[2 * i + 1], nb);
  }
}

int64_t fingerprint_chunk_bytes() { return g_chunk_bytes; }

void set_fingerprint_chunk_bytes(int64_t bytes) {
  TORCH_CHECK(bytes >= 64 && bytes % 64 == 0,
              "memstate: fingerprint chunk size must be a positive multiple of 64 bytes, got ",
              bytes);
  g_chunk_bytes = bytes;
}

}  // namespace cpu
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CPU, m) {
  m.impl("fingerprint", &memstate::cpu::fingerprint_rows_cpu);
  m.impl("fingerprint_sums", &memstate::cpu::fingerprint_sums_cpu);
  m.impl("copy_fingerprint", &memstate::cpu::copy_fingerprint_cpu);
}
