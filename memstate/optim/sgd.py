"""memstate.optim.SGD: fused, deterministic SGD (momentum, Nesterov) with in-pass fingerprints."""
from __future__ import annotations

from typing import List, Optional

import torch

from memstate import _ext
from memstate.optim._base import FusedOptimizer


def _check_sgd_hparams(lr, momentum, dampening, weight_decay, nesterov) -> None:
    """torch.optim.SGD's checks and messages (ValueError)."""
    if not 0.0 <= float(lr):
        raise ValueError(f"Invalid learning rate: {lr}")
    if momentum < 0.0:
        raise ValueError(f"Invalid momentum value: {momentum}")
    if weight_decay < 0.0:
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")


class SGD(FusedOptimizer):
    """Drop-in for ``torch.optim.SGD`` with a bitwise-reproducible fused step.

    Same arguments and defaults as torch (lr=1e-3, momentum=0, dampening=0, weight_decay=0,
    nesterov=False, maximize=False), plus ``fingerprint`` and ``skip_if_nonfinite`` (see
    ``FusedOptimizer``). State key ``momentum_buffer`` as in torch (no state without momentum).

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

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False,
                 fingerprint: bool = False, skip_if_nonfinite: bool = False):
        _check_sgd_hparams(lr, momentum, dampening, weight_decay, nesterov)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, maximize=maximize)
        super().__init__(params, defaults, fingerprint=fingerprint, skip_if_nonfinite=skip_if_nonfinite)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("maximize", False)

    def _roles(self, group):
        return ("param", "grad", "momentum_buffer") if group["momentum"] != 0 else ("param", "grad")

    def _check_hparams(self, group):
        _check_sgd_hparams(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                           group.get("nesterov", False))

    def _check_param(self, group, p):
        super()._check_param(group, p)
        buf = self.state.get(p, {}).get("momentum_buffer")
        if buf is not None and group["momentum"] != 0:
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
                    buf = torch.empty_like(p, memory_format=torch.contiguous_format)
                    new.append((p, buf))
                first.append(int(is_new))
                bufs.append(buf)
        rows = _ext.ops().sgd_step(
            params, grads, bufs, first, float(group["lr"]), momentum, float(group["dampening"]),
            float(group["weight_decay"]), bool(group["nesterov"]), bool(group["maximize"]), self.fingerprint,
        )
        for p, buf in new:
            self.state[p]["momentum_buffer"] = buf
        return rows

    def _required_state_keys(self, saved_group):
        return ()

    def _normalise_loaded_state(self):
        for p, st in self.state.items():
            buf = st.get("momentum_buffer")
            if buf is not None and not buf.is_contiguous():
                st["momentum_buffer"] = buf.contiguous()
