// Device-independent entry points of the optimizer ops (tier 2, ATen level): argument checks,
// float64 host scalars rounded once, dispatch over storage dtype and compile-time flags.
// Each device file instantiates them with its Runner, which provides (static or not)
//   template <class Op> at::Tensor run(const Op&, const OptimArgs&,
//       const std::vector<optim::TensorScalars<typename Op::M>>&, bool fingerprint) const;
// returning int64 [N, Op::kRoles, 2] finalised msfp1 lanes (or an empty tensor).
#pragma once

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cmath>

#include <vector>

#include "memstate/optim_scalars.h"
#include "memstate/precision.h"
#include "tensor_util.h"

namespace memstate {

// The tensors of one fused step: roles[r][i] is role r (param, grad, state...) of tensor i.
struct OptimArgs {
  std::vector<at::Tensor> roles[optim::kMaxRoles];
  int nroles = 0;
  int64_t n = 0;
  at::ScalarType dtype = at::kFloat;
  // What the runners read, filled once the tensors are checked (fill_raw): data[r * n + i] is
  // role r of tensor i's first element, numel[i] tensor i's element count. A cached plan
  // (optim_plan.h) keeps them and refreshes only the gradients' pointers every step.
  std::vector<void*> data;
  std::vector<int64_t> numel;

  void* ptr(int r, int64_t i) const { return data[static_cast<size_t>(r * n + i)]; }
};

inline void fill_raw(OptimArgs& a) {
  a.data.assign(static_cast<size_t>(a.nroles * a.n), nullptr);
  a.numel.resize(static_cast<size_t>(a.n));
  for (int r = 0; r < a.nroles; ++r) {
    for (int64_t i = 0; i < a.n; ++i) a.data[static_cast<size_t>(r * a.n + i)] = a.roles[r][i].data_ptr();
  }
  for (int64_t i = 0; i < a.n; ++i) a.numel[static_cast<size_t>(i)] = a.roles[0][i].numel();
}

// Checks that every role list has one dense, contiguous tensor per parameter, all on one
// device, with the parameter's dtype and shape, and that no written tensor (every role but
// grads) overlaps any other tensor of the call (a parameter listed twice would race). Errors
// name the list and index.
inline OptimArgs check_optim_args(const char* op, std::initializer_list<NamedList> lists) {
  OptimArgs a;
  auto it = lists.begin();
  const at::TensorList params = it->second;
  a.n = static_cast<int64_t>(params.size());
  for (const auto& [name, list] : lists) {
    TORCH_CHECK(static_cast<int64_t>(list.size()) == a.n, "memstate.", op, ": ", name, " has ",
                list.size(), " tensors but params has ", a.n);
    a.roles[a.nroles++] = std::vector<at::Tensor>(list.begin(), list.end());
  }
  c10::Device device = c10::Device(c10::kCPU);
  if (!common_device(op, lists, device)) return a;
  const at::Tensor& p0 = params[0];
  a.dtype = p0.scalar_type();
  TORCH_CHECK(a.dtype == at::kFloat || a.dtype == at::kDouble || a.dtype == at::kBFloat16 || a.dtype == at::kHalf,
              "memstate.", op, ": params[0] has dtype ", a.dtype, "; supported: float32, float64, bfloat16, float16");
  std::vector<ByteRange> ranges;
  for (const auto& [name, list] : lists) {
    const bool written = std::string(name) != "grads";
    for (int64_t i = 0; i < a.n; ++i) {
      const at::Tensor& t = list[i];
      TORCH_CHECK(t.scalar_type() == a.dtype, "memstate.", op, ": ", name, "[", i, "] has dtype ",
                  t.scalar_type(), " but params[0] has ", a.dtype);
      TORCH_CHECK(t.sizes() == params[i].sizes(), "memstate.", op, ": ", name, "[", i, "] has shape ",
                  t.sizes(), " but params[", i, "] has ", params[i].sizes());
      TORCH_CHECK(t.is_contiguous() && !t.is_conj() && !t.is_neg(), "memstate.", op, ": ", name, "[", i,
                  "] must be contiguous");
      ranges.push_back(byte_range(t, name, static_cast<size_t>(i), written));
    }
  }
  check_no_overlap(std::move(ranges), op);
  fill_raw(a);
  return a;
}

// check_optim_args over 2 to 5 lists known only at run time.
inline OptimArgs check_optim_args(const char* op, const std::vector<NamedList>& l) {
  TORCH_INTERNAL_ASSERT(l.size() >= 2 && l.size() <= static_cast<size_t>(optim::kMaxRoles));
  switch (l.size()) {  // the checks take an initializer list
    case 2: return check_optim_args(op, {l[0], l[1]});
    case 3: return check_optim_args(op, {l[0], l[1], l[2]});
    case 4: return check_optim_args(op, {l[0], l[1], l[2], l[3]});
    default: return check_optim_args(op, {l[0], l[1], l[2], l[3], l[4]});
  }
}

// A step counter (torch's `step` state) must be a one-element float32/float64 CPU tensor.
inline void check_step_counter(const at::Tensor& s, const char* op, size_t i) {
  TORCH_CHECK(s.defined() && s.layout() == at::kStrided && s.numel() == 1 && s.device().is_cpu() &&
                  (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble),
              "memstate.", op, ": steps[", i, "] must be a one-element float32/float64 CPU tensor, got ",
              s.scalar_type(), " ", s.sizes(), " on ", s.device());
}

// The value of a checked step counter.
inline double step_value(const at::Tensor& s) {
  return s.scalar_type() == at::kFloat ? static_cast<double>(*static_cast<const float*>(s.const_data_ptr()))
                                       : *static_cast<const double*>(s.const_data_ptr());
}

// Adds 1 to a checked step counter in its own dtype (as torch's `step += 1`); returns the new value.
inline double increment_step(const at::Tensor& s) {
  if (s.scalar_type() == at::kFloat) {
    float* v = static_cast<float*>(s.data_ptr());
    *v = *v + 1.0f;
    return *v;
  }
  double* v = static_cast<double*>(s.data_ptr());
  *v = *v + 1.0;
  return *v;
}

// Calls f(T{}) with the storage type of `dtype`.
template <class F>
void dispatch_storage(at::ScalarType dtype, F&& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kBFloat16: return f(bf16_bits{});
    case at::kHalf: return f(f16_bits{});
    default: TORCH_CHECK(false, "memstate: unsupported dtype ", dtype);
  }
}

