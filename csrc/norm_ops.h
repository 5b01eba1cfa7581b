// ATen-level checks of the deterministic norm op (norm_sums), shared by the CPU and CUDA glue.
// The reduction itself is defined in memstate/norm_math.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <vector>

#include "memstate/norm_math.h"
#include "tensor_util.h"

namespace memstate {

// The reduction for norm order p: 2, 1, inf, or another finite p > 0.
inline int norm_kind(double p) {
  TORCH_CHECK(p > 0, "memstate.norm_sums: norm order p must be > 0 or inf, got ", p);
  if (std::isinf(p)) return norm::kLinf;
  if (p == 2.0) return norm::kL2;
  if (p == 1.0) return norm::kL1;
  return norm::kLp;
}

// Storage code of a tensor the norm reads: 0 float32, 1 float64, 2 bfloat16, 3 float16.
inline int32_t norm_dtype_code(const at::Tensor& t, size_t i) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kDouble: return 1;
    case at::kBFloat16: return 2;
    case at::kHalf: return 3;
    default:
      TORCH_CHECK(false, "memstate.norm_sums: tensors[", i, "] has dtype ", t.scalar_type(),
                  "; supported: float32, float64, bfloat16, float16 (view complex tensors as real)");
  }
}

// Number of leaves (norm::kLeafElems elements each, the last one padded) of n elements.
inline int64_t norm_leaf_count(int64_t n) { return (n + norm::kLeafElems - 1) / norm::kLeafElems; }

// Checks every tensor (one device, dense, a supported dtype) before anything runs and returns
// their logical row-major contiguous versions. False in `any` when the list is empty.
inline std::vector<at::Tensor> norm_inputs(at::TensorList tensors, c10::Device& device, bool& any) {
  any = common_device("norm_sums", {{"tensors", tensors}}, device);
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    norm_dtype_code(tensors[i], i);
    out.push_back(tensors[i].contiguous());
  }
  return out;
}

}  // namespace memstate
