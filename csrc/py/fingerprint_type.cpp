/* memstate._fingerprint: memstate.Fingerprint as a static C type (issue 12). Written in the C
 * subset of C++ (the build compiles every extension source as C++).
 *
 * fingerprint_many over many small tensors spent about half of its serial host time creating and
 * freeing its results while they were instances of a Python class: every such instance is
 * allocated through the cycle collector (two objects each: the instance and its bytes). This
 * type keeps the 16-byte form inline, is not collected (it holds no references) and is built by
 * memstate._C through the capsule of fingerprint_object.h. It is a small module of its own,
 * Python.h only, so that `import memstate` loads it without loading torch's extension.
 *
 * Its behaviour is that of memstate.fingerprint._PyFingerprint, the reference implementation
 * (used where this module is not built); tests compare the two. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "memstate/fingerprint_object.h"

typedef MemstateFingerprintObject FpObject;

/* Its fields are filled in at module init, after its methods (fp_type_ready): C++ has no
 * out-of-order designated initializers. */
static PyTypeObject FingerprintType = {PyVarObject_HEAD_INIT(NULL, 0)};

static uint64_t lane_of(const FpObject* self, int i) {
  uint64_t v = 0;
  for (int b = 7; b >= 0; --b) v = (v << 8) | self->raw[8 * i + b];
  return v;
}

static void set_lane(FpObject* self, int i, uint64_t v) {
  for (int b = 0; b < 8; ++b) self->raw[8 * i + b] = (unsigned char)(v >> (8 * b));
}

static FpObject* fp_alloc(PyTypeObject* type) { return PyObject_New(FpObject, type); }

/* Fingerprint(lane0, lane1): each an int in [0, 2^64). */
static PyObject* fp_new(PyTypeObject* type, PyObject* args, PyObject* kwargs) {
  static const char* names[] = {"lane0", "lane1", NULL};
  PyObject* lanes[2];
  if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO:Fingerprint", const_cast<char**>(names), &lanes[0], &lanes[1])) {
    return NULL;
  }
  uint64_t v[2];
  for (int i = 0; i < 2; ++i) {
    int bad = !PyLong_Check(lanes[i]);
    if (!bad) {
      v[i] = PyLong_AsUnsignedLongLong(lanes[i]);
      if (v[i] == (uint64_t)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError)) return NULL;
        PyErr_Clear();
        bad = 1;
      }
    }
    if (bad) return PyErr_Format(PyExc_ValueError, "Fingerprint lane %d must be an int in [0, 2^64), got %R", i, lanes[i]);
  }
  FpObject* self = fp_alloc(type);
  if (self == NULL) return NULL;
  set_lane(self, 0, v[0]);
  set_lane(self, 1, v[1]);
  return (PyObject*)self;
}

static PyObject* fp_from_raw(PyTypeObject* type, const unsigned char* raw) {
  FpObject* self = fp_alloc(type);
  if (self == NULL) return NULL;
  memcpy(self->raw, raw, 16);
  return (PyObject*)self;
}

/* Fingerprint.from_bytes(data): the 16-byte form (bytes, bytearray or memoryview). */
static PyObject* fp_from_bytes(PyObject* cls, PyObject* data) {
  if (PyBytes_Check(data) || PyByteArray_Check(data) || PyMemoryView_Check(data)) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) == 0) {
      PyObject* out = NULL;
      if (view.len == 16) out = fp_from_raw((PyTypeObject*)cls, (const unsigned char*)view.buf);
      PyBuffer_Release(&view);
      if (out != NULL) return out;
      if (PyErr_Occurred()) return NULL;
    } else {
      PyErr_Clear();  /* a non-contiguous memoryview: not the 16-byte form */
    }
  }
  return PyErr_Format(PyExc_ValueError, "a msfp1 fingerprint is 16 bytes, got %R", data);
}

