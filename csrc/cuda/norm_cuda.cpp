// CUDA glue of norm_sums (tier 2): builds the task and leaf tables, ships them in one pinned,
// stream-ordered copy and launches the torch-free kernels of norm_kernels.cu. No host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../norm_ops.h"
#include "glue_util.h"
#include "kernels.h"

namespace memstate {
namespace cuda {

namespace {

constexpr int64_t kMaxLeafIndex = (int64_t{1} << 31) - 1;

at::Tensor norm_sums_cuda(at::TensorList tensors, double p) {
  c10::Device device(c10::kCUDA);
  bool any = false;
  const int kind = norm_kind(p);
  const std::vector<at::Tensor> ts = norm_inputs(tensors, device, any);
  TORCH_CHECK(!any || device.is_cuda(), "memstate.norm_sums: tensors[0] is on ", device, " in a CUDA call");
  c10::cuda::CUDAGuard guard(device);
  const int64_t n = static_cast<int64_t>(ts.size());
  std::vector<NormTask> tasks;
  std::vector<OptimChunk> leaves_of;
  int64_t nleaves = 0;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t count = norm_leaf_count(ts[i].numel());
    TORCH_CHECK(count <= kMaxLeafIndex, "memstate.norm_sums: tensors[", i, "] is too large (", ts[i].numel(),
                " elements)");
    tasks.push_back({ts[i].const_data_ptr(), ts[i].numel(), nleaves, count, norm_dtype_code(ts[i], i), 0});
    for (int64_t k = 0; k < count; ++k) leaves_of.push_back({static_cast<int32_t>(i), static_cast<int32_t>(k)});
    nleaves += count;
  }
  const auto f64 = at::TensorOptions().dtype(at::kDouble).device(device);
  at::Tensor out = at::zeros({n + 1}, f64);
  at::Tensor leaves = at::empty({nleaves}, f64);
  at::Tensor scratch = at::empty({n}, f64);
  const auto tables = upload_tables(tasks, leaves_of, device);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  launch_norm_sums(tables.a, n, tables.b, nleaves, kind, p, leaves.data_ptr<double>(), scratch.data_ptr<double>(),
                   out.data_ptr<double>(), stream);
  check_launch("norm_sums");
  return out;
}

}  // namespace

}  // namespace cuda
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CUDA, m) {
  m.impl("norm_sums", &memstate::cuda::norm_sums_cuda);
}
