// Cached optimizer step plans (torch.classes.memstate.StepPlan), the device-independent part.
//
// A plan is built once from the role lists of each (device, dtype) bucket of a fused optimizer
// (parameters, state buffers, step counters) and checks them once as the ops do
// (check_optim_args: dtype, shape, contiguity, no overlap). A step call then passes only the
// groups' scalars: natively it reads every parameter's gradient, checks it and that every held
// tensor still has the storage, shape and dtype it had when the plan was built, and only then
// increments the step counters and runs the device runner on the shared *_run functions of
// optim_ops.h (the same element functors: results are bitwise those of the ops). If any check
// fails nothing is modified and the call returns an empty list: the caller runs its full path,
// which raises the error naming the offender, or rebuilds the plan.
//
// Device files register a PlanDevice (how to prepare a bucket once and run it) for their
// device type: optim_cpu.cpp for CPU, optim_cuda.cpp for CUDA (the chunk table lives on the
// device in the bucket and is uploaded only when the plan is built).
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/custom_class.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <iterator>
#include <string>
#include <vector>

#include "cpu/kernels.h"
#include "memstate/msfp1.h"
#include "optim_ops.h"

namespace memstate {

// Which optimizer a plan steps, and the scalars one group passes per step (all as float64).
enum class PlanKind : int64_t {
  kSgd = 0,      // lr, momentum, dampening, weight_decay, nesterov, maximize
  kAdam = 1,     // lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize
  kRmsprop = 2,  // lr, alpha, eps, weight_decay, momentum, centered, maximize
  kAdagrad = 3,  // lr, lr_decay, eps, weight_decay, maximize
  kLion = 4,     // lr, beta1, beta2, weight_decay, maximize
};

inline int64_t plan_scalar_count(PlanKind k) {
  switch (k) {
    case PlanKind::kSgd: return 6;
    case PlanKind::kAdam: return 8;
    case PlanKind::kRmsprop: return 7;
    case PlanKind::kAdagrad: return 5;
    case PlanKind::kLion: return 5;
  }
  TORCH_CHECK(false, "memstate.StepPlan: unknown optimizer kind ", static_cast<int64_t>(k));
}

// A tensor the plan holds (parameter, state buffer, step counter) and what it must still have
// for the plan to hold: its memory (data pointer and the deleter of its storage's DataPtr: a
// copy-on-write lazy clone swaps the deleter, not the pointer), element count and dtype. The
// TensorImpl is read directly every step (the at::Tensor is kept alive in args.roles / steps);
// `storage` is the StorageImpl at build time, a prefetch hint only (never dereferenced unless
// the tensor still points to it).
struct PlanHeld {
  c10::TensorImpl* impl = nullptr;
  c10::StorageImpl* storage = nullptr;
  const void* data = nullptr;
  c10::DeleterFnPtr deleter = nullptr;
  int64_t numel = 0;
  caffe2::TypeMeta dtype;
  bool watched = false;  // in the plan's watch list: ...
  int64_t version = 0;   // ... its version counter, read with the last step's checks
};

// Per parameter: its autograd meta at build time (where its gradient is read; a parameter
// whose meta changed fails the check), its shape's rank (shapes of rank <= 1 are implied by
// the element count), and the last gradient byte range found disjoint from every written
// range (the ranges are fixed for the plan's life, so an unchanged gradient is not searched
// again).
struct PlanParam {
  torch::autograd::AutogradMeta* meta = nullptr;
  int64_t dim = 0;
  uintptr_t grad_begin = 0, grad_end = 0;
};

// One fused pass of a plan: args.roles[0] params, roles[2..] state buffers, all checked at
// build time; the gradients are re-read every step (args.data's grads column; roles[1] stays
// empty).
struct PlanBucket {
  int64_t group = 0;
  OptimArgs args;
  std::vector<at::Tensor> steps;     // step counters, one per tensor (or none)
  std::vector<double> step_values;   // their values after this step's increment
  int64_t nheld = 0;                 // held tensors per parameter: param, state roles[, step counter]
  std::vector<PlanHeld> held;        // tensor-major: held[i * nheld + k]
  std::vector<PlanParam> pinfo;      // per parameter
  std::vector<int64_t> sizes;        // params' shapes at build time, concatenated ...
  std::vector<int64_t> size_off;     // ... tensor i's from size_off[i]
  caffe2::TypeMeta dtype;            // every held tensor's and gradient's dtype ...
  c10::Device device = c10::Device(c10::kCPU);  // ... and device
  std::vector<std::pair<uintptr_t, uintptr_t>> written;  // sorted, disjoint byte ranges written
  at::Tensor device_table;           // what the device runner keeps (CUDA: its chunk table) ...
  int64_t chunk_elems = 0;           // ... and the chunk size it was cut with
};

// What a device contributes: prepare a bucket once (at build), run it (every step), and
// whether any of its checked gradients is NaN or +-Inf (skip_if_nonfinite; nullptr: the device
// has no such scan, and such steps take the full path).
struct PlanDevice {
  void (*prepare)(PlanBucket& bucket);
  at::Tensor (*run)(PlanKind kind, PlanBucket& bucket, const double* scalars, bool fingerprint);
  bool (*grads_nonfinite)(const PlanBucket& bucket);
};

// Registered by the device files at load time; index: 0 CPU, 1 CUDA.
inline const PlanDevice* g_plan_devices[2] = {nullptr, nullptr};

inline int plan_device_index(const c10::Device& d) { return d.is_cpu() ? 0 : d.is_cuda() ? 1 : -1; }

// Runs one checked bucket with `runner` (a device runner): the kind's *_run of optim_ops.h.
template <class Runner>
at::Tensor run_plan_bucket(const Runner& runner, PlanKind kind, const PlanBucket& b, const double* s,
                           bool fingerprint) {
  const OptimArgs& a = b.args;
  switch (kind) {
    case PlanKind::kSgd:
      return sgd_run(runner, a, {}, s[0], s[1], s[2], s[3], s[4] != 0, s[5] != 0, fingerprint);
    case PlanKind::kAdam:
      return adam_run(runner, a, b.step_values, s[0], s[1], s[2], s[3], s[4], s[5] != 0, s[6] != 0, s[7] != 0,
                      fingerprint);
    case PlanKind::kRmsprop:
      return rmsprop_run(runner, a, s[0], s[1], s[2], s[3], s[4], s[5] != 0, s[6] != 0, fingerprint);
    case PlanKind::kAdagrad:
      return adagrad_run(runner, a, b.step_values, s[0], s[1], s[2], s[3], s[4] != 0, fingerprint);
    case PlanKind::kLion:
      return lion_run(runner, a, s[0], s[1], s[2], s[3], s[4] != 0, fingerprint);
  }
  TORCH_CHECK(false, "memstate.StepPlan: unknown optimizer kind");
}

class StepPlan : public torch::CustomClassHolder {
 public:
  // kind: PlanKind. params: every bucket's parameters, concatenated; states: per bucket, its
  // state roles one after the other (role-major); steps: per bucket one counter per parameter
  // when has_steps. bucket_sizes / bucket_groups / bucket_nstates: per bucket its parameter
  // count, group index and number of state roles. absent: parameters without a gradient at
  // build time (a gradient appearing invalidates the plan). watch: tensors whose version
  // counters each step records (see watch_stale).
  StepPlan(int64_t kind, std::vector<at::Tensor> params, std::vector<at::Tensor> states,
           std::vector<at::Tensor> steps, std::vector<int64_t> bucket_sizes, std::vector<int64_t> bucket_groups,
           std::vector<int64_t> bucket_nstates, bool has_steps, std::vector<at::Tensor> absent,
           std::vector<at::Tensor> watch)
      : kind_(static_cast<PlanKind>(kind)), absent_(std::move(absent)), watch_(std::move(watch)) {
    nscalars_ = plan_scalar_count(kind_);
    const size_t nb = bucket_sizes.size();
    TORCH_CHECK(bucket_groups.size() == nb && bucket_nstates.size() == nb,
                "memstate.StepPlan: bucket_sizes, bucket_groups and bucket_nstates differ in length");
    size_t pi = 0, si = 0, ci = 0;
    for (size_t b = 0; b < nb; ++b) {
      const int64_t n = bucket_sizes[b], k = bucket_nstates[b];
      TORCH_CHECK(n > 0 && k >= 0 && k + 2 <= optim::kMaxRoles && bucket_groups[b] >= 0,
                  "memstate.StepPlan: bucket ", b, " has ", n, " tensors and ", k, " state roles");
      TORCH_CHECK(pi + n <= params.size() && si + k * n <= states.size() && (!has_steps || ci + n <= steps.size()),
                  "memstate.StepPlan: the tensor lists are shorter than the buckets say");
      PlanBucket bucket;
      bucket.group = bucket_groups[b];
      ngroups_ = std::max(ngroups_, bucket.group + 1);
      const at::TensorList ps(params.data() + pi, n);
      std::vector<at::Tensor> grads;
      for (const at::Tensor& p : ps) {
        TORCH_CHECK(p.grad().defined(), "memstate.StepPlan: a planned parameter has no gradient");
        grads.push_back(p.grad());
      }
      std::vector<std::string> names;
      for (int64_t r = 0; r < k; ++r) names.push_back("state" + std::to_string(r));
      std::vector<NamedList> lists = {{"params", ps}, {"grads", grads}};
      for (int64_t r = 0; r < k; ++r) lists.push_back({names[r].c_str(), at::TensorList(states.data() + si + r * n, n)});
      bucket.args = check_optim_args("StepPlan", lists);
      const int dev = plan_device_index(ps[0].device());
      TORCH_CHECK(dev >= 0 && g_plan_devices[dev] != nullptr, "memstate.StepPlan: no plan runner for ",
                  ps[0].device());
      check_roles(bucket);
      if (has_steps) {
        bucket.steps.assign(steps.begin() + ci, steps.begin() + ci + n);
        for (int64_t i = 0; i < n; ++i) check_step_counter(bucket.steps[i], "StepPlan", ci + i);
        bucket.step_values.resize(n);
        ci += n;
      }
      for (const at::Tensor& p : ps) {
        bucket.size_off.push_back(static_cast<int64_t>(bucket.sizes.size()));
        bucket.sizes.insert(bucket.sizes.end(), p.sizes().begin(), p.sizes().end());
      }
      bucket.size_off.push_back(static_cast<int64_t>(bucket.sizes.size()));
      for (int r = 0; r < bucket.args.nroles; ++r) {
        if (r == optim::kGrad) continue;
        for (const at::Tensor& t : bucket.args.roles[r]) {
          const ByteRange br = byte_range(t, "", 0, true);
          if (br.end > br.begin) bucket.written.emplace_back(br.begin, br.end);
        }
      }
      std::sort(bucket.written.begin(), bucket.written.end());
      pi += n;
      si += k * n;
      g_plan_devices[dev]->prepare(bucket);
      buckets_.push_back(std::move(bucket));
    }
    TORCH_CHECK(pi == params.size() && si == states.size() && (!has_steps || ci == steps.size()),
                "memstate.StepPlan: the tensor lists are longer than the buckets say");
    for (PlanBucket& b : buckets_) index_bucket(b);
    index_watch();
  }