/* Fingerprint.fromhex(text): the 32-hex-digit form of hex(), each half parsed as int(half, 16). */
static PyObject* fp_fromhex(PyObject* cls, PyObject* text) {
  if (!PyUnicode_Check(text) || PyUnicode_GET_LENGTH(text) != 32) {
    return PyErr_Format(PyExc_ValueError, "a msfp1 fingerprint is 32 hex digits, got %R", text);
  }
  PyObject* halves[2] = {NULL, NULL};
  PyObject* out = NULL;
  for (int i = 0; i < 2; ++i) {
    PyObject* part = PyUnicode_Substring(text, 16 * i, 16 * (i + 1));
    if (part == NULL) goto done;
    halves[i] = PyLong_FromUnicodeObject(part, 16);
    Py_DECREF(part);
    if (halves[i] == NULL) {
      if (!PyErr_ExceptionMatches(PyExc_ValueError)) goto done;
      PyErr_Clear();
      PyErr_Format(PyExc_ValueError, "a msfp1 fingerprint is 32 hex digits, got %R", text);
      goto done;
    }
  }
  out = PyObject_CallFunctionObjArgs(cls, halves[0], halves[1], NULL);
  if (out == NULL && PyErr_ExceptionMatches(PyExc_ValueError)) {  /* e.g. a sign: not hex digits */
    PyErr_Clear();
    PyErr_Format(PyExc_ValueError, "a msfp1 fingerprint is 32 hex digits, got %R", text);
  }
done:
  Py_XDECREF(halves[0]);
  Py_XDECREF(halves[1]);
  return out;
}

static PyObject* fp_lanes(PyObject* self, void* closure) {
  (void)closure;
  return Py_BuildValue("(KK)", (unsigned long long)lane_of((FpObject*)self, 0),
                       (unsigned long long)lane_of((FpObject*)self, 1));
}

/* 32 lowercase hex digits: lane 0 then lane 1, each most significant first. */
static PyObject* fp_hex(PyObject* self, PyObject* unused) {
  (void)unused;
  static const char digits[] = "0123456789abcdef";
  char buf[32];
  const FpObject* fp = (const FpObject*)self;
  for (int i = 0; i < 2; ++i) {
    for (int b = 0; b < 8; ++b) {
      const unsigned char byte = fp->raw[8 * i + 7 - b];
      buf[16 * i + 2 * b] = digits[byte >> 4];
      buf[16 * i + 2 * b + 1] = digits[byte & 15];
    }
  }
  return PyUnicode_FromStringAndSize(buf, 32);
}

static PyObject* fp_to_bytes(PyObject* self, PyObject* unused) {
  (void)unused;
  return PyBytes_FromStringAndSize((const char*)((FpObject*)self)->raw, 16);
}

/* copy, deepcopy and pickle: type(self).from_bytes(self.to_bytes()). */
static PyObject* fp_reduce(PyObject* self, PyObject* unused) {
  (void)unused;
  PyObject* ctor = PyObject_GetAttrString((PyObject*)Py_TYPE(self), "from_bytes");
  if (ctor == NULL) return NULL;
  PyObject* out = Py_BuildValue("(N(y#))", ctor, (const char*)((FpObject*)self)->raw, (Py_ssize_t)16);
  return out;
}

static PyObject* fp_str(PyObject* self) { return fp_hex(self, NULL); }

static PyObject* fp_repr(PyObject* self) {
  PyObject* h = fp_hex(self, NULL);
  if (h == NULL) return NULL;
  PyObject* out = PyUnicode_FromFormat("Fingerprint('%U')", h);
  Py_DECREF(h);
  return out;
}

/* Equal 16-byte forms are equal; anything that is not a Fingerprint is not equal (as the
 * reference's `isinstance(other, Fingerprint) and ...`). */
static PyObject* fp_richcompare(PyObject* a, PyObject* b, int op) {
  if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
  int eq = PyObject_TypeCheck(b, &FingerprintType) && PyObject_TypeCheck(a, &FingerprintType) &&
           memcmp(((FpObject*)a)->raw, ((FpObject*)b)->raw, 16) == 0;
  if ((op == Py_EQ) == eq) Py_RETURN_TRUE;
  Py_RETURN_FALSE;
}

static Py_hash_t fp_hash(PyObject* self) {
  const FpObject* fp = (const FpObject*)self;
  uint64_t h = lane_of(fp, 0) ^ (lane_of(fp, 1) * UINT64_C(0x9E3779B97F4A7C15));
  Py_hash_t out = (Py_hash_t)h;
  return out == -1 ? -2 : out;
}

