"""Exact, fast snapshots of the whole training state.

``Snapshot.capture(model, optimizer, ...)`` copies every tensor of the training state into one
preallocated arena per device with the native fused copy + fingerprint op (one pass over
memory), and records the non-tensor state (optimizer hyperparameters, scheduler, scaler and
sampler state, RNG states) as a JSON tree. ``restore()`` copies everything back into the same
live objects, in place, verifying every tensor's msfp1 fingerprint in the same pass.
``save(path)`` writes a directory: ``manifest.json`` plus one raw data file, with checksums,
atomically; ``Snapshot.load(path, model=..., ...)`` verifies every checksum before binding the
saved state to live objects. Nothing is ever pickled.

Tensor names (also those of ``fingerprint()``): ``model.{name}``, ``optimizer.state.{i}.{key}``,
``extra.{key}[.{name}]``; further tensors of the snapshot (RNG states, tensors inside
scheduler/scaler/sampler state) are named ``rng.*``, ``scheduler.*``, ... and are verified by
checksum but are not part of ``fingerprint()``.
"""
from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np
import torch

from memstate import _ext
from memstate.fingerprint import Fingerprint, StateFingerprint, named_state_tensors

__all__ = ["Snapshot", "SnapshotError"]

FORMAT = "memstate-snapshot"
FORMAT_VERSION = 1
ALIGN = 64  # bytes: every tensor starts on a 64-byte boundary of its arena
_M64 = (1 << 64) - 1
_SOURCES = ("model", "optimizer", "sampler", "scheduler", "scaler", "extra")


class SnapshotError(ValueError):
    """A snapshot file or binding is invalid: corrupt, truncated, tampered or mismatched."""


