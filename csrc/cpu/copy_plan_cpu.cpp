// The CPU backend of CopyPlan (copy_plan.h): the copy + fingerprint core of fingerprint_cpu.cpp
// (fixed-size chunks spread over threads) on pointer tables built once per plan.
#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "../copy_plan.h"
#include "kernels.h"

namespace memstate {
namespace cpu {
namespace {

class CpuPlan final : public PlanBackend {
 public:
  CpuPlan(std::vector<PlanCopy> capture, std::vector<PlanCopy> restore) : n_(static_cast<int64_t>(capture.size())) {
    for (int d = 0; d < 2; ++d) {
      for (const PlanCopy& c : d == 0 ? capture : restore) {
        from_[d].push_back(c.from);
        to_[d].push_back(c.to);
      }
    }
    for (const PlanCopy& c : capture) nbytes_.push_back(c.nbytes);
  }

  void run(bool restore, const std::vector<PlanCopy>& extra, at::Tensor* out) override {
    const int d = restore ? 1 : 0;
    const int64_t m = static_cast<int64_t>(extra.size()), total = n_ + m;
    // the per-call copies go after the fixed ones (the vectors keep their capacity)
    from_[d].resize(n_);
    to_[d].resize(n_);
    nbytes_.resize(n_);
    for (const PlanCopy& c : extra) {
      from_[d].push_back(c.from);
      to_[d].push_back(c.to);
      nbytes_.push_back(c.nbytes);
    }
    const int64_t chunk = fingerprint_chunk_bytes();  // settable by tests: the table follows it
    if (chunk != chunk_) {
      msfp1_chunk_table(nbytes_.data(), n_, chunk, chunk_begin_);
      chunk_ = chunk;
    }
    chunk_begin_.resize(n_ + 1);
    for (int64_t i = n_; i < total; ++i) chunk_begin_.push_back(chunk_begin_[i] + (nbytes_[i] + chunk - 1) / chunk);
    auto* rows = out != nullptr ? reinterpret_cast<uint64_t*>(out->data_ptr<int64_t>()) : nullptr;
    msfp1_ranges(total, from_[d].data(), to_[d].data(), nbytes_.data(), nullptr, chunk_begin_.data(), chunk, rows);
    if (rows != nullptr) msfp1_finalize_rows(rows, nbytes_.data(), total);
  }

 private:
  int64_t n_;
  std::vector<const unsigned char*> from_[2];
  std::vector<unsigned char*> to_[2];
  std::vector<int64_t> nbytes_;
  int64_t chunk_ = 0;
  std::vector<int64_t> chunk_begin_;
};

std::unique_ptr<PlanBackend> make_cpu_plan(const c10::Device&, std::vector<PlanCopy> capture,
                                           std::vector<PlanCopy> restore) {
  return std::make_unique<CpuPlan>(std::move(capture), std::move(restore));
}

const bool registered = (register_plan_backend(c10::DeviceType::CPU, &make_cpu_plan), true);

}  // namespace
}  // namespace cpu
}  // namespace memstate