  // One step: `scalars` holds plan_scalar_count(kind) values per param group (groups in order). Returns, per bucket,
  // the fingerprint rows (int64 [n, roles, 2], or empty), then the msfp1 lanes of every step
  // counter after the step (CPU int64 [counters, 2], or empty); an empty list, with nothing
  // modified, when any gradient or held tensor no longer fits the plan. With skip_nonfinite
  // (skip_if_nonfinite), once everything is checked, a gradient holding NaN or +-Inf skips the
  // step: nothing is modified and the list holds one bool tensor (true; the normal result
  // holds int64 tensors only, one even with no buckets); a device without a scan returns the
  // empty list.
  std::vector<at::Tensor> step(std::vector<double> scalars, bool fingerprint, bool skip_nonfinite) {
    TORCH_CHECK(static_cast<int64_t>(scalars.size()) >= ngroups_ * nscalars_, "memstate.StepPlan.step: got ",
                scalars.size(), " scalars; the plan's ", ngroups_, " groups take ", nscalars_, " each");
    if (skip_nonfinite) {
      for (const PlanBucket& b : buckets_) {
        if (g_plan_devices[plan_device_index(b.device)]->grads_nonfinite == nullptr) return {};
      }
    }
    for (const PlanBucket& b : buckets_) {
      if (!flags_fit(b, scalars.data() + b.group * nscalars_)) return {};
    }
    for (const at::Tensor& p : absent_) {
      if (p.unsafeGetTensorImpl()->grad().defined()) return {};
    }
    // The version counters of the watched tensors are read with the checks: the step itself
    // writes through raw pointers and moves none of them.
    const bool record = !watch_.empty();
    recorded_ = false;
    for (PlanBucket& b : buckets_) {
      if (!(record ? ready<true>(b) : ready<false>(b))) return {};
    }
    if (skip_nonfinite) {
      for (const PlanBucket& b : buckets_) {
        if (g_plan_devices[plan_device_index(b.device)]->grads_nonfinite(b)) return {at::ones({}, at::kBool)};
      }
    }
    // Everything checked: from here on the step runs.
    for (PlanBucket& b : buckets_) {
      for (size_t i = 0; i < b.steps.size(); ++i) b.step_values[i] = increment_at(step_held(b, i));
    }
    std::vector<at::Tensor> out;
    out.reserve(buckets_.size() + 1);
    for (PlanBucket& b : buckets_) {
      const int dev = plan_device_index(b.device);
      out.push_back(g_plan_devices[dev]->run(kind_, b, scalars.data() + b.group * nscalars_, fingerprint));
    }
    out.push_back(fingerprint ? step_fingerprints() : at::empty({0, 2}, at::kLong));
    extra_versions_.clear();
    for (const at::Tensor& t : extra_watch_) extra_versions_.push_back(static_cast<int64_t>(t._version()));
    recorded_ = record;
    return out;
  }