inline at::Tensor no_fingerprints() { return at::empty({0}, at::kLong); }

// ---- The runs: checked arguments `a` (a.n > 0), float64 scalars rounded once, dispatch over
// storage dtype and flags, then runner.run(...). Shared by the ops below and by cached step
// plans (optim_plan.h), which check their tensors once when built.

// first: empty (no new momentum buffer) or one entry per tensor.
template <class Runner>
at::Tensor sgd_run(const Runner& runner, const OptimArgs& a, at::IntArrayRef first, double lr, double momentum,
                   double dampening, double weight_decay, bool nesterov, bool maximize, bool fingerprint) {
  const bool use_momentum = momentum != 0.0;
  at::Tensor out;
  dispatch_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = math_t<T>;
    const auto s = optim::make_sgd_scalars<M>(lr, momentum, dampening, weight_decay, maximize);
    std::vector<optim::TensorScalars<M>> ts(a.n, {M(0), M(0), 0});
    if (use_momentum) {
      for (int64_t i = 0; i < a.n && !first.empty(); ++i) ts[i].flag = first[i] != 0;
      out = nesterov ? runner.run(optim::SgdOp<T, true, true>{s}, a, ts, fingerprint)
                     : runner.run(optim::SgdOp<T, true, false>{s}, a, ts, fingerprint);
    } else {
      out = runner.run(optim::SgdOp<T, false, false>{s}, a, ts, fingerprint);
    }
  });
  return out;
}

