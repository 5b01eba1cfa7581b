"""Shared machinery of memstate's fused optimizers (policy only; the arithmetic is native)."""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from memstate import _ext
from memstate.fingerprint import Fingerprint, StateFingerprint

_M64 = (1 << 64) - 1
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


class FusedOptimizer(Optimizer):
    """Base of memstate.optim.SGD / Adam / AdamW: a torch.optim.Optimizer whose step is one
    native multi-tensor pass per (device, dtype) bucket of each param group.

    Subclasses set ``_name`` and ``_state_keys`` (the tensor state keys, in kernel role order)
    and implement ``_init_state``, ``_step_bucket``.

    Extra options (all off by default):

    - ``fingerprint``: the step also returns the msfp1 fingerprint of every parameter (after the
      update), its gradient (as read) and every state buffer (after the update), computed in
      the same pass; see ``fingerprints(p)`` and ``state_fingerprint()``.
    - ``skip_if_nonfinite``: before anything is written, one native pass checks every gradient
      of the step for NaN/Inf (one host sync per step, none per tensor); if any is found no
      tensor is modified, step counters do not advance, and ``last_step_skipped`` is True.
    """

    _name = "FusedOptimizer"
    _state_keys: Tuple[str, ...] = ()

    def __init__(self, params, defaults: dict, *, fingerprint: bool, skip_if_nonfinite: bool):
        _ext.load()  # fail early, with build instructions, if the extension is missing
        self.fingerprint = bool(fingerprint)
        self.skip_if_nonfinite = bool(skip_if_nonfinite)
        self.last_step_skipped = False
        self.skipped_steps = 0
        self._pending: List[Tuple[List[torch.Tensor], Tuple[str, ...], torch.Tensor]] = []
        self._fingerprints: Dict[int, Dict[str, Fingerprint]] = {}
        super().__init__(params, defaults)

    # ------------------------------------------------------------------------------ helpers
    def _param_label(self, p: torch.Tensor) -> str:
        index = 0
        for gi, group in enumerate(self.param_groups):
            for pi, q in enumerate(group["params"]):
                if q is p:
                    return f"parameter {index} (param_groups[{gi}]['params'][{pi}], shape {tuple(p.shape)})"
                index += 1
        return f"parameter of shape {tuple(p.shape)}"

    def _params_with_grad(self, group) -> List[torch.Tensor]:
        out = []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError(
                    f"memstate.optim.{self._name} does not support sparse gradients "
                    f"({self._param_label(p)}); use torch.optim.SparseAdam or dense gradients"
                )
            if p.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(
                    f"memstate.optim.{self._name}: {self._param_label(p)} has dtype {p.dtype}; "
                    f"supported: float32, float64, bfloat16, float16"
                )
            if not p.is_contiguous():
                raise ValueError(
                    f"memstate.optim.{self._name}: {self._param_label(p)} is not contiguous; "
                    f"the fused step updates parameters in place in row-major order"
                )
            out.append(p)
        return out

    @staticmethod
    def _buckets(params: Sequence[torch.Tensor]) -> List[List[torch.Tensor]]:
        """Parameters grouped by (device, dtype), in first-seen order."""
        buckets: Dict[Tuple[int, torch.dtype], List[torch.Tensor]] = {}
        for p in params:
            buckets.setdefault((p.get_device(), p.dtype), []).append(p)
        return list(buckets.values())

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        g = p.grad
        return g if g.is_contiguous() else g.contiguous()

    def _any_nonfinite(self, groups_params: List[List[torch.Tensor]]) -> bool:
        ops = _ext.ops()
        flags = []
        for params in groups_params:
            for bucket in self._buckets(params):
                flags.append(ops.nonfinite_any([self._grad(p) for p in bucket]).cpu())
        return bool(torch.stack(flags).any()) if flags else False

    # ------------------------------------------------------------------------------ step
    def _init_state(self, group, p: torch.Tensor) -> None:
        raise NotImplementedError

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _roles(self, group) -> Tuple[str, ...]:
        """Names of the kernel's roles for this group: param, grad, then state keys used."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs one optimization step (see torch.optim.Optimizer.step)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        groups_params = [self._params_with_grad(g) for g in self.param_groups]
        self.last_step_skipped = False
        self._pending = []
        self._fingerprints = {}  # a skipped step has no fingerprints
        if self.skip_if_nonfinite and self._any_nonfinite(groups_params):
            self.last_step_skipped = True
            self.skipped_steps += 1
            return loss
        for group, params in zip(self.param_groups, groups_params):
            for p in params:
                if not self.state.get(p):
                    self._init_state(group, p)
            for bucket in self._buckets(params):
                rows = self._step_bucket(group, bucket, [self._grad(p) for p in bucket])
                if self.fingerprint:
                    self._pending.append((bucket, self._roles(group), rows))
        if self.fingerprint:
            self._after_fingerprinted_step()
        return loss

    def _after_fingerprinted_step(self) -> None:
        """Hook for non-kernel tensor state (e.g. Adam's step counters)."""

    # ------------------------------------------------------------------------------ fingerprints
    def _materialise(self) -> None:
        for bucket, roles, rows in self._pending:
            lanes = rows.cpu().tolist()
            for p, per_role in zip(bucket, lanes):
                self._fingerprints.setdefault(id(p), {}).update(
                    {role: Fingerprint._from_lanes(a & _M64, b & _M64) for role, (a, b) in zip(roles, per_role)}
                )
        self._pending = []

    def fingerprints(self, p: torch.Tensor) -> Dict[str, Fingerprint]:
        """msfp1 fingerprints of parameter ``p``'s tensors from the last step.

        Keys: "param" (after the update), "grad" (as read), and every tensor state key
        (after the update). Requires ``fingerprint=True``; empty if ``p`` had no gradient or
        the last step was skipped (``skip_if_nonfinite``).
        """
        if not self.fingerprint:
            raise RuntimeError(f"{self._name} was created with fingerprint=False; pass fingerprint=True")
        self._materialise()
        return dict(self._fingerprints.get(id(p), {}))

    def state_fingerprint(self) -> StateFingerprint:
        """StateFingerprint over the last step's in-pass fingerprints of every parameter.

        Names: ``param.{i}``, ``grad.{i}`` and ``state.{i}.{key}``, with ``i`` the parameter's
        index over all param groups (as in ``state_dict()``); the ``state.*`` entries equal
        ``memstate.fingerprint_state(optimizer)`` taken after the step.
        """
        if not self.fingerprint:
            raise RuntimeError(f"{self._name} was created with fingerprint=False; pass fingerprint=True")
        self._materialise()
        entries = {}
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                fps = self._fingerprints.get(id(p), {})
                for key, fp in fps.items():
                    if key in ("param", "grad"):
                        t = p if key == "param" else p.grad
                        entries[f"{key}.{index}"] = (fp, t.dtype, tuple(t.shape))
                    else:
                        t = self.state[p][key]
                        entries[f"state.{index}.{key}"] = (fp, t.dtype, tuple(t.shape))
                index += 1
        return StateFingerprint(entries)

    # ------------------------------------------------------------------------------ state dict
    def _check_loaded_state(self, state_dict: dict) -> None:
        """Raises ValueError naming the parameter if the saved state does not fit, before
        anything is modified."""
        groups = state_dict.get("param_groups")
        state = state_dict.get("state")
        if not isinstance(groups, list) or not isinstance(state, dict):
            raise ValueError("optimizer state_dict must have 'state' (dict) and 'param_groups' (list)")
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"loaded state dict has {len(groups)} parameter groups, this optimizer has {len(self.param_groups)}"
            )
        params = [p for g in self.param_groups for p in g["params"]]
        for gi, (saved, ours) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", [])) != len(ours["params"]):
                raise ValueError(
                    f"param_groups[{gi}] has {len(saved.get('params', []))} parameters in the loaded "
                    f"state dict but {len(ours['params'])} here"
                )
        saved_ids = [i for g in groups for i in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for key, value in state.items():
            if key not in id_to_param:
                raise ValueError(f"loaded optimizer state has an entry for unknown parameter id {key!r}")
            p = id_to_param[key]
            if not isinstance(value, dict):
                raise ValueError(f"loaded state of {self._param_label(p)} is not a dict")
            for sk in self._required_state_keys(groups[[i for i, g in enumerate(groups) if key in g["params"]][0]]):
                if sk not in value:
                    raise ValueError(f"loaded state of {self._param_label(p)} lacks '{sk}'")
                v = value[sk]
                if sk != "step" and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(p.shape)):
                    got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
                    raise ValueError(
                        f"loaded state '{sk}' of {self._param_label(p)} has shape {got}, expected {tuple(p.shape)}"
                    )

    def _required_state_keys(self, saved_group: dict) -> Tuple[str, ...]:
        return ()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, after checking that every saved tensor fits its
        parameter (ValueError naming the parameter otherwise; nothing is modified)."""
        self._check_loaded_state(state_dict)
        super().load_state_dict(state_dict)
        self._normalise_loaded_state()
        self._pending, self._fingerprints = [], {}

    def _normalise_loaded_state(self) -> None:
        """Hook: bring loaded state to this optimizer's conventions (e.g. step on CPU)."""