  // Whether a watched tensor was written since the last step (its version counter moved).
  bool watch_stale() const {
    if (watch_.empty()) return false;
    if (!recorded_ || extra_versions_.size() != extra_watch_.size()) return true;
    for (size_t i = 0; i < extra_watch_.size(); ++i) {
      if (static_cast<int64_t>(extra_watch_[i]._version()) != extra_versions_[i]) return true;
    }
    for (const PlanBucket& b : buckets_) {
      for (const PlanHeld& h : b.held) {
        if (h.watched && static_cast<int64_t>(h.impl->version_counter().current_version()) != h.version) return true;
      }
    }
    return false;
  }

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  static c10::StorageImpl* storage_of(const c10::TensorImpl* t) { return t->unsafe_storage().unsafeGetStorageImpl(); }

  // What const_data_ptr() returns (nullptr for an empty tensor), from the fields: no checks.
  static const void* data_of(const c10::TensorImpl* t, c10::StorageImpl* st, size_t itemsize) {
    if (t->numel() == 0) return nullptr;
    return static_cast<const char*>(st->_mutable_data_ptr_no_checks().get()) +
           itemsize * static_cast<size_t>(t->storage_offset());
  }

  static PlanHeld held_of(const at::Tensor& t) {
    PlanHeld h;
    h.impl = t.unsafeGetTensorImpl();
    h.storage = storage_of(h.impl);
    TORCH_CHECK(h.storage != nullptr, "memstate.StepPlan: a planned tensor has no storage");
    h.data = t.const_data_ptr();
    h.deleter = h.storage->_mutable_data_ptr_no_checks().get_deleter();
    h.numel = t.numel();
    h.dtype = t.dtype();
    TORCH_CHECK(data_of(h.impl, h.storage, h.dtype.itemsize()) == h.data, "memstate.StepPlan: unexpected tensor layout");
    return h;
  }

