// Deterministic vector norms (memstate.clip_grad_norm_): the ONE definition of the reduction
// tree, shared by the CPU kernels (g++) and the CUDA kernels (nvcc).
//
// For a list of tensors and a norm order p (1, 2, a finite p > 0, or inf) memstate computes, in
// float64, per tensor the sum of |x|^p over its elements (the max of |x| for inf), then the sum
// over tensors, by this fixed tree, whatever the thread count, work-chunk size or launch
// configuration:
//
//   1. term(x) = |x|^p as a double (x*x for p = 2 and |x| for p = 1, exactly rounded; pow() for
//      other p, whose last bit may differ between the host libm and CUDA).
//   2. A tensor's elements, in logical row-major order, are cut into leaves of kNormLeafElems
//      (1024) elements; the last leaf is padded with zeros (term 0).
//   3. Leaf: 32 lane accumulators; lane j (0..31) adds the terms of elements k*32 + j for
//      k = 0..31, in order of k, starting from +0. Then the lanes are folded by halving:
//      for s = 16, 8, 4, 2, 1: lane[j] = lane[j] (+) lane[j + s] for j < s. The leaf is lane[0].
//   4. Leaves of one tensor, and then the per-tensor values of the list, are combined by the
//      same strided pairwise tree: for stride s = 1, 2, 4, ...: v[i] = v[i] (+) v[i + s] for
//      every i that is a multiple of 2s with i + s < n. The result is v[0] (0 for no values).
//
// (+) is IEEE addition (round to nearest, no contraction) for finite p, and a NaN-propagating
// max for inf. A NaN result is returned as the canonical quiet NaN.
#pragma once

#include <cmath>

#include "memstate/macros.h"
#include "memstate/precision.h"

namespace memstate {
namespace norm {

constexpr int kLanes = 32;
constexpr int kLeafElems = kLanes * kLanes;  // 1024

// Which reduction: sum of x*x, sum of |x|, sum of pow(|x|, p), or max of |x|.
enum Kind : int { kL2 = 0, kL1 = 1, kLp = 2, kLinf = 3 };

template <int Kind>
MEMSTATE_HD double term(double x, double p) {
  const double a = x < 0 ? -x : x;  // fabs, but NaN stays NaN either way
  if (Kind == kL2) return x * x;
  if (Kind == kLp) return pow(a, p);
  return a;  // kL1, kLinf
}

template <int Kind>
MEMSTATE_HD double combine(double a, double b) {
  if (Kind != kLinf) return a + b;
  if (a != a) return a;
  if (b != b) return b;
  return a > b ? a : b;
}

// Term of one stored element (float32, float64, bfloat16, float16), widened exactly to double.
template <int Kind, class T>
MEMSTATE_HD double element_term(T v, double p) {
  return term<Kind>(static_cast<double>(to_math(v)), p);
}

// Host code: calls f(KindTag<kind>{}), the reduction kind as a compile-time constant.
template <int K>
struct KindTag {
  static constexpr int value = K;
};
template <class F>
inline void dispatch_kind(int kind, F&& f) {
  switch (kind) {
    case kL2: f(KindTag<kL2>{}); break;
    case kL1: f(KindTag<kL1>{}); break;
    case kLp: f(KindTag<kLp>{}); break;
    default: f(KindTag<kLinf>{}); break;
  }
}

}  // namespace norm
}  // namespace memstate
