"""memstate.optim.Adam and AdamW: fused, deterministic, with in-pass fingerprints."""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from memstate import _ext
from memstate.optim._base import _check_impl_flags, _check_lr, _scalar_dtype, _state_like
from memstate.optim._stepped import StepCounted


def _check_hparams(lr, betas, eps, weight_decay):
    """torch.optim.Adam's value checks and messages (ValueError)."""
    _check_lr(lr)
    if not 0.0 <= eps:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if not 0.0 <= betas[0] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 0: {betas[0]}")
    if not 0.0 <= betas[1] < 1.0:
        raise ValueError(f"Invalid beta parameter at index 1: {betas[1]}")
    if not 0.0 <= weight_decay:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")


def _check_constructor_args(lr, betas, eps, weight_decay, foreach, capturable):
    """torch.optim.Adam's constructor checks, in torch's order and with its messages (ValueError),
    tensor lr and betas included."""
    if isinstance(lr, torch.Tensor) and foreach and not capturable:
        raise ValueError("lr as a Tensor is not supported for capturable=False and foreach=True")
    _check_hparams(lr, betas, eps, weight_decay)
    if not ((isinstance(betas[0], float) and isinstance(betas[1], float))
            or (isinstance(betas[0], torch.Tensor) and isinstance(betas[1], torch.Tensor))):
        raise ValueError("betas must be either both floats or both Tensors")
    for i, beta in enumerate(betas):
        if isinstance(beta, torch.Tensor):
            if not capturable and foreach:
                raise ValueError(f"betas[{i}] as a Tensor is not supported for capturable=False and foreach=True")
            if beta.numel() != 1:
                raise ValueError(f"Tensor betas[{i}] must be 1-element")


