// The CUDA backend of CopyPlan (copy_plan.h): fingerprint_kernels.cu's fused copy + fingerprint
// kernel with the task tables of both directions and the chunk table uploaded ONCE, when the plan
// is built, and kept on the device; a call uploads only the few per-call ("dynamic") copies.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <utility>
#include <vector>

#include "../copy_plan.h"
#include "glue_util.h"
#include "kernels.h"

namespace memstate {
namespace cuda {
namespace {

// Tasks and chunks of `copies` (task t's chunks index tasks from t_base).
void tables_of(const std::vector<PlanCopy>& copies, std::vector<Msfp1Task>& tasks, std::vector<Msfp1Chunk>* chunks) {
  for (size_t i = 0; i < copies.size(); ++i) {
    const PlanCopy& c = copies[i];
    tasks.push_back({c.from, static_cast<uint64_t>(c.nbytes), 0, c.to});
    if (chunks == nullptr) continue;
    const int64_t n = (c.nbytes + kMsfp1ChunkBytes - 1) / kMsfp1ChunkBytes;
    TORCH_CHECK(n < (int64_t{1} << 31) && i < (size_t{1} << 31), "memstate.CopyPlan: copy ", i, " is too large");
    for (int64_t k = 0; k < n; ++k) chunks->push_back({static_cast<int32_t>(i), static_cast<int32_t>(k)});
  }
}

class CudaPlan final : public PlanBackend {
 public:
  CudaPlan(const c10::Device& device, std::vector<PlanCopy> capture, std::vector<PlanCopy> restore)
      : device_(device), n_(static_cast<int64_t>(capture.size())) {
    c10::cuda::CUDAGuard guard(device_);
    std::vector<Msfp1Task> tasks;  // capture's n tasks, then restore's (same sizes, same chunks)
    std::vector<Msfp1Chunk> chunks;
    tables_of(capture, tasks, &chunks);
    tables_of(restore, tasks, nullptr);
    nchunks_ = static_cast<int64_t>(chunks.size());
    tables_ = upload_tables(tasks, chunks, device_);
    // the tables are read by later calls on any stream: make them resident now (once per plan)
    c10::cuda::getCurrentCUDAStream(device_.index()).synchronize();
  }

  void run(bool restore, const std::vector<PlanCopy>& extra, at::Tensor* out) override {
    c10::cuda::CUDAGuard guard(device_);
    const auto m = static_cast<int64_t>(extra.size());
    auto* sums = out != nullptr ? reinterpret_cast<unsigned long long*>(out->data_ptr<int64_t>()) : nullptr;
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device_.index()).stream();
    const Msfp1Task* tasks = tables_.a == nullptr ? nullptr : tables_.a + (restore ? n_ : 0);
    launch_msfp1_sums(tasks, tables_.b, nchunks_, sums, stream);
    check_launch("CopyPlan");
    DeviceTables<Msfp1Task, Msfp1Chunk> more;
    if (m > 0) {
      std::vector<Msfp1Task> t;
      std::vector<Msfp1Chunk> c;
      tables_of(extra, t, &c);
      more = upload_tables(t, c, device_);
      launch_msfp1_sums(more.a, more.b, static_cast<int64_t>(c.size()), sums == nullptr ? nullptr : sums + 2 * n_,
                        stream);
      check_launch("CopyPlan");
    }
    if (sums == nullptr) return;
    launch_msfp1_finalize(tasks, n_, sums, stream);
    if (m > 0) launch_msfp1_finalize(more.a, m, sums + 2 * n_, stream);
    check_launch("CopyPlan");
  }

 private:
  c10::Device device_;
  int64_t n_;
  int64_t nchunks_ = 0;
  DeviceTables<Msfp1Task, Msfp1Chunk> tables_;  // owns the device memory of the fixed tables
};

std::unique_ptr<PlanBackend> make_cuda_plan(const c10::Device& device, std::vector<PlanCopy> capture,
                                            std::vector<PlanCopy> restore) {
  return std::make_unique<CudaPlan>(device, std::move(capture), std::move(restore));
}

const bool registered = (register_plan_backend(c10::DeviceType::CUDA, &make_cuda_plan), true);

}  // namespace
}  // namespace cuda
}  // namespace memstate
