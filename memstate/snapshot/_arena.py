"""The arena side of a snapshot: which live tensors a state has (and its JSON tree), their
64-byte aligned layout in one arena per device, and the fused native copy + fingerprint."""
from __future__ import annotations

import itertools
import operator
import sys
from typing import Any, Dict, List, Mapping, Tuple

import torch

from memstate import _ext
from memstate.fingerprint import named_state_tensors
from memstate.snapshot._common import ALIGN, _Entry, _check_tensor, _nbytes
from memstate.snapshot._rng import _capture_rng
from memstate.snapshot._tree import _encode


_Module = torch.nn.Module
_DTYPE, _SHAPE, _DEVICE = (operator.attrgetter(a) for a in ("dtype", "shape", "device"))


def _local(named):
    """(name, tensor) pairs with every DTensor (FSDP2 / tensor-parallel parameters and their
    optimizer state) replaced by its local shard, which shares its storage: a snapshot holds and
    restores, in place, what this rank holds."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return named
    return [(n, t._local_tensor if isinstance(t, dtensor) else t) for n, t in named]


def _like_param(t: torch.Tensor, param: torch.Tensor, live: Any) -> Any:
    """The optimizer state value to set for restored tensor `t` of `param`: the live DTensor
    whose local shard `t` is; for a DTensor parameter without that state live, `t` (a local
    shard of the parameter's local shape) wrapped as a DTensor like the parameter; else `t`."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(param, dtensor):
        return t
    if isinstance(live, dtensor) and live._local_tensor is t:
        return live
    if t.shape == param._local_tensor.shape:
        return dtensor.from_local(t, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                                  stride=param.stride())
    return t


def _dtensor_type():
    """torch's DTensor class if its module is loaded (no DTensor can exist otherwise: importing
    it here would cost every process that never uses one)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _static_named(sources: Dict[str, Any]) -> List[Tuple[str, torch.Tensor]]:
    """(name, live tensor) of the tensors restored in place, in entry order: model parameters
    and buffers, optimizer state tensors, extra modules / tensors / dicts of tensors. Raises
    TypeError naming a source of the wrong kind."""
    named: List[Tuple[str, torch.Tensor]] = []
    model = sources.get("model")
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        named += [(f"model.{n}", t) for n, t in _local(named_state_tensors(model))]
    opt = sources.get("optimizer")
    if opt is not None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
        named += [(f"optimizer.{n}", t) for n, t in _local(named_state_tensors(opt))]
    extra = sources.get("extra")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra must be a dict of name -> module, tensor or stateful object, got {type(extra).__name__}")
        for key, obj in extra.items():
            if _tensor_container(obj):
                named += [(f"extra.{key}.{n}", t) for n, t in _local(named_state_tensors(obj))]
            elif isinstance(obj, torch.Tensor):
                named += _local([(f"extra.{key}", obj)])
            elif not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
                raise TypeError(
                    f"extra[{key!r}] is a {type(obj).__name__}: pass a module, a tensor, a dict of tensors or an "
                    f"object with state_dict()/load_state_dict() (keep counters such as a queue pointer in a tensor)"
                )
    return named


def _tensor_container(obj: Any) -> bool:
    """Whether an ``extra`` value's tensors are captured by name (module, optimizer, dict of tensors)."""
    return isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)) or (
        isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values()))


_MODULE_DICTS = operator.attrgetter("_parameters", "_buffers", "_modules")
_PARAMS = operator.itemgetter("params")
_chain = itertools.chain.from_iterable


def _module_parts(mods: List[torch.nn.Module], objs: list, conts: list) -> None:
    """Every module's parameter, buffer and submodule dicts (their items compared natively): with
    the same objects in the same order, ``named_parameters``/``named_buffers`` give the same
    result."""
    dicts = list(_chain(map(_MODULE_DICTS, mods)))
    objs += dicts
    conts += dicts


def _optimizer_parts(opt: torch.optim.Optimizer, plain: list, mixed: list, objs: list, keys: list,
                     conts: list) -> None:
    """The state dict (parameter -> state dict), every param group and its params list, the
    per-parameter state dicts `plain` (all values tensors: their items compared natively) and
    `mixed` (also non-tensor values, which may change freely: they are re-encoded on every
    capture, so only their type counts)."""
    state, groups = opt.state, opt.param_groups
    plists = list(map(_PARAMS, groups))
    objs += (state, groups)
    objs += groups
    objs += plists
    conts += plists
    conts.append(state)
    conts += plain
    for st in mixed:
        objs.append(st)
        keys += st
        for v in st.values():
            if isinstance(v, torch.Tensor):
                objs.append(v)
            else:
                keys.append(type(v))


