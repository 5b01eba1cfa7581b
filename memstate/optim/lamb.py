"""memstate.optim.LAMB: fused, deterministic LAMB (Apex FusedLAMB's algorithm) with in-pass
fingerprints."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from memstate import _ext
from memstate.optim._base import _is_dense, _real, _scalar_dtype, _state_like
from memstate.optim.adam import _check_hparams as _check_lamb_hparams  # the same value checks and messages
from memstate.optim._stepped import StepCounted


def _kernel_shape(p: torch.Tensor) -> Tuple[int, ...]:
    """Shape of the kernel's view of ``p`` (``_KernelViews``): view_as_real for complex, a flat
    memory-order view for dense non-row-major tensors, the (real) shape otherwise."""
    r = _real(p)
    if not r.is_contiguous() and _is_dense(r):
        return (r.numel(),)
    return tuple(r.shape)


class LAMB(StepCounted):
    """LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76
    minutes") as NVIDIA Apex's ``FusedLAMB`` computes it, with a bitwise-reproducible step.

    Arguments, defaults and order as Apex: lr=1e-3, bias_correction=True, betas=(0.9, 0.999),
    eps=1e-6, weight_decay=0.01, amsgrad=False (True raises NotImplementedError, as Apex refuses
    it), adam_w_mode=True (decoupled weight decay in the update; False: L2 added to the
    gradient), grad_averaging=True (m uses (1 - beta1) * g; False: g), set_grad_none=True
    (``zero_grad()`` sets gradients to None; False: zeroes them), max_grad_norm=1.0 (global
    gradient clipping, None: off), use_nvlamb=False (trust ratio also for weight_decay == 0),
    plus ``fingerprint`` and ``skip_if_nonfinite`` (see ``FusedOptimizer``).

    State keys: ``step`` (a CPU 0-d tensor per parameter, as torch.optim's Adam; Apex keeps one
    counter per group), ``exp_avg``, ``exp_avg_sq``. Param-group keys: lr, bias_correction,
    betas, eps, weight_decay, grad_averaging, adam_w_mode, use_nvlamb.

    One step (docs/optim.md, "LAMB"):

    1. ``||g||``: the L2 norm of every gradient of the step (all groups), by memstate's
       deterministic reduction; ``last_grad_norm``. Clipping as Apex: the gradient is divided by
       ``||g|| / max_grad_norm`` when ``||g|| > max_grad_norm``, inside the kernel (``p.grad``
       is not modified).
    2. Stage 1, per element in float32 (float64 for float64 params)::

           g = grad / divisor
           g = g + weight_decay * p                   (adam_w_mode=False, weight_decay != 0)
           m = m * beta1 + beta3 * g                  beta3 = 1 - beta1 if grad_averaging else 1
           v = v * beta2 + ((1 - beta2) * g) * g
           u = (m / bc1) / (sqrt(v / bc2) + eps)      bc = 1 - beta^step (1 without bias_correction)
           u = u + weight_decay * p                   (adam_w_mode=True, weight_decay != 0)

       u is written to a scratch buffer kept by the optimizer (one per parameter, not state).
    3. Per tensor ``||p||`` and ``||u||`` by the same deterministic reduction (float64).
    4. Stage 2: ``p = p - step * u`` with ``step = lr * ||p|| / ||u||`` computed in float64
       and rounded once; ``step = lr`` where Apex uses no trust ratio: weight_decay == 0 without
       use_nvlamb, or either norm 0.

    On CUDA a step reads the global norm and each bucket's per-tensor norms on the host (host
    syncs: one, plus one per (device, dtype) bucket of each group).
    """

    _name = "LAMB"
    _state_keys = ("exp_avg", "exp_avg_sq")
    _clips_in_kernel = True  # max_grad_norm: Apex's in-kernel division (memstate/optim/_clipping.py)

    def __init__(self, params, lr: float = 1e-3, bias_correction: bool = True,
                 betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-6, weight_decay: float = 0.01,
                 amsgrad: bool = False, adam_w_mode: bool = True, grad_averaging: bool = True,
                 set_grad_none: bool = True, max_grad_norm: Optional[float] = 1.0, use_nvlamb: bool = False, *,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False):
        if amsgrad:
            raise NotImplementedError("memstate.optim.LAMB does not support amsgrad=True (neither does Apex's "
                                      "FusedLAMB)")
        _check_lamb_hparams(lr, betas, eps, weight_decay)
        defaults = dict(lr=lr, bias_correction=bool(bias_correction), betas=tuple(betas), eps=eps,
                        weight_decay=weight_decay, grad_averaging=bool(grad_averaging),
                        adam_w_mode=bool(adam_w_mode), use_nvlamb=bool(use_nvlamb))
        self.set_grad_none = bool(set_grad_none)
        self._updates: Dict[int, torch.Tensor] = {}
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite,
                         max_grad_norm=max_grad_norm)

    def __getstate__(self):
        state = super().__getstate__()
        state["_memstate_set_grad_none"] = self.set_grad_none
        return state

    def __setstate__(self, state):
        state = dict(state)
        set_grad_none = state.pop("_memstate_set_grad_none", getattr(self, "set_grad_none", True))
        super().__setstate__(state)
        self.set_grad_none = set_grad_none
        self._updates = getattr(self, "_updates", {})  # scratch buffers: never saved

    def zero_grad(self, set_to_none: Optional[bool] = None) -> None:
        """As Apex: gradients to None when ``set_grad_none`` (the default), else zeroed;
        ``set_to_none`` given explicitly overrides it (torch.optim's argument)."""
        super().zero_grad(set_to_none=self.set_grad_none if set_to_none is None else set_to_none)

    def _roles(self, group):
        return ("param", "grad", "exp_avg", "exp_avg_sq")

    def _check_hparams(self, group):
        _check_lamb_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"])

    def _check_param(self, group, p):
        super()._check_param(group, p)
        if self.state.get(p):
            self._check_step_state(p)
            for key in ("exp_avg", "exp_avg_sq"):
                self._check_state_tensor(p, key, self.state[p].get(key))

    def _init_state(self, group, p):
        st = self.state[p]
        st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
        st["exp_avg"] = _state_like(p, 0)
        st["exp_avg_sq"] = _state_like(p, 0)

    def _scratch(self, params: List[torch.Tensor]) -> List[torch.Tensor]:
        """One update buffer per parameter, shaped like the kernel's view of it, reused across
        steps (its contents never outlive a step)."""
        out = []
        for p in params:
            dtype = p.dtype.to_real() if p.is_complex() else p.dtype
            u = self._updates.get(id(p))
            shape = _kernel_shape(p)
            if u is None or u.dtype != dtype or u.device != p.device or tuple(u.shape) != shape:
                u = self._updates[id(p)] = torch.empty(shape, dtype=dtype, device=p.device)
            out.append(u)
        return out

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        states = [self.state[p] for p in params]
        steps = self._increment_steps(states)
        beta1, beta2 = group["betas"]
        norm = self._grad_norm_f64
        return self._run_kernel(
            _ext.ops().lamb_step, params,
            [params, grads, [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]],
            self._scratch(params), steps, float(group["lr"]), float(beta1), float(beta2), float(group["eps"]),
            float(group["weight_decay"]), bool(group["bias_correction"]), bool(group["grad_averaging"]),
            bool(group["adam_w_mode"]), bool(group["use_nvlamb"]), 0.0 if norm is None else norm,
            math.inf if norm is None else self.max_grad_norm, self.fingerprint,
        )

    def _required_state_keys(self, saved_group):
        return ("step", "exp_avg", "exp_avg_sq")