  // Fills the bucket's held tensors and per-parameter records (build time).
  static void index_bucket(PlanBucket& b) {
    const OptimArgs& a = b.args;
    const int64_t n = a.n;
    b.nheld = a.nroles - 1 + (b.steps.empty() ? 0 : 1);
    b.held.reserve(static_cast<size_t>(n * b.nheld));
    b.dtype = a.roles[0][0].dtype();
    b.device = a.roles[0][0].device();
    for (int64_t i = 0; i < n; ++i) {
      for (int r = 0; r < a.nroles; ++r) {
        if (r != optim::kGrad) b.held.push_back(held_of(a.roles[r][i]));
      }
      if (!b.steps.empty()) b.held.push_back(held_of(b.steps[i]));
      const at::Tensor& p = a.roles[0][i];
      PlanParam pp;
      pp.meta = dynamic_cast<torch::autograd::AutogradMeta*>(p.unsafeGetTensorImpl()->autograd_meta());
      TORCH_CHECK(pp.meta != nullptr, "memstate.StepPlan: a planned parameter has no autograd meta");
      pp.dim = p.dim();
      b.pinfo.push_back(pp);
    }
    b.args.roles[optim::kGrad].clear();  // the grads are re-read every step
  }

  // Splits watch_ into held tensors (their versions are read by ready()) and the others.
  void index_watch() {
    std::vector<const c10::TensorImpl*> watched;
    for (const at::Tensor& t : watch_) watched.push_back(t.unsafeGetTensorImpl());
    std::sort(watched.begin(), watched.end());
    std::vector<const c10::TensorImpl*> held;
    for (PlanBucket& b : buckets_) {
      for (PlanHeld& h : b.held) {
        h.watched = std::binary_search(watched.begin(), watched.end(), h.impl);
        held.push_back(h.impl);
      }
    }
    std::sort(held.begin(), held.end());
    for (const at::Tensor& t : watch_) {
      if (!std::binary_search(held.begin(), held.end(), t.unsafeGetTensorImpl())) extra_watch_.push_back(t);
    }
  }