// steps[i]: tensor i's step count after this step's increment.
template <class Runner>
at::Tensor adam_run(const Runner& runner, const OptimArgs& a, at::ArrayRef<double> steps, double lr, double beta1,
                    double beta2, double eps, double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                    bool fingerprint) {
  at::Tensor out;
  dispatch_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = math_t<T>;
    const auto s = optim::make_adam_scalars<M>(lr, beta1, beta2, eps, weight_decay, maximize);
    std::vector<optim::TensorScalars<M>> ts(a.n);
    for (int64_t i = 0; i < a.n; ++i) {
      TORCH_CHECK(steps[i] >= 1.0, "memstate.adam_step: steps[", i, "] = ", steps[i], " must be >= 1");
      if (i > 0 && steps[i] == steps[i - 1]) {  // the same step count: the same pow() results
        ts[i] = ts[i - 1];
        continue;
      }
      const auto st = optim::make_adam_step_scalars<M>(lr, beta1, beta2, steps[i]);
      ts[i] = {st.step_size, st.bias_correction2_sqrt, 0};
    }
    if (decoupled) {
      out = amsgrad ? runner.run(optim::AdamOp<T, true, true>{s}, a, ts, fingerprint)
                    : runner.run(optim::AdamOp<T, true, false>{s}, a, ts, fingerprint);
    } else {
      out = amsgrad ? runner.run(optim::AdamOp<T, false, true>{s}, a, ts, fingerprint)
                    : runner.run(optim::AdamOp<T, false, false>{s}, a, ts, fingerprint);
    }
  });
  return out;
}

template <class Runner>
at::Tensor rmsprop_run(const Runner& runner, const OptimArgs& a, double lr, double alpha, double eps,
                       double weight_decay, double momentum, bool centered, bool maximize, bool fingerprint) {
  const bool use_momentum = momentum > 0.0;  // as torch.optim.RMSprop
  at::Tensor out;
  dispatch_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = math_t<T>;
    const auto s = optim::make_rmsprop_scalars<M>(lr, alpha, eps, weight_decay, momentum, maximize);
    const std::vector<optim::TensorScalars<M>> ts(a.n, {M(0), M(0), 0});
    if (use_momentum) {
      out = centered ? runner.run(optim::RmspropOp<T, true, true>{s}, a, ts, fingerprint)
                     : runner.run(optim::RmspropOp<T, true, false>{s}, a, ts, fingerprint);
    } else {
      out = centered ? runner.run(optim::RmspropOp<T, false, true>{s}, a, ts, fingerprint)
                     : runner.run(optim::RmspropOp<T, false, false>{s}, a, ts, fingerprint);
    }
  });
  return out;
}

// steps[i]: tensor i's step count after this step's increment.
template <class Runner>
at::Tensor adagrad_run(const Runner& runner, const OptimArgs& a, at::ArrayRef<double> steps, double lr,
                       double lr_decay, double eps, double weight_decay, bool maximize, bool fingerprint) {
  at::Tensor out;
  dispatch_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = math_t<T>;
    const auto s = optim::make_adagrad_scalars<M>(eps, weight_decay, maximize);
    std::vector<optim::TensorScalars<M>> ts(a.n);
    for (int64_t i = 0; i < a.n; ++i) {
      TORCH_CHECK(steps[i] >= 1.0, "memstate.adagrad_step: steps[", i, "] = ", steps[i], " must be >= 1");
      ts[i] = {static_cast<M>(optim::adagrad_clr(lr, lr_decay, steps[i])), M(0), 0};
    }
    out = runner.run(optim::AdagradOp<T>{s}, a, ts, fingerprint);
  });
  return out;
}

template <class Runner>
at::Tensor lion_run(const Runner& runner, const OptimArgs& a, double lr, double beta1, double beta2,
                    double weight_decay, bool maximize, bool fingerprint) {
  at::Tensor out;
  dispatch_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = math_t<T>;
    const auto s = optim::make_lion_scalars<M>(lr, beta1, beta2, weight_decay, maximize);
    const std::vector<optim::TensorScalars<M>> ts(a.n, {M(0), M(0), 0});
    out = runner.run(optim::LionOp<T>{s}, a, ts, fingerprint);
  });
  return out;
}

// ---- The ops: argument checks, then the run.

