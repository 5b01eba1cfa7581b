// Torch-free CPU kernels on raw pointers (tier 1). The ATen glue in *_cpu.cpp splits work into
// fixed-size chunks and spreads them over threads; these functions do one chunk.
#pragma once

#include <cstdint>
#include <string>

#include "memstate/precision.h"

namespace memstate {
namespace cpu {

// Instruction sets the CPU kernels are built for; picked at run time (see set_isa()).
enum class Isa { kScalar = 0, kAvx2 = 1 };

// The ISA the kernels use now: the best one this CPU supports, unless set_isa() forced one.
Isa active_isa();
// "auto" (default), "scalar" or "avx2". Throws std::invalid_argument for unknown names or an
// ISA this CPU lacks. Results never depend on the ISA; tests use this to prove it.
void set_isa(const std::string& name);
const char* isa_name(Isa isa);
// Comma-separated ISAs this CPU supports, e.g. "scalar,avx2".
std::string supported_isas();

// msfp1 partial sums: adds the terms of the pairs of `nbytes` bytes at `data` (whose first pair
// has global index `first_pair`) to s0/s1. Only the final chunk of a tensor may have
// nbytes % 8 != 0 (its tail is zero-padded).
void msfp1_accumulate(const unsigned char* data, uint64_t nbytes, uint64_t first_pair,
                      uint64_t& s0, uint64_t& s1);

// Bytes of one CPU work item of the fingerprint ops (default 512 KiB; a multiple of 64).
// Settable so tests can prove that results do not depend on it.
int64_t fingerprint_chunk_bytes();
void set_fingerprint_chunk_bytes(int64_t bytes);

// Elements per work item of the fused optimizer ops (default 16384; a multiple of 8). The CUDA
// kernels use the same setting. Settable so tests can prove results do not depend on it.
int64_t optim_chunk_elems();
void set_optim_chunk_elems(int64_t elems);

// Work below this many bytes runs on the calling thread: waking the OpenMP pool costs far more
// than hashing or updating a few KiB (tens of milliseconds on a loaded machine).
constexpr int64_t kSerialBytes = int64_t{1} << 20;

// Grain for at::parallel_for over `nchunks` work items that touch `total_bytes` in all: all of
// them (so parallel_for runs inline) when the work is small, else 1. Threading never changes
// a result, only which thread computes which chunk.
inline int64_t chunk_grain(int64_t nchunks, int64_t total_bytes) {
  return total_bytes < kSerialBytes ? (nchunks > 1 ? nchunks : 1) : 1;
}

// Whether any of elements [begin, end) at p (a storage dtype: float, double, bfloat16, half) is
// NaN or +-Inf: v - v is NaN exactly for those. One pass, no early exit (it vectorises).
template <class T>
bool any_nonfinite(const T* p, int64_t begin, int64_t end) {
  bool bad = false;
  for (int64_t j = begin; j < end; ++j) {
    const math_t<T> v = to_math(p[j]);
    bad |= (v - v) != (v - v);
  }
  return bad;
}

}  // namespace cpu

#ifdef PYBIND11_VERSION_MAJOR  // (included after pybind11: ops.cpp, cpu/fingerprint_*.cpp)
// memstate._C.fingerprints_from_rows (cpu/fingerprint_py.cpp; called from ops.cpp's PYBIND11_MODULE).
void bind_fingerprint_rows(pybind11::module_& m);
// [memstate.Fingerprint] for n msfp1 lane rows (uint64 lane 0, lane 1 each), built by the C API
// of memstate._fingerprint (memstate/fingerprint_object.h): the builder of fingerprints_from_rows
// and fingerprint_many_cpu (cpu/fingerprint_py.cpp).
pybind11::list fingerprint_objects(const uint64_t* rows, pybind11::ssize_t n);
// memstate._C.fingerprint_many_cpu (cpu/fingerprint_many.cpp).
void bind_fingerprint_many(pybind11::module_& m);
#endif

}  // namespace memstate
