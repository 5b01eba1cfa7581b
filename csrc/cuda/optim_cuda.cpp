// CUDA glue of the fused optimizer ops (tier 2): the device-independent entry points of
// optim_ops.h (checks, float64 scalars rounded once, dtype/flag dispatch) with a runner that
// builds the task and chunk tables, ships them in one pinned, stream-ordered copy and launches
// the torch-free kernels of optim_kernels.cu on the current stream. No host sync. Cached step
// plans (optim_plan.h) keep their chunk table on the device and upload only the task table.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <vector>

#include "../cpu/kernels.h"
#include "../optim_ops.h"
#include "../optim_plan.h"
#include "glue_util.h"
#include "kernels.h"

namespace memstate {
namespace cuda {

namespace {

constexpr int64_t kMaxGrid = (int64_t{1} << 31) - 1;

// The chunk size shared with the CPU path: tests vary it to show results do not depend on it.
// A multiple of 8 elements keeps every chunk 16-byte aligned and pair-aligned.
int64_t checked_chunk_elems() {
  const int64_t chunk = cpu::optim_chunk_elems();
  TORCH_CHECK(chunk >= 8 && chunk % 8 == 0, "memstate: optimizer chunk size ", chunk,
              " is not a positive multiple of 8");
  return chunk;
}

// The chunk table of a step: (tensor, chunk index) for every `chunk` elements of every tensor.
std::vector<OptimChunk> make_chunks(const OptimArgs& a, int64_t chunk) {
  std::vector<OptimChunk> chunks;
  for (int64_t i = 0; i < a.n; ++i) {
    const int64_t nc = (a.numel[i] + chunk - 1) / chunk;
    TORCH_CHECK(nc <= kMaxGrid && static_cast<int64_t>(chunks.size()) + nc <= kMaxGrid,
                "memstate: optimizer step has too many chunks at params[", i, "]");
    for (int64_t c = 0; c < nc; ++c) chunks.push_back({static_cast<int32_t>(i), static_cast<int32_t>(c)});
  }
  return chunks;
}

// The task table of a step: every tensor's role pointers and per-tensor scalars.
template <class M>
std::vector<OptimTask> make_tasks(const OptimArgs& a, int roles, const std::vector<optim::TensorScalars<M>>& ts) {
  std::vector<OptimTask> tasks(a.n);
  for (int64_t i = 0; i < a.n; ++i) {
    OptimTask& t = tasks[i];
    for (int r = 0; r < kOptimMaxRoles; ++r) t.roles[r] = r < roles ? a.ptr(r, i) : nullptr;
    t.numel = a.numel[i];
    t.s0 = static_cast<double>(ts[i].s0);  // exact: a double holds every float
    t.s1 = static_cast<double>(ts[i].s1);
    t.flag = ts[i].flag;
    t.reserved = 0;
  }
  return tasks;
}

// Launches `op` over device task and chunk tables on the current stream; returns the
// fingerprint rows (or an empty tensor) on the device.
template <class Op>
at::Tensor launch_step(const Op& op, const OptimArgs& a, const OptimTask* tasks, const OptimChunk* chunks,
                       int64_t nchunks, int64_t chunk, bool fingerprint) {
  const c10::Device device = a.roles[0][0].device();
  at::Tensor out;
  unsigned long long* sums = nullptr;
  if (fingerprint) {
    out = at::zeros({a.n, Op::kRoles, 2}, at::TensorOptions().dtype(at::kLong).device(device));
    sums = reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>());
  }
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  launch_optim(op, tasks, a.n, chunks, nchunks, chunk, sums, stream);
  check_launch("optimizer step");
  return fingerprint ? out : at::empty({0}, at::TensorOptions().dtype(at::kLong).device(device));
}

template <class Op>
void check_cuda_args(const OptimArgs& a, const std::vector<optim::TensorScalars<typename Op::M>>& ts) {
  TORCH_INTERNAL_ASSERT(a.nroles == Op::kRoles && a.n > 0 && static_cast<int64_t>(ts.size()) == a.n);
  TORCH_CHECK(a.roles[0][0].device().is_cuda(), "memstate: CUDA optimizer step got params[0] on ",
              a.roles[0][0].device());
}

// The ops' runner: builds the task and chunk tables, ships them in one pinned, stream-ordered
// copy and launches.
struct CudaRunner {
  template <class Op>
  static at::Tensor run(const Op& op, const OptimArgs& a,
                        const std::vector<optim::TensorScalars<typename Op::M>>& ts, bool fingerprint) {
    check_cuda_args<Op>(a, ts);
    c10::cuda::CUDAGuard guard(a.roles[0][0].device());
    const int64_t chunk = checked_chunk_elems();
    const std::vector<OptimChunk> chunks = make_chunks(a, chunk);
    const auto tables = upload_tables(make_tasks(a, Op::kRoles, ts), chunks, a.roles[0][0].device());
    return launch_step(op, a, tables.a, tables.b, static_cast<int64_t>(chunks.size()), chunk, fingerprint);
  }
};

// A cached plan's runner (optim_plan.h): the chunk table was uploaded once, when the plan was
// built (plan_prepare); each step ships only the task table (pointers and per-tensor scalars,
// which change every step: Adam's bias corrections).
struct CudaPlanRunner {
  const PlanBucket& bucket;

  template <class Op>
  at::Tensor run(const Op& op, const OptimArgs& a, const std::vector<optim::TensorScalars<typename Op::M>>& ts,
                 bool fingerprint) const {
    check_cuda_args<Op>(a, ts);
    const c10::Device device = a.roles[0][0].device();
    c10::cuda::CUDAGuard guard(device);
    const std::vector<OptimTask> tasks = make_tasks(a, Op::kRoles, ts);
    const at::Tensor dev_tasks = upload(tasks.data(), tasks.size() * sizeof(OptimTask), device);
    const auto* chunks = static_cast<const OptimChunk*>(bucket.device_table.const_data_ptr());
    const int64_t nchunks = bucket.device_table.numel() / static_cast<int64_t>(sizeof(OptimChunk));
    return launch_step(op, a, static_cast<const OptimTask*>(dev_tasks.const_data_ptr()), chunks, nchunks,
                       bucket.chunk_elems, fingerprint);
  }
};

void plan_prepare(PlanBucket& b) {
  const c10::Device device = b.args.roles[0][0].device();
  c10::cuda::CUDAGuard guard(device);
  b.chunk_elems = checked_chunk_elems();
  const std::vector<OptimChunk> chunks = make_chunks(b.args, b.chunk_elems);
  b.device_table = upload(chunks.data(), chunks.size() * sizeof(OptimChunk), device);
  // Later steps may run on another stream: wait for the copy once, here (plans are built rarely).
  c10::cuda::getCurrentCUDAStream(device.index()).synchronize();
}

const PlanDevice kCudaPlanDevice = {
    &plan_prepare,
    [](PlanKind kind, PlanBucket& b, const double* s, bool fingerprint) {
      return run_plan_bucket(CudaPlanRunner{b}, kind, b, s, fingerprint);
    },
    nullptr};  // no non-finite scan: skip_if_nonfinite steps on CUDA take the full path
const bool kCudaPlanRegistered = (g_plan_devices[1] = &kCudaPlanDevice, true);

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