  static const PlanHeld& step_held(const PlanBucket& b, size_t i) {
    return b.held[(i + 1) * static_cast<size_t>(b.nheld) - 1];
  }

  // increment_step (optim_ops.h) through a checked held counter.
  static double increment_at(const PlanHeld& s) {
    if (s.dtype == caffe2::TypeMeta::Make<float>()) {
      float* v = static_cast<float*>(const_cast<void*>(s.data));
      *v = *v + 1.0f;
      return *v;
    }
    double* v = static_cast<double*>(const_cast<void*>(s.data));
    *v = *v + 1.0;
    return *v;
  }

  // The roles the kind's run reads (state roles as the flags will ask for them) are checked
  // again every step against the scalars (run_plan_bucket); here only their count is bounded.
  void check_roles(const PlanBucket& b) const {
    const int k = b.args.nroles - 2;
    switch (kind_) {
      case PlanKind::kSgd: TORCH_CHECK(k <= 1, "memstate.StepPlan: SGD takes at most 1 state role"); break;
      case PlanKind::kAdam: TORCH_CHECK(k == 2 || k == 3, "memstate.StepPlan: Adam takes 2 or 3 state roles"); break;
      case PlanKind::kRmsprop: TORCH_CHECK(k >= 1, "memstate.StepPlan: RMSprop takes 1 to 3 state roles"); break;
      case PlanKind::kAdagrad:
      case PlanKind::kLion: TORCH_CHECK(k == 1, "memstate.StepPlan: this optimizer takes 1 state role"); break;
    }
  }

  // Whether the group's flags ask for the state roles the bucket holds (and SGD's Nesterov
  // for a momentum without dampening, as sgd_step checks).
  bool flags_fit(const PlanBucket& b, const double* s) const {
    const int k = b.args.nroles - 2;
    switch (kind_) {
      case PlanKind::kSgd: return k == (s[1] != 0 ? 1 : 0) && (s[4] == 0 || (s[1] != 0 && s[2] == 0));
      case PlanKind::kAdam: return k == (s[6] != 0 ? 3 : 2);
      case PlanKind::kRmsprop: return k == 1 + (s[4] > 0 ? 1 : 0) + (s[5] != 0 ? 1 : 0);
      case PlanKind::kAdagrad:
      case PlanKind::kLion: return k == 1;
    }
    return false;
  }

  // The bytes of a TensorImpl that the checks read: storage_ and autograd_meta_, the rank and
  // first sizes, and storage_offset_ .. key_set_ (with the contiguity bits). Addresses past
  // the object are harmless: a prefetch never faults.
  static void prefetch_impl(const c10::TensorImpl* t, bool sizes) {
    const char* q = reinterpret_cast<const char*>(t);
    __builtin_prefetch(q + 16);
    if (sizes) __builtin_prefetch(q + 96);
    __builtin_prefetch(q + 144);
    __builtin_prefetch(q + sizeof(c10::TensorImpl) - 1);
  }

  static void prefetch_storage(const c10::StorageImpl* s) {
    __builtin_prefetch(reinterpret_cast<const char*>(s) + 16);  // the DataPtr
  }

  // The address of a tensor's version counter object (a prefetch hint only).
  static const void* version_object(const c10::TensorImpl* t) {
    static_assert(sizeof(c10::VariableVersion) == sizeof(void*), "VariableVersion holds one pointer");
    return *reinterpret_cast<const void* const*>(&t->version_counter());
  }

