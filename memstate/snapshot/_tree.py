"""The JSON state tree: state_dict-like objects as JSON (tensors are referenced by name and
stored in the arena), and back."""
from __future__ import annotations

from typing import Any, List, Mapping, Tuple

import numpy as np
import torch

from memstate.snapshot._common import SnapshotError


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