template <class Runner>
at::Tensor sgd_step_impl(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                         at::IntArrayRef first, double lr, double momentum, double dampening,
                         double weight_decay, bool nesterov, bool maximize, bool fingerprint) {
  const bool use_momentum = momentum != 0.0;
  TORCH_CHECK(!nesterov || (use_momentum && dampening == 0.0),
              "memstate.sgd_step: Nesterov momentum requires a momentum and zero dampening");
  OptimArgs a = use_momentum
                    ? check_optim_args("sgd_step", {{"params", params}, {"grads", grads}, {"momentum_buffers", momentum_buffers}})
                    : check_optim_args("sgd_step", {{"params", params}, {"grads", grads}});
  TORCH_CHECK(!use_momentum || static_cast<int64_t>(first.size()) == a.n, "memstate.sgd_step: first has ",
              first.size(), " entries but params has ", a.n);
  if (a.n == 0) return no_fingerprints();
  return sgd_run(Runner{}, a, first, lr, momentum, dampening, weight_decay, nesterov, maximize, fingerprint);
}

template <class Runner>
at::Tensor adam_step_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                          at::ArrayRef<double> steps, double lr, double beta1, double beta2, double eps,
                          double weight_decay, bool decoupled, bool amsgrad, bool maximize,
                          bool fingerprint) {
  OptimArgs a = amsgrad ? check_optim_args("adam_step", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                                         {"exp_avg_sqs", exp_avg_sqs}, {"max_exp_avg_sqs", max_exp_avg_sqs}})
                        : check_optim_args("adam_step", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                                         {"exp_avg_sqs", exp_avg_sqs}});
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == a.n, "memstate.adam_step: steps has ", steps.size(),
              " entries but params has ", a.n);
  if (a.n == 0) return no_fingerprints();
  return adam_run(Runner{}, a, steps, lr, beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize,
                  fingerprint);
}

template <class Runner>
at::Tensor rmsprop_step_impl(at::TensorList params, at::TensorList grads, at::TensorList square_avgs,
                             at::TensorList momentum_buffers, at::TensorList grad_avgs, double lr, double alpha,
                             double eps, double weight_decay, double momentum, bool centered, bool maximize,
                             bool fingerprint) {
  std::vector<NamedList> lists = {{"params", params}, {"grads", grads}, {"square_avgs", square_avgs}};
  if (momentum > 0.0) lists.push_back({"momentum_buffers", momentum_buffers});
  if (centered) lists.push_back({"grad_avgs", grad_avgs});
  OptimArgs a = check_optim_args("rmsprop_step", lists);
  if (a.n == 0) return no_fingerprints();
  return rmsprop_run(Runner{}, a, lr, alpha, eps, weight_decay, momentum, centered, maximize, fingerprint);
}

template <class Runner>
at::Tensor adagrad_step_impl(at::TensorList params, at::TensorList grads, at::TensorList state_sums,
                             at::ArrayRef<double> steps, double lr, double lr_decay, double eps,
                             double weight_decay, bool maximize, bool fingerprint) {
  OptimArgs a = check_optim_args("adagrad_step", {{"params", params}, {"grads", grads}, {"state_sums", state_sums}});
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == a.n, "memstate.adagrad_step: steps has ", steps.size(),
              " entries but params has ", a.n);
  if (a.n == 0) return no_fingerprints();
  return adagrad_run(Runner{}, a, steps, lr, lr_decay, eps, weight_decay, maximize, fingerprint);
}

template <class Runner>
at::Tensor lion_step_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, double lr,
                          double beta1, double beta2, double weight_decay, bool maximize, bool fingerprint) {
  OptimArgs a = check_optim_args("lion_step", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs}});
  if (a.n == 0) return no_fingerprints();
  return lion_run(Runner{}, a, lr, beta1, beta2, weight_decay, maximize, fingerprint);
}


// Per-tensor sums of squares of `tensors` on the host, by the deterministic reduction of
// norm_sums (memstate/norm_math.h), called through the dispatcher so that the tensors' device
// kernel runs. On CUDA the copy to the host is a sync.
inline std::vector<double> host_sums_of_squares(const std::vector<at::Tensor>& tensors) {
  static const auto norm_sums = c10::Dispatcher::singleton()
                                    .findSchemaOrThrow("memstate::norm_sums", "")
                                    .typed<at::Tensor(at::TensorList, double)>();
  const at::Tensor sums = norm_sums.call(tensors, 2.0).to(at::kCPU);
  const double* v = sums.const_data_ptr<double>();
  return std::vector<double>(v, v + tensors.size());
}