  // Whether held tensor h still has the memory, deleter, element count and dtype it had at
  // build time, densely (contiguous, no lazy conjugate or negation); with `record`, reads its
  // version counter.
  template <bool kRecord>
  static bool held_fits(PlanHeld& h) {
    const c10::TensorImpl* t = h.impl;
    if (t->dtype() != h.dtype || t->numel() != h.numel || !t->is_contiguous() || t->is_conj() || t->is_neg()) {
      return false;
    }
    c10::StorageImpl* st = storage_of(t);
    if (st == nullptr || st->_mutable_data_ptr_no_checks().get_deleter() != h.deleter ||
        data_of(t, st, h.dtype.itemsize()) != h.data) {
      return false;
    }
    if constexpr (kRecord) {
      const c10::VariableVersion& vv = t->version_counter();
      if (!vv.enabled()) return false;
      h.version = static_cast<int64_t>(vv.current_version());
    }
    return true;
  }

  // Whether the bucket still fits the plan, reading every gradient's pointer into the grads
  // column of args.data: every held tensor has the memory, element count, dtype and contiguity
  // it had at build time (`p.data = other`, a resized storage or a copy-on-write clone fail
  // here), every parameter its shape and autograd meta, every step counter is a finite count
  // >= 0, and every gradient is defined, dense, the parameter's dtype, shape and device,
  // contiguous, within its storage's bytes and overlaps no tensor the pass writes. (A held
  // tensor's storage cannot shrink unnoticed: resizing a storage moves its data pointer.)
  //
  // The checks chase pointers through thousands of small objects (tensor -> storage -> data,
  // parameter -> autograd meta -> gradient -> storage). One pass over the parameters keeps a
  // software pipeline of prefetches ahead of the checks: kAhead parameters ahead, every held
  // tensor's TensorImpl, its StorageImpl as at build time, the step counter's value and the
  // parameter's autograd meta (addresses known from the build: no dependent load); kAhead / 2
  // ahead, the gradient's TensorImpl (read from the meta, fetched by then); kAhead / 4 ahead,
  // the gradient's StorageImpl. Their cache misses overlap instead of queueing.
  template <bool kRecord>
  static bool ready(PlanBucket& b) {
    constexpr int64_t kAhead = 8;
    const int64_t n = b.args.n;
    const int64_t k = b.nheld;
    const bool counted = !b.steps.empty();
    const size_t itemsize = b.dtype.itemsize();
    const auto stage0 = [&](int64_t i) {
      for (int64_t j = 0; j < k; ++j) {
        const PlanHeld& h = b.held[static_cast<size_t>(i * k + j)];
        prefetch_impl(h.impl, j == 0 && b.pinfo[i].dim > 1);
        prefetch_storage(h.storage);
      }
      if (counted) __builtin_prefetch(b.held[static_cast<size_t>(i * k + k - 1)].data);
      __builtin_prefetch(&b.pinfo[i].meta->grad_);  // an address computation only: no load
    };
    // the gradient as the parameter's live autograd meta has it (the build-time meta only if
    // it is still the parameter's: a replaced one may be freed)
    const auto grad_impl = [&](int64_t i) -> const c10::TensorImpl* {
      const c10::AutogradMetaInterface* m = b.held[static_cast<size_t>(i * k)].impl->autograd_meta();
      return m == b.pinfo[i].meta ? b.pinfo[i].meta->grad_.unsafeGetTensorImpl() : nullptr;
    };
    const auto stage1 = [&](int64_t i) {
      if (const c10::TensorImpl* g = grad_impl(i)) prefetch_impl(g, b.pinfo[i].dim > 1);
      if (kRecord) {
        for (int64_t j = 0; j < k; ++j) __builtin_prefetch(version_object(b.held[static_cast<size_t>(i * k + j)].impl));
      }
    };
    const auto stage2 = [&](int64_t i) {
      const c10::TensorImpl* g = grad_impl(i);
      if (g != nullptr && storage_of(g) != nullptr) prefetch_storage(storage_of(g));
    };
    for (int64_t i = 0; i < std::min(n, kAhead); ++i) stage0(i);
    for (int64_t i = 0; i < std::min(n, kAhead / 2); ++i) stage1(i);
    for (int64_t i = 0; i < std::min(n, kAhead / 4); ++i) stage2(i);
    for (int64_t i = 0; i < n; ++i) {
      if (i + kAhead < n) stage0(i + kAhead);
      if (i + kAhead / 2 < n) stage1(i + kAhead / 2);
      if (i + kAhead / 4 < n) stage2(i + kAhead / 4);

      PlanHeld* hs = &b.held[static_cast<size_t>(i * k)];
      for (int64_t j = 0; j < k; ++j) {
        if (!held_fits<kRecord>(hs[j])) return false;
      }
      if (counted) {
        const PlanHeld& s = hs[k - 1];
        const double v = s.dtype == caffe2::TypeMeta::Make<float>() ? static_cast<double>(*static_cast<const float*>(s.data))
                                                                   : *static_cast<const double*>(s.data);
        if (!std::isfinite(v) || v < 0) return false;
      }
      // the parameter: its shape (the rank and element count imply it up to rank 1) and the
      // autograd meta its gradient is read from
      PlanParam& pp = b.pinfo[i];
      const c10::TensorImpl* p = hs[0].impl;
      const int64_t* sz = b.sizes.data() + b.size_off[i];
      if (p->dim() != pp.dim || (pp.dim > 1 && !std::equal(sz, sz + pp.dim, p->sizes().begin())) ||
          p->autograd_meta() != pp.meta) {
        return false;
      }
      const at::Tensor& gt = pp.meta->grad_;
      if (!gt.defined()) return false;
      const c10::TensorImpl* g = gt.unsafeGetTensorImpl();
      if (g->layout() != at::kStrided || g->dtype() != b.dtype || g->numel() != hs[0].numel || g->dim() != pp.dim ||
          !g->is_contiguous() || g->is_conj() || g->is_neg() || g->device() != b.device ||
          (pp.dim > 1 && !std::equal(sz, sz + pp.dim, g->sizes().begin()))) {
        return false;
      }
      c10::StorageImpl* gs = storage_of(g);
      if (gs == nullptr) return false;
      const void* gd = data_of(g, gs, itemsize);
      if (gd == nullptr && hs[0].numel > 0) return false;
      // a storage freed or shrunk under the gradient (resize_): no memory for its elements
      if (static_cast<int64_t>(gs->nbytes()) < (g->storage_offset() + hs[0].numel) * static_cast<int64_t>(itemsize)) {
        return false;
      }
      const auto gb = reinterpret_cast<uintptr_t>(gd);
      const uintptr_t ge = gb + static_cast<uintptr_t>(hs[0].numel) * itemsize;
      if (ge > gb && (gb != pp.grad_begin || ge != pp.grad_end)) {
        // the first written range starting at or after ge; the one before it must end by gb
        auto it = std::lower_bound(b.written.begin(), b.written.end(), std::make_pair(ge, uintptr_t{0}));
        if (it != b.written.begin() && std::prev(it)->second > gb) return false;
        pp.grad_begin = gb;
        pp.grad_end = ge;
      }
      b.args.data[static_cast<size_t>(optim::kGrad * n + i)] = const_cast<void*>(gd);
    }
    return true;
  }

