// torch.classes.memstate.CopyPlan (copy_plan.h): the device-independent part. It lives in cpu/
// because setup.py compiles csrc/cpu/*.cpp in every build; the device backends are in
// cpu/copy_plan_cpu.cpp and cuda/copy_plan_cuda.cpp.
#include "../copy_plan.h"

#include <array>
#include <string>
#include <utility>

#include "../tensor_util.h"

namespace memstate {

namespace {

std::array<PlanBackendFactory, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)>& backends() {
  static std::array<PlanBackendFactory, static_cast<size_t>(c10::DeviceType::COMPILE_TIME_MAX_DEVICE_TYPES)> table{};
  return table;
}

int64_t storage_need(const at::Tensor& t) { return (t.storage_offset() + t.numel()) * t.element_size(); }

void check_dense(const at::Tensor& t, const char* name, size_t i, const c10::Device& device) {
  TORCH_CHECK(t.defined(), "memstate.CopyPlan: ", name, "[", i, "] is an undefined tensor");
  TORCH_CHECK(t.layout() == at::kStrided && !t.is_meta() && t.has_storage(), "memstate.CopyPlan: ", name, "[", i,
              "] is not a dense strided tensor with storage");
  TORCH_CHECK(static_cast<int64_t>(t.storage().nbytes()) >= storage_need(t), "memstate.CopyPlan: ", name, "[", i,
              "] has no memory (its storage was freed)");
  TORCH_CHECK(t.device() == device, "memstate.CopyPlan: ", name, "[", i, "] is on ", t.device(), " but the plan is on ",
              device, "; build one plan per device");
  TORCH_CHECK(t.is_contiguous() && !t.is_conj() && !t.is_neg(), "memstate.CopyPlan: ", name, "[", i,
              "] is not contiguous (or is a conjugate/negative view); the snapshot copies such tensors apart");
}

}  // namespace

void register_plan_backend(c10::DeviceType type, PlanBackendFactory factory) {
  backends()[static_cast<size_t>(type)] = factory;
}

CopyPlan::CopyPlan(std::vector<at::Tensor> sources, std::vector<at::Tensor> slots, std::vector<int64_t> bump)
    : device_(c10::kCPU), sources_(std::move(sources)), slots_(std::move(slots)) {
  const size_t n = sources_.size();
  TORCH_CHECK(slots_.size() >= n, "memstate.CopyPlan: ", n, " sources but only ", slots_.size(), " slots");
  if (!slots_.empty()) device_ = slots_[0].device();
  std::vector<ByteRange> ranges;
  std::vector<ByteRange> written_sources;
  expect_.reserve(n);
  slot_nbytes_.reserve(slots_.size());
  for (size_t i = 0; i < slots_.size(); ++i) {
    check_dense(slots_[i], "slots", i, device_);
    slot_nbytes_.push_back(nbytes_of(slots_[i]));
    ranges.push_back(byte_range(slots_[i], "slots", i, true));
  }
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = sources_[i];
    check_dense(t, "sources", i, device_);
    TORCH_CHECK(nbytes_of(t) == slot_nbytes_[i], "memstate.CopyPlan: sources[", i, "] has ", nbytes_of(t),
                " bytes but slots[", i, "] holds ", slot_nbytes_[i]);
    expect_.push_back({t.const_data_ptr(), t.scalar_type(), t.sizes().vec()});
    ranges.push_back(byte_range(t, "sources", i, false));
    written_sources.push_back(byte_range(t, "sources", i, true));
  }
  check_no_overlap(ranges, "CopyPlan");  // slots vs slots and sources
  try {  // restore writes the sources: they may not overlap each other (capture only reads them)
    check_no_overlap(std::move(written_sources), "CopyPlan.restore");
  } catch (const c10::Error& e) {
    restore_refusal_ = e.what_without_backtrace();
  }
  for (int64_t i : bump) {
    TORCH_CHECK(i >= 0 && static_cast<size_t>(i) < n, "memstate.CopyPlan: bump index ", i, " is not in [0, ", n, ")");
    bump_.push_back(sources_[i]);
  }
  const PlanBackendFactory make = backends()[static_cast<size_t>(device_.type())];
  TORCH_CHECK(make != nullptr, "memstate.CopyPlan: no plan backend for ", device_, " tensors in this build");
  std::vector<PlanCopy> capture(n), restore(n);
  for (size_t i = 0; i < n; ++i) {
    auto* live = static_cast<unsigned char*>(sources_[i].data_ptr());
    auto* slot = static_cast<unsigned char*>(slots_[i].data_ptr());
    capture[i] = {live, slot, slot_nbytes_[i]};
    restore[i] = {slot, live, slot_nbytes_[i]};
  }
  backend_ = make(device_, std::move(capture), std::move(restore));
}

