"""memstate.optim.RMSprop: fused, deterministic RMSprop with in-pass fingerprints."""
from __future__ import annotations

from typing import List, Optional

import torch

from memstate import _ext
from memstate.optim._base import _check_impl_flags, _check_lr, _scalar_dtype, _state_like
from memstate.optim._stepped import StepCounted


def _check_rmsprop_hparams(lr, alpha, eps, weight_decay, momentum) -> None:
    """torch.optim.RMSprop's checks, order and messages (ValueError)."""
    _check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= momentum:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= alpha:
        raise ValueError(f"Invalid alpha value: {alpha}")


class RMSprop(StepCounted):
    """Drop-in for ``torch.optim.RMSprop`` with a bitwise-reproducible fused step.

    Same arguments and defaults as torch (lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0,
    momentum=0, centered=False, capturable=False, foreach=None, maximize=False,
    differentiable=False), plus ``fingerprint`` and ``skip_if_nonfinite`` (see
    ``FusedOptimizer``). ``foreach`` is kept in the param groups and changes nothing (the step is
    always fused); ``differentiable=True`` and ``capturable=True`` raise NotImplementedError.
    State keys as torch: ``step`` (CPU 0-d tensor), ``square_avg``, ``momentum_buffer``
    (momentum > 0), ``grad_avg`` (centered). Sparse gradients are refused, as torch does.

    Per element, in float32 (float64 for float64 params), scalars rounded once from float64::

        g = -grad if maximize else grad
        if weight_decay != 0: g = g + weight_decay * p
        v = v * alpha + (1 - alpha) * (g * g)
        if centered: ga = ga + (1 - alpha) * (g - ga); avg = sqrt(v - ga * ga) + eps
        else:        avg = sqrt(v) + eps
        if momentum > 0: buf = buf * momentum + g / avg; p = p - lr * buf
        else:            p = p - lr * (g / avg)
    """

    _name = "RMSprop"
    _state_keys = ("square_avg", "momentum_buffer", "grad_avg")

    def __init__(self, params, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8, weight_decay: float = 0,
                 momentum: float = 0, centered: bool = False, capturable: bool = False,
                 foreach: Optional[bool] = None, maximize: bool = False, differentiable: bool = False, *,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False,
                 max_grad_norm: Optional[float] = None):
        _check_rmsprop_hparams(lr, alpha, eps, weight_decay, momentum)
        defaults = dict(lr=lr, momentum=momentum, alpha=alpha, eps=eps, centered=centered,
                        weight_decay=weight_decay, capturable=capturable, foreach=foreach, maximize=maximize,
                        differentiable=differentiable)
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite,
                         max_grad_norm=max_grad_norm)
        _check_impl_flags(self._name, foreach=foreach, fused=None, differentiable=differentiable,
                          capturable=capturable)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # keys of older state dicts, as torch.optim.RMSprop
            group.setdefault("momentum", 0)
            group.setdefault("centered", False)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("capturable", False)

    def _roles(self, group):
        return (("param", "grad", "square_avg") + (("momentum_buffer",) if group["momentum"] > 0 else ())
                + (("grad_avg",) if group["centered"] else ()))

    _plan_kind = 2  # csrc/optim_plan.h PlanKind::kRmsprop

    def _plan_scalars(self, group):
        return [float(group["lr"]), float(group["alpha"]), float(group["eps"]), float(group["weight_decay"]),
                float(group["momentum"]), float(bool(group["centered"])), float(bool(group["maximize"]))]

    def _check_hparams(self, group):
        _check_rmsprop_hparams(group["lr"], group["alpha"], group["eps"], group["weight_decay"], group["momentum"])

    def _check_param(self, group, p):
        super()._check_param(group, p)
        st = self.state.get(p)
        if not st:
            return
        self._check_step_state(p)
        for key in self._state_keys:
            if key == "square_avg" or key in st:
                self._check_state_tensor(p, key, st.get(key))

    def _init_state(self, group, p):
        st = self.state[p]
        st["step"] = torch.zeros((), dtype=_scalar_dtype())
        st["square_avg"] = _state_like(p, 0)
        if group["momentum"] > 0:
            st["momentum_buffer"] = _state_like(p, 0)
        if group["centered"]:
            st["grad_avg"] = _state_like(p, 0)

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        states = [self.state[p] for p in params]
        use_momentum, centered = group["momentum"] > 0, bool(group["centered"])
        for p, st in zip(params, states):  # momentum / centered switched on after state was created
            if use_momentum and "momentum_buffer" not in st:
                st["momentum_buffer"] = _state_like(p, 0)
            if centered and "grad_avg" not in st:
                st["grad_avg"] = _state_like(p, 0)
        self._increment_steps(states)
        roles = [params, grads, [st["square_avg"] for st in states],
                 [st["momentum_buffer"] for st in states] if use_momentum else [],
                 [st["grad_avg"] for st in states] if centered else []]
        return self._run_kernel(
            _ext.ops().rmsprop_step, params, roles, float(group["lr"]), float(group["alpha"]), float(group["eps"]),
            float(group["weight_decay"]), float(group["momentum"]), centered, bool(group["maximize"]),
            self.fingerprint,
        )

    def _required_state_keys(self, saved_group):
        return (("step", "square_avg") + (("momentum_buffer",) if saved_group.get("momentum", 0) > 0 else ())
                + (("grad_avg",) if saved_group.get("centered") else ()))
