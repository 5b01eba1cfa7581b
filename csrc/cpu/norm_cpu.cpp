// CPU kernel of norm_sums: leaf values in parallel (threads only change who computes a leaf),
// then the fixed pairwise trees on the calling thread. See memstate/norm_math.h.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../norm_ops.h"
#include "kernels.h"

namespace memstate {
namespace cpu {

namespace {

using norm::kLanes;
using norm::kLeafElems;

// The leaf of `n` (1 .. kLeafElems) elements at x: 32 lanes, then the halving fold.
template <int Kind, class T>
inline __attribute__((always_inline)) double leaf_value(const T* x, int64_t n, double p) {
  double lane[kLanes];
  for (int j = 0; j < kLanes; ++j) lane[j] = 0.0;
  if (n == kLeafElems) {
    for (int k = 0; k < kLanes; ++k)
      for (int j = 0; j < kLanes; ++j)
        lane[j] = norm::combine<Kind>(lane[j], norm::element_term<Kind>(x[k * kLanes + j], p));
  } else {
    for (int k = 0; k < kLanes; ++k)
      for (int j = 0; j < kLanes; ++j) {
        const int64_t idx = k * kLanes + j;
        lane[j] = norm::combine<Kind>(lane[j], idx < n ? norm::element_term<Kind>(x[idx], p) : 0.0);
      }
  }
  for (int s = kLanes / 2; s >= 1; s /= 2)
    for (int j = 0; j < s; ++j) lane[j] = norm::combine<Kind>(lane[j], lane[j + s]);
  return lane[0];
}

// The same leaf compiled for AVX2 (wider vectors for the 32 lanes; IEEE add and multiply with
// no contraction give the same bits on either path, which the tests check with set_cpu_isa).
template <int Kind, class T>
__attribute__((target("avx2"))) double leaf_value_avx2(const T* x, int64_t n, double p) {
  return leaf_value<Kind>(x, n, p);
}

template <int Kind, class T>
double leaf(const T* x, int64_t n, double p, bool avx2) {
  return avx2 ? leaf_value_avx2<Kind>(x, n, p) : leaf_value<Kind>(x, n, p);
}

// The strided pairwise tree over v[0 .. n), in place; 0 for n == 0.
template <int Kind>
double tree(double* v, int64_t n) {
  for (int64_t s = 1; s < n; s *= 2)
    for (int64_t i = 0; i + s < n; i += 2 * s) v[i] = norm::combine<Kind>(v[i], v[i + s]);
  return n > 0 ? canonical_nan(v[0]) : 0.0;
}

template <class T>
const T* as(const at::Tensor& t) {
  return static_cast<const T*>(t.const_data_ptr());
}

// float64 [N + 1]: per tensor the sum of |x|^p (max |x| for inf), then their combination.
at::Tensor norm_sums_cpu(at::TensorList tensors, double p) {
  c10::Device device(c10::kCPU);
  bool any = false;
  const int kind = norm_kind(p);
  const std::vector<at::Tensor> ts = norm_inputs(tensors, device, any);
  const int64_t n = static_cast<int64_t>(ts.size());
  std::vector<int64_t> leaf_begin(n + 1, 0);
  int64_t total_bytes = 0;
  for (int64_t i = 0; i < n; ++i) {
    leaf_begin[i + 1] = leaf_begin[i] + norm_leaf_count(ts[i].numel());
    total_bytes += ts[i].nbytes();
  }
  const int64_t nleaves = leaf_begin[n];
  std::vector<double> leaves(nleaves);
  at::Tensor out = at::empty({n + 1}, at::kDouble);
  double* o = out.data_ptr<double>();
  const bool avx2 = active_isa() == Isa::kAvx2;
  norm::dispatch_kind(kind, [&](auto tag) {
    constexpr int K = decltype(tag)::value;
    at::parallel_for(0, nleaves, chunk_grain(nleaves, total_bytes), [&](int64_t begin, int64_t end) {
      int64_t t = std::upper_bound(leaf_begin.begin(), leaf_begin.end(), begin) - leaf_begin.begin() - 1;
      for (int64_t l = begin; l < end; ++l) {
        while (leaf_begin[t + 1] <= l) ++t;
        const at::Tensor& x = ts[t];
        const int64_t start = (l - leaf_begin[t]) * kLeafElems;
        const int64_t len = std::min<int64_t>(kLeafElems, x.numel() - start);
        switch (norm_dtype_code(x, t)) {
          case 0: leaves[l] = leaf<K>(as<float>(x) + start, len, p, avx2); break;
          case 1: leaves[l] = leaf<K>(as<double>(x) + start, len, p, avx2); break;
          case 2: leaves[l] = leaf<K>(as<bf16_bits>(x) + start, len, p, avx2); break;
          default: leaves[l] = leaf<K>(as<f16_bits>(x) + start, len, p, avx2); break;
        }
      }
    });
    for (int64_t i = 0; i < n; ++i) o[i] = tree<K>(leaves.data() + leaf_begin[i], leaf_begin[i + 1] - leaf_begin[i]);
    std::vector<double> per(o, o + n);
    o[n] = tree<K>(per.data(), n);
  });
  return out;
}

}  // namespace

}  // namespace cpu
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CPU, m) {
  m.impl("norm_sums", &memstate::cpu::norm_sums_cpu);
}
