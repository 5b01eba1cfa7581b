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

// What a held tensor must still have for the plan to hold: its memory, element count, dtype.
struct PlanSignature {
  const void* data;
  int64_t numel;
  at::ScalarType dtype;
};

// One fused pass of a plan: args.roles[0] params, roles[2..] state buffers, all checked at
// build time; the gradients are re-read every step (args.data's grads column; roles[1] stays
// empty).
struct PlanBucket {
  int64_t group = 0;
  OptimArgs args;
  std::vector<at::Tensor> steps;     // step counters, one per tensor (or none)
  std::vector<double> step_values;   // their values after this step's increment
  std::vector<PlanSignature> sig;    // per written role (role-major), then per step counter
  std::vector<int64_t> sizes;        // params' shapes at build time, concatenated ...
  std::vector<int64_t> size_off;     // ... tensor i's from size_off[i]
  std::vector<std::pair<uintptr_t, uintptr_t>> written;  // sorted, disjoint byte ranges written
  at::Tensor device_table;           // what the device runner keeps (CUDA: its chunk table) ...
  int64_t chunk_elems = 0;           // ... and the chunk size it was cut with
};

// What a device contributes: prepare a bucket once (at build), run it (every step).
struct PlanDevice {
  void (*prepare)(PlanBucket& bucket);
  at::Tensor (*run)(PlanKind kind, PlanBucket& bucket, const double* scalars, bool fingerprint);
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
    for (PlanBucket& b : buckets_) {
      for (int r = 0; r < b.args.nroles; ++r) {
        if (r != optim::kGrad) {
          for (const at::Tensor& t : b.args.roles[r]) b.sig.push_back(signature(t));
        }
      }
      for (const at::Tensor& s : b.steps) b.sig.push_back(signature(s));
      b.args.roles[optim::kGrad].clear();  // the grads are re-read every step
    }
  }

  // One step: `scalars` holds plan_scalar_count(kind) values per param group (groups in order). Returns, per bucket,
  // the fingerprint rows (int64 [n, roles, 2], or empty), then the msfp1 lanes of every step
  // counter after the step (CPU int64 [counters, 2], or empty); an empty list, with nothing
  // modified, when any gradient or held tensor no longer fits the plan.
  std::vector<at::Tensor> step(std::vector<double> scalars, bool fingerprint) {
    TORCH_CHECK(static_cast<int64_t>(scalars.size()) >= ngroups_ * nscalars_, "memstate.StepPlan.step: got ",
                scalars.size(), " scalars; the plan's ", ngroups_, " groups take ", nscalars_, " each");
    for (const PlanBucket& b : buckets_) {
      if (!flags_fit(b, scalars.data() + b.group * nscalars_)) return {};
    }
    for (const at::Tensor& p : absent_) {
      if (p.grad().defined()) return {};
    }
    for (PlanBucket& b : buckets_) {
      if (!ready(b)) return {};
    }
    // Everything checked: from here on the step runs.
    for (PlanBucket& b : buckets_) {
      const PlanSignature* sc = step_signatures(b);
      for (size_t i = 0; i < b.steps.size(); ++i) b.step_values[i] = increment_at(sc[i]);
    }
    std::vector<at::Tensor> out;
    out.reserve(buckets_.size() + 1);
    for (PlanBucket& b : buckets_) {
      const int dev = plan_device_index(b.args.roles[0][0].device());
      out.push_back(g_plan_devices[dev]->run(kind_, b, scalars.data() + b.group * nscalars_, fingerprint));
    }
    out.push_back(fingerprint ? step_fingerprints() : at::empty({0, 2}, at::kLong));
    versions_.clear();
    for (const at::Tensor& t : watch_) versions_.push_back(static_cast<int64_t>(t._version()));
    return out;
  }

  // Whether a watched tensor was written since the last step (its version counter moved).
  bool watch_stale() const {
    if (versions_.size() != watch_.size()) return true;
    for (size_t i = 0; i < watch_.size(); ++i) {
      if (static_cast<int64_t>(watch_[i]._version()) != versions_[i]) return true;
    }
    return false;
  }

  int64_t num_buckets() const { return static_cast<int64_t>(buckets_.size()); }

 private:
  static PlanSignature signature(const at::Tensor& t) { return {t.const_data_ptr(), t.numel(), t.scalar_type()}; }

  // The step counters' signatures (after the written roles'): checked by ready(), so their data
  // pointers are the counters' (no second walk through the tensor objects).
  static const PlanSignature* step_signatures(const PlanBucket& b) {
    return b.sig.data() + static_cast<size_t>(b.args.nroles - 1) * static_cast<size_t>(b.args.n);
  }

  // increment_step (optim_ops.h) through a checked signature.
  static double increment_at(const PlanSignature& s) {
    if (s.dtype == at::kFloat) {
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

  static void prefetch_impl(const at::Tensor& t) {
    const char* q = reinterpret_cast<const char*>(t.unsafeGetTensorImpl());
    for (int o = 0; o < 256; o += 64) __builtin_prefetch(q + o);  // the fields the checks read
  }

  static void prefetch_storage(const at::Tensor& t) {
    const c10::Storage& s = t.unsafeGetTensorImpl()->unsafe_storage();
    if (s) __builtin_prefetch(s.unsafeGetStorageImpl());
  }

  // Whether the bucket still fits the plan, reading every gradient's pointer into the grads
  // column of args.data: every held tensor has the memory, element count, dtype and contiguity
  // it had at build time (`p.data = other` or a resized storage fail here), every parameter its
  // shape, every step counter is a finite count >= 0, and every gradient is defined, dense, the
  // parameter's dtype, shape and device, contiguous and overlaps no tensor the pass writes.
  //
  // The checks chase pointers through thousands of small objects (tensor -> storage -> data,
  // parameter -> autograd meta -> gradient -> storage); blocks of tensors issue each level's
  // loads together (software prefetch), so that their cache misses overlap.
  static bool ready(PlanBucket& b) {
    constexpr int64_t kBlock = 16;
    const OptimArgs& a = b.args;
    const int64_t n = a.n;
    const auto& params = a.roles[0];
    for (int64_t i0 = 0; i0 < n; i0 += kBlock) {
      const int64_t i1 = std::min(n, i0 + kBlock);
      for (int r = 0; r < a.nroles; ++r) {
        if (r == optim::kGrad) continue;
        for (int64_t i = i0; i < i1; ++i) prefetch_impl(a.roles[r][i]);
      }
      for (int64_t i = i0; i < i1 && !b.steps.empty(); ++i) prefetch_impl(b.steps[i]);
      for (int r = 0; r < a.nroles; ++r) {
        if (r == optim::kGrad) continue;
        for (int64_t i = i0; i < i1; ++i) prefetch_storage(a.roles[r][i]);
      }
      for (int64_t i = i0; i < i1 && !b.steps.empty(); ++i) prefetch_storage(b.steps[i]);
      for (int64_t i = i0; i < i1; ++i) __builtin_prefetch(params[i].unsafeGetTensorImpl()->autograd_meta());
      for (int64_t i = i0; i < i1; ++i) prefetch_impl(params[i].grad());
      for (int64_t i = i0; i < i1; ++i) prefetch_storage(params[i].grad());
      for (int64_t i = i0; i < i1 && !b.steps.empty(); ++i) __builtin_prefetch(b.steps[i].const_data_ptr());

      size_t slot = 0;
      for (int r = 0; r < a.nroles; ++r, ++slot) {
        if (r == optim::kGrad) {
          --slot;
          continue;
        }
        for (int64_t i = i0; i < i1; ++i) {
          const at::Tensor& t = a.roles[r][i];
          const PlanSignature& s = b.sig[slot * n + i];
          if (t.const_data_ptr() != s.data || t.numel() != s.numel || t.scalar_type() != s.dtype ||
              !t.is_contiguous() || t.is_conj() || t.is_neg()) {
            return false;
          }
        }
      }
      for (int64_t i = i0; i < i1 && !b.steps.empty(); ++i) {
        const at::Tensor& t = b.steps[i];
        const PlanSignature& s = b.sig[slot * n + i];
        if (t.const_data_ptr() != s.data || t.numel() != s.numel || t.scalar_type() != s.dtype) return false;
        const double v = step_value(t);
        if (!std::isfinite(v) || v < 0) return false;
      }
      for (int64_t i = i0; i < i1; ++i) {
        const at::Tensor& p = params[i];
        const auto sz = p.sizes();
        if (static_cast<int64_t>(sz.size()) != b.size_off[i + 1] - b.size_off[i] ||
            !std::equal(sz.begin(), sz.end(), b.sizes.begin() + b.size_off[i])) {
          return false;
        }
        const at::Tensor& g = p.grad();
        if (!g.defined() || g.layout() != at::kStrided || g.scalar_type() != p.scalar_type() ||
            g.device() != p.device() || !g.is_contiguous() || g.is_conj() || g.is_neg() || g.sizes() != sz) {
          return false;
        }
        const auto gb = reinterpret_cast<uintptr_t>(g.const_data_ptr());
        const uintptr_t ge = gb + static_cast<uintptr_t>(g.numel()) * static_cast<uintptr_t>(g.element_size());
        if (ge > gb) {
          // the first written range starting at or after ge; the one before it must end by gb
          auto it = std::lower_bound(b.written.begin(), b.written.end(), std::make_pair(ge, uintptr_t{0}));
          if (it != b.written.begin() && std::prev(it)->second > gb) return false;
        }
        b.args.data[static_cast<size_t>(optim::kGrad * n + i)] = const_cast<void*>(g.const_data_ptr());
      }
    }
    return true;
  }

  at::Tensor step_fingerprints() const {
    int64_t n = 0;
    for (const PlanBucket& b : buckets_) n += static_cast<int64_t>(b.steps.size());
    at::Tensor out = at::empty({n, 2}, at::kLong);
    auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
    for (const PlanBucket& b : buckets_) {
      const PlanSignature* sc = step_signatures(b);
      for (size_t i = 0; i < b.steps.size(); ++i) {
        const uint64_t nbytes = sc[i].dtype == at::kFloat ? sizeof(float) : sizeof(double);
        uint64_t s0 = 0, s1 = 0;
        cpu::msfp1_accumulate(static_cast<const unsigned char*>(sc[i].data), nbytes, 0, s0, s1);
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
  std::vector<int64_t> versions_;
};

}  // namespace memstate
