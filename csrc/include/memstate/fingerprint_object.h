/* memstate.Fingerprint's C layout and the C API its module exports (a capsule), shared by
 * memstate._fingerprint (csrc/py/fingerprint_type.c, which defines the type) and memstate._C
 * (which builds fingerprint_many's results with it). Plain C, Python.h only. */
#ifndef MEMSTATE_FINGERPRINT_OBJECT_H
#define MEMSTATE_FINGERPRINT_OBJECT_H

#include <Python.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* An immutable msfp1 fingerprint: its 16-byte form (lane 0 then lane 1, each little-endian).
 * Not tracked by the cycle collector (it holds no references): one small allocation each. */
typedef struct {
  PyObject_HEAD
  unsigned char raw[16];
} MemstateFingerprintObject;

typedef struct {
  PyTypeObject* type;
  /* A new list of n Fingerprints from n rows of two uint64 lanes (host byte order: x86-64 and
   * AArch64 are little-endian, so a row's bytes are the 16-byte form); NULL with an exception
   * set on failure. */
  PyObject* (*from_rows)(const uint64_t* rows, Py_ssize_t n);
} MemstateFingerprintCAPI;

#define MEMSTATE_FINGERPRINT_CAPSULE "memstate._fingerprint._C_API"

#ifdef __cplusplus
}
#endif

#endif
