"""Data order as explicit, resumable, hashable state.

Data order is a memory source of training (random reshuffling and sampling with replacement
leave different noise in the path), so memstate treats it like the weights: a pure function of
a seed, addressable by step, resumable exactly and hashable for audit.

``OrderSampler(n, batch_size, policy=..., contract=...)`` is a ``torch.utils.data.Sampler`` of
batch index lists, for ``DataLoader(dataset, batch_sampler=sampler)``:

- the order of epoch ``e`` is a pure function of (contract root seed, ``e``): it is drawn from
  the contract's ``data`` stream at ``epoch=e``, never from a shared generator, so nothing drawn
  elsewhere can shift it;
- every training step has an address: global step ``s`` is batch ``s % batches_per_epoch`` of
  epoch ``s // batches_per_epoch``, and ``batch(s)`` returns its ids without iterating;
- ``state_dict()`` taken at any point of an iteration, loaded into a new sampler, makes it yield
  exactly the remaining batches;
- ``order_hash(e)`` and ``window_hash(start, length)`` let two runs prove they saw the same ids;
- ``override_window(start, batches)`` replaces the ids of a window of steps: that is how the
  order primitives (order swaps, with-replacement windows) change the order of one arm for a
  hold window while the sampler's own policy stays as it is.

Policies (``POLICIES``):

=========  ===================================================================================
``rr``     random reshuffling: epoch e is ``torch.randperm(n, generator=g_e)``, a fresh
           permutation every epoch
``wr``     with replacement: epoch e is ``torch.randint(0, n, (n,), generator=g_e)``, n ids
           drawn independently (repeats and omissions expected)
``so``     shuffle once: every epoch is epoch 0's ``rr`` permutation
``fixed``  every epoch is ``0, 1, ..., n-1``
=========  ===================================================================================

where ``g_e = torch.Generator().manual_seed(contract.seed("data", epoch=e))``, exactly what
``contract.generator("data", epoch=e)`` returns. These internal draws are **not** recorded in
the contract's consumption log: the order never depends on the log, and the order is audited by
its own hashes (``order_hash``/``window_hash``), so logging every recomputation would only make
the log depend on cache behaviour. The seed is platform-independent; the permutation then
depends on torch's ``randperm``/``randint`` algorithms, which are stable within a torch version
(a change across versions shows up as a different ``order_hash``).

Hash byte layout: ids as little-endian int64 (8 bytes each), concatenated in order, no header;
the digest is xxh3_64 (seed 0) as 16 lowercase hex digits (``xxhash.xxh3_64_hexdigest``, the
value written most significant digit first). So anyone can recompute a hash with
``xxhash.xxh3_64_hexdigest(numpy.asarray(ids, dtype="<i8").tobytes())``.
"""
from __future__ import annotations

import operator
from collections import OrderedDict
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence

import numpy as np
import torch
import xxhash
from torch.utils.data import Sampler

from memstate.rng import RngContract

__all__ = ["OrderSampler", "POLICIES", "ids_hash"]

POLICIES = ("rr", "wr", "so", "fixed")
STATE_FORMAT = "memstate.data.OrderSampler"
STATE_VERSION = 1
_CACHE_EPOCHS = 4  # epoch orders kept: the current one, its neighbours, one for hashing


def ids_hash(ids: Sequence[int]) -> str:
    """xxh3_64 hex (16 lowercase digits) of ``ids`` as concatenated little-endian int64."""
    return xxhash.xxh3_64_hexdigest(np.asarray(ids, dtype="<i8").tobytes())


def _int(value: Any, what: str) -> int:
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, got a bool ({value!r})")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})") from None


