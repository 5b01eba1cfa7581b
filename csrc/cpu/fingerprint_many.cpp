// memstate._C.fingerprint_many_cpu: fingerprint_many's path for plain CPU tensors, one native call
// from the Python list to the Fingerprint objects (issue 12).
//
// Through torch.ops.memstate.fingerprint, a call over 1,000 small tensors spent more time
// converting its Tensor[] argument than hashing: an IValue list is built, and every tensor's
// reference is taken and dropped, which in torch 2.x also updates the PyObject's bookkeeping
// and re-acquires the GIL per drop (~0.11 us a tensor in all). Here each tensor is read through
// its Python object (THPVariable_Unpack: no reference count change; the handles are borrowed),
// the items are kept alive by a tuple snapshot of the list, the hashing (fingerprint_rows_cpu,
// the op's own CPU kernel) runs with the GIL released, and the objects are built in one loop.
//
// Only where the dispatcher would do nothing but call that CPU kernel: every item is exactly a
// torch.Tensor or nn.Parameter (a subclass may override __torch_function__ or
// __torch_dispatch__); its dispatch keys are dense CPU plus only the autograd, inplace-or-view
// and autocast keys, which this op passes through (so no conjugate or negative view, no
// functorch wrapper, no fake, meta, sparse or quantized tensor); and no torch function mode,
// dispatch mode or thread-local included key is active. Otherwise it returns None and the
// caller calls the op. Where both apply the results are the same (tests compare).
#include <torch/extension.h>

#include <ATen/PythonTorchFunctionTLS.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <vector>

#include "../copy_plan.h"
#include "kernels.h"

namespace memstate {

namespace py = pybind11;

namespace {

// Whether the dispatcher's only work for `t` in fingerprint is the CPU kernel.
bool plain_cpu(const at::Tensor& t) {
  static const c10::DispatchKeySet kPassed({c10::DispatchKey::ADInplaceOrView, c10::DispatchKey::AutogradCPU,
                                            c10::DispatchKey::AutocastCPU});
  static const c10::DispatchKeySet kDenseCpu(c10::DispatchKey::CPU);
  return t.defined() && (t.key_set() - kPassed) == kDenseCpu;
}

// Whether something thread-local (a Python mode, an included key) would intercept the op call.
bool intercepted() {
  return at::impl::torch_function_mode_enabled() || c10::impl::dispatch_mode_enabled() ||
         !(c10::impl::tls_local_dispatch_key_set().included_ - c10::default_included_set).empty();
}

// Tensor handles borrowed from Python objects (no reference count change), released on exit
// without a decrement.
struct Borrowed {
  std::vector<at::Tensor> tensors;
  ~Borrowed() {
    for (at::Tensor& t : tensors) c10::MaybeOwnedTraits<at::Tensor>::destroyBorrow(t);
  }
};

py::object fingerprint_many_cpu(const py::list& items) {
  if (intercepted()) return py::none();
  // New references to the items: a list edited by another thread while the GIL is released
  // below cannot free a tensor being hashed.
  const py::tuple keep = py::reinterpret_steal<py::tuple>(PyList_AsTuple(items.ptr()));
  if (!keep) throw py::error_already_set();
  const py::ssize_t n = PyTuple_GET_SIZE(keep.ptr());
  Borrowed b;
  b.tensors.reserve(static_cast<size_t>(n));
  for (py::ssize_t i = 0; i < n; ++i) {
    PyObject* o = PyTuple_GET_ITEM(keep.ptr(), i);
    if (!THPVariable_CheckExact(o)) return py::none();
    const at::Tensor& t = THPVariable_Unpack(o);
    if (!plain_cpu(t)) return py::none();
    b.tensors.push_back(c10::MaybeOwnedTraits<at::Tensor>::createBorrow(t));
  }
  at::Tensor rows;
  {
    py::gil_scoped_release nogil;
    rows = cpu::fingerprint_rows_cpu(b.tensors);
  }
  return fingerprint_objects(reinterpret_cast<const uint64_t*>(rows.const_data_ptr<int64_t>()), n);
}

}  // namespace

void bind_fingerprint_many(py::module_& m) {
  m.def("fingerprint_many_cpu", &fingerprint_many_cpu, py::arg("tensors"),
        "fingerprint_many's one-call path: [memstate.Fingerprint] for a list of plain CPU tensors, or None where "
        "the op must be called instead (a subclass, a non-plain tensor, an active mode).");
}

}  // namespace memstate