def _plain_module(m: torch.nn.Module) -> bool:
    cls = type(m)
    return all(getattr(cls, a) is getattr(_Module, a)
               for a in ("named_parameters", "named_buffers", "named_modules", "_named_members", "modules"))


class _Bound:
    """A bound snapshot plan: the live tensors captured and restored in place (``_static_named``)
    and what identifies the structure they were found in, so that ``recapture()`` and
    ``restore()`` need not walk the module tree again.

    The signature is the identity of every entry of every module's ``_parameters``,
    ``_buffers`` and ``_modules`` dicts, of the optimizer's state dict, param groups, their
    params lists and parameters, each parameter's state dict with its keys and tensor values,
    and of ``extra`` tensors and dicts of tensors. The per-tensor part, the items of those dicts
    and of the params lists, is compared natively against flat lists taken when the plan was
    built (``memstate._C.same_items``: it reads the dicts' entry tables, never the objects, a
    few ns an item); the dicts, lists, groups and modules themselves by identity
    (``memstate._C.same_objects``); keys of state dicts with non-tensor values, and those
    values' types, by value. Anything changed (parameters replaced, optimizer state created,
    ``load_state_dict``, param groups added) fails the check, and the caller builds a new plan
    with a full walk. What the signature does not see, ``t.data = ...`` or an in-place resize,
    the native CopyPlan catches (it compares every tensor's pointer, sizes, dtype, device and
    contiguity on each use); without one, ``valid(tensors=True)`` compares dtypes and shapes
    (and devices and contiguity when ``strict``). Modules that override ``named_parameters`` and
    friends are never cached (every use walks)."""

    def __init__(self, sources: Dict[str, Any]):
        self.named = _static_named(sources)
        self.source_keys = sorted(k for k, v in sources.items() if v is not None)  # (the dict is never rebound)
        for n, t in self.named:
            _check_tensor(n, t)
        self.tensors = [t for _, t in self.named]
        self.dtypes = [t.dtype for t in self.tensors]
        self.shapes = [t.shape for t in self.tensors]
        self.devices = [t.device for t in self.tensors]
        self.bump = [t for n, t in self.named if n.startswith(("model.", "extra."))]  # autograd versions
        self._parts: List[Tuple[str, Any]] = []
        cacheable = True
        extra = sources.get("extra") or {}
        for obj in [sources.get("model"), sources.get("optimizer")] + list(extra.values()):
            if isinstance(obj, torch.nn.Module):
                mods = list(obj.modules())
                cacheable = cacheable and all(_plain_module(m) for m in mods)
                self._parts.append(("module", mods))
            elif isinstance(obj, torch.optim.Optimizer):
                sts = [st for st in obj.state.values() if isinstance(st, Mapping)]
                cacheable = cacheable and len(sts) == len(obj.state) and all(type(st) is dict for st in sts)
                plain = [st for st in sts if all(isinstance(v, torch.Tensor) for v in st.values())]
                mixed = [st for st in sts if not all(isinstance(v, torch.Tensor) for v in st.values())]
                self._parts.append(("optimizer", (obj, plain, mixed)))
            elif isinstance(obj, torch.Tensor):
                self._parts.append(("tensor", obj))
            elif isinstance(obj, Mapping):
                self._parts.append(("mapping", obj))
        if cacheable:
            self._held, self._keys, conts = self._signature()
            self._ckeys, self._cvals = _flat_items(conts)
        else:
            self._held = None
        self.param_keys = _param_keys(sources)
        opt = sources.get("optimizer")
        self.params = [p for g in opt.param_groups for p in g["params"]] if opt is not None else []
        self.param_names = ([[self.param_keys.get(id(p)) for p in g["params"]] for g in opt.param_groups]
                            if opt is not None else None)
        # (index over all groups, state dict) of parameters with state; those with non-tensor
        # values (re-encoded on every capture, set on every restore) listed apart
        state = opt.state if opt is not None else {}
        self.with_state = [(i, state[p]) for i, p in enumerate(self.params) if state.get(p)]
        self.non_tensor = [(i, st) for i, st in self.with_state
                           if any(not isinstance(v, torch.Tensor) for v in st.values())]
        self.version = 0  # bumped by Snapshot when a layout is built from this plan

    def _signature(self) -> Tuple[list, list, list]:
        """(objects compared by identity, keys and types compared by value, dicts and lists
        whose items are compared natively: see ``_flat_items``)."""
        objs: list = []
        keys: list = []
        conts: list = []
        for kind, obj in self._parts:
            if kind == "module":
                _module_parts(obj, objs, conts)
            elif kind == "optimizer":
                _optimizer_parts(*obj, objs, keys, conts)
            else:  # a tensor, or a mapping of tensors
                objs.append(obj)
                if kind == "mapping" and isinstance(obj, dict):
                    conts.append(obj)
                elif kind == "mapping":
                    keys += obj
                    objs += obj.values()
        return objs, keys, conts

    def valid(self, tensors: bool = True, strict: bool = False) -> bool:
        """Whether the live objects still have exactly this plan's structure and, with
        ``tensors``, its tensors' dtypes and shapes (``strict``: devices and contiguity too;
        restore writes into them). A native CopyPlan checks the tensors itself: callers that
        hold one pass ``tensors=False``."""
        if self._held is None:
            return False
        objs, keys, conts = self._signature()
        native = _ext.load()
        if not (keys == self._keys and native.same_objects(objs, self._held)
                and native.same_items(conts, self._ckeys, self._cvals)):
            return False
        if not tensors:
            return True
        ts = self.tensors
        if not (list(map(_DTYPE, ts)) == self.dtypes and list(map(_SHAPE, ts)) == self.shapes):
            return False
        return not strict or (list(map(_DEVICE, ts)) == self.devices
                              and all(map(torch.Tensor.is_contiguous, ts)))


