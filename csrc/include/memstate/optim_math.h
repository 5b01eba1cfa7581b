// Per-element optimizer updates: ONE definition used by the CPU and CUDA kernels.
//
// Everything is in the math type M (float for float32/bfloat16/float16 storage, double for
// float64). Scalars arrive already rounded once to M from float64 host values (see
// optim_scalars.h). The operation order is fixed and written out below; there is no FMA
// contraction (-ffp-contract=off, nvcc --fmad=false), so each device evaluates exactly these
// roundings and CPU == CUDA bit for bit.
#pragma once

#include <cmath>

#include "memstate/macros.h"
#include "memstate/precision.h"

namespace memstate {
namespace optim {

// Roles of the tensors an optimizer step touches, in slot order. The gradient is read only.
enum Role : int { kParam = 0, kGrad = 1, kState0 = 2, kState1 = 3, kState2 = 4 };
constexpr int kMaxRoles = 5;

template <typename M>
MEMSTATE_HD M msqrt(M x) {
#if defined(__CUDA_ARCH__)
  return sqrt(x);  // correctly rounded (sqrt_rn) for float and double without fast-math
#else
  return std::sqrt(x);
#endif
}

// Group-wide SGD scalars, each rounded once from float64.
template <typename M>
struct SgdScalars {
  M lr;
  M momentum;
  M one_minus_dampening;  // 1 - dampening
  M weight_decay;
  bool has_weight_decay;  // weight_decay != 0 (torch skips the add entirely when it is 0)
  bool maximize;
  // -1 when maximizing, else 1. g = grad * grad_sign() equals `maximize ? -grad : grad` bit for
  // bit except for the sign of a NaN gradient, which no stored value shows (every stored NaN is
  // canonical). A multiply by a loop-invariant, not a select on a loop-invariant bool, so that
  // GCC vectorises every CPU variant (it cannot vectorise a select with a scalar condition).
  MEMSTATE_HD M grad_sign() const { return maximize ? M(-1) : M(1); }
};

// SGD, as torch.optim.SGD (foreach=False):
//   g = maximize ? -grad : grad
//   if weight_decay != 0:  g = g + weight_decay * p
//   if momentum != 0:
//     buf = first ? g : buf * momentum + (1 - dampening) * g
//     g   = nesterov ? g + momentum * buf : buf
//   p = p - lr * g
template <typename M, bool kMomentum, bool kNesterov>
MEMSTATE_HD void sgd_update(M& p, M grad, M& buf, bool first, const SgdScalars<M>& s) {
  M g = grad * s.grad_sign();  // -grad when maximizing (see grad_sign)
  if (s.has_weight_decay) g = g + s.weight_decay * p;
  if (kMomentum) {
    buf = first ? g : buf * s.momentum + s.one_minus_dampening * g;
    g = kNesterov ? g + s.momentum * buf : buf;
  }
  p = p - s.lr * g;
}

// Group-wide Adam/AdamW scalars, each rounded once from float64.
template <typename M>
struct AdamScalars {
  M one_minus_beta1;  // 1 - beta1
  M beta2;
  M one_minus_beta2;  // 1 - beta2
  M eps;
  M weight_decay;     // Adam: L2 term added to the gradient
  M decay_factor;     // AdamW: 1 - lr * weight_decay
  bool has_weight_decay;
  bool maximize;
  MEMSTATE_HD M grad_sign() const { return maximize ? M(-1) : M(1); }  // as SgdScalars
};

// Per-tensor Adam scalars (they depend on the tensor's step count), rounded once from float64.
template <typename M>
struct AdamStepScalars {
  M step_size;              // lr / (1 - beta1^step)
  M bias_correction2_sqrt;  // sqrt(1 - beta2^step)
};

// Adam / AdamW, as torch.optim.Adam / AdamW (foreach=False):
//   g = maximize ? -grad : grad
//   if weight_decay != 0:  Adam:  g = g + weight_decay * p
//                          AdamW: p = p * (1 - lr * weight_decay)
//   m = m + (1 - beta1) * (g - m)                  (torch: exp_avg.lerp_(g, 1 - beta1))
//   v = v * beta2 + (1 - beta2) * (g * g)
//   amsgrad: vmax = max(vmax, v); vh = vmax        else vh = v
//   denom = sqrt(vh) / sqrt(1 - beta2^step) + eps
//   p = p - step_size * (m / denom)
template <typename M, bool kDecoupled, bool kAmsgrad>
MEMSTATE_HD void adam_update(M& p, M grad, M& m, M& v, M& vmax, const AdamScalars<M>& s,
                             const AdamStepScalars<M>& t) {
  M g = grad * s.grad_sign();  // -grad when maximizing (see grad_sign)
  if (s.has_weight_decay) {
    if (kDecoupled) {
      p = p * s.decay_factor;
    } else {
      g = g + s.weight_decay * p;
    }
  }
  m = m + s.one_minus_beta1 * (g - m);
  v = v * s.beta2 + s.one_minus_beta2 * (g * g);
  M vh = v;
  if (kAmsgrad) {
    // NaN propagates, as torch.maximum. Two plain selects: the CPU loop vectorises.
    const M larger = v > vmax ? v : vmax;
    vmax = v != v ? v : larger;
    vh = vmax;
  }
  const M denom = msqrt(vh) / t.bias_correction2_sqrt + s.eps;
  p = p - t.step_size * (m / denom);
}

// Group-wide RMSprop scalars, each rounded once from float64.
template <typename M>
struct RmspropScalars {
  M lr;
  M alpha;
  M one_minus_alpha;  // 1 - alpha
  M eps;
  M weight_decay;
  M momentum;
  bool has_weight_decay;
  bool maximize;
  MEMSTATE_HD M grad_sign() const { return maximize ? M(-1) : M(1); }  // as SgdScalars
};

// RMSprop, as torch.optim.RMSprop (foreach=False):
//   g = maximize ? -grad : grad
//   if weight_decay != 0:  g = g + weight_decay * p
//   v = v * alpha + ((1 - alpha) * g) * g
//   centered: ga = ga + (1 - alpha) * (g - ga);  avg = sqrt(v - ga * ga) + eps
//   else:                                        avg = sqrt(v) + eps
//   momentum > 0: buf = buf * momentum + g / avg;  p = p - lr * buf
//   else:                                          p = p - (lr * g) / avg
// The roundings are those of torch's CPU kernels (addcmul: (value * a) * b; addcdiv:
// (value * a) / b; lerp with weight < 0.5: a + w * (b - a)): the momentum buffer sums terms of
// about +-1/sqrt(1 - alpha) that cancel, so a different grouping shows up at float32 tolerance.
template <typename M, bool kMomentum, bool kCentered>
MEMSTATE_HD void rmsprop_update(M& p, M grad, M& v, M& buf, M& ga, const RmspropScalars<M>& s) {
  M g = grad * s.grad_sign();
  if (s.has_weight_decay) g = g + s.weight_decay * p;
  v = v * s.alpha + (s.one_minus_alpha * g) * g;
  M centered = v;
  if (kCentered) {
    ga = ga + s.one_minus_alpha * (g - ga);
    centered = v - ga * ga;
  }
  const M avg = msqrt(centered) + s.eps;
  if (kMomentum) {
    buf = buf * s.momentum + g / avg;
    p = p - s.lr * buf;
  } else {
    p = p - (s.lr * g) / avg;
  }
}

// Group-wide Adagrad scalars, each rounded once from float64. The learning rate is per tensor
// (it decays with the tensor's step count).
template <typename M>
struct AdagradScalars {
  M eps;
  M weight_decay;
  bool has_weight_decay;
  bool maximize;
  MEMSTATE_HD M grad_sign() const { return maximize ? M(-1) : M(1); }  // as SgdScalars
};

// Adagrad, as torch.optim.Adagrad (dense gradients; the fused CPU kernel's order):
//   g = maximize ? -grad : grad
//   if weight_decay != 0:  g = g + weight_decay * p
//   sum = sum + g * g
//   p = p - clr * (g / (sqrt(sum) + eps))     clr = lr / (1 + (step - 1) * lr_decay)
template <typename M>
MEMSTATE_HD void adagrad_update(M& p, M grad, M& sum, M clr, const AdagradScalars<M>& s) {
  M g = grad * s.grad_sign();
  if (s.has_weight_decay) g = g + s.weight_decay * p;
  sum = sum + g * g;
  const M std_ = msqrt(sum) + s.eps;
  p = p - clr * (g / std_);
}

// Group-wide Lion scalars, each rounded once from float64.
template <typename M>
struct LionScalars {
  M lr;
  M beta1;
  M one_minus_beta1;  // 1 - beta1
  M beta2;
  M one_minus_beta2;  // 1 - beta2
  M decay_factor;     // 1 - lr * weight_decay (decoupled, as AdamW)
  bool has_weight_decay;
  bool maximize;
  MEMSTATE_HD M grad_sign() const { return maximize ? M(-1) : M(1); }  // as SgdScalars
};

// Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms", Algorithm 2):
//   g = maximize ? -grad : grad
//   if weight_decay != 0:  p = p * (1 - lr * weight_decay)
//   c = beta1 * m + (1 - beta1) * g
//   p = p - lr * sign(c)           sign(+-0) = +0, sign(NaN) = NaN
//   m = beta2 * m + (1 - beta2) * g
template <typename M>
MEMSTATE_HD void lion_update(M& p, M grad, M& m, const LionScalars<M>& s) {
  const M g = grad * s.grad_sign();
  if (s.has_weight_decay) p = p * s.decay_factor;
  const M c = s.beta1 * m + s.one_minus_beta1 * g;
  // sign(c) as (c > 0) - (c < 0), a NaN kept by one select on a quiet compare: GCC vectorises
  // this form (not nested selects on c < 0 / c > 0, which made the CPU loop 5x slower).
  const M sgn = c != c ? c : M(c > M(0)) - M(c < M(0));
  p = p - s.lr * sgn;
  m = s.beta2 * m + s.one_minus_beta2 * g;
}

// ---------------------------------------------------------------------------------------------
// Functors: one per optimizer, shared by the CPU loop and the CUDA multi-tensor kernel. Each
// says how many roles it touches and updates one element given the values of its roles in the
// math type. Per-tensor scalars come in a TensorScalars (s0, s1, flag), already rounded.

template <typename M>
struct TensorScalars {
  M s0;
  M s1;
  int flag;
};

template <typename T, bool kMomentum, bool kNesterov>
struct SgdOp {
  using storage_t = T;
  using M = math_t<T>;
  static constexpr int kRoles = kMomentum ? 3 : 2;  // param, grad[, momentum_buffer]
  SgdScalars<M> s;
  // flag: 1 when the momentum buffer is new (buf := g, as torch's first step)
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>& ts) const {
    M dummy = M(0);
    M& buf = kMomentum ? x[kState0] : dummy;
    sgd_update<M, kMomentum, kNesterov>(x[kParam], x[kGrad], buf, ts.flag != 0, s);
  }
};

template <typename T, bool kDecoupled, bool kAmsgrad>
struct AdamOp {
  using storage_t = T;
  using M = math_t<T>;
  static constexpr int kRoles = kAmsgrad ? 5 : 4;  // param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]
  AdamScalars<M> s;
  // s0 = step_size, s1 = sqrt(1 - beta2^step)
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>& ts) const {
    M dummy = M(0);
    M& vmax = kAmsgrad ? x[kState2] : dummy;
    adam_update<M, kDecoupled, kAmsgrad>(x[kParam], x[kGrad], x[kState0], x[kState1], vmax, s,
                                         AdamStepScalars<M>{ts.s0, ts.s1});
  }
};

