// Host-side optimizer scalars: computed once per step in float64 and rounded once to the math
// type M. Used by the CPU and the CUDA glue alike, so both devices get the same bits.
#pragma once

#include <cmath>

#include "memstate/optim_math.h"

namespace memstate {
namespace optim {

template <typename M>
SgdScalars<M> make_sgd_scalars(double lr, double momentum, double dampening, double weight_decay,
                               bool maximize) {
  SgdScalars<M> s;
  s.lr = static_cast<M>(lr);
  s.momentum = static_cast<M>(momentum);
  s.one_minus_dampening = static_cast<M>(1.0 - dampening);
  s.weight_decay = static_cast<M>(weight_decay);
  s.has_weight_decay = weight_decay != 0.0;
  s.maximize = maximize;
  return s;
}

template <typename M>
AdamScalars<M> make_adam_scalars(double lr, double beta1, double beta2, double eps,
                                 double weight_decay, bool maximize) {
  AdamScalars<M> s;
  s.one_minus_beta1 = static_cast<M>(1.0 - beta1);
  s.beta2 = static_cast<M>(beta2);
  s.one_minus_beta2 = static_cast<M>(1.0 - beta2);
  s.eps = static_cast<M>(eps);
  s.weight_decay = static_cast<M>(weight_decay);
  s.decay_factor = static_cast<M>(1.0 - lr * weight_decay);
  s.has_weight_decay = weight_decay != 0.0;
  s.maximize = maximize;
  return s;
}

// Per-tensor scalars of Adam at step `step` (the count after this step's increment).
template <typename M>
AdamStepScalars<M> make_adam_step_scalars(double lr, double beta1, double beta2, double step) {
  const double bias_correction1 = 1.0 - std::pow(beta1, step);
  const double bias_correction2 = 1.0 - std::pow(beta2, step);
  return {static_cast<M>(lr / bias_correction1), static_cast<M>(std::sqrt(bias_correction2))};
}

template <typename M>
RmspropScalars<M> make_rmsprop_scalars(double lr, double alpha, double eps, double weight_decay,
                                       double momentum, bool maximize) {
  RmspropScalars<M> s;
  s.lr = static_cast<M>(lr);
  s.alpha = static_cast<M>(alpha);
  s.one_minus_alpha = static_cast<M>(1.0 - alpha);
  s.eps = static_cast<M>(eps);
  s.weight_decay = static_cast<M>(weight_decay);
  s.momentum = static_cast<M>(momentum);
  s.has_weight_decay = weight_decay != 0.0;
  s.maximize = maximize;
  return s;
}

template <typename M>
AdagradScalars<M> make_adagrad_scalars(double eps, double weight_decay, bool maximize) {
  AdagradScalars<M> s;
  s.eps = static_cast<M>(eps);
  s.weight_decay = static_cast<M>(weight_decay);
  s.has_weight_decay = weight_decay != 0.0;
  s.maximize = maximize;
  return s;
}

// Adagrad's learning rate at step `step` (the count after this step's increment), as torch.
inline double adagrad_clr(double lr, double lr_decay, double step) {
  return lr / (1.0 + (step - 1.0) * lr_decay);
}

template <typename M>
LionScalars<M> make_lion_scalars(double lr, double beta1, double beta2, double weight_decay,
                                 bool maximize) {
  LionScalars<M> s;
  s.lr = static_cast<M>(lr);
  s.beta1 = static_cast<M>(beta1);
  s.one_minus_beta1 = static_cast<M>(1.0 - beta1);
  s.beta2 = static_cast<M>(beta2);
  s.one_minus_beta2 = static_cast<M>(1.0 - beta2);
  s.decay_factor = static_cast<M>(1.0 - lr * weight_decay);
  s.has_weight_decay = weight_decay != 0.0;
  s.maximize = maximize;
  return s;
}


template <typename M>
LambScalars<M> make_lamb_scalars(double beta1, double beta2, double eps, double weight_decay,
                                 bool grad_averaging, double grad_divisor) {
  LambScalars<M> s;
  s.beta1 = static_cast<M>(beta1);
  s.beta3 = static_cast<M>(grad_averaging ? 1.0 - beta1 : 1.0);
  s.beta2 = static_cast<M>(beta2);
  s.one_minus_beta2 = static_cast<M>(1.0 - beta2);
  s.eps = static_cast<M>(eps);
  s.weight_decay = static_cast<M>(weight_decay);
  s.grad_divisor = static_cast<M>(grad_divisor);
  s.has_weight_decay = weight_decay != 0.0;
  return s;
}

// LAMB's global clipping divisor, as Apex: ||g|| / max_grad_norm when ||g|| > max_grad_norm, else
// 1 (also for a NaN norm; max_grad_norm = inf never clips).
inline double lamb_grad_divisor(double global_grad_norm, double max_grad_norm) {
  return global_grad_norm > max_grad_norm ? global_grad_norm / max_grad_norm : 1.0;
}

// LAMB's bias correction 1 - beta^step (1 without bias correction), at the count after this
// step's increment.
inline double lamb_bias_correction(double beta, double step, bool bias_correction) {
  return bias_correction ? 1.0 - std::pow(beta, step) : 1.0;
}

// LAMB's per-tensor step lr * ||p|| / ||u||, as Apex: plain lr when the trust ratio is not used
// (`adaptive` false: weight_decay == 0 without use_nvlamb) or either norm is 0.
inline double lamb_step_size(double lr, double param_norm, double update_norm, bool adaptive) {
  if (!adaptive || param_norm == 0.0 || update_norm == 0.0) return lr;
  return lr * (param_norm / update_norm);
}

}  // namespace optim
}  // namespace memstate
