// Every memstate op schema, in one place. Device implementations live in cpu/*_cpu.cpp and
// cuda/*_cuda.cpp (one TORCH_LIBRARY_IMPL per device file). PYBIND11_MODULE only exposes
// non-tensor helpers: build information and test knobs.
#include <torch/extension.h>
#include <torch/library.h>

#include "cpu/kernels.h"

#ifndef MEMSTATE_SOURCE_HASH
#define MEMSTATE_SOURCE_HASH "unknown"
#endif
#ifndef MEMSTATE_VERSION
#define MEMSTATE_VERSION "unknown"
#endif

TORCH_LIBRARY(memstate, m) {
  // msfp1 fingerprints of a list of tensors on one device: int64 [N, 2], the lanes (F_0, F_1)
  // as uint64 bit patterns, over each tensor's logical row-major bytes.
  m.def("fingerprint(Tensor[] tensors) -> Tensor");
  // msfp1 partial sums (S_0, S_1) before finalisation, int64 [N, 2]; first_pairs[i] is the
  // global index (in 8-byte pairs) of tensors[i]'s first pair, or empty for all zero. Shards
  // of one tensor add up (mod 2^64) to the whole tensor's sums.
  m.def("fingerprint_sums(Tensor[] tensors, int[] first_pairs) -> Tensor");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict d;
  d["version"] = MEMSTATE_VERSION;
  d["source_hash"] = MEMSTATE_SOURCE_HASH;
#ifdef MEMSTATE_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  d["torch_version"] = TORCH_VERSION;
  d["cpu_isas"] = memstate::cpu::supported_isas();
  d["cpu_isa"] = memstate::cpu::isa_name(memstate::cpu::active_isa());
#if defined(__VERSION__)
  d["host_compiler"] = __VERSION__;
#endif
  return d;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "memstate native core: ops are registered as torch.ops.memstate.*";
  m.def("build_info", &build_info, "How this extension was built.");
  m.def("set_cpu_isa", &memstate::cpu::set_isa,
        "Force the CPU kernels' ISA: 'auto', 'scalar' or 'avx2' (tests only; results never "
        "depend on it).");
  m.def("cpu_isa", []() { return std::string(memstate::cpu::isa_name(memstate::cpu::active_isa())); });
  m.def("fingerprint_chunk_bytes", &memstate::cpu::fingerprint_chunk_bytes);
  m.def("set_fingerprint_chunk_bytes", &memstate::cpu::set_fingerprint_chunk_bytes,
        "Bytes per CPU work item of the fingerprint ops (tests only).");
}
