// CUDA glue of the fused optimizer ops (tier 2): the device-independent entry points of
// optim_ops.h (checks, float64 scalars rounded once, dtype/flag dispatch) with a runner that
// builds the task and chunk tables, ships them in one pinned, stream-ordered copy and launches
// the torch-free kernels of optim_kernels.cu on the current stream. No host sync.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../cpu/kernels.h"
#include "../optim_ops.h"
#include "glue_util.h"
#include "kernels.h"

namespace memstate {
namespace cuda {

namespace {

constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

struct CudaRunner {
  template <class Op>
  static at::Tensor run(const Op& op, const OptimArgs& a,
                        const std::vector<optim::TensorScalars<typename Op::M>>& ts, bool fingerprint) {
    constexpr int R = Op::kRoles;
    TORCH_INTERNAL_ASSERT(a.nroles == R && a.n > 0 && static_cast<int64_t>(ts.size()) == a.n);
    const c10::Device device = a.roles[0][0].device();
    TORCH_CHECK(device.is_cuda(), "memstate: CUDA optimizer step got params[0] on ", device);
    c10::cuda::CUDAGuard guard(device);
    // The CPU and CUDA paths share the chunk setting: tests vary it to show results do not
    // depend on it. A multiple of 8 elements keeps every chunk 16-byte aligned and pair-aligned.
    const int64_t chunk = cpu::optim_chunk_elems();
    TORCH_CHECK(chunk >= 8 && chunk % 8 == 0, "memstate: optimizer chunk size ", chunk,
                " is not a positive multiple of 8");

    std::vector<OptimTask> tasks(a.n);
    std::vector<OptimChunk> chunks;
    for (int64_t i = 0; i < a.n; ++i) {
      OptimTask& t = tasks[i];
      for (int r = 0; r < kOptimMaxRoles; ++r) t.roles[r] = r < R ? a.roles[r][i].data_ptr() : nullptr;
      t.numel = a.roles[0][i].numel();
      t.s0 = static_cast<double>(ts[i].s0);  // exact: a double holds every float
      t.s1 = static_cast<double>(ts[i].s1);
      t.flag = ts[i].flag;
      t.reserved = 0;
      const int64_t nc = (t.numel + chunk - 1) / chunk;
      TORCH_CHECK(nc <= kMaxGrid && static_cast<int64_t>(chunks.size()) + nc <= kMaxGrid,
                  "memstate: optimizer step has too many chunks at params[", i, "]");
      for (int64_t c = 0; c < nc; ++c) chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
    }
    const auto tables = upload_tables(tasks, chunks, device);

    at::Tensor out;
    unsigned long long* sums = nullptr;
    if (fingerprint) {
      out = at::zeros({a.n, R, 2}, at::TensorOptions().dtype(at::kLong).device(device));
      sums = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
    }
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    launch_optim(op, tables.a, a.n, tables.b, static_cast<int64_t>(chunks.size()), chunk, sums, stream);
    check_launch("optimizer step");
    return fingerprint ? out : at::empty({0}, at::TensorOptions().dtype(at::kLong).device(device));
  }
};

// Storage word width and exponent mask of a floating dtype; false for dtypes the scan does not
// know (the CPU path rejects the same ones).
bool nonfinite_format(at::ScalarType st, int32_t& width, uint64_t& exp_mask) {
  switch (st) {
    case at::kFloat:
    case at::kComplexFloat: width = 4; exp_mask = 0x7F800000ull; return true;
    case at::kDouble:
    case at::kComplexDouble: width = 8; exp_mask = 0x7FF0000000000000ull; return true;
    case at::kBFloat16: width = 2; exp_mask = 0x7F80ull; return true;
    case at::kHalf: width = 2; exp_mask = 0x7C00ull; return true;
    default: return false;
  }
}

// Whether any element of any floating tensor is NaN or +-Inf: a 0-d bool tensor on the device,
// without a host sync. Integer and bool tensors are skipped.
at::Tensor nonfinite_any_cuda(at::TensorList tensors) {
  c10::Device device(c10::kCUDA);
  if (!common_device("nonfinite_any", {{"tensors", tensors}}, device)) {
    return at::scalar_tensor(false, at::TensorOptions().dtype(at::kBool));
  }
  TORCH_CHECK(device.is_cuda(), "memstate.nonfinite_any: tensors[0] is on ", device, " in a CUDA call");
  check_nonfinite_dtypes(tensors);  // every tensor, before any is scanned: as on the CPU
  c10::cuda::CUDAGuard guard(device);
  std::vector<at::Tensor> keep;  // contiguous versions, alive until the kernel is enqueued
  std::vector<NonfiniteTask> tasks;
  std::vector<OptimChunk> chunks;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    const at::ScalarType st = t.scalar_type();
    if (!at::isFloatingType(st) && !at::isComplexType(st)) continue;
    int32_t width = 0;
    uint64_t mask = 0;
    TORCH_INTERNAL_ASSERT(nonfinite_format(st, width, mask));  // check_nonfinite_dtypes admitted it
    if (t.numel() == 0) continue;
    // Sign bits are irrelevant here, so a conjugate or negative view's bytes do as they are.
    keep.push_back(t.contiguous());
    const at::Tensor& c = keep.back();
    const int64_t nb = c.numel() * static_cast<int64_t>(c.element_size());
    const int64_t nc = (nb + kNonfiniteChunkBytes - 1) / kNonfiniteChunkBytes;
    TORCH_CHECK(nc <= kMaxGrid && static_cast<int64_t>(chunks.size()) + nc <= kMaxGrid,
                "memstate.nonfinite_any: too many chunks at tensors[", i, "]");
    const auto task = static_cast<int32_t>(tasks.size());
    tasks.push_back({c.const_data_ptr(), nb, mask, width, 0});
    for (int64_t k = 0; k < nc; ++k) chunks.push_back({task, static_cast<int32_t>(k)});
  }
  at::Tensor flag = at::zeros({}, at::TensorOptions().dtype(at::kInt).device(device));
  if (!chunks.empty()) {
    const auto tables = upload_tables(tasks, chunks, device);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
    launch_nonfinite_any(tables.a, tables.b, static_cast<int64_t>(chunks.size()),
                         flag.data_ptr<int32_t>(), stream);
    check_launch("nonfinite_any");
  }
  return flag.ne(0);
}

}  // namespace

}  // namespace cuda
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CUDA, m) {
  m.impl("sgd_step", &memstate::sgd_step_impl<memstate::cuda::CudaRunner>);
  m.impl("adam_step", &memstate::adam_step_impl<memstate::cuda::CudaRunner>);
  m.impl("rmsprop_step", &memstate::rmsprop_step_impl<memstate::cuda::CudaRunner>);
  m.impl("adagrad_step", &memstate::adagrad_step_impl<memstate::cuda::CudaRunner>);
  m.impl("lion_step", &memstate::lion_step_impl<memstate::cuda::CudaRunner>);
  m.impl("lamb_step", &memstate::lamb_step_impl<memstate::cuda::CudaRunner>);
  m.impl("nonfinite_any", &memstate::cuda::nonfinite_any_cuda);
}
