// memstate._C.fingerprints_from_rows: msfp1 lane rows -> Python Fingerprint objects in one C loop.
// fingerprint_many over many small tensors spent more time building its results in Python
// (numpy -> ints -> tuples -> objects, ~0.23 us a tensor) than the native hash call itself.
// pybind11 only (no torch headers): this file compiles in seconds.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "kernels.h"

namespace memstate {

namespace py = pybind11;

py::list fingerprint_objects(const uint64_t* rows, py::ssize_t n, py::handle cls, py::handle slot) {
  auto* tp = reinterpret_cast<PyTypeObject*>(cls.ptr());
  if (!PyType_Check(cls.ptr())) throw py::type_error("fingerprint_objects: cls is not a type");
  descrsetfunc set = Py_TYPE(slot.ptr())->tp_descr_set;
  if (set == nullptr) throw py::type_error("fingerprint_objects: slot is not a data descriptor");
  py::list out(static_cast<size_t>(n));
  // No cycle collection while the results are built: every allocation of a tracked object
  // counts towards the next collection, so 1,000 results triggered one or more per call, each
  // traversing the young objects (~0.04 us a result). The count is not reset: objects the caller
  // keeps still count towards the next collection after this call, as they would anyway.
  struct GcPause {
    int was = PyGC_Disable();
    ~GcPause() {
      if (was) PyGC_Enable();
    }
  } pause;
  for (py::ssize_t i = 0; i < n; ++i) {
    py::object fp = py::reinterpret_steal<py::object>(tp->tp_alloc(tp, 0));
    if (!fp) throw py::error_already_set();
    // A row's two uint64 lanes in memory (little-endian: x86-64, AArch64) are Fingerprint's
    // 16-byte form, lane 0 then lane 1: one bytes object, not two ints and a tuple.
    py::object raw = py::reinterpret_steal<py::object>(
        PyBytes_FromStringAndSize(reinterpret_cast<const char*>(rows + 2 * i), 16));
    if (!raw || set(slot.ptr(), fp.ptr(), raw.ptr()) < 0) throw py::error_already_set();
    // The object holds only a bytes object, so it can never be part of a reference cycle: the
    // cycle collector need not track it (as CPython untracks tuples of atoms) and later
    // collections do not traverse it.
    if (PyObject_IS_GC(fp.ptr()) && PyObject_GC_IsTracked(fp.ptr())) PyObject_GC_UnTrack(fp.ptr());
    PyList_SET_ITEM(out.ptr(), i, fp.release().ptr());
  }
  return out;
}

namespace {

// rows: a C-contiguous buffer of N x 2 8-byte integers (the op's int64 rows, as numpy), read as
// uint64 bit patterns. cls: the Fingerprint class (plain __slots__ class: allocated as
// object.__new__ does); slot: its `_raw` member descriptor, whose setter stores the bytes.
py::list fingerprints_from_rows(const py::buffer& rows, const py::type& cls, const py::object& slot) {
  py::buffer_info info = rows.request();
  const std::string& f = info.format;
  const bool int8byte = info.itemsize == 8 && (f == "q" || f == "Q" || f == "l" || f == "L" ||
                                               f == "<q" || f == "<Q" || f == "<l" || f == "<L");
  if (!int8byte) throw py::type_error("fingerprints_from_rows: rows must hold 8-byte integers, got format '" + f + "'");
  if (info.ndim != 2 || info.shape[1] != 2)
    throw py::value_error("fingerprints_from_rows: rows must have shape [N, 2]");
  if (info.shape[0] > 0 && (info.strides[1] != 8 || info.strides[0] != 16))
    throw py::value_error("fingerprints_from_rows: rows must be C-contiguous");
  return fingerprint_objects(static_cast<const uint64_t*>(info.ptr), info.shape[0], cls, slot);
}

}  // namespace

void bind_fingerprint_rows(py::module_& m) {
  m.def("fingerprints_from_rows", &fingerprints_from_rows, py::arg("rows"), py::arg("cls"), py::arg("slot"),
        "int64 [N, 2] msfp1 lane rows (a buffer, e.g. numpy) -> [cls] with the slot set to the row's 16 bytes "
        "(lane 0 then lane 1, little-endian).");
}

}  // namespace memstate
