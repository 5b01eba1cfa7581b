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
#include "kernels.h"
#include "memstate/msfp1.h"

namespace memstate {
namespace cpu {

namespace {

int64_t g_chunk_bytes = int64_t{1} << 19;  // 512 KiB per work item

// Sums of every tensor as an int64 [N, 2] tensor holding the uint64 bit patterns. When `dst` is
// given, each chunk of ts[i] is first copied to dst[i] and the copy is hashed while in cache:
// a fused copy + fingerprint in one pass over memory.
at::Tensor msfp1_sums(const std::vector<at::Tensor>& ts, const std::vector<uint64_t>& first_pairs,
                      const std::vector<unsigned char*>* dst = nullptr, bool hash = true) {
  const int64_t n = static_cast<int64_t>(ts.size());
  const int64_t chunk = g_chunk_bytes;
  std::vector<int64_t> chunk_begin(n + 1, 0);  // prefix sum of chunks per tensor
  int64_t total_bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t nb = nbytes_of(ts[i]);
    total_bytes += nb;
    chunk_begin[i + 1] = chunk_begin[i] + (nb + chunk - 1) / chunk;
  }
  const int64_t nchunks = chunk_begin[n];
  std::vector<uint64_t> partial(2 * nchunks, 0);
  at::parallel_for(0, nchunks, chunk_grain(nchunks, total_bytes), [&](int64_t begin, int64_t end) {
    int64_t t = std::upper_bound(chunk_begin.begin(), chunk_begin.end(), begin) -
                chunk_begin.begin() - 1;
    for (int64_t c = begin; c < end; ++c) {
      while (chunk_begin[t + 1] <= c) ++t;
      const int64_t start = (c - chunk_begin[t]) * chunk;
      const int64_t len = std::min(chunk, nbytes_of(ts[t]) - start);
      const auto* data = static_cast<const unsigned char*>(ts[t].const_data_ptr()) + start;
      if (dst != nullptr) {
        unsigned char* to = (*dst)[t] + start;
        std::memcpy(to, data, static_cast<size_t>(len));
        data = to;
      }
      if (hash) msfp1_accumulate(data, static_cast<uint64_t>(len),
                       first_pairs[t] + static_cast<uint64_t>(start / msfp1::kPairBytes),
                       partial[2 * c], partial[2 * c + 1]);
    }
  });
  at::Tensor out = at::zeros({n, 2}, at::kLong);
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  for (int64_t i = 0; i < n; ++i) {
    for (int64_t c = chunk_begin[i]; c < chunk_begin[i + 1]; ++c) {
      o[2 * i] += partial[2 * c];
      o[2 * i + 1] += partial[2 * c + 1];
    }
  }
  return out;
}

at::Tensor fingerprint_sums_cpu(at::TensorList tensors, at::IntArrayRef first_pairs) {
  c10::Device device(c10::kCPU);
  common_device("fingerprint_sums", {{"tensors", tensors}}, device);
  auto ts = contiguous_bytes_views(tensors, "fingerprint_sums", device);
  return msfp1_sums(ts, checked_first_pairs(first_pairs, ts.size(), "fingerprint_sums"));
}

void finalize_rows(at::Tensor& out, const std::vector<at::Tensor>& ts) {
  auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
  for (size_t i = 0; i < ts.size(); ++i) {
    const auto nb = static_cast<uint64_t>(nbytes_of(ts[i]));
    o[2 * i] = msfp1::finalize_lane0(o[2 * i], nb);
    o[2 * i + 1] = msfp1::finalize_lane1(o[2 * i + 1], nb);
  }
}

at::Tensor fingerprint_cpu(at::TensorList tensors) {
  c10::Device device(c10::kCPU);
  common_device("fingerprint", {{"tensors", tensors}}, device);
  auto ts = contiguous_bytes_views(tensors, "fingerprint", device);
  at::Tensor out = msfp1_sums(ts, std::vector<uint64_t>(ts.size(), 0));
  finalize_rows(out, ts);
  return out;
}

at::Tensor copy_fingerprint_cpu(at::TensorList src, at::TensorList dst, bool fingerprint) {
  c10::Device device(c10::kCPU);
  common_device("copy_fingerprint", {{"src", src}, {"dst", dst}}, device);
  TORCH_CHECK(dst.size() == src.size(), "memstate.copy_fingerprint: ", src.size(), " sources but ", dst.size(),
              " destinations");
  auto ts = contiguous_bytes_views(src, "copy_fingerprint", device, "src");
  const auto dptr = checked_copy_targets(ts, dst, "copy_fingerprint");
  at::Tensor out = msfp1_sums(ts, std::vector<uint64_t>(ts.size(), 0), &dptr, fingerprint);
  if (!fingerprint) return at::empty({0}, at::kLong);
  finalize_rows(out, ts);
  return out;
}

}  // namespace

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
  m.impl("fingerprint", &memstate::cpu::fingerprint_cpu);
  m.impl("fingerprint_sums", &memstate::cpu::fingerprint_sums_cpu);
  m.impl("copy_fingerprint", &memstate::cpu::copy_fingerprint_cpu);
}
