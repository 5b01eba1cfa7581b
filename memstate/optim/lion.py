"""memstate.optim.Lion: fused, deterministic Lion (Chen et al. 2023) with in-pass fingerprints."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from memstate import _ext
from memstate.optim._base import FusedOptimizer, _check_impl_flags, _check_lr, _state_like


def _check_lion_hparams(lr, betas, weight_decay) -> None:
    """Value checks in torch.optim's style and messages (ValueError)."""
    _check_lr(lr)
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


class Lion(FusedOptimizer):
    """Lion, "EvoLved Sign Momentum" (Chen et al. 2023, "Symbolic Discovery of Optimization
    Algorithms", Algorithm 2), with a bitwise-reproducible fused step.

    Arguments: lr=1e-4, betas=(0.9, 0.99), weight_decay=0 (decoupled: p *= 1 - lr *
    weight_decay, as the paper), maximize=False, foreach/fused (kept, change nothing),
    differentiable (True raises NotImplementedError), plus ``fingerprint`` and
    ``skip_if_nonfinite`` (see ``FusedOptimizer``). State key: ``exp_avg`` (the momentum m).

    Per element, in float32 (float64 for float64 params), scalars rounded once from float64::

        g = -grad if maximize else grad
        if weight_decay != 0: p = p * (1 - lr * weight_decay)
        c = beta1 * m + (1 - beta1) * g
        p = p - lr * sign(c)          (sign(+-0) = +0; a NaN stays NaN)
        m = beta2 * m + (1 - beta2) * g
    """

    _name = "Lion"
    _state_keys = ("exp_avg",)

    def __init__(self, params, lr: float = 1e-4, betas: Tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, maximize: bool = False, foreach: Optional[bool] = None,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False,
                 max_grad_norm: Optional[float] = None):
        _check_lion_hparams(lr, betas, weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, maximize=maximize, foreach=foreach,
                        differentiable=differentiable, fused=fused)
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite,
                         max_grad_norm=max_grad_norm)
        _check_impl_flags(self._name, foreach=foreach, fused=fused, differentiable=differentiable)

    def _roles(self, group):
        return ("param", "grad", "exp_avg")

    _plan_kind = 4  # csrc/optim_plan.h PlanKind::kLion

    def _plan_scalars(self, group):
        beta1, beta2 = group["betas"]
        return [float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"]),
                float(bool(group["maximize"]))]

    def _check_hparams(self, group):
        _check_lion_hparams(group["lr"], group["betas"], group["weight_decay"])

    def _check_param(self, group, p):
        super()._check_param(group, p)
        if self.state.get(p):
            self._check_state_tensor(p, "exp_avg", self.state[p].get("exp_avg"))

    def _init_state(self, group, p):
        self.state[p]["exp_avg"] = _state_like(p, 0)

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        beta1, beta2 = group["betas"]
        return self._run_kernel(
            _ext.ops().lion_step, params, [params, grads, [self.state[p]["exp_avg"] for p in params]],
            float(group["lr"]), float(beta1), float(beta2), float(group["weight_decay"]), bool(group["maximize"]),
            self.fingerprint,
        )

    def _required_state_keys(self, saved_group):
        return ("exp_avg",)