  at::Tensor step_fingerprints() const {
    int64_t n = 0;
    for (const PlanBucket& b : buckets_) n += static_cast<int64_t>(b.steps.size());
    at::Tensor out = at::empty({n, 2}, at::kLong);
    auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
    for (const PlanBucket& b : buckets_) {
      for (size_t i = 0; i < b.steps.size(); ++i) {
        const PlanHeld& s = step_held(b, i);
        const uint64_t nbytes = s.dtype.itemsize();
        uint64_t s0 = 0, s1 = 0;
        msfp1::accumulate_bytes(static_cast<const unsigned char*>(s.data), nbytes, 0, s0, s1);
        *o++ = msfp1::finalize_lane0(s0, nbytes);
        *o++ = msfp1::finalize_lane1(s1, nbytes);
      }
    }
    return out;
  }

  PlanKind kind_;
  int64_t nscalars_ = 0;
  int64_t ngroups_ = 0;
  std::vector<PlanBucket> buckets_;
  std::vector<at::Tensor> absent_;
  std::vector<at::Tensor> watch_;
  std::vector<at::Tensor> extra_watch_;  // watched tensors the plan does not hold ...
  std::vector<int64_t> extra_versions_;  // ... and their versions after the last step
  bool recorded_ = false;                // whether the last step recorded the held tensors' versions
};

}  // namespace memstate
