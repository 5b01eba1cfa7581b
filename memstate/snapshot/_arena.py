"""The arena side of a snapshot: which live tensors a state has (and its JSON tree), their
64-byte aligned layout in one arena per device, and the fused native copy + fingerprint."""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Tuple

import torch

from memstate import _ext
from memstate.fingerprint import named_state_tensors
from memstate.snapshot._common import ALIGN, _Entry, _check_tensor, _nbytes
from memstate.snapshot._rng import _capture_rng
from memstate.snapshot._tree import _encode


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