def _flat_items(conts: list) -> Tuple[list, list]:
    """(dict keys, dict values and list items) of `conts` in order, as ``memstate._C.same_items``
    reads them (a dict's own entry order)."""
    keys: list = []
    values: list = []
    for c in conts:
        if isinstance(c, dict):
            keys += dict.keys(c)
            values += dict.values(c)
        else:
            values += c
    return keys, values


def _dynamic(sources: Dict[str, Any], rng: bool, bound: _Bound) -> Tuple[List[Tuple[str, torch.Tensor]], dict]:
    """The JSON meta tree of the state, and the tensors found inside it (optimizer
    hyperparameters and non-tensor state, stateful extras, sampler, scheduler, scaler, RNG
    states): recomputed on every capture (small, except per-parameter non-tensor optimizer
    state, which only parameters that have such values pay for)."""
    named: List[Tuple[str, torch.Tensor]] = []
    meta: dict = {"sources": list(bound.source_keys)}
    opt = sources.get("optimizer")
    if opt is not None:
        groups = [_encode({k: v for k, v in g.items() if k != "params"}, f"optimizer.param_groups.{gi}", named)
                  for gi, g in enumerate(opt.param_groups)]
        other = {str(i): _EMPTY for i, _ in bound.with_state}
        for i, st in bound.non_tensor:
            other[str(i)] = _encode({k: v for k, v in st.items() if not isinstance(v, torch.Tensor)},
                                    f"optimizer.state.{i}", named)
        meta["optimizer"] = {"param_groups": groups, "state": other, "n_params": len(bound.params),
                             "params": bound.param_names}
    extra = sources.get("extra")
    if extra is not None:
        meta["extra"] = {}
        for key, obj in extra.items():
            if _tensor_container(obj):
                meta["extra"][key] = "tensors"
            elif isinstance(obj, torch.Tensor):
                meta["extra"][key] = "tensor"
            else:
                meta["extra"][key] = {"state_dict": _encode(obj.state_dict(), f"extra.{key}", named)}
    for key in ("sampler", "scheduler", "scaler"):
        obj = sources.get(key)
        if obj is None:
            continue
        if not hasattr(obj, "state_dict") or not hasattr(obj, "load_state_dict"):
            raise TypeError(f"{key} must have state_dict() and load_state_dict(), got {type(obj).__name__}")
        meta[key] = _encode(obj.state_dict(), key, named)
    if rng:
        meta["rng"] = _capture_rng(named)
    for n, t in named:
        _check_tensor(n, t)
    return named, meta


