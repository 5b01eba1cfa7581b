"""Binding a snapshot's optimizer state to a live optimizer: parameters by name, group
structure, hyperparameter policies; and the checked restore plan."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch

from memstate.snapshot._common import SnapshotError
from memstate.snapshot._tree import _decode


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
    return binding, _hyperparameters(opt, saved_groups, policy)


def _hyperparameters(opt, saved_groups: List[Any], policy: str) -> Optional[List[dict]]:
    """The param groups' hyperparameters to set (``policy`` "snapshot"), or None ("live"; "check"
    after refusing any difference, naming the group and key). ``saved_groups``: decoded."""
    if policy == "live":
        return None
    if policy == "check":
        for gi, (g, saved) in enumerate(zip(opt.param_groups, saved_groups)):
            for k in sorted(set(saved) | (set(g) - {"params"}), key=str):
                if k not in g or k not in saved or not _same(g[k], saved[k]):
                    raise SnapshotError(
                        f"optimizer param group {gi}, key {k!r}: the snapshot holds "
                        f"{saved.get(k, '<absent>')!r}, the live optimizer {g.get(k, '<absent>')!r}; pass "
                        f"hyperparameters='snapshot' to restore the snapshot's values (e.g. a scheduled "
                        f"learning rate) or 'live' to keep the live ones")
        return None
    for gi, saved in enumerate(saved_groups):
        if not isinstance(saved, dict) or "params" in saved:
            raise SnapshotError(f"optimizer param group {gi}: invalid hyperparameters in the snapshot")
    return saved_groups


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
    fast: bool = False  # bound plan still valid: targets are its tensors (the static entries only), state keys unchanged
    # fast, and the tensors not yet compared with the one native plan: its restore() compares
    # them and, when one changed, writes nothing (restore() then plans again with the full walk)
    deferred: bool = False