template <typename T, bool kMomentum, bool kCentered>
struct RmspropOp {
  using storage_t = T;
  using M = math_t<T>;
  // param, grad, square_avg[, momentum_buffer][, grad_avg]
  static constexpr int kRoles = 3 + (kMomentum ? 1 : 0) + (kCentered ? 1 : 0);
  RmspropScalars<M> s;
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>& ts) const {
    M dummy_buf = M(0), dummy_ga = M(0);
    M& buf = kMomentum ? x[kState1] : dummy_buf;
    M& ga = kCentered ? x[kMomentum ? kState2 : kState1] : dummy_ga;
    rmsprop_update<M, kMomentum, kCentered>(x[kParam], x[kGrad], x[kState0], buf, ga, s);
  }
};

template <typename T>
struct AdagradOp {
  using storage_t = T;
  using M = math_t<T>;
  static constexpr int kRoles = 3;  // param, grad, sum
  AdagradScalars<M> s;
  // s0 = clr = lr / (1 + (step - 1) * lr_decay)
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>& ts) const {
    adagrad_update<M>(x[kParam], x[kGrad], x[kState0], ts.s0, s);
  }
};

template <typename T>
struct LionOp {
  using storage_t = T;
  using M = math_t<T>;
  static constexpr int kRoles = 3;  // param, grad, exp_avg
  LionScalars<M> s;
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>&) const {
    lion_update<M>(x[kParam], x[kGrad], x[kState0], s);
  }
};