# ----------------------------------------------------------------------------------- JSON tree
def _encode(obj: Any, path: str, tensors: List[Tuple[str, torch.Tensor]]) -> Any:
    """JSON-able form of a state_dict-like tree; tensors are appended to `tensors` by name."""
    if isinstance(obj, torch.Tensor):
        tensors.append((path, obj))
        return {"__tensor__": path}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return obj
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else {"__float__": repr(obj)}
    if isinstance(obj, np.generic):
        return _encode(obj.item(), path, tensors)
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": {"dtype": obj.dtype.str, "shape": list(obj.shape), "data": obj.ravel().tolist()}}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{path}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        return {"__dict__": [[_encode(k, f"{path}.<key>", tensors), _encode(v, f"{path}.{k}", tensors)]
                             for k, v in obj.items()]}
    raise TypeError(f"cannot snapshot {path}: a {type(obj).__name__} is not a tensor, number, string or container")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]].clone()
        if "__float__" in obj:
            return float(obj["__float__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {_decode(k, tensors): _decode(v, tensors) for k, v in obj["__dict__"]}
        if "__ndarray__" in obj:
            a = obj["__ndarray__"]
            dtype = np.dtype(a["dtype"])
            if dtype.kind not in "biufc" or dtype.itemsize > 16:  # numbers only: bounded, no objects
                raise SnapshotError(f"unsupported ndarray dtype {a['dtype']!r} in snapshot")
            return np.array(a["data"], dtype=dtype).reshape(a["shape"])
        raise SnapshotError(f"unknown JSON node {sorted(obj)}")
    return obj


# ----------------------------------------------------------------------------------- RNG
def _capture_rng(tensors: List[Tuple[str, torch.Tensor]]) -> dict:
    tensors.append(("rng.torch", torch.get_rng_state()))
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors.append((f"rng.cuda.{i}", s))
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    meta = {
        "numpy": {"name": name, "keys": [int(k) for k in keys], "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next},
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }
    from memstate import rng as _rng

    streams = _rng.active_state()  # every live RngContract (consumption logs), by name
    if streams:
        meta["memstate"] = streams
    return meta


def _check_rng(meta: Any, tensors: Mapping[str, torch.Tensor]) -> dict:
    """Validated RNG states of a snapshot (SnapshotError naming the one that is invalid), each
    tried on a scratch generator: nothing global is touched."""
    if not isinstance(meta, Mapping):
        raise SnapshotError("rng: the RNG state must be a dict")
    out: dict = {"torch": tensors["rng.torch"].clone()}
    try:
        torch.Generator().set_state(out["torch"])
    except (RuntimeError, TypeError) as e:
        raise SnapshotError(f"rng.torch: not a torch CPU generator state ({e})") from None
    n_cuda = meta.get("cuda_devices", 0)
    if not isinstance(n_cuda, int) or n_cuda < 0:
        raise SnapshotError(f"rng.cuda_devices must be a non-negative int, got {n_cuda!r}")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n_cuda > available:
        raise SnapshotError(f"rng: the snapshot holds the RNG states of {n_cuda} CUDA devices, this process has {available}")
    out["cuda"] = []
    for i in range(n_cuda):
        state = tensors[f"rng.cuda.{i}"].clone()
        try:
            torch.Generator(device=f"cuda:{i}").set_state(state)
        except (RuntimeError, TypeError) as e:
            raise SnapshotError(f"rng.cuda.{i}: not a CUDA generator state ({e})") from None
        out["cuda"].append(state)
    n, p = meta["numpy"], meta["python"]
    try:
        out["numpy"] = (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
        np.random.RandomState().set_state(out["numpy"])
    except (KeyError, TypeError, ValueError, OverflowError, IndexError) as e:
        raise SnapshotError(f"rng.numpy: not a numpy RandomState state ({type(e).__name__}: {e})") from None
    try:
        out["python"] = (p["version"], tuple(p["state"]), p["gauss_next"])
        random.Random().setstate(out["python"])
    except (KeyError, TypeError, ValueError, OverflowError, IndexError) as e:
        raise SnapshotError(f"rng.python: not a Python random state ({type(e).__name__}: {e})") from None
    out["memstate"] = None
    if meta.get("memstate"):
        from memstate import rng as _rng

        try:
            _rng.validate_active_state(meta["memstate"])
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"rng: the snapshot holds the state of RngContract(s) "
                                f"{sorted(map(str, meta['memstate']))}: {e}") from None
        out["memstate"] = meta["memstate"]
    return out


def _restore_rng(state: dict) -> None:
    """Sets every RNG from ``_check_rng``'s output (cannot fail)."""
    torch.set_rng_state(state["torch"])
    for i, s in enumerate(state["cuda"]):
        torch.cuda.set_rng_state(s, i)
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["memstate"]:
        from memstate import rng as _rng

        _rng.load_active_state(state["memstate"])


# ----------------------------------------------------------------------------------- optimizer binding
_HYPER_POLICIES = ("snapshot", "live", "check")


def _param_index(text: Any, n: int) -> int:
    """A saved parameter index (str or int), checked against the n bound parameters."""
    if isinstance(text, bool) or not isinstance(text, (int, str)) or not str(text).isdigit() or int(text) >= n:
        raise SnapshotError(f"optimizer parameter index {text!r} is not in [0, {n})")
    return int(text)


def _same(a: Any, b: Any) -> bool:
    """Exact equality of hyperparameter values (type included; NaN equals NaN; tensors by value)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and torch.equal(a.detach().cpu().reshape(-1).view(torch.uint8)
                                                       if a.numel() else a.cpu(),
                                                       b.detach().cpu().reshape(-1).view(torch.uint8)
                                                       if b.numel() else b.cpu()))
    if isinstance(a, (list, tuple)) or isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return type(a) is type(b) and a == b


def _names(names: List[Optional[str]]) -> str:
    shown = ", ".join(str(n) for n in names[:6])
    return shown + (f", ... ({len(names)} in all)" if len(names) > 6 else "")


def _bind_optimizer(opt, meta: Mapping[str, Any], keys: Dict[int, str], tensors, policy: str):
    """(live parameter for each saved parameter index, hyperparameters to set or None).

    Parameters are bound by the names recorded at capture (``_param_keys``): group g of the
    snapshot must hold exactly the parameters of live group g (order within a group may
    differ). Parameters without a name (not in the model or extra) are bound by position.
    Hyperparameters: ``policy`` "snapshot" returns the saved ones to set, "live" None, "check"
    refuses any difference naming the group and key."""
    saved_groups = [_decode(g, tensors) for g in meta["param_groups"]]
    if len(saved_groups) != len(opt.param_groups):
        raise SnapshotError(f"optimizer: the snapshot has {len(saved_groups)} param group(s), the live optimizer "
                            f"{len(opt.param_groups)}; the group structure changed")
    n_live = sum(len(g["params"]) for g in opt.param_groups)
    if n_live != meta["n_params"]:
        raise SnapshotError(f"optimizer: the optimizer has {n_live} parameters, the snapshot {meta['n_params']}")
    saved_names = meta.get("params")  # absent in snapshots of older memstate: positional binding
    binding: List[torch.Tensor] = []
    for gi, g in enumerate(opt.param_groups):
        live = [keys.get(id(p)) for p in g["params"]]
        saved = saved_names[gi] if saved_names is not None else [None] * len(live)
        if not isinstance(saved, list) or len(saved) != len(live):
            raise SnapshotError(f"optimizer param group {gi}: the snapshot has {len(saved)} parameters "
                                f"({_names(saved)}), the live group {len(live)} ({_names(live)})")
        by_name = dict(zip(live, g["params"]))
        named = None not in live and None not in saved and len(by_name) == len(live) == len(set(saved))
        if named and set(saved) == set(live):
            binding += [by_name[n] for n in saved]
        elif saved_names is None or (not named and saved == live):
            binding += list(g["params"])
        else:
            only_saved = [n for n in saved if n not in by_name]
            only_live = [n for n in live if n not in set(saved)]
            raise SnapshotError(f"optimizer param group {gi}: different parameters: in the snapshot only "
                                f"{_names(only_saved) or '-'}; live only {_names(only_live) or '-'}")
    if policy == "live":
        return binding, None
    if policy == "check":
        for gi, (g, saved) in enumerate(zip(opt.param_groups, saved_groups)):
            for k in sorted(set(saved) | (set(g) - {"params"}), key=str):
                if k not in g or k not in saved or not _same(g[k], saved[k]):
                    raise SnapshotError(
                        f"optimizer param group {gi}, key {k!r}: the snapshot holds "
                        f"{saved.get(k, '<absent>')!r}, the live optimizer {g.get(k, '<absent>')!r}; pass "
                        f"hyperparameters='snapshot' to restore the snapshot's values (e.g. a scheduled "
                        f"learning rate) or 'live' to keep the live ones")
        return binding, None
    for gi, saved in enumerate(saved_groups):
        if not isinstance(saved, dict) or "params" in saved:
            raise SnapshotError(f"optimizer param group {gi}: invalid hyperparameters in the snapshot")
    return binding, saved_groups


@dataclass
class _Plan:
    """What restore() writes, all checked (Snapshot._plan)."""
    targets: List[Optional[torch.Tensor]]  # live tensor per entry; None: allocate (optimizer state) / not in place
    tensors: Dict[str, torch.Tensor]  # non-state entries (RNG, tensors inside state dicts), arena views
    binding: Optional[List[torch.Tensor]]  # live parameter per saved optimizer index (None: no optimizer)
    groups: Optional[List[dict]]  # hyperparameters to set per group, or None
    opt_state: Dict[int, dict]  # saved index -> state (tensors filled in by _apply)
    loads: List[Tuple[str, Any, Any]]  # (what, object, decoded state_dict) for load_state_dict
    rng: Optional[dict]  # _check_rng output


# ----------------------------------------------------------------------------------- entries
@dataclass
class _Entry:
    name: str
    dtype: torch.dtype
    shape: Tuple[int, ...]
    device: torch.device
    offset: int  # in the arena of its device
    nbytes: int
    in_state: bool = True  # part of fingerprint() / fingerprint_state of the live objects


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise SnapshotError(f"unknown dtype {name!r} in snapshot")
    return dt


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bytes_view(t: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view of a contiguous tensor's bytes."""
    return t.reshape(-1).view(torch.uint8) if t.numel() else torch.empty(0, dtype=torch.uint8, device=t.device)


def _check_tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_meta or t.is_nested or t.is_quantized:
        raise TypeError(f"{name}: only dense strided tensors can be snapshotted (got layout {t.layout})")
    return t.detach()


# ----------------------------------------------------------------------------------- collection
def _collect(sources: Dict[str, Any], rng: bool) -> Tuple[List[Tuple[str, torch.Tensor, bool]], dict]:
    """(name, live tensor, in_state) for every tensor of the state, and the JSON meta tree."""
    named: List[Tuple[str, torch.Tensor, bool]] = []
    meta: dict = {"sources": sorted(k for k, v in sources.items() if v is not None)}
    model = sources.get("model")
    if model is not None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        named += [(f"model.{n}", t, True) for n, t in named_state_tensors(model)]
    opt = sources.get("optimizer")
    if opt is not None:
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(opt).__name__}")
        named += [(f"optimizer.{n}", t, True) for n, t in named_state_tensors(opt)]
        other, groups, extra_tensors = {}, [], []
        index = 0
        for gi, g in enumerate(opt.param_groups):
            groups.append(_encode({k: v for k, v in g.items() if k != "params"}, f"optimizer.param_groups.{gi}", extra_tensors))
            for p in g["params"]:
                st = opt.state.get(p)
                if st:
                    other[str(index)] = _encode({k: v for k, v in st.items() if not isinstance(v, torch.Tensor)},
                                                f"optimizer.state.{index}", extra_tensors)
                index += 1
        keys = _param_keys(sources)
        meta["optimizer"] = {"param_groups": groups, "state": other, "n_params": index,
                             "params": [[keys.get(id(p)) for p in g["params"]] for g in opt.param_groups]}
        named += [(n, t, False) for n, t in extra_tensors]
    extra = sources.get("extra")
    if extra is not None:
        if not isinstance(extra, Mapping):
            raise TypeError(f"extra must be a dict of name -> module, tensor or stateful object, got {type(extra).__name__}")
        meta["extra"] = {}
        for key, obj in extra.items():
            if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)) or (
                    isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())):
                named += [(f"extra.{key}.{n}", t, True) for n, t in named_state_tensors(obj)]
                meta["extra"][key] = "tensors"
            elif isinstance(obj, torch.Tensor):
                named.append((f"extra.{key}", obj, True))
                meta["extra"][key] = "tensor"
            elif hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict"):
                tens: List[Tuple[str, torch.Tensor]] = []
                meta["extra"][key] = {"state_dict": _encode(obj.state_dict(), f"extra.{key}", tens)}
                named += [(n, t, False) for n, t in tens]
            else:
                raise TypeError(
                    f"extra[{key!r}] is a {type(obj).__name__}: pass a module, a tensor, a dict of tensors or an "
                    f"object with state_dict()/load_state_dict() (keep counters such as a queue pointer in a tensor)"
                )
    for key in ("sampler", "scheduler", "scaler"):
        obj = sources.get(key)
        if obj is None:
            continue
        if not hasattr(obj, "state_dict") or not hasattr(obj, "load_state_dict"):
            raise TypeError(f"{key} must have state_dict() and load_state_dict(), got {type(obj).__name__}")
        tens = []
        meta[key] = _encode(obj.state_dict(), key, tens)
        named += [(n, t, False) for n, t in tens]
    if rng:
        tens = []
        meta["rng"] = _capture_rng(tens)
        named += [(n, t, False) for n, t in tens]
    seen = set()
    for n, t, _ in named:
        if n in seen:
            raise ValueError(f"two tensors of the state are both named {n!r}")
        seen.add(n)
        _check_tensor(n, t)
    return named, meta


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
    out = torch.zeros(n, 2, dtype=torch.int64)
    for idxs, rows in parts:
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


