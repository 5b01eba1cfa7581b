"""memstate.optim.SGD: fused, deterministic SGD (momentum, Nesterov) with in-pass fingerprints."""
from __future__ import annotations

from typing import List, Optional

import torch

from memstate import _ext
from memstate.optim._base import FusedOptimizer, _check_impl_flags, _check_lr, _real, _state_like


def _check_sgd_hparams(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's checks and messages (ValueError)."""
    _check_lr(lr)
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD`` with a bitwise-reproducible fused step.

    Same arguments and defaults as torch (lr=1e-3, momentum=0, dampening=0, weight_decay=0,
    nesterov=False, maximize=False, foreach=None, differentiable=False, fused=None), plus
    ``fingerprint`` and ``skip_if_nonfinite`` (see ``FusedOptimizer``). ``foreach`` and ``fused``
    are kept in the param groups and change nothing (the step is always fused);
    ``differentiable=True`` raises NotImplementedError. State key ``momentum_buffer`` as in torch
    (no state without momentum). ``lr`` and ``weight_decay`` may be one-element tensors.

    Sparse gradients take a separate, non-fused path (``_step_sparse``): torch.optim.SGD's
    per-tensor operations on the gradient after ``coalesce()`` (duplicate indices summed in index
    order, so the result never depends on the device's scheduling).

    Per element, in float32 (float64 for float64 params), scalars rounded once from float64::

        g = -grad if maximize else grad
        if weight_decay != 0: g = g + weight_decay * p
        if momentum != 0:
            buf = g if first step else buf * momentum + (1 - dampening) * g
            g = g + momentum * buf if nesterov else buf
        p = p - lr * g
    """

    _name = "SGD"
    _state_keys = ("momentum_buffer",)
    _optional_state_keys = ("momentum_buffer",)
    _supports_sparse_grad = True

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 foreach: Optional[bool] = None, differentiable: bool = False, fused: Optional[bool] = None,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False,
                 max_grad_norm: Optional[float] = None):
        _check_sgd_hparams(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
                        fused=fused)
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite,
                         max_grad_norm=max_grad_norm)
        _check_impl_flags(self._name, foreach=foreach, fused=fused, differentiable=differentiable)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:  # keys of older state dicts, as torch.optim.SGD
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)
            group.setdefault("differentiable", False)
            group.setdefault("fused", False)

    def _roles(self, group):
        return ("param", "grad", "momentum_buffer") if group["momentum"] != 0 else ("param", "grad")

    _plan_kind = 0  # csrc/optim_plan.h PlanKind::kSgd (a plan is built once every momentum buffer exists)

    def _plan_scalars(self, group):
        return [float(group["lr"]), float(group["momentum"]), float(group["dampening"]),
                float(group["weight_decay"]), float(bool(group["nesterov"])), float(bool(group["maximize"]))]

    def _check_hparams(self, group):
        _check_sgd_hparams(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                           group.get("nesterov", False))

    def _check_param(self, group, p):
        super()._check_param(group, p)
        buf = self.state.get(p, {}).get("momentum_buffer")
        if p.grad.is_sparse:
            # what torch.optim.SGD cannot do either (add(sparse, dense)), refused before any update
            if group["weight_decay"] != 0 or (group["nesterov"] and buf is not None and not buf.is_sparse):
                raise RuntimeError(
                    f"memstate.optim.SGD: {self._param_label(p)} has a sparse gradient; weight_decay != 0 "
                    f"and Nesterov momentum over a dense momentum buffer need add(sparse, dense), which torch "
                    f"does not support (torch.optim.SGD raises too)")
        elif buf is not None and group["momentum"] != 0:
            self._check_state_tensor(p, "momentum_buffer", buf)

    def _begin_step(self, groups_params):
        # parameters whose momentum buffer is created by this step
        self._fresh = {id(p) for params in groups_params for p in params
                       if self.state.get(p, {}).get("momentum_buffer") is None}

    def _init_state(self, group, p):
        # as torch: no state at all without momentum; the buffer is created by the first step
        if group["momentum"] != 0:
            self.state[p]["momentum_buffer"] = None

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        momentum = float(group["momentum"])
        bufs, first, new = [], [], []
        if momentum != 0:
            for p in params:
                buf = self.state[p].get("momentum_buffer")
                # A parameter listed twice that had no buffer when the step began starts a buffer
                # at each listing (buf := g), as torch.optim.SGD does.
                is_new = buf is None or id(p) in self._fresh
                if buf is None:
                    # filled by the kernel (buf := g); kept only once the kernel has run, so a
                    # refused step never leaves an allocated-but-unfilled buffer behind
                    buf = _state_like(p)
                    new.append((p, buf))
                first.append(int(is_new))
                bufs.append(buf)
        rows = self._run_kernel(
            _ext.ops().sgd_step, params, [params, grads, bufs], first, float(group["lr"]), momentum,
            float(group["dampening"]), float(group["weight_decay"]), bool(group["nesterov"]),
            bool(group["maximize"]), self.fingerprint,
        )
        for p, buf in new:
            self.state[p]["momentum_buffer"] = buf
        return rows

    def _step_sparse(self, group, p: torch.Tensor) -> Optional[torch.Tensor]:
        """torch.optim.SGD's for-loop step for one parameter with a sparse gradient (the same
        tensor operations, so the same bits for a coalesced gradient). weight_decay is 0 here
        (``_check_param``). A momentum buffer created here is sparse, as torch's."""
        grad = p.grad.coalesce()
        read = grad
        if group["maximize"]:
            grad = -grad
        momentum = float(group["momentum"])
        buf = None
        if momentum != 0:
            st = self.state[p]
            buf = st.get("momentum_buffer")
            if buf is None:
                buf = grad.detach().clone()
            else:
                buf.mul_(momentum).add_(grad, alpha=1 - float(group["dampening"]))
                if buf.is_sparse:
                    buf = buf.coalesce()
            st["momentum_buffer"] = buf
            grad = grad.add(buf, alpha=momentum) if group["nesterov"] else buf
        p.add_(grad, alpha=-float(group["lr"]))
        if not self.fingerprint:
            return None
        tensors = [p, read] + ([buf] if buf is not None else [])
        # sparse tensors are fingerprinted in their dense form (their logical values)
        dense = [t.to_dense() if t.is_sparse else t for t in tensors]
        return _ext.ops().fingerprint([_real(t).contiguous() for t in dense]).unsqueeze(0)

    def _required_state_keys(self, saved_group):
        return ()
