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
            return np.array(a["data"], dtype=np.dtype(a["dtype"])).reshape(a["shape"])
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


def _restore_rng(meta: dict, tensors: Mapping[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"].clone())
    for i in range(meta.get("cuda_devices", 0)):
        torch.cuda.set_rng_state(tensors[f"rng.cuda.{i}"].clone(), i)
    n = meta["numpy"]
    np.random.set_state((n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if meta.get("memstate"):
        from memstate import rng as _rng

        _rng.load_active_state(meta["memstate"])


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
        meta["optimizer"] = {"param_groups": groups, "state": other, "n_params": index}
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
        self._pending: Optional[Tuple[Any, List[torch.Tensor], List[int]]] = None
        self._slots: List[torch.Tensor] = []
        self._last_srcs: List[torch.Tensor] = []
        self._fp_parts: List[Tuple[List[int], torch.Tensor]] = []
        self._fp_rows: Optional[torch.Tensor] = None

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
            rows = _ext.ops().fingerprint([srcs[i] for i in spilled])
            parts.append((spilled, rows))
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for i in spilled:
                    self._slots[i].copy_(_bytes_view(srcs[i]), non_blocking=True)
                    srcs[i].record_stream(stream)
            event = torch.cuda.Event()
            event.record(stream)
            self._pending = (event, [srcs[i] for i in spilled], spilled)
        self._fp_parts, self._fp_rows = parts, None
        self._meta = meta

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
        if self._pending is not None:
            self._pending[0].synchronize()
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
    def _live_targets(self) -> List[torch.Tensor]:
        """Live tensors to write each entry into, checked before anything is modified.

        Model/extra tensors must exist with the captured shape, dtype and device. Optimizer
        state tensors are written in place where a matching one exists, else allocated (the
        optimizer's state is then rebuilt to match the capture)."""
        live_named, _ = _collect_tensor_names(self._sources)
        targets = []
        missing = [e.name for e in self._entries if e.in_state and not e.name.startswith("optimizer.")
                   and e.name not in live_named]
        captured = {e.name for e in self._entries}
        extra_live = [n for n in live_named if not n.startswith("optimizer.") and n not in captured]
        if missing or extra_live:
            raise SnapshotError(
                "the live objects do not match the snapshot: "
                + (f"missing {', '.join(missing[:10])}" if missing else "")
                + ("; " if missing and extra_live else "")
                + (f"not in the snapshot: {', '.join(extra_live[:10])}" if extra_live else ""))
        saved_contracts = set(self._meta.get("rng", {}).get("memstate", {}))
        if saved_contracts:
            from memstate import rng as _rng

            missing_contracts = sorted(saved_contracts - set(_rng.active_names()))
            if missing_contracts:
                raise SnapshotError(f"the snapshot holds the state of RngContract(s) {missing_contracts}; "
                                    f"create them (same names) before restore()")
        opt = self._sources.get("optimizer")
        if opt is not None and "optimizer" in self._meta:
            n_live = sum(len(g["params"]) for g in opt.param_groups)
            if n_live != self._meta["optimizer"]["n_params"]:
                raise SnapshotError(f"the optimizer has {n_live} parameters, the snapshot {self._meta['optimizer']['n_params']}")
        for e in self._entries:
            t = live_named.get(e.name)
            if e.name.startswith("optimizer.state.") and e.in_state:
                if t is None or t.shape != e.shape or t.dtype != e.dtype or t.device != e.device:
                    t = None  # allocated below
            elif t is not None and (tuple(t.shape) != e.shape or t.dtype != e.dtype or t.device != e.device):
                raise SnapshotError(
                    f"{e.name}: live tensor is {_dtype_name(t.dtype)}{list(t.shape)} on {t.device}, the snapshot "
                    f"holds {_dtype_name(e.dtype)}{list(e.shape)} on {e.device}")
            targets.append(t)
        return targets

    def restore(self) -> None:
        """Writes the captured state back into the live objects, in place, verifying every
        tensor's fingerprint in the same pass. Raises before modifying anything if the live
        objects no longer match the snapshot (names, shapes, dtypes, devices)."""
        self._wait()
        targets = self._live_targets()
        opt = self._sources.get("optimizer")
        # allocate optimizer state tensors that do not exist live (or changed shape)
        for i, (e, t) in enumerate(zip(self._entries, targets)):
            if t is None and e.name.startswith("optimizer.state."):
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
        if bad:
            raise SnapshotError(f"snapshot arena corrupted in memory: fingerprints differ for {', '.join(bad[:10])}")
        _bump_versions([targets[i] for i in in_place if self._entries[i].name.startswith(("model.", "extra."))])
        tensors = {e.name: _typed(self._slot(e), e) for e, t in zip(self._entries, targets) if not e.in_state}
        if opt is not None and "optimizer" in self._meta:
            self._restore_optimizer(opt, targets, tensors)
        extra = self._sources.get("extra") or {}
        for key, kind in self._meta.get("extra", {}).items():
            if isinstance(kind, dict):
                extra[key].load_state_dict(_decode(kind["state_dict"], tensors))
        for key in ("sampler", "scheduler", "scaler"):
            if key in self._meta and self._sources.get(key) is not None:
                self._sources[key].load_state_dict(_decode(self._meta[key], tensors))
        if "rng" in self._meta:
            _restore_rng(self._meta["rng"], tensors)

    def _restore_optimizer(self, opt, targets, tensors) -> None:
        meta = self._meta["optimizer"]
        params = [p for g in opt.param_groups for p in g["params"]]
        new_state: Dict[int, dict] = {}
        for e, t in zip(self._entries, targets):
            if e.in_state and e.name.startswith("optimizer.state."):
                _, _, index, key = e.name.split(".", 3)
                new_state.setdefault(int(index), {})[key] = t
        for index, values in meta["state"].items():
            new_state.setdefault(int(index), {}).update(_decode(values, tensors))
        for gi, (g, saved) in enumerate(zip(opt.param_groups, meta["param_groups"])):
            for k, v in _decode(saved, tensors).items():
                g[k] = v
        for i, p in enumerate(params):
            if i in new_state:
                st = opt.state[p]
                for k in [k for k in st if k not in new_state[i]]:
                    del st[k]
                st.update(new_state[i])
            elif p in opt.state:
                del opt.state[p]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str) -> None:
        """Writes the snapshot to directory `path` atomically: a new data file under a fresh
        name, then the manifest via a temporary name, fsync and rename. A crash at any point
        leaves the previous snapshot at `path` intact."""
        from memstate import _persist

        self._wait()
        _persist.save(self, path)

    @classmethod
    def load(cls, path: str, model=None, optimizer=None, *, sampler=None, scheduler=None, scaler=None,
             extra=None, rng: bool = True) -> "Snapshot":
        """Reads a saved snapshot, verifies every checksum and fingerprint, and binds it to
        the given live objects (names, shapes and dtypes must match). Nothing live is touched
        until ``restore()``."""
        from memstate import _persist

        return _persist.load(cls, path, dict(model=model, optimizer=optimizer, sampler=sampler, scheduler=scheduler,
                                             scaler=scaler, extra=dict(extra) if extra is not None else None), rng)

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


