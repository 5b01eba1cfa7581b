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

}  // namespace optim
}  // namespace memstate
