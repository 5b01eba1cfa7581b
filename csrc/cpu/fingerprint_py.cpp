// memstate._C.fingerprints_from_rows: msfp1 lane rows -> Python Fingerprint objects in one C loop.
// fingerprint_many over many small tensors spent more time building its results in Python
// (numpy -> ints -> tuples -> objects, ~0.23 us a tensor) than the native hash call itself; the
// objects are memstate._fingerprint's (a static C type: one small untracked allocation each).
// pybind11 only (no torch headers): this file compiles in seconds.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "kernels.h"
#include "memstate/fingerprint_object.h"

namespace memstate {

namespace py = pybind11;

py::list fingerprint_objects(const uint64_t* rows, py::ssize_t n) {
  // The C API of memstate._fingerprint (imported by `import memstate`), looked up once.
  static const MemstateFingerprintCAPI* api = nullptr;
  if (api == nullptr) {
    api = static_cast<const MemstateFingerprintCAPI*>(PyCapsule_Import(MEMSTATE_FINGERPRINT_CAPSULE, 0));
    if (api == nullptr) throw py::error_already_set();
  }
  PyObject* out = api->from_rows(rows, n);
  if (out == nullptr) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(out);
}

namespace {

// rows: a C-contiguous buffer of N x 2 8-byte integers (the op's int64 rows, as numpy), read as
// uint64 bit patterns.
py::list fingerprints_from_rows(const py::buffer& rows) {
  py::buffer_info info = rows.request();
  const std::string& f = info.format;
  const bool int8byte = info.itemsize == 8 && (f == "q" || f == "Q" || f == "l" || f == "L" ||
                                               f == "<q" || f == "<Q" || f == "<l" || f == "<L");
  if (!int8byte) throw py::type_error("fingerprints_from_rows: rows must hold 8-byte integers, got format '" + f + "'");
  if (info.ndim != 2 || info.shape[1] != 2)
    throw py::value_error("fingerprints_from_rows: rows must have shape [N, 2]");
  if (info.shape[0] > 0 && (info.strides[1] != 8 || info.strides[0] != 16))
    throw py::value_error("fingerprints_from_rows: rows must be C-contiguous");
  return fingerprint_objects(static_cast<const uint64_t*>(info.ptr), info.shape[0]);
}

}  // namespace

void bind_fingerprint_rows(py::module_& m) {
  m.def("fingerprints_from_rows", &fingerprints_from_rows, py::arg("rows"),
        "int64 [N, 2] msfp1 lane rows (a buffer, e.g. numpy) -> [memstate.Fingerprint] (lane 0 then lane 1 "
        "of each row, read as uint64).");
}

}  // namespace memstate
