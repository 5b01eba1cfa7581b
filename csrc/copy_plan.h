// Bound copy plans (issue 12): memstate._C.CopyPlan (pybind11; what Snapshot calls) and
// torch.classes.memstate.CopyPlan (the same class for TorchScript), the native half of a snapshot's
// bound plan. A plan holds, for one device, the live tensors of a snapshot and the arena slots
// they are captured into, with their pointers and byte counts, so that Snapshot.recapture() and
// restore() are ONE native call per device that copies and fingerprints everything: no tensor
// list crosses from Python on the hot path and nothing is looked up per tensor in Python.
//
// Safety: every use first compares every held live tensor with what it was when the plan was
// built (data pointer, sizes, dtype, device, contiguity, storage still allocated); when anything changed
// the call copies nothing and returns None, and the Python side rebuilds the plan. A stale plan
// therefore never reads or writes through an old pointer or byte count.
//
// Device-independent part (the class, here and in cpu/copy_plan.cpp, which every build compiles)
// plus one backend per device type: cpu/copy_plan_cpu.cpp (the copy + fingerprint core of
// fingerprint_cpu.cpp) and cuda/copy_plan_cuda.cpp (fingerprint_kernels.cu's kernel with the
// task and chunk tables uploaded once, when the plan is built).
#pragma once

#include <ATen/ATen.h>
#include <torch/custom_class.h>

#include <cstdint>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace memstate {

// One byte copy of a plan (torch-free): `nbytes` bytes from `from` to `to`.
struct PlanCopy {
  const unsigned char* from;
  unsigned char* to;
  int64_t nbytes;
};

// A device's runner of a plan's copies. Built once per plan with the fixed copies of both
// directions (capture: live -> slot; restore: slot -> live), then run any number of times.
class PlanBackend {
 public:
  virtual ~PlanBackend() = default;
  // Runs the fixed copies of one direction, then (capture only) the `extra` copies, whose
  // pointers change per call. With `rows` (a zeroed int64 [fixed + extra, 2] tensor on the
  // plan's device) not null, leaves in it the finalised msfp1 lanes of the copied bytes,
  // computed in the same pass. Ordered on the current stream; no host sync.
  virtual void run(bool restore, const std::vector<PlanCopy>& extra, at::Tensor* rows) = 0;
};

using PlanBackendFactory = std::unique_ptr<PlanBackend> (*)(const c10::Device& device,
                                                            std::vector<PlanCopy> capture,
                                                            std::vector<PlanCopy> restore);

// Called at static-initialisation time by each device file.
void register_plan_backend(c10::DeviceType type, PlanBackendFactory factory);

class CopyPlan : public torch::CustomClassHolder {
 public:
  // `sources`: the live tensors restored in place (dense, contiguous, one device); `slots`:
  // contiguous uint8 arena slots on that device, one per source (same byte count) followed by
  // the slots of the tensors passed to capture() per call (the "dynamic" ones: RNG states and
  // tensors of the JSON tree). `bump`: indices of the sources whose autograd version counter
  // restore() increments. Refuses (naming the index) anything else, and overlapping memory.
  CopyPlan(std::vector<at::Tensor> sources, std::vector<at::Tensor> slots, std::vector<int64_t> bump);

  // Index of the first source that is no longer what the plan was built from, or -1.
  int64_t stale() const;
  // Copies every source into its slot and `dynamic[j]` (any layout; same byte count) into slot
  // n_sources + j, fingerprinting all in the same pass. Returns the rows (see PlanBackend::run),
  // or None when the plan is stale (nothing copied).
  std::optional<at::Tensor> capture(std::vector<at::Tensor> dynamic, bool fingerprint);
  // Copies every source's slot back into it and bumps the versions of `bump`; returns the
  // fingerprints of the written bytes, int64 [n_sources, 2], or None when stale (nothing written).
  std::optional<at::Tensor> restore();
  int64_t num_sources() const { return static_cast<int64_t>(sources_.size()); }
  int64_t num_slots() const { return static_cast<int64_t>(slots_.size()); }

 private:
  struct Expect {  // what source i was when the plan was built (its sizes: expect_sizes_[at, at + ndim))
    const void* data;
    caffe2::TypeMeta dtype;
    int64_t itemsize;
    uint32_t ndim;
    size_t at;
  };
  bool matches(size_t i) const;
  // The zeroed rows of a call: the previous call's buffer when nobody else holds it any more
  // (a fresh one otherwise), so a large plan does not map and fault in new pages per call.
  at::Tensor rows_for(bool restore, int64_t n);

  c10::Device device_;
  std::vector<at::Tensor> sources_;
  std::vector<at::Tensor> slots_;  // keep the arena alive
  std::vector<Expect> expect_;
  std::vector<int64_t> expect_sizes_;  // every source's sizes, flat (one allocation, read in order)
  std::vector<at::Tensor> bump_;
  std::vector<int64_t> slot_nbytes_;
  std::unique_ptr<PlanBackend> backend_;
  at::Tensor rows_[2];  // the last capture's and restore's rows (see rows_for)
  std::string restore_refusal_;  // why restore() is refused (sources overlap), or empty
  std::mutex mutex_;  // one call at a time (the backends reuse their tables)
};

namespace cpu {

// The CPU copy + fingerprint core (fingerprint_cpu.cpp), on raw pointers.
// chunk_begin := prefix sums (n + 1) of the chunks of `chunk` bytes of every range.
void msfp1_chunk_table(const int64_t* nbytes, int64_t n, int64_t chunk, std::vector<int64_t>& chunk_begin);
// For n byte ranges: copies src[i] to dst[i] when dst is not null, and when `out` is not null
// adds the msfp1 sums (S_0, S_1) of the (copied) bytes to out[2i], out[2i + 1] (not finalised;
// first_pairs null: all zero). Chunks spread over threads with at::parallel_for; the result
// does not depend on the thread count or `chunk`.
void msfp1_ranges(int64_t n, const unsigned char* const* src, unsigned char* const* dst, const int64_t* nbytes,
                  const uint64_t* first_pairs, const int64_t* chunk_begin, int64_t chunk, uint64_t* out);
// msfp1_accumulate (kernels.h) of the bytes at `src` while copying them to `dst` in the same pass
// (fingerprint_kernels.cpp). `stream`: non-temporal stores where the ISA and alignment allow
// (large copies). Results never depend on the path.
void msfp1_copy_accumulate(const unsigned char* src, unsigned char* dst, uint64_t nbytes, uint64_t first_pair,
                           uint64_t& s0, uint64_t& s1, bool stream);
// rows[2i], rows[2i + 1] := the finalised lanes F_0, F_1 of sums over nbytes[i] bytes.
void msfp1_finalize_rows(uint64_t* rows, const int64_t* nbytes, int64_t n);
// The CPU kernel of torch.ops.memstate.fingerprint (int64 [N, 2] finalised lanes); also called
// directly by memstate._C.fingerprint_many_cpu (cpu/fingerprint_many.cpp) for plain CPU tensors.
at::Tensor fingerprint_rows_cpu(at::TensorList tensors);

}  // namespace cpu

#ifdef PYBIND11_VERSION_MAJOR  // (included before this header: ops.cpp and cpu/copy_plan.cpp)
// memstate._C.CopyPlan: the same class bound with pybind11, and memstate._C.same_objects (called
// from ops.cpp's PYBIND11_MODULE). The snapshot calls this binding: a method call costs under a
// microsecond, against 4-10 us for the boxed TorchBind call of torch.classes.memstate.CopyPlan.
void bind_copy_plan(pybind11::module_& m);
#endif

}  // namespace memstate
