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

namespace {

// rows: a C-contiguous buffer of N x 2 8-byte integers (the op's int64 rows, as numpy), read as
// uint64 bit patterns. cls: the Fingerprint class (plain __slots__ class: allocated as
// object.__new__ does); slot: its `_lanes` member descriptor, whose setter stores the tuple.
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
  auto* tp = reinterpret_cast<PyTypeObject*>(cls.ptr());
  descrsetfunc set = Py_TYPE(slot.ptr())->tp_descr_set;
  if (set == nullptr) throw py::type_error("fingerprints_from_rows: slot is not a data descriptor");
  const auto* r = static_cast<const uint64_t*>(info.ptr);
  const py::ssize_t n = info.shape[0];
  py::list out(static_cast<size_t>(n));
  for (py::ssize_t i = 0; i < n; ++i) {
    py::object fp = py::reinterpret_steal<py::object>(tp->tp_alloc(tp, 0));
    if (!fp) throw py::error_already_set();
    py::object lanes = py::reinterpret_steal<py::object>(
        PyTuple_Pack(2, py::int_(r[2 * i]).ptr(), py::int_(r[2 * i + 1]).ptr()));
    if (!lanes || set(slot.ptr(), fp.ptr(), lanes.ptr()) < 0) throw py::error_already_set();
    PyList_SET_ITEM(out.ptr(), i, fp.release().ptr());
  }
  return out;
}

}  // namespace

void bind_fingerprint_rows(py::module_& m) {
  m.def("fingerprints_from_rows", &fingerprints_from_rows, py::arg("rows"), py::arg("cls"), py::arg("slot"),
        "int64 [N, 2] msfp1 lane rows (a buffer, e.g. numpy) -> [cls] with the slot set to (lane0, lane1), "
        "lanes read as uint64.");
}

}  // namespace memstate