// LAMB, Apex FusedLAMB's algorithm (optim_math.h): stage 1 writes the update into `updates`
// (scratch buffers like the params; gradients are only read), the per-tensor norms ||p|| and
// ||u|| come from norm_sums, stage 2 applies the trust ratio. global_grad_norm is the norm of
// every gradient of the optimizer step (all groups), max_grad_norm its clipping threshold
// (inf: no clipping). Fingerprint rows: params (after stage 2), grads, exp_avgs, exp_avg_sqs.
template <class Runner>
at::Tensor lamb_step_impl(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                          at::TensorList exp_avg_sqs, at::TensorList updates, at::ArrayRef<double> steps,
                          double lr, double beta1, double beta2, double eps, double weight_decay,
                          bool bias_correction, bool grad_averaging, bool adam_w_mode, bool use_nvlamb,
                          double global_grad_norm, double max_grad_norm, bool fingerprint) {
  OptimArgs a = check_optim_args("lamb_step", {{"params", params}, {"grads", grads}, {"exp_avgs", exp_avgs},
                                               {"exp_avg_sqs", exp_avg_sqs}, {"updates", updates}});
  TORCH_CHECK(static_cast<int64_t>(steps.size()) == a.n, "memstate.lamb_step: steps has ", steps.size(),
              " entries but params has ", a.n);
  TORCH_CHECK(max_grad_norm > 0.0, "memstate.lamb_step: max_grad_norm must be > 0 (inf: no clipping), got ",
              max_grad_norm);
  if (a.n == 0) return no_fingerprints();
  at::Tensor out;
  dispatch_storage(a.dtype, [&](auto tag) {
    using T = decltype(tag);
    using M = math_t<T>;
    const auto s = optim::make_lamb_scalars<M>(beta1, beta2, eps, weight_decay, grad_averaging,
                                               optim::lamb_grad_divisor(global_grad_norm, max_grad_norm));
    std::vector<optim::TensorScalars<M>> ts(a.n);
    for (int64_t i = 0; i < a.n; ++i) {
      TORCH_CHECK(steps[i] >= 1.0, "memstate.lamb_step: steps[", i, "] = ", steps[i], " must be >= 1");
      ts[i] = {static_cast<M>(optim::lamb_bias_correction(beta1, steps[i], bias_correction)),
               static_cast<M>(optim::lamb_bias_correction(beta2, steps[i], bias_correction)), 0};
    }
    const at::Tensor rows1 = adam_w_mode ? Runner::run(optim::LambStage1Op<T, true>{s}, a, ts, fingerprint)
                                         : Runner::run(optim::LambStage1Op<T, false>{s}, a, ts, fingerprint);
    // ||p|| (p is unchanged by stage 1) and ||u||, one reduction call for both
    std::vector<at::Tensor> both(a.roles[optim::kParam]);
    both.insert(both.end(), a.roles[optim::kState2].begin(), a.roles[optim::kState2].end());
    const std::vector<double> sums = host_sums_of_squares(both);
    OptimArgs b;
    b.roles[optim::kParam] = a.roles[optim::kParam];
    b.roles[optim::kGrad] = a.roles[optim::kState2];
    b.nroles = 2;
    b.n = a.n;
    b.dtype = a.dtype;
    fill_raw(b);
    const bool adaptive = use_nvlamb || weight_decay != 0.0;
    for (int64_t i = 0; i < a.n; ++i) {
      ts[i] = {static_cast<M>(optim::lamb_step_size(lr, std::sqrt(sums[i]), std::sqrt(sums[a.n + i]), adaptive)),
               M(0), 0};
    }
    const at::Tensor rows2 = Runner::run(optim::LambStage2Op<T>{}, b, ts, fingerprint);
    out = fingerprint ? at::cat({rows2.narrow(1, 0, 1), rows1.narrow(1, 1, 3)}, 1) : rows2;
  });
  return out;
}

}  // namespace memstate
