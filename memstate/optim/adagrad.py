"""memstate.optim.Adagrad: fused, deterministic Adagrad with in-pass fingerprints."""
from __future__ import annotations

from typing import List, Optional

import torch

from memstate import _ext
from memstate.optim._base import _check_impl_flags, _check_lr, _scalar_dtype, _state_like
from memstate.optim._stepped import StepCounted


def _check_adagrad_hparams(lr, lr_decay, weight_decay, initial_accumulator_value, eps) -> None:
    """torch.optim.Adagrad's checks, order and messages (ValueError)."""
    _check_lr(lr)
    if not 0.0 <= lr_decay:
        raise ValueError(f"Invalid lr_decay value: {lr_decay}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if not 0.0 <= initial_accumulator_value:
        raise ValueError(f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")


class Adagrad(StepCounted):
    """Drop-in for ``torch.optim.Adagrad`` (dense gradients) with a bitwise-reproducible fused step.

    Same arguments and defaults as torch (lr=1e-2, lr_decay=0, weight_decay=0,
    initial_accumulator_value=0, eps=1e-10, foreach=None, maximize=False, differentiable=False,
    fused=None), plus ``fingerprint`` and ``skip_if_nonfinite`` (see ``FusedOptimizer``).
    ``foreach`` and ``fused`` are kept in the param groups and change nothing (the step is always
    fused); ``differentiable=True`` raises NotImplementedError. As torch, the state (``step``, a
    CPU 0-d tensor, and ``sum``, filled with initial_accumulator_value) is created by the
    constructor. Sparse gradients are refused (torch.optim.Adagrad has a sparse path).

    Per element, in float32 (float64 for float64 params); clr = lr / (1 + (step - 1) * lr_decay)
    is computed per tensor in float64 and rounded once::

        g = -grad if maximize else grad
        if weight_decay != 0: g = g + weight_decay * p
        sum = sum + g * g
        p = p - clr * (g / (sqrt(sum) + eps))
    """

    _name = "Adagrad"
    _state_keys = ("sum",)

    def __init__(self, params, lr: float = 1e-2, lr_decay: float = 0, weight_decay: float = 0,
                 initial_accumulator_value: float = 0, eps: float = 1e-10, foreach: Optional[bool] = None, *,
                 maximize: bool = False, differentiable: bool = False, fused: Optional[bool] = None,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False,
                 max_grad_norm: Optional[float] = None):
        _check_adagrad_hparams(lr, lr_decay, weight_decay, initial_accumulator_value, eps)
        defaults = dict(lr=lr, lr_decay=lr_decay, eps=eps, weight_decay=weight_decay,
                        initial_accumulator_value=initial_accumulator_value, foreach=foreach, maximize=maximize,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite,
                         max_grad_norm=max_grad_norm)
        _check_impl_flags(self._name, foreach=foreach, fused=fused, differentiable=differentiable)
        for group in self.param_groups:
            for p in group["params"]:
                self._init_state(group, p)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # keys of older state dicts, as torch.optim.Adagrad
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)
            group.setdefault("differentiable", False)
            group.setdefault("fused", None)

    def share_memory(self) -> None:
        """Moves every ``sum`` buffer to shared memory, as torch.optim.Adagrad.share_memory."""
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["sum"].share_memory_()

    def _roles(self, group):
        return ("param", "grad", "sum")

    _plan_kind = 3  # csrc/optim_plan.h PlanKind::kAdagrad

    def _plan_scalars(self, group):
        return [float(group["lr"]), float(group["lr_decay"]), float(group["eps"]), float(group["weight_decay"]),
                float(bool(group["maximize"]))]

    def _check_hparams(self, group):
        _check_adagrad_hparams(group["lr"], group["lr_decay"], group["weight_decay"],
                               group["initial_accumulator_value"], group["eps"])

    def _check_param(self, group, p):
        super()._check_param(group, p)
        if self.state.get(p):
            self._check_step_state(p)
            self._check_state_tensor(p, "sum", self.state[p].get("sum"))

    def _init_state(self, group, p):
        # as torch: complex parameters start with initial_accumulator_value in both parts
        v = float(group["initial_accumulator_value"])
        st = self.state[p]
        st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        st["sum"] = _state_like(p, complex(v, v) if p.is_complex() else v)

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        states = [self.state[p] for p in params]
        steps = self._increment_steps(states)
        return self._run_kernel(
            _ext.ops().adagrad_step, params, [params, grads, [st["sum"] for st in states]], steps,
            float(group["lr"]), float(group["lr_decay"]), float(group["eps"]), float(group["weight_decay"]),
            bool(group["maximize"]), self.fingerprint,
        )

    def _required_state_keys(self, saved_group):
        return ("step", "sum")
