// torch.classes.memstate.CopyPlan (copy_plan.h): the device-independent part. It lives in cpu/
// because setup.py compiles csrc/cpu/*.cpp in every build; the device backends are in
// cpu/copy_plan_cpu.cpp and cuda/copy_plan_cuda.cpp.
#include <torch/extension.h>  // pybind11 and torch's tensor casters (bind_copy_plan); first, for copy_plan.h

#include "../copy_plan.h"

#include <array>
#include <cstring>
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
    expect_.push_back({t.const_data_ptr(), t.dtype(), static_cast<int64_t>(t.element_size()),
                       static_cast<uint32_t>(t.dim()), expect_sizes_.size()});
    expect_sizes_.insert(expect_sizes_.end(), t.sizes().begin(), t.sizes().end());
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
  // the same checks as check_dense and the constructor, on the TensorImpl: no calls per field
  const c10::TensorImpl* t = sources_[i].unsafeGetTensorImpl();
  const Expect& e = expect_[i];
  if (!t->has_storage() || t->dtype() != e.dtype || t->dim() != static_cast<int64_t>(e.ndim) ||
      t->device() != device_ || !t->is_contiguous() || t->is_conj() || t->is_neg()) {
    return false;
  }
  const int64_t* want = expect_sizes_.data() + e.at;
  const c10::IntArrayRef sizes = t->sizes();
  for (uint32_t d = 0; d < e.ndim; ++d) {
    if (sizes[d] != want[d]) return false;
  }
  // storage last: the data pointer of a tensor whose storage was freed cannot be read
  const c10::Storage& storage = t->storage();
  return static_cast<int64_t>(storage.nbytes()) >= (t->storage_offset() + t->numel()) * e.itemsize &&
         t->data() == e.data;
}

// The check reads each source's TensorImpl (a few cache lines) and then its StorageImpl: with
// thousands of small tensors that is a chain of cache misses per tensor, so the loop asks for
// the TensorImpls kAhead tensors ahead and, once those have arrived, for their StorageImpls.
int64_t CopyPlan::stale() const {
  constexpr size_t kAhead = 8;
  const size_t n = sources_.size();
  for (size_t i = 0; i < n; ++i) {
    if (i + 2 * kAhead < n) prefetch_tensor_impl(sources_[i + 2 * kAhead].unsafeGetTensorImpl());
    if (i + kAhead < n) prefetch_storage_impl(sources_[i + kAhead].unsafeGetTensorImpl());
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
    if (device_.is_cpu()) {
      std::memset(buf.data_ptr(), 0, buf.nbytes());  // (no dispatch: a fixed cost of every call)
    } else {
      buf.zero_();
    }
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

namespace {

// Whether the items of `containers` (dicts: their keys and values; lists: their items), in
// order, are the objects of `keys` and `values` (keys: the same object or an equal str; values:
// the same object). Reads each dict's entry table and list's item array and the two flat lists,
// never the objects themselves (no reference counts touched: no cache miss per object).
bool same_items(const pybind11::list& containers, const pybind11::list& keys, const pybind11::list& values) {
  PyObject* ks = keys.ptr();
  PyObject* vs = values.ptr();
  const Py_ssize_t nk = PyList_GET_SIZE(ks), nv = PyList_GET_SIZE(vs);
  Py_ssize_t ik = 0, iv = 0;
  for (Py_ssize_t c = 0; c < PyList_GET_SIZE(containers.ptr()); ++c) {
    PyObject* obj = PyList_GET_ITEM(containers.ptr(), c);
    if (PyDict_Check(obj)) {
      Py_ssize_t pos = 0;
      PyObject *k = nullptr, *v = nullptr;
      while (PyDict_Next(obj, &pos, &k, &v)) {
        if (ik == nk || iv == nv || v != PyList_GET_ITEM(vs, iv++)) return false;
        PyObject* want = PyList_GET_ITEM(ks, ik++);
        if (k != want && !(PyUnicode_CheckExact(k) && PyUnicode_CheckExact(want) && PyUnicode_Compare(k, want) == 0)) {
          return false;
        }
      }
    } else if (PyList_Check(obj)) {
      for (Py_ssize_t i = 0; i < PyList_GET_SIZE(obj); ++i) {
        if (iv == nv || PyList_GET_ITEM(obj, i) != PyList_GET_ITEM(vs, iv++)) return false;
      }
    } else {
      return false;
    }
  }
  return ik == nk && iv == nv;
}

}  // namespace

void bind_copy_plan(pybind11::module_& m) {
  namespace py = pybind11;
  // the GIL is released around the copies, as torch ops do
  py::class_<CopyPlan, c10::intrusive_ptr<CopyPlan>>(m, "CopyPlan",
                                                      "A bound snapshot copy plan of one device (csrc/copy_plan.h).")
      .def(py::init([](std::vector<at::Tensor> sources, std::vector<at::Tensor> slots, std::vector<int64_t> bump) {
             return c10::make_intrusive<CopyPlan>(std::move(sources), std::move(slots), std::move(bump));
           }),
           py::arg("sources"), py::arg("slots"), py::arg("bump"))
      .def("stale", &CopyPlan::stale, py::call_guard<py::gil_scoped_release>())
      .def("capture", &CopyPlan::capture, py::arg("dynamic"), py::arg("fingerprint"),
           py::call_guard<py::gil_scoped_release>())
      .def("restore", &CopyPlan::restore, py::call_guard<py::gil_scoped_release>())
      .def("num_sources", &CopyPlan::num_sources)
      .def("num_slots", &CopyPlan::num_slots);
  // The snapshot's structure check (memstate/snapshot/_arena.py, _Bound.valid): thousands of
  // objects compared by identity at about a nanosecond each, against tens in Python.
  m.def(
      "same_objects",
      [](const py::list& a, const py::list& b) {
        const Py_ssize_t n = PyList_GET_SIZE(a.ptr());
        if (PyList_GET_SIZE(b.ptr()) != n) return false;
        for (Py_ssize_t i = 0; i < n; ++i) {
          if (PyList_GET_ITEM(a.ptr(), i) != PyList_GET_ITEM(b.ptr(), i)) return false;
        }
        return true;
      },
      py::arg("a"), py::arg("b"), "Whether two lists hold the same objects (by identity) in the same order.");
  m.def("same_items", &same_items, py::arg("containers"), py::arg("keys"), py::arg("values"),
        "Whether the dicts and lists of `containers`, in order, hold exactly `keys` (the same objects or "
        "equal str) and `values` (the same objects): the flat lists of their dict keys and of their dict "
        "values and list items.");
}

}  // namespace memstate