static int fp_setattro(PyObject* self, PyObject* name, PyObject* value) {
  (void)self; (void)name; (void)value;
  PyErr_SetString(PyExc_AttributeError, "Fingerprint is immutable");
  return -1;
}

static PyMethodDef fp_methods[] = {
    {"from_bytes", (PyCFunction)fp_from_bytes, METH_O | METH_CLASS,
     "from_bytes(data) -> Fingerprint\n\nReads the 16-byte form produced by to_bytes()."},
    {"fromhex", (PyCFunction)fp_fromhex, METH_O | METH_CLASS,
     "fromhex(text) -> Fingerprint\n\nParses the 32-hex-digit form produced by hex()."},
    {"hex", fp_hex, METH_NOARGS, "32 lowercase hex digits: lane 0 then lane 1."},
    {"to_bytes", fp_to_bytes, METH_NOARGS, "16 bytes: lane 0 then lane 1, each little-endian."},
    {"__reduce__", fp_reduce, METH_NOARGS, "copy, deepcopy and pickle: rebuilt by from_bytes."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef fp_getset[] = {
    {"lanes", fp_lanes, NULL, "the two 64-bit lanes as ints", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

PyDoc_STRVAR(fp_doc,
             "Fingerprint(lane0, lane1)\n\n"
             "An immutable msfp1 fingerprint: two 64-bit lanes.\n\n"
             "``hex()`` gives 32 lowercase hex digits (lane 0 then lane 1); ``lanes`` the two ints;\n"
             "``to_bytes()`` the 16-byte form (each lane little-endian), which ``from_bytes`` reads back.\n"
             "Equal fingerprints compare equal and hash alike, so they work as dict keys and in sets.");

static int fp_type_ready(void) {
  PyTypeObject* t = &FingerprintType;
  t->tp_name = "memstate.fingerprint.Fingerprint";
  t->tp_basicsize = sizeof(FpObject);
  t->tp_flags = Py_TPFLAGS_DEFAULT;
  t->tp_doc = fp_doc;
  t->tp_new = fp_new;
  t->tp_repr = fp_repr;
  t->tp_str = fp_str;
  t->tp_hash = fp_hash;
  t->tp_richcompare = fp_richcompare;
  t->tp_setattro = fp_setattro;
  t->tp_methods = fp_methods;
  t->tp_getset = fp_getset;
  return PyType_Ready(t);
}

/* The capsule's builder: n Fingerprints from n rows of two uint64 lanes, in one list. */
static PyObject* fp_from_rows(const uint64_t* rows, Py_ssize_t n) {
  PyObject* out = PyList_New(n);
  if (out == NULL) return NULL;
  for (Py_ssize_t i = 0; i < n; ++i) {
    PyObject* fp = fp_from_raw(&FingerprintType, (const unsigned char*)(rows + 2 * i));
    if (fp == NULL) {
      Py_DECREF(out);
      return NULL;
    }
    PyList_SET_ITEM(out, i, fp);
  }
  return out;
}

static MemstateFingerprintCAPI capi = {&FingerprintType, fp_from_rows};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "memstate._fingerprint",
    "memstate.Fingerprint as a static C type, and the C API memstate._C builds it with.", -1, NULL, NULL, NULL,
    NULL, NULL,
};

extern "C" PyMODINIT_FUNC PyInit__fingerprint(void) {
  if (fp_type_ready() < 0) return NULL;
  PyObject* m = PyModule_Create(&module);
  if (m == NULL) return NULL;
  Py_INCREF(&FingerprintType);
  if (PyModule_AddObject(m, "Fingerprint", (PyObject*)&FingerprintType) < 0) {
    Py_DECREF(&FingerprintType);
    Py_DECREF(m);
    return NULL;
  }
  PyObject* cap = PyCapsule_New(&capi, MEMSTATE_FINGERPRINT_CAPSULE, NULL);
  if (cap == NULL || PyModule_AddObject(m, "_C_API", cap) < 0) {
    Py_XDECREF(cap);
    Py_DECREF(m);
    return NULL;
  }
  return m;
}