// ---------------------------------------------------------------------------------------------
// LAMB (Apex FusedLAMB's algorithm; You et al. 2019, "Large Batch Optimization for Deep Learning:
// Training BERT in 76 minutes"). Two element passes around per-tensor norms:
//   stage 1 (LambStage1Op): Adam moments and the update u, written to a scratch buffer (the
//            gradient is only read);
//   norms:   ||p|| and ||u|| per tensor, by norm_math.h's deterministic tree (norm_sums);
//   stage 2 (LambStage2Op): p = p - (lr * trust_ratio) * u, the factor per tensor.

// Group-wide LAMB scalars, each rounded once from float64.
template <typename M>
struct LambScalars {
  M beta1;
  M beta3;            // 1 - beta1 with grad_averaging, else 1
  M beta2;
  M one_minus_beta2;  // 1 - beta2
  M eps;
  M weight_decay;
  M grad_divisor;     // global clipping: ||g|| / max_grad_norm when ||g|| > max_grad_norm, else 1
  bool has_weight_decay;
};

// LAMB stage 1, as Apex's LAMBStage1Functor (bc1, bc2: the tensor's bias corrections,
// 1 - beta^step, or 1 without bias correction):
//   g = grad / grad_divisor
//   if !adam_w_mode and weight_decay != 0:  g = g + weight_decay * p      (L2)
//   m = m * beta1 + beta3 * g
//   v = v * beta2 + ((1 - beta2) * g) * g
//   u = (m / bc1) / (sqrt(v / bc2) + eps)
//   if adam_w_mode and weight_decay != 0:   u = u + weight_decay * p      (decoupled)
// (Apex skips reading p when weight_decay == 0: has_weight_decay keeps a non-finite p out.)
template <typename M, bool kAdamW>
MEMSTATE_HD void lamb_stage1_update(M p, M grad, M& m, M& v, M& u, M bc1, M bc2, const LambScalars<M>& s) {
  M g = grad / s.grad_divisor;
  if (!kAdamW && s.has_weight_decay) g = g + s.weight_decay * p;
  m = m * s.beta1 + s.beta3 * g;
  v = v * s.beta2 + (s.one_minus_beta2 * g) * g;
  const M denom = msqrt(v / bc2) + s.eps;
  u = (m / bc1) / denom;
  if (kAdamW && s.has_weight_decay) u = u + s.weight_decay * p;
}