# ----------------------------------------------------------------------------------- Snapshot
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
        self._last_srcs: List[torch.Tensor] = []
        self._fp_parts: List[Tuple[List[int], torch.Tensor]] = []
        self._fp_rows: Optional[torch.Tensor] = None
        self._hyper = "snapshot"  # restore(): param-group hyperparameters (see _HYPER_POLICIES)

    # ------------------------------------------------------------------ capture
    @classmethod
    def capture(cls, model: Optional[torch.nn.Module] = None, optimizer: Optional[torch.optim.Optimizer] = None, *,
                sampler=None, scheduler=None, scaler=None, extra: Optional[Mapping[str, Any]] = None,
                rng: bool = True, to: Optional[str] = None) -> "Snapshot":
        """Captures the state of the given live objects.

        - ``model``: parameters and buffers (BatchNorm statistics included);
        - ``optimizer``: every state tensor, step counters, param_groups hyperparameters;
        - ``sampler``, ``scheduler``, ``scaler``: anything with ``state_dict()``;
        - ``extra``: name -> module (EMA/teacher), tensor (queue, pointer) or stateful object;
        - ``rng``: torch CPU and every CUDA generator, numpy's and Python's global RNGs;
        - ``to="cpu"``: keep device tensors in pinned host memory (copied asynchronously on a
          side stream) for state that does not fit beside the model.
        """
        if to not in (None, "cpu"):
            raise ValueError(f"to must be None or 'cpu', got {to!r}")
        snap = cls()
        snap._sources = {"model": model, "optimizer": optimizer, "sampler": sampler, "scheduler": scheduler,
                         "scaler": scaler, "extra": dict(extra) if extra is not None else None}
        snap._rng = bool(rng)
        snap._to = to
        snap._capture()
        return snap

    def recapture(self) -> "Snapshot":
        """Captures the same live objects again, reusing the arenas when the layout (names,
        shapes, dtypes, devices) is unchanged: no allocation on this path."""
        self._capture()
        return self

    def _arena_device(self, t: torch.Tensor) -> torch.device:
        return torch.device("cpu") if self._to == "cpu" else t.device

    def _capture(self) -> None:
        self._wait()
        named, meta = _collect(self._sources, self._rng)
        srcs = [t for _, t, _ in named]
        # Fast path (recapture of the same live tensors): same objects, shapes and dtypes as the
        # last capture, so the layout, the arenas and the arena views are reused as they are.
        same = (len(srcs) == len(self._last_srcs) and len(self._slots) == len(srcs) and all(
            a is b and a.dtype == e.dtype and a.shape == e.shape
            for a, b, e in zip(srcs, self._last_srcs, self._entries)))
        if not same:
            for n, t, _ in named:
                _check_tensor(n, t)
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
        self._last_srcs = srcs
        srcs = [t.detach() for t in srcs]
        srcs = [t if t.is_contiguous() and not t.is_conj() and not t.is_neg()
                else t.resolve_conj().resolve_neg().contiguous() for t in srcs]
        # tensors whose arena is on their device: one fused copy + fingerprint per device
        if self._to != "cpu":
            local, spilled = list(range(len(srcs))), []
        else:
            local = [i for i, t in enumerate(srcs) if t.device.type == "cpu"]
            spilled = [i for i, t in enumerate(srcs) if t.device.type != "cpu"]
        parts = [([local[j] for j in idxs], rows)
                 for idxs, rows in _copy([srcs[i] for i in local], [self._slots[i] for i in local], True)]
        if spilled:  # to="cpu": fingerprint on the device, copy to pinned memory on a side stream
            parts += self._spill([srcs[i] for i in spilled], [self._slots[i] for i in spilled], spilled)
        self._fp_parts, self._fp_rows = parts, None
        self._meta = meta

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
        return [Fingerprint._from_lanes(a & _M64, b & _M64) for a, b in self._fingerprint_rows().tolist()]

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
    def _plan(self, hyperparameters: Optional[str] = None) -> "_Plan":
        """Every check of every source, before anything live is written: tensor names, shapes,
        dtypes and devices; the optimizer's parameters (bound by name), group structure and
        hyperparameters; the decoded state of the sampler, scheduler, scaler and stateful
        extras (``validate_state_dict`` where the object has one); every RNG state and RNG
        contract. Raises SnapshotError naming the first mismatch; modifies nothing."""
        policy = hyperparameters or self._hyper
        if policy not in _HYPER_POLICIES:
            raise ValueError(f"hyperparameters must be one of {', '.join(_HYPER_POLICIES)}, got {policy!r}")
        try:
            return self._plan_unchecked(policy)
        except SnapshotError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError, RecursionError,
                RuntimeError) as e:
            raise SnapshotError(f"the snapshot's state cannot be applied: {type(e).__name__}: {e}") from None

    def _plan_unchecked(self, policy: str) -> "_Plan":
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
        return _Plan(targets, tensors, binding, groups, opt_state, loads, rng_state)

    def restore(self, *, hyperparameters: Optional[str] = None) -> None:
        """Writes the captured state back into the live objects, in place, verifying every
        tensor's fingerprint in the same pass.

        Every check of every source runs first (see ``_plan``): a mismatch raises SnapshotError
        before any live state is modified. ``hyperparameters`` overrides how param-group
        hyperparameters are treated (default: ``"snapshot"`` for a captured snapshot, the
        ``Snapshot.load`` choice for a loaded one): ``"snapshot"`` sets them to the captured
        values, ``"live"`` keeps the live ones, ``"check"`` refuses any difference."""
        self._wait()
        self._apply(self._plan(hyperparameters))

    def _apply(self, plan: "_Plan") -> None:
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
        for t, dst in tmp_back:
            t.copy_(dst)
        want = self._fingerprint_rows()
        sel = torch.tensor(in_place, dtype=torch.long)
        bad = [] if torch.equal(got[sel], want[sel]) else [
            self._entries[i].name for i in in_place if not torch.equal(got[i], want[i])]
        if bad:  # the arena itself changed in memory since capture/load: nothing to fall back to
            raise SnapshotError(f"snapshot arena corrupted in memory: fingerprints differ for {', '.join(bad[:10])}")
        _bump_versions([targets[i] for i in in_place if self._entries[i].name.startswith(("model.", "extra."))])
        # 3. the optimizer's state and param groups, bound by parameter name
        opt = self._sources.get("optimizer")
        if plan.binding is not None:
            for e, t in zip(self._entries, targets):
                if e.in_state and e.name.startswith("optimizer.state."):
                    _, _, index, key = e.name.split(".", 3)
                    plan.opt_state[int(index)][key] = t
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

    # ------------------------------------------------------------------ persistence
    def save(self, path: str, *, timeout: Optional[float] = None) -> None:
        """Writes the snapshot to directory `path` atomically: a new data file under a fresh
        name, then the manifest via a temporary name, fsync and rename; then the data file of
        the previous manifest (and nothing else) is removed. A crash at any point leaves the
        previous snapshot at `path` intact; a failed save removes what it wrote.

        Writers take an exclusive ``fcntl.flock`` on ``path/.memstate.lock``: a second writer
        raises SnapshotError at once, or waits up to ``timeout`` seconds for the lock. The free
        space is checked first: the new data file and manifest must fit while the old ones
        still exist (SnapshotError naming the bytes needed and free otherwise)."""
        from memstate import _persist

        self._wait()
        _persist.save(self, path, timeout)

    @classmethod
    def load(cls, path: str, model=None, optimizer=None, *, sampler=None, scheduler=None, scaler=None,
             extra=None, rng: bool = True, hyperparameters: str = "check") -> "Snapshot":
        """Reads a saved snapshot, verifies every checksum and fingerprint, and binds it to
        the given live objects, running every check ``restore()`` makes (names, shapes, dtypes,
        the optimizer's parameters bound by name and its group structure, sampler/scheduler/
        scaler/extra state, RNG states). Nothing live is touched until ``restore()``.

        ``hyperparameters``: ``"check"`` (default) refuses a param group whose hyperparameters
        (lr, betas, weight_decay, ...) differ from the snapshot's, naming the group and key;
        ``"snapshot"`` restores the snapshot's values (e.g. a scheduled learning rate when
        resuming); ``"live"`` keeps the live optimizer's."""
        from memstate import _persist

        return _persist.load(cls, path, dict(model=model, optimizer=optimizer, sampler=sampler, scheduler=scheduler,
                                             scaler=scaler, extra=dict(extra) if extra is not None else None), rng,
                             hyperparameters)

    def __repr__(self):
        return (f"Snapshot({len(self._entries)} tensors, {self.nbytes / 2**20:.1f} MiB, "
                f"sources={self._meta.get('sources')}, rng={'rng' in self._meta})")


def _typed(raw: torch.Tensor, e: _Entry) -> torch.Tensor:
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=e.dtype, device=raw.device)
    return raw.view(e.dtype).reshape(e.shape)


def _collect_tensor_names(sources) -> Tuple[Dict[str, torch.Tensor], None]:
    """Live tensors by snapshot name for the sources whose tensors are restored in place."""
    out: Dict[str, torch.Tensor] = {}
    model = sources.get("model")
    if model is not None:
        out.update({f"model.{n}": t for n, t in named_state_tensors(model)})
    opt = sources.get("optimizer")
    if opt is not None:
        out.update({f"optimizer.{n}": t for n, t in named_state_tensors(opt)})
    for key, obj in (sources.get("extra") or {}).items():
        if isinstance(obj, torch.Tensor):
            out[f"extra.{key}"] = obj
        elif isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)) or (
                isinstance(obj, Mapping) and all(isinstance(v, torch.Tensor) for v in obj.values())):
            out.update({f"extra.{key}.{n}": t for n, t in named_state_tensors(obj)})
    return out, None