_EMPTY = {"__dict__": []}  # _encode({}): the state of a parameter whose state values are all tensors


def _check_names(named: List[Tuple[str, Any, bool]]) -> None:
    seen = set()
    for n, _, _ in named:
        if n in seen:
            raise ValueError(f"two tensors of the state are both named {n!r}")
        seen.add(n)


def _param_keys(sources: Mapping[str, Any]) -> Dict[int, str]:
    """id(parameter) -> the name that identifies it across processes: ``model.{name}`` for the
    model's parameters, ``extra.{key}.{name}`` / ``extra.{key}`` for modules / tensors in
    ``extra``. The optimizer's state is bound to parameters by these names."""
    out: Dict[int, str] = {}
    model = sources.get("model")
    if isinstance(model, torch.nn.Module):
        for n, p in model.named_parameters():
            out.setdefault(id(p), f"model.{n}")
    extra = sources.get("extra")
    for key, obj in (extra.items() if isinstance(extra, Mapping) else ()):
        if isinstance(obj, torch.nn.Module):
            for n, p in obj.named_parameters():
                out.setdefault(id(p), f"extra.{key}.{n}")
        elif isinstance(obj, torch.Tensor):
            out.setdefault(id(obj), f"extra.{key}")
    return out


def _layout(named: List[Tuple[str, torch.Tensor, bool]], device_of) -> Tuple[List[_Entry], Dict[str, int]]:
    """Entries with aligned offsets per arena; arena sizes by device key."""
    sizes: Dict[str, int] = {}
    entries = []
    for name, t, in_state in named:
        dev = device_of(t)
        off = (sizes.get(str(dev), 0) + ALIGN - 1) // ALIGN * ALIGN
        nb = _nbytes(t)
        entries.append(_Entry(name, t.dtype, tuple(t.shape), t.device, off, nb, in_state))
        sizes[str(dev)] = off + nb
    return entries, sizes


def _copy(src: List[torch.Tensor], dst: List[torch.Tensor], fingerprint: bool) -> List[Tuple[List[int], torch.Tensor]]:
    """Native fused copy (+ fingerprint), one call per device. Returns (indices, int64 [n, 2]
    lanes on the device) per call, without a host sync."""
    ops = _ext.ops()
    groups: Dict[torch.device, List[int]] = {}
    for i, s in enumerate(src):
        groups.setdefault(s.device, []).append(i)
    parts = []
    for idxs in groups.values():
        rows = ops.copy_fingerprint([src[i] for i in idxs], [dst[i] for i in idxs], fingerprint)
        parts.append((idxs, rows))
    return parts


def _rows_to_cpu(n: int, parts: List[Tuple[List[int], torch.Tensor]], index_map=None) -> torch.Tensor:
    """int64 [n, 2] rows in entry order from (indices, rows) parts; indices None: all, in order."""
    if len(parts) == 1 and parts[0][0] is None and index_map is None:
        rows = parts[0][1]
        return rows if rows.is_cpu else rows.cpu()
    out = torch.zeros(n, 2, dtype=torch.int64)
    for idxs, rows in parts:
        if idxs is None:
            idxs = list(range(n))
        target = idxs if index_map is None else [index_map[i] for i in idxs]
        out[torch.tensor(target, dtype=torch.long)] = rows.cpu()
    return out


def _bump_versions(tensors: List[torch.Tensor]) -> None:
    """Tell autograd the tensors were modified in place (the native copy does not)."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch versions that take one tensor
        for t in tensors:
            torch.autograd.graph.increment_version(t)



def _collect_tensor_names(sources) -> Tuple[Dict[str, torch.Tensor], None]:
    """Live tensors by snapshot name for the sources whose tensors are restored in place."""
    out: Dict[str, torch.Tensor] = {}
    model = sources.get("model")
    if model is not None:
        out.update({f"model.{n}": t for n, t in _local(named_state_tensors(model))})
    opt = sources.get("optimizer")
    if opt is not None:
        out.update({f"optimizer.{n}": t for n, t in _local(named_state_tensors(opt))})
    for key, obj in (sources.get("extra") or {}).items():
        if isinstance(obj, torch.Tensor):
            out.update(_local([(f"extra.{key}", obj)]))
        elif _tensor_container(obj):
            out.update({f"extra.{key}.{n}": t for n, t in _local(named_state_tensors(obj))})
    return out, None