class Adam(StepCounted):
    """Drop-in for ``torch.optim.Adam`` with a bitwise-reproducible fused step.

    Same arguments and defaults as torch (lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0, amsgrad=False, foreach=None, maximize=False, capturable=False,
    differentiable=False, fused=None, decoupled_weight_decay=False), plus ``fingerprint`` and
    ``skip_if_nonfinite`` (see ``FusedOptimizer``). ``foreach`` and ``fused`` are kept in the
    param groups and change nothing (the step is always fused); ``differentiable=True`` and
    ``capturable=True`` raise NotImplementedError. ``decoupled_weight_decay=True`` is AdamW's
    update (the same kernel). State keys as torch: ``step`` (a CPU 0-d tensor, float32, or
    float64 under ``torch.set_default_dtype(torch.float64)``), ``exp_avg``, ``exp_avg_sq``,
    ``max_exp_avg_sq`` (amsgrad).

    Per element, in float32 (float64 for float64 params); step_size = lr / (1 - beta1^step)
    and sqrt(1 - beta2^step) are computed per tensor in float64 and rounded once::

        g = -grad if maximize else grad
        if weight_decay != 0: Adam: g = g + weight_decay * p
                              AdamW, decoupled_weight_decay: p = p * (1 - lr * weight_decay)
        m = m + (1 - beta1) * (g - m)
        v = v * beta2 + (1 - beta2) * (g * g)
        vh = max(vmax, v) -> vmax  if amsgrad else v
        p = p - step_size * (m / (sqrt(vh) / sqrt(1 - beta2^step) + eps))
    """

    _name = "Adam"
    _state_keys = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False, *,
                 foreach: Optional[bool] = None, maximize: bool = False, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None, decoupled_weight_decay: bool = False,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False,
                 max_grad_norm: Optional[float] = None):
        _check_constructor_args(lr, betas, eps, weight_decay, foreach, capturable)
        betas = tuple(b.squeeze() if isinstance(b, torch.Tensor) and b.dim() != 0 else b for b in betas)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad, maximize=maximize,
                        foreach=foreach, capturable=capturable, differentiable=differentiable, fused=fused,
                        decoupled_weight_decay=decoupled_weight_decay)
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite,
                         max_grad_norm=max_grad_norm)
        _check_impl_flags(self._name, foreach=foreach, fused=fused, differentiable=differentiable,
                          capturable=capturable)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # keys of older state dicts, as torch.optim.Adam
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("capturable", False)
            group.setdefault("differentiable", False)
            group.setdefault("decoupled_weight_decay", self._decoupled_default)
            group.setdefault("fused", None)

    _decoupled_default = False  # AdamW: True (state dicts saved before the key existed)

    def _roles(self, group):
        roles = ("param", "grad", "exp_avg", "exp_avg_sq")
        return roles + ("max_exp_avg_sq",) if group["amsgrad"] else roles

    def _check_hparams(self, group):
        _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _check_param(self, group, p):
        super()._check_param(group, p)
        st = self.state.get(p)
        if not st:
            return
        self._check_step_state(p)
        keys = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if "max_exp_avg_sq" in st else ())
        for key in keys:
            self._check_state_tensor(p, key, st.get(key))

    def _init_state(self, group, p):
        st = self.state[p]
        st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        st["exp_avg"] = _state_like(p, 0)
        st["exp_avg_sq"] = _state_like(p, 0)
        if group["amsgrad"]:
            st["max_exp_avg_sq"] = _state_like(p, 0)

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        states = [self.state[p] for p in params]
        if group["amsgrad"]:
            for p, st in zip(params, states):
                if "max_exp_avg_sq" not in st:  # amsgrad switched on after state was created
                    st["max_exp_avg_sq"] = _state_like(p, 0)
        steps = self._increment_steps(states)
        beta1, beta2 = group["betas"]
        roles = [params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states],
                 [st["max_exp_avg_sq"] for st in states] if group["amsgrad"] else []]
        return self._run_kernel(
            _ext.ops().adam_step, params, roles, steps, float(group["lr"]), float(beta1), float(beta2),
            float(group["eps"]), float(group["weight_decay"]), bool(group["decoupled_weight_decay"]),
            bool(group["amsgrad"]), bool(group["maximize"]), self.fingerprint,
        )

    _plan_kind = 1  # csrc/optim_plan.h PlanKind::kAdam

    def _plan_scalars(self, group):
        beta1, beta2 = group["betas"]
        return [float(group["lr"]), float(beta1), float(beta2), float(group["eps"]), float(group["weight_decay"]),
                float(bool(group["decoupled_weight_decay"])), float(bool(group["amsgrad"])),
                float(bool(group["maximize"]))]

    def _required_state_keys(self, saved_group):
        keys = ("step", "exp_avg", "exp_avg_sq")
        return keys + ("max_exp_avg_sq",) if saved_group.get("amsgrad") else keys

class AdamW(Adam):
    """Drop-in for ``torch.optim.AdamW``: Adam with decoupled weight decay (default 1e-2); its
    param groups carry ``decoupled_weight_decay=True`` as torch's do.

    A state dict whose groups say ``decoupled_weight_decay=False`` (a coupled Adam's) is refused
    with a ValueError (torch.optim.AdamW would silently step it decoupled); load it into
    ``memstate.optim.Adam``. A group without the key (older state dicts) is decoupled.
    """

    _name = "AdamW"
    _decoupled_default = True

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, foreach: Optional[bool] = None, capturable: bool = False,
                 differentiable: bool = False, fused: Optional[bool] = None,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False,
                 max_grad_norm: Optional[float] = None):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=amsgrad,
                         foreach=foreach, maximize=maximize, capturable=capturable, differentiable=differentiable,
                         fused=fused, decoupled_weight_decay=True, fingerprint=fingerprint,
                         skip_if_nonfinite=skip_if_nonfinite, max_grad_norm=max_grad_norm)

    def _check_hparams(self, group):
        super()._check_hparams(group)
        if not group.get("decoupled_weight_decay", True):
            raise ValueError("decoupled_weight_decay=False is coupled (L2) Adam, not AdamW: memstate.optim.AdamW "
                             "will not step it as AdamW; load this state dict into memstate.optim.Adam")
