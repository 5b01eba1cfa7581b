"""RNG capture: torch's CPU and CUDA generators, numpy's and Python's global RNGs and every
live RngContract; validation on scratch generators; restore."""
from __future__ import annotations

import random
from typing import Any, List, Mapping, Tuple

import numpy as np
import torch

from memstate.snapshot._common import SnapshotError


def _capture_rng(tensors: List[Tuple[str, torch.Tensor]]) -> dict:
    """JSON tree of the global RNG states; generator states are appended to `tensors` (copied
    into the arena by the fused copy). Tens of microseconds: numpy's 624 keys convert with
    ``ndarray.tolist()`` in C, Python's state tuple is copied as a list."""
    tensors.append(("rng.torch", torch.get_rng_state()))
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors.append((f"rng.cuda.{i}", s))
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, pystate, gauss_next = random.getstate()
    meta = {
        "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
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