// LAMB stage 2: p = p - step * u, step = lr * ||p|| / ||u|| per tensor (lr where Apex uses no
// trust ratio: a zero norm, or weight_decay == 0 without use_nvlamb).
template <typename M>
MEMSTATE_HD void lamb_stage2_update(M& p, M u, M step) {
  p = p - step * u;
}

// Stage 1 roles: param (read; the runner stores it back unchanged), grad, exp_avg, exp_avg_sq,
// update (scratch, written). s0 = 1 - beta1^step, s1 = 1 - beta2^step (1, 1 without bias
// correction).
template <typename T, bool kAdamW>
struct LambStage1Op {
  using storage_t = T;
  using M = math_t<T>;
  static constexpr int kRoles = 5;
  LambScalars<M> s;
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>& ts) const {
    lamb_stage1_update<M, kAdamW>(x[kParam], x[kGrad], x[kState0], x[kState1], x[kState2], ts.s0, ts.s1, s);
  }
};

// Stage 2 roles: param, update (in the read-only slot). s0 = lr * trust ratio.
template <typename T>
struct LambStage2Op {
  using storage_t = T;
  using M = math_t<T>;
  static constexpr int kRoles = 2;
  MEMSTATE_HD void operator()(M* x, const TensorScalars<M>& ts) const {
    lamb_stage2_update<M>(x[kParam], x[kGrad], ts.s0);
  }
};

}  // namespace optim
}  // namespace memstate
