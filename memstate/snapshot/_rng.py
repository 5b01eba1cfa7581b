"""RNG capture: torch's CPU and CUDA generators, numpy's and Python's global RNGs and every
live RngContract; validation on scratch generators; restore."""
from __future__ import annotations

import random
from collections.abc import MutableMapping
from typing import Any, List, Mapping, Tuple

import numpy as np
import torch

from memstate.snapshot._common import SnapshotError


class _RngMeta(MutableMapping):
    """``meta["rng"]`` of a capture: the numpy and Python states as the generators returned them
    (a uint32 array and a tuple of ints), converted to their JSON tree only when the tree is
    read (saving, comparing, inspecting), since converting 1,249 numbers to Python lists costs
    more than the whole capture of a small state. Once read, the tree is the state (a change
    to it is what ``restore()`` checks and sets)."""

    __slots__ = ("_raw", "_tree")

    def __init__(self, raw: tuple):
        self._raw = raw  # (numpy state tuple, python state tuple, cuda device count, RngContract states or None)
        self._tree = None

    def raw(self):
        """The raw states, or None once the tree has been read."""
        return self._raw

    def tree(self) -> dict:
        if self._tree is None:
            (name, keys, pos, has_gauss, cached), (version, pystate, gauss_next), n_cuda, streams = self._raw
            self._tree = {
                "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                          "cached_gaussian": float(cached)},
                "python": {"version": version, "state": list(pystate), "gauss_next": gauss_next},
                "cuda_devices": n_cuda,
            }
            if streams:
                self._tree["memstate"] = streams
            self._raw = None
        return self._tree

    def __getitem__(self, key):
        return self.tree()[key]

    def __setitem__(self, key, value):
        self.tree()[key] = value

    def __delitem__(self, key):
        del self.tree()[key]

    def __iter__(self):
        return iter(self.tree())

    def __len__(self):
        return len(self.tree())


def _json_meta(meta: dict) -> dict:
    """`meta` with a captured ``_RngMeta`` replaced by its JSON tree (for the manifest)."""
    rng = meta.get("rng")
    return {**meta, "rng": rng.tree()} if isinstance(rng, _RngMeta) else meta


def _capture_rng(tensors: List[Tuple[str, torch.Tensor]]) -> "_RngMeta":
    """The global RNG states: generator states are appended to `tensors` (copied into the arena
    by the fused copy); numpy's and Python's are kept as returned (a few microseconds) and
    converted to JSON only when needed (``_RngMeta``)."""
    tensors.append(("rng.torch", torch.get_rng_state()))
    n_cuda = 0
    if torch.cuda.is_available():
        states = torch.cuda.get_rng_state_all()
        n_cuda = len(states)
        for i, s in enumerate(states):
            tensors.append((f"rng.cuda.{i}", s))
    from memstate import rng as _rng

    streams = _rng.active_state()  # every live RngContract (consumption logs), by name
    return _RngMeta((np.random.get_state(), random.getstate(), n_cuda, streams or None))


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
    raw = meta.raw() if isinstance(meta, _RngMeta) else None  # (reading the tree would convert it)
    n_cuda = raw[2] if raw is not None else meta.get("cuda_devices", 0)
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
    if raw is not None:  # as the generators returned them at capture: valid by construction
        out["numpy"], out["python"] = raw[0], raw[1]
        streams = raw[3]
    else:
        n, p = meta["numpy"], meta["python"]
        try:
            out["numpy"] = (n["name"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                            n["cached_gaussian"])
            np.random.RandomState().set_state(out["numpy"])
        except (KeyError, TypeError, ValueError, OverflowError, IndexError) as e:
            raise SnapshotError(f"rng.numpy: not a numpy RandomState state ({type(e).__name__}: {e})") from None
        try:
            out["python"] = (p["version"], tuple(p["state"]), p["gauss_next"])
            random.Random().setstate(out["python"])
        except (KeyError, TypeError, ValueError, OverflowError, IndexError) as e:
            raise SnapshotError(f"rng.python: not a Python random state ({type(e).__name__}: {e})") from None
        streams = meta.get("memstate")
    out["memstate"] = None
    if streams:
        from memstate import rng as _rng

        try:
            _rng.validate_active_state(streams)
        except (TypeError, ValueError) as e:
            raise SnapshotError(f"rng: the snapshot holds the state of RngContract(s) "
                                f"{sorted(map(str, streams))}: {e}") from None
        out["memstate"] = streams
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