class OrderSampler(Sampler[List[int]]):
    """Batches of dataset indices in an order that is a pure function of (contract, epoch).

    Args:
        n: dataset size (>= 1); ids are in [0, n).
        batch_size: ids per batch (>= 1).
        policy: one of ``POLICIES`` (see the module docstring).
        contract: the ``RngContract`` whose ``data`` stream seeds the order; None uses a private
            ``RngContract(0, register=False)`` (not part of snapshots; its root seed is in
            ``state_dict()``).
        drop_last: drop the last batch of an epoch when it has fewer than ``batch_size`` ids.

    Every epoch has ``batches_per_epoch`` batches (``== len(sampler)``): ``ceil(n / batch_size)``,
    or ``n // batch_size`` with ``drop_last``. Iteration state is (``epoch``, ``position``), the
    next batch to yield; ``step == epoch * batches_per_epoch + position`` is the number of
    batches yielded since epoch 0 (when iterating from the start).

    Iterating yields the batches of the current epoch from the current position, and advances
    the position *before* each batch is handed out, rolling over to the next epoch after the
    last one; so after the consumer has received k batches, ``state_dict()`` resumes at the
    (k+1)-th. With ``DataLoader(num_workers=0)`` that is exact. With worker processes the
    DataLoader fetches indices ahead (``prefetch_factor * num_workers`` batches), so the sampler
    runs ahead of training by that many steps: save ``epoch``/``position`` computed from the
    training step instead (``divmod(step, batches_per_epoch)``). One iteration at a time.
    """

    def __init__(self, n: int, batch_size: int, *, policy: str = "rr", contract: Optional[RngContract] = None,
                 drop_last: bool = False):
        super().__init__()
        n = _int(n, "n")
        batch_size = _int(batch_size, "batch_size")
        if n < 1:
            raise ValueError(f"n (the dataset size) must be >= 1, got {n}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if policy not in POLICIES:
            raise ValueError(f"unknown order policy {policy!r}; valid policies are {', '.join(POLICIES)}")
        if not isinstance(drop_last, (bool, np.bool_)):
            raise TypeError(f"drop_last must be a bool, got {type(drop_last).__name__}")
        if drop_last and n < batch_size:
            raise ValueError(f"drop_last=True with n={n} < batch_size={batch_size} would yield no batches")
        if contract is None:
            contract = RngContract(0, register=False)
        elif not isinstance(contract, RngContract):
            raise TypeError(f"contract must be a memstate.RngContract or None, got {type(contract).__name__}")
        if policy in ("rr", "wr", "so"):
            contract.seed("data", epoch=0)  # the contract must serve a 'data' stream (error lists its streams)
        self._n = n
        self._batch_size = batch_size
        self._policy = policy
        self._drop_last = bool(drop_last)
        self._contract = contract
        self._bpe = n // batch_size if drop_last else -(-n // batch_size)
        self._epoch = 0
        self._position = 0
        self._overrides: Dict[int, List[int]] = {}
        # keyed by the data seed, not the epoch, so a contract whose root seed is reloaded
        # can never be served a stale order
        self._cache: "OrderedDict[Any, torch.Tensor]" = OrderedDict()

    # ------------------------------------------------------------------ configuration
    @property
    def n(self) -> int:
        return self._n

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def policy(self) -> str:
        return self._policy

    @property
    def drop_last(self) -> bool:
        return self._drop_last

    @property
    def contract(self) -> RngContract:
        return self._contract

    @property
    def batches_per_epoch(self) -> int:
        return self._bpe

    def __len__(self) -> int:
        """Batches of a full epoch (also the first epoch after a mid-epoch resume, which yields
        only ``batches_per_epoch - position`` of them)."""
        return self._bpe

    # ------------------------------------------------------------------ position
    @property
    def epoch(self) -> int:
        return self._epoch

    @property
    def position(self) -> int:
        """Index within the current epoch of the next batch to yield, in [0, batches_per_epoch)."""
        return self._position

    @property
    def step(self) -> int:
        """Global step of the next batch: ``epoch * batches_per_epoch + position``."""
        return self._epoch * self._bpe + self._position

    def set_epoch(self, epoch: int) -> None:
        """Moves to the start of ``epoch``. Calling it with the current epoch is a no-op, so the
        usual ``for e in range(start, E): sampler.set_epoch(e)`` loop keeps a mid-epoch resume
        position (and, since iteration already rolls over, agrees with it otherwise)."""
        epoch = _int(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if epoch != self._epoch:
            self._epoch, self._position = epoch, 0

    # ------------------------------------------------------------------ orders
    def _order(self, epoch: int) -> torch.Tensor:
        """int64 CPU tensor of epoch ``epoch``'s n ids, before overrides (cached; do not mutate)."""
        if self._policy == "fixed":
            key: Any = None
        else:
            key = self._contract.seed("data", epoch=0 if self._policy == "so" else epoch)
        order = self._cache.get(key)
        if order is not None:
            self._cache.move_to_end(key)
            return order
        if self._policy == "fixed":
            order = torch.arange(self._n, dtype=torch.int64)
        else:
            g = torch.Generator().manual_seed(key)  # == contract.generator("data", epoch=...), unlogged
            if self._policy == "wr":
                order = torch.randint(0, self._n, (self._n,), generator=g, dtype=torch.int64)
            else:
                order = torch.randperm(self._n, generator=g, dtype=torch.int64)
        self._cache[key] = order
        while len(self._cache) > _CACHE_EPOCHS:
            self._cache.popitem(last=False)
        return order

    def epoch_order(self, epoch: int) -> List[int]:
        """The n ids of ``epoch`` in order, before overrides. With ``drop_last`` the batches use
        only the first ``batches_per_epoch * batch_size`` of them."""
        epoch = _int(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return self._order(epoch).tolist()

    def batch(self, step: int) -> List[int]:
        """Ids of global step ``step`` (batch ``step % batches_per_epoch`` of epoch
        ``step // batches_per_epoch``), with overrides applied."""
        step = _int(step, "step")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        over = self._overrides.get(step)
        if over is not None:
            return list(over)
        epoch, pos = divmod(step, self._bpe)
        start = pos * self._batch_size
        return self._order(epoch)[start:start + self._batch_size].tolist()

    def __iter__(self) -> Iterator[List[int]]:
        epoch = self._epoch
        while self._epoch == epoch:
            ids = self.batch(self.step)
            # advance before handing the batch out: state_dict() taken by the consumer after
            # receiving it must resume with the next one
            self._position += 1
            if self._position == self._bpe:
                self._epoch, self._position = epoch + 1, 0
            yield ids

    # ------------------------------------------------------------------ hashes
    def order_hash(self, epoch: int) -> str:
        """xxh3_64 hex of ``epoch_order(epoch)`` as little-endian int64 (all n ids, before
        overrides and before ``drop_last``; see the module docstring for the layout)."""
        epoch = _int(epoch, "epoch")
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        return xxhash.xxh3_64_hexdigest(self._order(epoch).numpy().astype("<i8", copy=False).tobytes())

    def window_hash(self, start_step: int, length: int) -> str:
        """xxh3_64 hex of the ids of ``batch(s)`` for s in [start_step, start_step + length),
        overrides applied, concatenated as little-endian int64. Batch boundaries are not hashed
        (ids only), so compare windows of samplers with the same batch size."""
        start_step = _int(start_step, "start_step")
        length = _int(length, "length")
        if start_step < 0 or length < 0:
            raise ValueError(f"window_hash needs start_step >= 0 and length >= 0, got {start_step}, {length}")
        h = xxhash.xxh3_64()
        for s in range(start_step, start_step + length):
            h.update(np.asarray(self.batch(s), dtype="<i8").tobytes())
        return h.hexdigest()

    # ------------------------------------------------------------------ overrides
    def _check_batches(self, start_step: int, batches: Any, what: str) -> List[List[int]]:
        if isinstance(batches, (str, bytes)) or not hasattr(batches, "__len__"):
            raise TypeError(f"{what}: batches must be a sequence of id sequences, got {type(batches).__name__}")
        out = []
        for i, b in enumerate(batches):
            step = start_step + i
            if isinstance(b, (torch.Tensor, np.ndarray)):
                b = b.tolist()
            if isinstance(b, (str, bytes)) or not hasattr(b, "__iter__"):
                raise TypeError(f"{what}: step {step} (batches[{i}]) must be a sequence of ids, "
                                f"got {type(b).__name__}")
            ids = [_int(v, f"{what}: step {step} (batches[{i}]) id {j}") for j, v in enumerate(b)]
            if not ids:
                raise ValueError(f"{what}: step {step} (batches[{i}]) is empty")
            bad = next((j for j, v in enumerate(ids) if not 0 <= v < self._n), None)
            if bad is not None:
                raise ValueError(f"{what}: step {step} (batches[{i}]) id {ids[bad]} at position {bad} "
                                 f"is outside [0, {self._n})")
            out.append(ids)
        return out

    def override_window(self, start_step: int, batches: Sequence[Sequence[int]]) -> None:
        """Replaces the ids of steps ``start_step .. start_step + len(batches) - 1`` with
        ``batches`` (earlier overrides of those steps are replaced). Every id must be in
        [0, n) and no batch empty; the batch size is free (a window may use another size).
        Validates all batches before applying any (ValueError naming the step otherwise).
        Overrides are part of ``state_dict()`` and of ``window_hash``, not of ``order_hash``."""
        start_step = _int(start_step, "start_step")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        checked = self._check_batches(start_step, batches, "override_window")
        for i, ids in enumerate(checked):
            self._overrides[start_step + i] = ids

    def clear_overrides(self) -> None:
        self._overrides.clear()

    @property
    def overrides(self) -> Dict[int, List[int]]:
        """A copy of the overrides: ``{step: ids}``."""
        return {s: list(ids) for s, ids in sorted(self._overrides.items())}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able: format, version, n, batch_size, policy, drop_last, epoch, position,
        overrides (``[[step, [ids]], ...]`` sorted by step), root_seed and contract (the name of
        the contract whose ``data`` stream seeds the order)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "n": self._n,
            "batch_size": self._batch_size,
            "policy": self._policy,
            "drop_last": self._drop_last,
            "epoch": self._epoch,
            "position": self._position,
            "overrides": [[s, list(ids)] for s, ids in sorted(self._overrides.items())],
            "root_seed": self._contract.root_seed,
            "contract": self._contract.name,
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Resumes from ``state_dict()`` (possibly through JSON): epoch, position and overrides.

        ``n``, ``batch_size``, ``policy``, ``drop_last`` and ``root_seed`` must equal this
        sampler's (they define the order), otherwise ValueError naming the field. Everything is
        validated (``validate_state_dict``) before anything changes."""
        self._epoch, self._position, self._overrides = self.validate_state_dict(state_dict)

    def validate_state_dict(self, state_dict: Mapping[str, Any]) -> tuple[int, int, Dict[int, List[int]]]:
        """Checks ``state_dict`` as ``load_state_dict`` would (TypeError/ValueError naming the
        field) without changing this sampler; returns (epoch, position, overrides)."""
        sd = state_dict
        if not isinstance(sd, Mapping):
            raise TypeError(f"OrderSampler state_dict must be a dict, got {type(sd).__name__}")
        if sd.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"not an OrderSampler state (format {sd.get('format')!r})")
        if sd.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"OrderSampler state version {sd.get('version')!r} is not supported "
                             f"(this memstate reads {STATE_VERSION})")
        missing = [k for k in ("n", "batch_size", "policy", "drop_last", "epoch", "position") if k not in sd]
        if missing:
            raise ValueError(f"OrderSampler state_dict lacks {', '.join(missing)}")
        mine = {"n": self._n, "batch_size": self._batch_size, "policy": self._policy,
                "drop_last": self._drop_last, "root_seed": self._contract.root_seed}
        for field, want in mine.items():
            if field in sd and sd[field] != want:
                raise ValueError(f"OrderSampler state_dict field {field!r} is {sd[field]!r}, this sampler's "
                                 f"is {want!r}; the order would differ")
        epoch = _int(sd["epoch"], "state_dict field 'epoch'")
        position = _int(sd["position"], "state_dict field 'position'")
        if epoch < 0:
            raise ValueError(f"state_dict field 'epoch' must be >= 0, got {epoch}")
        if not 0 <= position < self._bpe:
            raise ValueError(f"state_dict field 'position' must be in [0, {self._bpe}), got {position}")
        raw = sd.get("overrides", [])
        if isinstance(raw, Mapping):  # tolerate the {step: ids} form of the overrides property
            raw = sorted(([int(k), v] for k, v in raw.items()), key=lambda kv: kv[0])
        overrides: Dict[int, List[int]] = {}
        for i, item in enumerate(raw):
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise ValueError(f"state_dict field 'overrides'[{i}] must be [step, ids], got {item!r}")
            step = _int(item[0], f"state_dict field 'overrides'[{i}] step")
            if step < 0:
                raise ValueError(f"state_dict field 'overrides'[{i}]: step must be >= 0, got {step}")
            overrides[step] = self._check_batches(step, [item[1]], "state_dict field 'overrides'")[0]
        return epoch, position, overrides

    def __repr__(self):
        return (f"OrderSampler(n={self._n}, batch_size={self._batch_size}, policy={self._policy!r}, "
                f"drop_last={self._drop_last}, epoch={self._epoch}, position={self._position}, "
                f"overrides={len(self._overrides)})")