bool CopyPlan::matches(size_t i) const {
  const at::Tensor& t = sources_[i];
  const Expect& e = expect_[i];
  // storage first: the data pointer of a tensor whose storage was freed cannot be read
  return t.has_storage() && t.scalar_type() == e.dtype && t.sizes().equals(e.sizes) && t.device() == device_ &&
         static_cast<int64_t>(t.storage().nbytes()) >= storage_need(t) && t.is_contiguous() && !t.is_conj() &&
         !t.is_neg() && t.const_data_ptr() == e.data;
}

int64_t CopyPlan::stale() const {
  for (size_t i = 0; i < sources_.size(); ++i) {
    if (!matches(i)) return static_cast<int64_t>(i);
  }
  return -1;
}

std::optional<at::Tensor> CopyPlan::capture(std::vector<at::Tensor> dynamic, bool fingerprint) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stale() >= 0) return std::nullopt;
  const size_t n = sources_.size();
  TORCH_CHECK(dynamic.size() == slots_.size() - n, "memstate.CopyPlan.capture: ", dynamic.size(),
              " dynamic tensors for ", slots_.size() - n, " dynamic slots");
  if (!dynamic.empty()) {
    c10::Device device = device_;
    common_device("CopyPlan.capture", {{"dynamic", dynamic}}, device);
  }
  const auto views = contiguous_bytes_views(dynamic, "CopyPlan.capture", device_, "dynamic");
  std::vector<PlanCopy> extra(views.size());
  for (size_t j = 0; j < views.size(); ++j) {
    TORCH_CHECK(nbytes_of(views[j]) == slot_nbytes_[n + j], "memstate.CopyPlan.capture: dynamic[", j, "] has ",
                nbytes_of(views[j]), " bytes but its slot holds ", slot_nbytes_[n + j]);
    extra[j] = {static_cast<const unsigned char*>(views[j].const_data_ptr()),
                static_cast<unsigned char*>(slots_[n + j].data_ptr()), slot_nbytes_[n + j]};
  }
  if (!fingerprint) {
    backend_->run(false, extra, nullptr);
    return at::empty({0}, at::TensorOptions().dtype(at::kLong).device(device_));
  }
  at::Tensor rows = rows_for(false, static_cast<int64_t>(slots_.size()));
  backend_->run(false, extra, &rows);
  return rows;
}

at::Tensor CopyPlan::rows_for(bool restore, int64_t n) {
  at::Tensor& buf = rows_[restore ? 1 : 0];
  if (buf.defined() && buf.use_count() == 1 && buf.size(0) == n) {
    buf.zero_();
  } else {
    buf = at::zeros({n, 2}, at::TensorOptions().dtype(at::kLong).device(device_));
  }
  return buf;
}

std::optional<at::Tensor> CopyPlan::restore() {
  std::lock_guard<std::mutex> lock(mutex_);
  if (stale() >= 0) return std::nullopt;
  TORCH_CHECK(restore_refusal_.empty(), restore_refusal_);
  at::Tensor rows = rows_for(true, static_cast<int64_t>(sources_.size()));
  backend_->run(true, {}, &rows);
  for (const at::Tensor& t : bump_) {
    if (!t.is_inference()) t.unsafeGetTensorImpl()->bump_version();  // autograd: modified in place
  }
  return rows;
}

}  // namespace memstate
