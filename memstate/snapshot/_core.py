"""The Snapshot object: capture into arenas, restore, fingerprint, save and load."""
from __future__ import annotations

import copy
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from memstate import _ext
from memstate.fingerprint import Fingerprint, StateFingerprint, _from_rows
from memstate.snapshot import _dist, _format
from memstate.snapshot._arena import (_Bound, _bump_versions, _check_names, _collect_tensor_names, _copy, _dynamic,
                                      _layout, _like_param, _local, _param_keys, _rows_to_cpu)
from memstate.snapshot._bind import _HYPER_POLICIES, _Plan, _bind_optimizer, _hyperparameters, _param_index
from memstate.snapshot._common import SnapshotError, _bytes_view, _dtype_name, _Entry, _typed
from memstate.snapshot._rng import _check_rng, _restore_rng
from memstate.snapshot._tree import _decode

_NO_TENSORS: List[torch.Tensor] = []  # capture()'s dynamic tensors when the JSON tree holds none (never mutated)


class Snapshot:
    """A bit-exact copy of a training state, bound to the live objects it came from."""

    def __init__(self):  # use Snapshot.capture or Snapshot.load
        self._sources: Dict[str, Any] = {}
        self._rng = True
        self._to: Optional[str] = None
        self._entries: List[_Entry] = []
        self._arenas: Dict[str, torch.Tensor] = {}
        self._meta: dict = {}
        self._pending: Optional[List[Any]] = None  # CUDA events of to="cpu" copies in flight
        self._slots: List[torch.Tensor] = []
        self._fp_parts: List[Tuple[List[int], torch.Tensor]] = []
        self._fp_rows: Optional[torch.Tensor] = None
        self._hyper = "snapshot"  # restore(): param-group hyperparameters (see _HYPER_POLICIES)
        self._bound: Optional[_Bound] = None  # the capture plan (live tensors + structure signature)
        self._layout_of: Optional[_Bound] = None  # the plan the entries and copy groups were built from
        self._dyn_key: list = []  # (name, dtype, shape, device) of the JSON tree's tensors at the last layout
        self._groups: list = []  # per device: (entry indices or None, arena views) for the fused copy
        self._spilled: List[int] = []  # to="cpu": entries of device tensors, copied on a side stream
        self._restore_groups: Optional[list] = None  # per device: (plan indices or None, live targets, views)
        self._plans: Optional[list] = None  # per device: native CopyPlan (see _native_plans), or None
        self._group = None  # the torch.distributed process group of a per-rank snapshot (None: one process)
        self._file: Optional[dict] = None  # loaded snapshots: the file manifest's checksum and rank record

    # ------------------------------------------------------------------ capture
    @classmethod
    def capture(cls, model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None, *,
                sampler=None, scheduler=None, scaler=None, extra: Optional[Mapping[str, Any]] = None,
                rng: bool = True, to: Optional[str] = None, group=None) -> "Snapshot":
        """Captures the state of the given live objects.

        - ``model``: parameters and buffers (BatchNorm statistics included);
        - ``optimizer``: every state tensor, step counters, param_groups hyperparameters;
        - ``sampler``, ``scheduler``, ``scaler``: anything with ``state_dict()``;
        - ``extra``: name -> module (EMA/teacher), tensor (queue, pointer) or stateful object;
        - ``rng``: torch CPU and every CUDA generator, numpy's and Python's global RNGs;
        - ``to="cpu"``: keep device tensors in pinned host memory (copied asynchronously on a
          side stream) for state that does not fit beside the model;
        - ``group``: the ``torch.distributed`` process group: ``None`` (default) is the default
          group when ``torch.distributed`` is initialised, else one process; ``False`` opts out
          (a single-process snapshot even under a group); or a ``ProcessGroup``. Under a group
          the capture is still local (this rank's shards, RNG states, sampler position; no
          communication, like ``restore()``), and ``save``/``load`` become collective: per-rank
          directories plus one global manifest (docs/snapshot.md, "Distributed").
        """
        if to not in (None, "cpu"):
            raise ValueError(f"to must be None or 'cpu', got {to!r}")
        snap = cls()
        snap._sources = {"model": model, "optimizer": optimizer, "sampler": sampler, "scheduler": scheduler,
                         "scaler": scaler, "extra": dict(extra) if extra is not None else None}
        snap._rng = bool(rng)
        snap._to = to
        snap._group = _dist.resolve_group(group)
        snap._capture()
        return snap

    def recapture(self) -> "Snapshot":
        """Captures the same live objects again, reusing the arenas when the layout (names,
        shapes, dtypes, devices) is unchanged: no allocation on this path."""
        self._capture()
        return self

    def _arena_device(self, t: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self._to == "cpu" else t.device

    def _capture(self, retry: bool = True) -> None:
        self._wait()
        bound = self._bound
        # the structure by identity; the tensors themselves are compared by the native plans
        if bound is None or not bound.valid(tensors=self._plans is None or self._layout_of is not bound):
            bound = self._bound = _Bound(self._sources)  # the full walk; cached until the structure changes
        dyn, meta = _dynamic(self._sources, self._rng, bound)
        dyn_key = [(n, t.dtype, t.shape, t.device) for n, t in dyn]
        if self._layout_of is not bound or dyn_key != self._dyn_key:
            self._build_layout(bound, dyn)
            self._dyn_key = dyn_key
        if self._plans is not None:
            self._fp_parts, self._fp_rows = [], None  # (a plan reuses its rows buffer when nobody holds it)
            if dyn:  # (the plan copies raw bytes: grad mode only matters for the views it takes of these)
                with torch.no_grad():
                    parts = [(idxs, plan.capture([dyn[j][1] for j in dyn_at], True))
                             for idxs, _, dyn_at, plan in self._plans]
            else:
                parts = [(idxs, plan.capture(_NO_TENSORS, True)) for idxs, _, _, plan in self._plans]
            if any(rows is None for _, rows in parts):
                # a held tensor changed (``p.data = ...``, resized in place, moved): nothing was
                # copied; walk again and rebuild the layout and the plans
                if not retry:
                    raise RuntimeError("memstate: the snapshot plan went stale while it was being rebuilt")
                self._bound = None
                return self._capture(retry=False)
            self._fp_parts, self._fp_rows = parts, None
            self._meta = meta
            return
        srcs = bound.tensors + [t for _, t in dyn]
        try:
            with torch.no_grad():  # live parameters as they are (no detach): autograd's fallback is cheaper so
                parts = [(idxs, _ext.ops().copy_fingerprint(srcs if idxs is None else [srcs[i] for i in idxs], dsts,
                                                            True)) for idxs, dsts in self._groups]
        except RuntimeError:
            # a tensor moved to another device since the plan was built (``p.data = p.data.to(...)``
            # keeps the object): the op checks devices and byte counts before writing anything
            if not retry:
                raise
            self._bound = None
            return self._capture(retry=False)
        if self._spilled:  # to="cpu": fingerprint on the device, copy to pinned memory on a side stream
            sp = [srcs[i].detach() for i in self._spilled]
            sp = [t if t.is_contiguous() and not t.is_conj() and not t.is_neg()
                  else t.resolve_conj().resolve_neg().contiguous() for t in sp]
            parts += self._spill(sp, [self._slots[i] for i in self._spilled], self._spilled)
        self._fp_parts, self._fp_rows = parts, None
        self._meta = meta

    def _build_layout(self, bound: _Bound, dyn: List[Tuple[str, torch.Tensor]]) -> None:
        """Entries, arenas (reused when the layout is unchanged) and the per-device copy lists
        for the plan's tensors followed by the tensors of the JSON tree."""
        named = [(n, t, True) for n, t in bound.named] + [(n, t, False) for n, t in dyn]
        _check_names(named)
        entries, sizes = _layout(named, self._arena_device)
        if not (len(entries) == len(self._entries) and all(
                (a.name, a.dtype, a.shape, a.device, a.offset) == (b.name, b.dtype, b.shape, b.device, b.offset)
                for a, b in zip(entries, self._entries)) and set(sizes) == set(self._arenas)):
            self._arenas = {}
            for dev, size in sizes.items():
                pin = self._to == "cpu" and torch.cuda.is_available()
                self._arenas[dev] = torch.empty(size, dtype=torch.uint8, device=dev, pin_memory=pin)
        self._entries = entries
        self._slots = [self._slot(e) for e in entries]  # arena views, reused by recapture()
        local = [i for i, e in enumerate(entries) if self._to != "cpu" or e.device.type == "cpu"]
        self._spilled = [i for i, e in enumerate(entries) if self._to == "cpu" and e.device.type != "cpu"]
        self._groups = self._device_groups(local, self._slots)
        self._restore_groups = None
        self._plans = self._native_plans(bound)
        self._layout_of = bound

    def _native_plans(self, bound: _Bound) -> Optional[list]:
        """Per device: (entry indices of its capture rows, static entry indices (None for both
        when there is one device: all, in order), positions in the JSON tree's tensor list of the
        dynamic tensors it copies, the native ``memstate._C.CopyPlan``). None when a
        plan cannot hold the tensors (``to="cpu"``; a non-contiguous or conjugate view, copied
        through the op with lists instead)."""
        if self._to == "cpu" or not all(t.is_contiguous() and not t.is_conj() and not t.is_neg()
                                        for t in bound.tensors):
            return None
        n = len(bound.tensors)
        by_device: Dict[torch.device, List[int]] = {}
        for i, e in enumerate(self._entries):
            by_device.setdefault(e.device, []).append(i)
        bump = {i for i, (name, _) in enumerate(bound.named) if name.startswith(("model.", "extra."))}
        native = _ext.load()
        plans = []
        for idxs in by_device.values():
            static = [i for i in idxs if i < n]
            plan = native.CopyPlan([bound.tensors[i] for i in static], [self._slots[i] for i in idxs],
                                                   [k for k, i in enumerate(static) if i in bump])
            one = len(by_device) == 1
            plans.append((None if one else idxs, None if one else static, [i - n for i in idxs if i >= n], plan))
        return plans

    @staticmethod
    def _device_groups(idxs: List[int], other: List[torch.Tensor]):
        """[(entry indices or None for all in order, the `other` tensors at them)] per device."""
        by_device: Dict[torch.device, List[int]] = {}
        for i in idxs:
            by_device.setdefault(other[i].device, []).append(i)
        return [(None if len(by_device) == 1 and ii == list(range(len(other))) else ii, [other[i] for i in ii])
                for ii in by_device.values()]

    def _spill(self, srcs: List[torch.Tensor], dsts: List[torch.Tensor], idxs: List[int]):
        """Device-to-host copies of `srcs` into pinned `dsts`, asynchronous, stream-ordered.

        Per device: the fingerprints run on that device's current stream; a side stream created
        *on that device* first waits for the current stream (so every write issued before the
        capture has landed), copies, and then the current stream waits for the side stream, so
        nothing issued on it after capture() (an optimizer step, say) can modify a tensor before
        it is copied. The host does not block; ``_wait()`` (restore, save, tensor, recapture)
        synchronises on the per-device events. Work the caller issues on *other* streams must
        be ordered after the current stream by the caller, as for any PyTorch op."""
        by_device: Dict[torch.device, List[int]] = {}
        for j, t in enumerate(srcs):
            by_device.setdefault(t.device, []).append(j)
        parts, events = [], []
        ops = _ext.ops()
        for device, js in by_device.items():
            with torch.cuda.device(device):
                current = torch.cuda.current_stream(device)
                rows = ops.fingerprint([srcs[j] for j in js])
                parts.append(([idxs[j] for j in js], rows))
                side = torch.cuda.Stream(device=device)
                side.wait_stream(current)
                with torch.cuda.stream(side):
                    for j in js:
                        dsts[j].copy_(_bytes_view(srcs[j]), non_blocking=True)
                        srcs[j].record_stream(side)  # kept alive (temporaries too) until the copy ran
                event = torch.cuda.Event()
                event.record(side)
                current.wait_stream(side)
                events.append(event)
        self._pending = events
        return parts

    def _fingerprint_rows(self) -> torch.Tensor:
        """int64 [N, 2] msfp1 lanes of the captured tensors, in entry order (one host sync the
        first time after a capture)."""
        if self._fp_rows is None:
            self._fp_rows = _rows_to_cpu(len(self._entries), self._fp_parts)
            self._fp_parts = []
        return self._fp_rows

    def _fingerprints(self) -> List[Fingerprint]:
        return _from_rows(self._fingerprint_rows())

    def _wait(self) -> None:
        """Blocks until the asynchronous device-to-host copies of to="cpu" have completed."""
        for event in self._pending or ():
            event.synchronize()
        self._pending = None

    def _slot(self, e: _Entry) -> torch.Tensor:
        arena = self._arenas[str(self._arena_device_of_entry(e))]
        return arena[e.offset:e.offset + e.nbytes]

    def _arena_device_of_entry(self, e: _Entry) -> torch.device:
        return torch.device("cpu") if self._to == "cpu" else e.device

    # ------------------------------------------------------------------ views
    @property
    def nbytes(self) -> int:
        """Bytes held by the arenas: the state's bytes plus per-tensor alignment padding."""
        return sum(a.numel() for a in self._arenas.values())

    @property
    def names(self) -> List[str]:
        return [e.name for e in self._entries]

    def fingerprint(self) -> StateFingerprint:
        """StateFingerprint of the captured model, optimizer and extra tensors (names
        ``model.*``, ``optimizer.state.*``, ``extra.*``): its digest equals
        ``memstate.fingerprint_state({"model": model, "optimizer": optimizer, "extra": extra})``
        of the live objects at capture time (keys for the sources given)."""
        fps = self._fingerprints()
        return StateFingerprint({e.name: (fp, e.dtype, e.shape) for e, fp in zip(self._entries, fps) if e.in_state})

    def tensor(self, name: str) -> torch.Tensor:
        """A read-only-by-convention view of one captured tensor (in its arena)."""
        self._wait()
        for e in self._entries:
            if e.name == name:
                return _typed(self._slot(e), e)
        raise KeyError(f"{name!r} is not in the snapshot; names: {', '.join(self.names[:20])}...")

    # ------------------------------------------------------------------ restore
    def _plan(self, hyperparameters: Optional[str] = None, defer: bool = False) -> "_Plan":
        """Every check of every source, before anything live is written: tensor names, shapes,
        dtypes and devices; the optimizer's parameters (bound by name), group structure and
        hyperparameters; the decoded state of the sampler, scheduler, scaler and stateful
        extras (``validate_state_dict`` where the object has one); every RNG state and RNG
        contract. Raises SnapshotError naming the first mismatch; modifies nothing.

        ``defer`` (restore() only): with one native CopyPlan and nothing restored through
        ``load_state_dict``, the plan's tensors are compared natively by the restore call itself
        (``_Plan.deferred``) instead of by a separate call first."""
        policy = hyperparameters or self._hyper
        if policy not in _HYPER_POLICIES:
            raise ValueError(f"hyperparameters must be one of {', '.join(_HYPER_POLICIES)}, got {policy!r}")
        try:
            return self._plan_unchecked(policy, defer)
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError,
                RuntimeError) as e:
            raise SnapshotError(f"the snapshot's state cannot be applied: {type(e).__name__}: {e}") from None

    def _plan_unchecked(self, policy: str, defer: bool = False) -> "_Plan":
        bound = self._bound
        plans = self._plans
        if bound is not None and self._layout_of is bound and self._to != "cpu" and (
                bound.valid(strict=True) if plans is None else bound.valid(tensors=False)):
            plan = self._plan_bound(policy, bound)
            if plans is None:
                return plan
            if defer and len(plans) == 1 and not plan.loads:
                plan.deferred = True  # _copy_back_bound: the restore call compares the tensors
                return plan
            if all(p.stale() < 0 for *_, p in plans):
                return plan
        live_named, _ = _collect_tensor_names(self._sources)
        captured = {e.name for e in self._entries}
        missing = [e.name for e in self._entries if e.in_state and not e.name.startswith("optimizer.")
                   and e.name not in live_named]
        extra_live = [n for n in live_named if not n.startswith("optimizer.") and n not in captured]
        if missing or extra_live:
            raise SnapshotError(
                "the live objects do not match the snapshot: "
                + (f"missing {', '.join(missing[:10])}" if missing else "")
                + ("; " if missing and extra_live else "")
                + (f"not in the snapshot: {', '.join(extra_live[:10])}" if extra_live else ""))
        tensors = {e.name: _typed(self._slot(e), e) for e in self._entries if not e.in_state}
        opt = self._sources.get("optimizer")
        binding: Optional[List[torch.Tensor]] = None
        groups: Optional[List[dict]] = None
        opt_state: Dict[int, dict] = {}
        if opt is not None and "optimizer" in self._meta:
            binding, groups = _bind_optimizer(opt, self._meta["optimizer"], _param_keys(self._sources), tensors,
                                              policy)
            for index, values in self._meta["optimizer"]["state"].items():
                opt_state[_param_index(index, len(binding))] = dict(_decode(values, tensors))
        elif opt is not None or "optimizer" in self._meta:
            raise SnapshotError("the snapshot and the live objects disagree on whether there is an optimizer")
        targets: List[Optional[torch.Tensor]] = []
        for e in self._entries:
            if e.in_state and e.name.startswith("optimizer."):
                parts = e.name.split(".", 3)
                if len(parts) != 4 or parts[1] != "state" or binding is None:
                    raise SnapshotError(f"{e.name}: not an optimizer state tensor of this optimizer")
                index = _param_index(parts[2], len(binding))
                if not parts[3].isidentifier():
                    raise SnapshotError(f"{e.name}: {parts[3]!r} is not an optimizer state key")
                t = opt.state.get(binding[index], {}).get(parts[3])
                if isinstance(t, torch.Tensor):
                    t = _local([(e.name, t)])[0][1]  # a DTensor's local shard
                if not (isinstance(t, torch.Tensor) and tuple(t.shape) == e.shape and t.dtype == e.dtype
                        and t.device == e.device):
                    t = None  # allocated by _apply; the optimizer's state is rebuilt to the capture
                opt_state.setdefault(index, {})
            elif e.in_state:
                t = live_named[e.name]
                if tuple(t.shape) != e.shape or t.dtype != e.dtype or t.device != e.device:
                    raise SnapshotError(
                        f"{e.name}: live tensor is {_dtype_name(t.dtype)}{list(t.shape)} on {t.device}, the snapshot "
                        f"holds {_dtype_name(e.dtype)}{list(e.shape)} on {e.device}")
            else:
                t = None
            targets.append(t)
        loads, rng_state = self._check_objects(tensors)
        return _Plan(targets, tensors, binding, groups, opt_state, loads, rng_state)

    def _check_objects(self, tensors: Dict[str, torch.Tensor]):
        """(load_state_dict calls, checked RNG state): the decoded state of stateful extras,
        sampler, scheduler and scaler, each validated where the object can, and every RNG state
        tried on scratch generators."""
        loads = []
        extra = self._sources.get("extra") or {}
        for key, kind in self._meta.get("extra", {}).items():
            obj = extra.get(key)
            if isinstance(kind, dict):
                if obj is None or not hasattr(obj, "load_state_dict"):
                    raise SnapshotError(f"extra[{key!r}]: the snapshot holds its state_dict; pass the object")
                loads.append((f"extra[{key!r}]", obj, _decode(kind["state_dict"], tensors)))
        stateful_live = [k for k, v in extra.items() if not isinstance(v, (torch.Tensor, torch.nn.Module,
                         torch.optim.Optimizer, Mapping)) and k not in self._meta.get("extra", {})]
        if stateful_live:
            raise SnapshotError(f"extra: not in the snapshot: {', '.join(map(repr, stateful_live))}")
        for key in ("sampler", "scheduler", "scaler"):
            if key in self._meta and self._sources.get(key) is not None:
                loads.append((key, self._sources[key], _decode(self._meta[key], tensors)))
        for what, obj, sd in loads:
            check = getattr(obj, "validate_state_dict", None)
            if callable(check):
                try:
                    check(sd)
                except (TypeError, ValueError) as e:
                    raise SnapshotError(f"{what}: {e}") from None
        rng_state = _check_rng(self._meta["rng"], tensors) if "rng" in self._meta else None
        return loads, rng_state

    def _plan_bound(self, policy: str, bound: _Bound) -> "_Plan":
        """``_plan_unchecked`` while the capture's plan is still valid: the live objects hold
        exactly the captured tensors (same objects, dtypes, shapes, devices, contiguous), the
        optimizer the same param groups, parameters and state keys. So names need no check, the
        optimizer binds by position, and only non-tensor optimizer state, hyperparameters, the
        JSON-tree objects and RNGs are decoded and checked."""
        n = len(bound.tensors)
        tensors = {e.name: _typed(self._slot(e), e) for e in self._entries[n:]}
        opt = self._sources.get("optimizer")
        binding = groups = None
        opt_state: Dict[int, dict] = {}
        if opt is not None:
            meta = self._meta["optimizer"]
            binding = bound.params
            groups = _hyperparameters(opt, [_decode(g, tensors) for g in meta["param_groups"]], policy)
            opt_state = {i: dict(_decode(meta["state"][str(i)], tensors)) for i, _ in bound.non_tensor}
        loads, rng_state = self._check_objects(tensors)
        return _Plan(bound.tensors, tensors, binding, groups, opt_state, loads, rng_state, fast=True)

    def restore(self, *, hyperparameters: Optional[str] = None) -> None:
        """Writes the captured state back into the live objects, in place, verifying every
        tensor's fingerprint in the same pass.

        Every check of every source runs first (see ``_plan``): a mismatch raises SnapshotError
        before any live state is modified. ``hyperparameters`` overrides how param-group
        hyperparameters are treated (default: ``"snapshot"`` for a captured snapshot, the
        ``Snapshot.load`` choice for a loaded one): ``"snapshot"`` sets them to the captured
        values, ``"live"`` keeps the live ones, ``"check"`` refuses any difference."""
        self._wait()
        if not self._apply(self._plan(hyperparameters, defer=True)):
            # a held tensor changed since capture (``p.data = ...``, resized): nothing was written
            # (see _Plan.deferred); plan again, which now checks by name with the full walk
            self._apply(self._plan(hyperparameters))

    def _apply(self, plan: "_Plan") -> bool:
        """Writes `plan` into the live objects. False, with nothing written, when a deferred
        plan (``_Plan.deferred``) found a held tensor changed."""
        # 1. objects restored through load_state_dict: all validated, but a generic object may
        #    still refuse; then every one loaded so far is put back and nothing else is touched.
        done = []
        for what, obj, sd in plan.loads:
            try:
                before = copy.deepcopy(obj.state_dict())
                obj.load_state_dict(sd)
                done.append((obj, before))
            except Exception as e:
                for o, b in reversed(done):
                    o.load_state_dict(b)
                raise SnapshotError(f"{what}: load_state_dict refused the snapshot's state ({type(e).__name__}: {e}); "
                                    f"nothing was restored") from None
        # 2. tensors, in place (optimizer state tensors that do not exist live are allocated)
        if plan.fast:
            if not self._copy_back_bound(plan.deferred):
                return False
        else:
            self._copy_back(plan)
        # 3. the optimizer's state and param groups, bound by parameter name
        opt = self._sources.get("optimizer")
        if plan.fast and plan.binding is not None:  # same state dicts and keys as captured
            if plan.groups is not None:
                for g, saved in zip(opt.param_groups, plan.groups):
                    g.update(saved)
            for i, values in plan.opt_state.items():
                opt.state[plan.binding[i]].update(values)
        elif plan.binding is not None:
            targets = plan.targets
            for e, t in zip(self._entries, targets):
                if e.in_state and e.name.startswith("optimizer.state."):
                    _, _, index, key = e.name.split(".", 3)
                    p = plan.binding[int(index)]
                    plan.opt_state[int(index)][key] = _like_param(t, p, opt.state.get(p, {}).get(key))
            if plan.groups is not None:
                for g, saved in zip(opt.param_groups, plan.groups):
                    g.update(saved)
            for i, p in enumerate(plan.binding):
                if i in plan.opt_state:
                    st = opt.state[p]
                    for k in [k for k in st if k not in plan.opt_state[i]]:
                        del st[k]
                    st.update(plan.opt_state[i])
                elif p in opt.state:
                    del opt.state[p]
        # 4. RNGs (validated by _check_rng)
        if plan.rng is not None:
            _restore_rng(plan.rng)
        return True

    def _copy_back_bound(self, deferred: bool = False) -> bool:
        """The fused copy back into the bound plan's tensors: one native call per device, with
        the argument lists built once per layout; fingerprints verified. False when `deferred`
        (one plan, its tensors not checked before) and a held tensor changed: nothing written."""
        bound = self._layout_of
        n = len(bound.tensors)
        if self._plans is not None:  # one native call per device; versions bumped natively
            parts = [(static, plan.restore()) for _, static, _, plan in self._plans]  # raw bytes: no autograd
            if any(rows is None for _, rows in parts):
                if deferred:
                    return False
                # checked by _plan: only a concurrent change gets here
                raise SnapshotError("live tensors changed while the snapshot was being restored")
            self._check_restored(n, parts)
            return True
        if self._restore_groups is None:
            self._restore_groups = [(idxs, [self._slots[i] for i in (range(n) if idxs is None else idxs)], dsts)
                                    for idxs, dsts in self._device_groups(list(range(n)), bound.tensors)]
        ops = _ext.ops()
        with torch.no_grad():
            parts = [(idxs, ops.copy_fingerprint(srcs, dsts, True)) for idxs, srcs, dsts in self._restore_groups]
        self._check_restored(n, parts)
        _bump_versions(bound.bump)
        return True

    def _check_restored(self, n: int, parts) -> None:
        """Compares the fingerprints of the n restored tensors with the captured ones."""
        got = _rows_to_cpu(n, parts)
        want = self._fingerprint_rows()
        if want.shape[0] != n:
            want = want[:n]
        if not torch.equal(got, want):  # the arena itself changed in memory since capture
            bad = [self._entries[i].name for i in range(n) if not torch.equal(got[i], want[i])]
            raise SnapshotError(f"snapshot arena corrupted in memory: fingerprints differ for {', '.join(bad[:10])}")

    def _copy_back(self, plan: "_Plan") -> None:
        """The fused copy back into ``plan.targets`` (allocating optimizer state that does not
        exist live, staging non-contiguous targets), fingerprints verified."""
        targets = list(plan.targets)
        for i, (e, t) in enumerate(zip(self._entries, targets)):
            if t is None and e.in_state:
                targets[i] = torch.empty(e.shape, dtype=e.dtype, device=e.device)
        in_place = [i for i, t in enumerate(targets) if t is not None]
        srcs, dsts, tmp_back = [], [], []
        for i in in_place:
            e, t = self._entries[i], targets[i]
            src = self._slots[i] if self._slots else self._slot(e)
            if src.device != t.device:
                src = src.to(t.device, non_blocking=True)
            dst = t if t.is_contiguous() else torch.empty_like(t, memory_format=torch.contiguous_format)
            if dst is not t:
                tmp_back.append((t, dst))
            srcs.append(src)
            dsts.append(dst)  # the op copies bytes: any dtype of the same byte count will do
        got = _rows_to_cpu(len(self._entries), _copy(srcs, dsts, True), index_map=in_place)
        with torch.no_grad():  # parameters are leaves that require grad
            for t, dst in tmp_back:
                t.copy_(dst)
        want = self._fingerprint_rows()
        sel = torch.tensor(in_place, dtype=torch.long)
        bad = [] if torch.equal(got[sel], want[sel]) else [
            self._entries[i].name for i in in_place if not torch.equal(got[i], want[i])]
        if bad:  # the arena itself changed in memory since capture/load: nothing to fall back to
            raise SnapshotError(f"snapshot arena corrupted in memory: fingerprints differ for {', '.join(bad[:10])}")
        _bump_versions([targets[i] for i in in_place if self._entries[i].name.startswith(("model.", "extra."))])
        plan.targets[:] = targets  # allocated optimizer state tensors, for step 3

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, *, timeout: Optional[float] = None) -> None:
        """Writes the snapshot to directory `path` atomically: a new data file under a fresh
        name, then the manifest via a temporary name, fsync and rename; then the data file of
        the previous manifest (and nothing else) is removed. A crash at any point leaves the
        previous snapshot at `path` intact; a failed save removes what it wrote.

        Writers take an exclusive ``fcntl.flock`` on ``path/.memstate.lock``: a second writer
        raises SnapshotError at once, or waits up to ``timeout`` seconds for the lock. The free
        space is checked first: the new data file and manifest must fit while the old ones
        still exist (SnapshotError naming the bytes needed and free otherwise).

        A snapshot captured or loaded under a process group saves collectively (every rank of
        the group calls ``save`` with the same `path`): each rank writes ``path/rank-{r}/`` in
        the format above, then rank 0 writes the global ``path/manifest.json`` once every rank
        has written and fsynced (docs/snapshot.md, "Distributed")."""
        self._wait()
        if self._group is not None:
            _dist.save(self, path, timeout)
        else:
            _format.save(self, path, timeout)

    @classmethod
    def load(cls, path: str, model=None, optimizer=None, *, sampler=None, scheduler=None, scaler=None,
             extra=None, rng: bool = True, hyperparameters: str = "check", group=None) -> "Snapshot":
        """Reads a saved snapshot, verifies every checksum and fingerprint, and binds it to
        the given live objects, running every check ``restore()`` makes (names, shapes, dtypes,
        the optimizer's parameters bound by name and its group structure, sampler/scheduler/
        scaler/extra state, RNG states). Nothing live is touched until ``restore()``.

        ``hyperparameters``: ``"check"`` (default) refuses a param group whose hyperparameters
        (lr, betas, weight_decay, ...) differ from the snapshot's, naming the group and key;
        ``"snapshot"`` restores the snapshot's values (e.g. a scheduled learning rate when
        resuming); ``"live"`` keeps the live optimizer's.

        ``group`` (as in ``capture``): a directory of per-rank snapshots is loaded collectively
        (every rank of the group calls ``load``): each rank reads ``rank-{r}/`` and checks it
        against the global manifest; a different world size, a missing or corrupt rank
        directory or a manifest that does not match the rank files makes every rank raise
        SnapshotError naming the rank and file, with nothing live touched. A single-process
        snapshot directory loads as before, locally, whatever ``group`` is."""
        sources = dict(model=model, optimizer=optimizer, sampler=sampler, scheduler=scheduler, scaler=scaler,
                       extra=dict(extra) if extra is not None else None)
        group = _dist.resolve_group(group)
        if _dist.is_distributed(path):
            return _dist.load(cls, path, sources, rng, hyperparameters, group)
        return _format.load(cls, path, sources, rng, hyperparameters)

    def __repr__(self):
        rank = "" if self._group is None else f", rank={_dist._dist().get_rank(self._group)}"
        return (f"Snapshot({len(self._entries)} tensors, {self.nbytes / 2**20:.1f} MiB, "
                f"sources={self._meta.get('sources')}, rng={'rng' in self._meta}{rank})")

