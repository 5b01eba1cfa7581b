"""Shared machinery of memstate's fused optimizers (policy only; the arithmetic is native)."""
from __future__ import annotations

import operator
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.optim import Optimizer

from memstate import _ext
from memstate.fingerprint import Fingerprint, StateFingerprint

_M64 = (1 << 64) - 1
_VERSION = operator.attrgetter("_version")  # a tensor's in-place write counter
_SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _to_host(tensors: List[torch.Tensor]) -> List[torch.Tensor]:
    """CPU copies of small int64/bool tensors (flags, fingerprint rows): THE host sync point of
    a step. The tensors of each device are flattened into one buffer and fetched with one
    ``.cpu()`` call (one sync per device, not one per tensor or bucket); shapes are kept and
    bool tensors come back as int64."""
    out: List[Optional[torch.Tensor]] = [None] * len(tensors)
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    for idxs in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.int64) for i in idxs]).cpu()
        offset = 0
        for i in idxs:
            n = tensors[i].numel()
            out[i] = flat[offset:offset + n].reshape(tensors[i].shape)
            offset += n
    return out  # type: ignore[return-value]


def _stream_capturing() -> bool:
    """Whether the current CUDA stream is capturing a CUDA graph (False without CUDA)."""
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_not_capturing(name: str) -> None:
    if _stream_capturing():
        raise RuntimeError(
            f"memstate.optim.{name}.step() cannot run under CUDA graph capture: its kernel tables are "
            f"uploaded from host memory and Adam's step counters live on the CPU, so a replayed graph "
            f"would reuse stale values. Step outside the captured region (there is no capturable=True "
            f"mode yet)."
        )


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
      of the step for NaN/Inf (one host sync per step and device, none per tensor or bucket);
      if any is found no tensor is modified, step counters do not advance, and
      ``last_step_skipped`` is True.

    A step either updates every parameter with a gradient or raises before modifying
    anything: hyperparameters of every group, gradients and existing state are all checked
    first (``_check_group``, ``_check_param``). A parameter listed twice in a group (torch.optim
    warns about it at construction) is updated once per listing, in order, as torch.optim's
    for-loop implementation does: each fused pass holds a parameter at most once, so nothing
    races. Steps refuse to run under CUDA graph capture (no ``capturable`` mode yet).
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
        self._plan = None  # see _plan_key / _planned_step; None: next step builds it
        self._fp_watch: List[torch.Tensor] = []  # the tensors behind _fingerprints ...
        self._fp_versions: List[int] = []  # ... and their version counters when fingerprinted
        super().__init__(params, defaults)

    def __getstate__(self):
        # torch.optim pickles defaults, state and param_groups only; keep our options too
        state = super().__getstate__()
        state["_memstate_options"] = (self.fingerprint, self.skip_if_nonfinite, self.skipped_steps)
        return state

    def __setstate__(self, state):
        # also called by torch's load_state_dict with state and param_groups only: options kept
        state = dict(state)
        options = state.pop("_memstate_options", None)
        super().__setstate__(state)
        if options is None:
            options = (getattr(self, "fingerprint", False), getattr(self, "skip_if_nonfinite", False),
                       getattr(self, "skipped_steps", 0))
        self.fingerprint, self.skip_if_nonfinite, self.skipped_steps = options
        self.last_step_skipped = False
        self._pending, self._fingerprints, self._fp_watch, self._plan = [], {}, [], None

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._plan = None

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
        """Parameters grouped by (device, dtype, listing), in first-seen order.

        A parameter listed k times goes into k buckets, its j-th listing into the j-th bucket of
        its (device, dtype): one fused pass never holds a tensor twice (that would race), and
        the passes run in order, so the result is torch.optim's (one update per listing).
        """
        buckets: Dict[Tuple[int, torch.dtype, int], List[torch.Tensor]] = {}
        seen: Dict[int, int] = {}
        for p in params:
            k = seen.get(id(p), 0)
            seen[id(p)] = k + 1
            buckets.setdefault((p.get_device(), p.dtype, k), []).append(p)
        return list(buckets.values())

    @staticmethod
    def _grad(p: torch.Tensor) -> torch.Tensor:
        g = p.grad
        return g if g.is_contiguous() else g.contiguous()

    def _any_nonfinite(self, groups_params: List[List[torch.Tensor]]) -> bool:
        ops = _ext.ops()
        by_device: Dict[torch.device, Dict[int, torch.Tensor]] = {}
        for params in groups_params:
            for p in params:
                by_device.setdefault(p.device, {})[id(p)] = self._grad(p)
        # one scan per device (no host sync), then one host fetch of all flags
        flags = [ops.nonfinite_any(list(grads.values())) for grads in by_device.values()]
        return any(bool(f) for f in _to_host(flags))

    # ------------------------------------------------------------------------------ step
    def _init_state(self, group, p: torch.Tensor) -> None:
        raise NotImplementedError

    def _step_bucket(self, group, params: List[torch.Tensor], grads: List[torch.Tensor]) -> Optional[torch.Tensor]:
        raise NotImplementedError

    def _roles(self, group) -> Tuple[str, ...]:
        """Names of the kernel's roles for this group: param, grad, then state keys used."""
        raise NotImplementedError

    def _check_hparams(self, group) -> None:
        """Raises ValueError (torch's constructor message) if a group's hyperparameters are
        invalid. Subclasses implement it; run for every group before any step touches state."""

    def _check_group(self, gi: int, group) -> None:
        """``_check_hparams`` with the group named in the error."""
        try:
            self._check_hparams(group)
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"memstate.optim.{self._name}: param_groups[{gi}]: {e}") from None

    def _check_state_tensor(self, p: torch.Tensor, key: str, t) -> None:
        """State tensor ``key`` of ``p`` must be what the kernel takes: a contiguous tensor of
        p's shape, dtype and device. Raises ValueError naming the parameter and key."""
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"memstate.optim.{self._name}: state '{key}' of {self._param_label(p)} is a "
                             f"{type(t).__name__}, not a tensor")
        if tuple(t.shape) != tuple(p.shape) or t.dtype != p.dtype or t.device != p.device \
                or t.layout != torch.strided or not t.is_contiguous():
            raise ValueError(
                f"memstate.optim.{self._name}: state '{key}' of {self._param_label(p)} is a "
                f"{'' if t.is_contiguous() else 'non-contiguous '}{t.dtype} tensor of shape "
                f"{tuple(t.shape)} on {t.device}; expected a contiguous {p.dtype} tensor of shape "
                f"{tuple(p.shape)} on {p.device}"
            )

    def _check_param(self, group, p: torch.Tensor) -> None:
        """Checks p's gradient and existing state before any tensor of the step is modified."""
        g = p.grad
        if g.dtype != p.dtype or tuple(g.shape) != tuple(p.shape) or g.device != p.device:
            raise ValueError(
                f"memstate.optim.{self._name}: the gradient of {self._param_label(p)} is a {g.dtype} "
                f"tensor of shape {tuple(g.shape)} on {g.device}; expected {p.dtype}, "
                f"{tuple(p.shape)}, {p.device}"
            )

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None):
        """Performs one optimization step (see torch.optim.Optimizer.step).

        Everything is checked before anything is modified: a step that raises leaves
        parameters, state and step counters as they were.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        _check_not_capturing(self._name)
        if self._planned_step():
            return loss
        groups_params = [self._params_with_grad(g) for g in self.param_groups]
        for gi, (group, params) in enumerate(zip(self.param_groups, groups_params)):
            self._check_group(gi, group)
            for p in params:
                self._check_param(group, p)
        self.last_step_skipped = False
        self._pending = []
        self._fingerprints, self._fp_watch = {}, []  # a skipped step has no fingerprints
        self._plan = None
        if self.skip_if_nonfinite and self._any_nonfinite(groups_params):
            self.last_step_skipped = True
            self.skipped_steps += 1
            return loss
        self._begin_step(groups_params)
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
        self._plan = self._build_plan()
        return loss

    # ------------------------------------------------------------------------------ cached plans
    def _build_plan(self):
        """Hook: the cached argument lists of the step just run, or None (no cached path). A
        plan is used by ``_planned_step`` only while ``_plan_key()`` is unchanged."""
        return None

    def _planned_step(self) -> bool:
        """Hook: runs the step from the cached plan and returns True, or returns False (nothing
        done) when there is no valid plan; the full path then checks, steps and rebuilds it."""
        return False

    def _begin_step(self, groups_params: List[List[torch.Tensor]]) -> None:
        """Hook: called once the step is checked and will run, before the first update."""

    def _after_fingerprinted_step(self) -> None:
        """Hook for non-kernel tensor state (e.g. Adam's step counters)."""

    # ------------------------------------------------------------------------------ fingerprints
    def _fingerprints_stale(self) -> bool:
        """Whether a tensor behind the last step's fingerprints was written since (e.g. by
        ``Snapshot.restore``, which bumps versions, or by replacing a state entry)."""
        return list(map(_VERSION, self._fp_watch)) != self._fp_versions

    def _materialise(self) -> None:
        if self._fp_watch and self._fingerprints_stale():
            self._refingerprint()
        if not self._pending:
            return
        fetched = _to_host([rows for _, _, rows in self._pending])  # one host sync
        for (bucket, roles, _), host_rows in zip(self._pending, fetched):
            lanes = host_rows.tolist()
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
        """Raises ValueError naming the group or parameter if the saved state does not fit, before
        anything is modified: structure, every group's hyperparameters (as ``step`` will check
        them), every state entry's type, shape and dtype kind."""
        if not isinstance(state_dict, dict):
            raise ValueError(f"optimizer state_dict must be a dict, got {type(state_dict).__name__}")
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
            if not isinstance(saved, dict) or not isinstance(saved.get("params"), list):
                raise ValueError(f"loaded param_groups[{gi}] must be a dict with a 'params' list")
            if len(saved["params"]) != len(ours["params"]):
                raise ValueError(
                    f"param_groups[{gi}] has {len(saved['params'])} parameters in the loaded "
                    f"state dict but {len(ours['params'])} here"
                )
            merged = dict(self.defaults)
            merged.update({k: v for k, v in saved.items() if k != "params"})
            self._check_group(gi, merged)
        group_of = {i: gi for gi, g in enumerate(groups) for i in g["params"]}
        saved_ids = [i for g in groups for i in g["params"]]
        id_to_param = dict(zip(saved_ids, params))
        for key, value in state.items():
            if key not in id_to_param:
                raise ValueError(f"loaded optimizer state has an entry for unknown parameter id {key!r}")
            p = id_to_param[key]
            if not isinstance(value, dict):
                raise ValueError(f"loaded state of {self._param_label(p)} is not a dict")
            for sk in self._required_state_keys(groups[group_of[key]]):
                if sk not in value:
                    raise ValueError(f"loaded state of {self._param_label(p)} lacks '{sk}'")
            for sk, v in value.items():
                self._check_loaded_entry(p, sk, v)

    def _check_loaded_entry(self, p: torch.Tensor, key: str, v) -> None:
        """A loaded state value of a tensor state key must be a dense real floating tensor of
        p's shape (torch.optim casts it to p's dtype and device); None only where the key
        allows it (SGD's momentum_buffer)."""
        if key not in self._state_keys or (v is None and key in self._optional_state_keys):
            return
        ok = isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape)
        if not ok:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise ValueError(f"loaded state '{key}' of {self._param_label(p)} has shape {got}, expected {tuple(p.shape)}")
        if v.layout != torch.strided or v.is_meta or not v.is_floating_point():
            raise ValueError(f"loaded state '{key}' of {self._param_label(p)} is a {v.dtype} {v.layout} tensor on "
                             f"{v.device}; expected a dense floating-point tensor")

    _optional_state_keys: Tuple[str, ...] = ()

    def _required_state_keys(self, saved_group: dict) -> Tuple[str, ...]:
        return ()

    def load_state_dict(self, state_dict: dict) -> None:
        """torch.optim's load_state_dict, after checking that every saved tensor fits its
        parameter (ValueError naming the parameter otherwise; nothing is modified)."""
        self._check_loaded_state(state_dict)
        super().load_state_dict(state_dict)
        self._normalise_loaded_state()
        self._pending, self._fingerprints, self._fp_watch, self._plan = [], {}, [], None

    def _refingerprint(self) -> None:
        """Hook: recompute the fingerprints of the last step's tensors from their current
        contents (they were overwritten since the step)."""
        self._pending, self._fingerprints, self._fp_watch = [], {}, []

    def _normalise_loaded_state(self) -> None:
        """Hook: bring loaded state to this optimizer's conventions (e.g. step on CPU)."""
