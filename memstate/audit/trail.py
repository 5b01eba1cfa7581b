"""Trail: a per-step record of a training run's fingerprints in an SQLite database.

One row per recorded step holds the msfp1 fingerprint (16 bytes) of every tracked tensor,
packed in the order of the ``tensors`` table, plus the step's scalars (loss, batch-id hash,
RNG digests). 2,000 tensors cost 32 KB a step. The database is written in WAL mode, in
batches of ``commit_every`` steps (and at ``flush()`` / ``close()``), with
``synchronous=FULL``, so every committed step survives a crash and a reader may open the file
while training runs. See docs/audit.md for the schema.
"""
from __future__ import annotations

import json
import os
import platform
import random
import sqlite3
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
import xxhash

from memstate import _ext, _version, rng as _rng
from memstate.fingerprint import Fingerprint, fingerprint_many, named_state_tensors

__all__ = ["Trail", "TrailReader", "TrailError", "StepRecord", "KINDS", "FORMAT", "SCHEMA_VERSION"]

FORMAT = "memstate.audit.trail"
SCHEMA_VERSION = 1
# Tensor kinds in cause-before-consequence order: a step reads the gradient, updates the
# optimizer state from it, then the parameter; buffers (BatchNorm) and extra state come last.
KINDS: Tuple[str, ...] = ("grad", "optim", "param", "buffer", "extra")
_M64 = (1 << 64) - 1
ABSENT = bytes(16)  # a tensor not present at a step (e.g. no gradient, state not created yet)

_SCHEMA = """
CREATE TABLE header (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tensors (idx INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL,
                      dtype TEXT NOT NULL, shape TEXT NOT NULL, UNIQUE (kind, name));
CREATE TABLE steps (step INTEGER PRIMARY KEY, n_tensors INTEGER NOT NULL, fingerprints BLOB NOT NULL,
                    loss REAL, batch_hash TEXT, rng_torch TEXT, rng_cuda TEXT, rng_numpy TEXT,
                    rng_python TEXT, contracts TEXT NOT NULL, wall_time REAL NOT NULL);
"""


class TrailError(RuntimeError):
    """A trail file that cannot be read: missing, not SQLite, not a memstate trail, or a
    schema version this memstate does not know. The message names the file."""


# ------------------------------------------------------------------------------- digests
def _h(*parts: bytes) -> str:
    h = xxhash.xxh3_128()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def rng_digests() -> Dict[str, Optional[str]]:
    """xxh3-128 hex digests of the global RNG states: torch CPU, every initialised CUDA
    device (None without CUDA), numpy's legacy global RandomState, Python's ``random``."""
    out: Dict[str, Optional[str]] = {"torch": _h(torch.get_rng_state().numpy().tobytes())}
    cuda = None
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = _h(*[s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()])
    out["cuda"] = cuda
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out["numpy"] = _h(name.encode(), keys.tobytes(), struct.pack("<qqd", pos, has_gauss, cached))
    version, internal, gauss = random.getstate()
    out["python"] = _h(struct.pack(f"<q{len(internal)}Q", version, *internal), repr(gauss).encode())
    return out


def batch_hash(batch_ids: Any) -> Optional[str]:
    """xxh3-128 of the batch ids as little-endian int64 (a tensor, array or sequence of ints)."""
    if batch_ids is None:
        return None
    if isinstance(batch_ids, torch.Tensor):
        arr = batch_ids.detach().cpu().numpy()
    else:
        arr = np.asarray(batch_ids)
    if arr.dtype.kind not in "iub":
        raise TypeError(f"batch_ids must be integers, got an array of dtype {arr.dtype}")
    return _h(b"memstate.batch.v1\0", np.ascontiguousarray(arr.astype("<i8", copy=False)).tobytes())


class _ContractChain:
    """Running xxh3-128 over a contract's consumption log, fed only the entries added since
    the last record (O(new entries) per step, not O(log)). Restarted if the log shrinks or
    is replaced (e.g. after a restore)."""

    def __init__(self):
        self._h = None
        self._seen = 0
        self._head: Optional[Tuple] = None

    def digest(self, contract: "_rng.RngContract") -> str:
        log = contract._log
        head = log[0] if log else None
        if self._h is None or len(log) < self._seen or head != self._head:
            self._h, self._seen = xxhash.xxh3_128(), 0
            self._h.update(_rng.LOG_MAGIC + _rng._u64(contract.root_seed))
        for stream, index in log[self._seen:]:
            self._h.update(_rng._text(stream) + struct.pack("<I", len(index)) + _rng._encode_index(index))
        self._seen, self._head = len(log), head
        return self._h.hexdigest()


def _in_pass_lanes(opt: Any) -> Dict[int, Dict[str, Tuple[int, int]]]:
    """id(param) -> role -> lanes of a memstate FusedOptimizer's last step, read from its
    pending kernel rows (one ``tolist`` per bucket) without building the per-tensor
    ``Fingerprint`` objects ``opt.fingerprints(p)`` would; the pending rows are left in place,
    so ``opt.fingerprints()`` still works afterwards. Mirrors ``FusedOptimizer._materialise``."""
    out: Dict[int, Dict[str, Tuple[int, int]]] = {
        pid: {role: fp.lanes for role, fp in fps.items()} for pid, fps in opt._fingerprints.items()}
    for bucket, roles, rows in opt._pending:
        for p, per_role in zip(bucket, rows.cpu().tolist()):
            out.setdefault(id(p), {}).update({role: (a & _M64, b & _M64) for role, (a, b) in zip(roles, per_role)})
    return out


SERIAL_BYTES = 1 << 20  # below this many CPU bytes in all, fingerprint on the calling thread


def _native_lanes(tensors: List[torch.Tensor]) -> List[Tuple[int, int]]:
    """msfp1 lanes of dense tensors: one native call per device, no per-tensor Python checks.

    The native op spreads its 512 KiB chunks (at least one per tensor) over the intra-op
    threads; for a few BatchNorm buffers that costs a thread wake-up and barrier per call,
    which on a busy machine was measured at 3-16 ms against about 10 us on one thread. So
    when the CPU tensors are small in all the call runs on one thread (``torch.set_num_threads``
    is process-wide for the call's length). Results never depend on the thread count."""
    ops = _ext.ops()
    out: List[Optional[Tuple[int, int]]] = [None] * len(tensors)
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(i)
    threads = torch.get_num_threads()
    for device, idxs in by_device.items():
        group = [tensors[i] for i in idxs]
        serial = (device.type == "cpu" and threads > 1
                  and sum(t.numel() * t.element_size() for t in group) < SERIAL_BYTES)
        if serial:
            torch.set_num_threads(1)
        try:
            rows = ops.fingerprint(group).cpu().tolist()
        finally:
            if serial:
                torch.set_num_threads(threads)
        for i, (a, b) in zip(idxs, rows):
            out[i] = (a & _M64, b & _M64)
    return out  # type: ignore[return-value]


def _fingerprint_lanes(tensors: List[torch.Tensor], names: List[str]) -> List[Tuple[int, int]]:
    """``_native_lanes``; if the native op refuses a tensor, ``fingerprint_many`` says which
    one (an error naming it) or handles it."""
    try:
        return _native_lanes(tensors)
    except (RuntimeError, TypeError, ValueError):
        return [fp.lanes for fp in fingerprint_many(tensors, names)]


# ------------------------------------------------------------------------------- header
def determinism_settings() -> Dict[str, Any]:
    """The process settings that decide whether kernels are deterministic."""
    return {
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "deterministic_warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "CUBLAS_WORKSPACE_CONFIG": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED"),
        "torch_threads": torch.get_num_threads(),
    }


def _loader_info(loader: Any) -> Dict[str, Any]:
    """What can be seen of a DataLoader's determinism: worker count, seeded generator, shuffle."""
    sampler = getattr(loader, "sampler", None)
    return {
        "num_workers": int(getattr(loader, "num_workers", 0)),
        "generator": getattr(loader, "generator", None) is not None,
        "worker_init_fn": getattr(loader, "worker_init_fn", None) is not None,
        "sampler": type(sampler).__name__ if sampler is not None else None,
        "sampler_generator": getattr(sampler, "generator", None) is not None,
    }


def _build_info() -> Dict[str, Any]:
    info = _ext.build_info()
    return {k: v if isinstance(v, (str, int, float, bool, type(None))) else str(v) for k, v in info.items()}


# ------------------------------------------------------------------------------- writer
@dataclass
class StepRecord:
    """The values ``with trail.step(t) as s:`` records on exit; set ``s.loss``/``s.batch_ids``."""

    step: int
    loss: Any = None
    batch_ids: Any = None


class _StepContext:
    def __init__(self, trail: "Trail", record: StepRecord):
        self._trail, self._record = trail, record

    def __enter__(self) -> StepRecord:
        return self._record

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            r = self._record
            self._trail.record(r.step, loss=r.loss, batch_ids=r.batch_ids)
        return False


def _check_step(step: Any) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"Trail step must be an int, got {type(step).__name__} ({step!r})")
    if step < 0:
        raise ValueError(f"Trail step must be >= 0, got {step}")
    return int(step)


class Trail:
    """Records per-step fingerprints of a training run to an SQLite file at ``path``.

    - ``model``: its parameters ("param"), their gradients ("grad") and buffers ("buffer");
    - ``optimizer``: its state tensors ("optim"), named ``{param name}.{key}``. A memstate
      optimizer built with ``fingerprint=True`` supplies the param, grad and state
      fingerprints of its last step from the step's own pass; everything else is
      fingerprinted with one native ``fingerprint_many`` call per record;
    - ``extra``: name -> tensor, module, optimizer or dict (EMA model, queue, ...) ("extra");
    - ``contracts``: RngContracts whose consumption logs are chained per step (default: the
      live registered contracts at each record);
    - ``every``: record only steps divisible by ``every``;
    - ``commit_every``: steps buffered in memory between commits (each commit is durable);
    - ``dataloader``: optional, only inspected for the header (workers, seeded generator);
    - ``overwrite``: replace an existing file at ``path`` (otherwise FileExistsError).

    Call ``record(step, loss=..., batch_ids=...)`` after ``optimizer.step()`` (or wrap the step
    in ``with trail.step(t) as s:``), and ``close()`` at the end (or use it as a context
    manager). Steps must increase.
    """

    def __init__(self, path: str, model: Optional[torch.nn.Module] = None,
                 optimizer: Optional[torch.optim.Optimizer] = None, *, every: int = 1,
                 extra: Optional[Mapping[str, Any]] = None, contracts: Optional[Sequence[Any]] = None,
                 commit_every: int = 50, dataloader: Any = None, overwrite: bool = False,
                 max_steps: Optional[int] = None):
        if not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"Trail path must be a str or os.PathLike, got {type(path).__name__}")
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"Trail model must be a torch.nn.Module, got {type(model).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"Trail optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        for what, v in (("every", every), ("commit_every", commit_every)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Trail {what} must be an int >= 1, got {v!r}")
        if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1):
            raise ValueError(f"Trail max_steps must be None or an int >= 1, got {max_steps!r}")
        if extra is not None:
            if not isinstance(extra, Mapping):
                raise TypeError(f"Trail extra must be a dict of name -> tensor/module/optimizer, got {type(extra).__name__}")
            named_state_tensors(dict(extra))  # validates every entry, naming a bad one
        self._contracts_given = None
        if contracts is not None:
            for i, c in enumerate(contracts):
                if not isinstance(c, _rng.RngContract):
                    raise TypeError(f"Trail contracts[{i}] is a {type(c).__name__}, not an RngContract")
            self._contracts_given = list(contracts)
        self.path = os.fspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise FileExistsError(f"trail file {self.path!r} already exists (pass overwrite=True to replace it)")
        self.model, self.optimizer, self.extra = model, optimizer, dict(extra or {})
        self.every, self.commit_every, self.max_steps = every, commit_every, max_steps
        self._param_names = {id(p): n for n, p in model.named_parameters()} if model is not None else {}
        self._index: Dict[Tuple[str, str], int] = {}
        self._new_tensors: List[Tuple[int, str, str, str, str]] = []
        self._rows: List[tuple] = []
        self._chains: Dict[str, _ContractChain] = {}
        self._last_step: Optional[int] = None
        self._fresh_step = False
        self._hook = None
        self._in_pass = bool(getattr(optimizer, "fingerprint", False)) and hasattr(optimizer, "state_fingerprint")
        self._plan()
        self._conn: Optional[sqlite3.Connection] = None
        header = self._header(dataloader)
        self._create(header, overwrite)
        if self._in_pass:
            # in-pass fingerprints describe the last step; only trust them once per step
            self._hook = optimizer.register_step_post_hook(self._on_step)

    # -------------------------------------------------------------- file
    def _create(self, header: Dict[str, Any], overwrite: bool) -> None:
        """Schema and header go to a temporary file renamed into place: the file at ``path``
        is a complete, readable trail from the moment it exists."""
        directory = os.path.dirname(os.path.abspath(self.path))
        tmp = os.path.join(directory, f".{os.path.basename(self.path)}.{os.getpid()}.tmp")
        if os.path.exists(tmp):
            os.remove(tmp)
        conn = sqlite3.connect(tmp)
        try:
            conn.executescript(_SCHEMA)
            conn.executemany("INSERT INTO header VALUES (?, ?)", [(k, json.dumps(v)) for k, v in header.items()])
            conn.commit()
        finally:
            conn.close()
        if overwrite:
            for suffix in ("-wal", "-shm"):
                if os.path.exists(self.path + suffix):
                    os.remove(self.path + suffix)
        os.replace(tmp, self.path)
        self._conn = sqlite3.connect(self.path, check_same_thread=False)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")

    def _header(self, dataloader: Any) -> Dict[str, Any]:
        device = "none"
        if self.model is not None:
            devs = sorted({str(p.device) for p in self.model.parameters()})
            device = ",".join(devs) if devs else "none"
        cuda_name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        from memstate import card as _card  # the CPU as a protocol card records it

        return {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "memstate_version": _version.__version__,
            "memstate_build": _build_info(),
            "torch_version": torch.__version__,
            "numpy_version": np.__version__,
            "python_version": platform.python_version(),
            "platform": platform.platform(),
            "cpu": _card.cpu_model(),
            "torch_cpu_capability": _card.cpu_capability(),
            "cpu_kernel_env": _card.cpu_kernel_env(),
            "device": device,
            "cuda_device": cuda_name,
            "cuda_version": torch.version.cuda,
            "determinism": determinism_settings(),
            "optimizer": type(self.optimizer).__name__ if self.optimizer is not None else None,
            "in_pass_fingerprints": self._in_pass,
            "every": self.every,
            "dataloader": _loader_info(dataloader) if dataloader is not None else None,
            "argv": list(sys.argv),
            "created": time.time(),
        }

    # -------------------------------------------------------------- recording
    def _on_step(self, *_args) -> None:
        self._fresh_step = True

    def step(self, step: int, *, loss: Any = None, batch_ids: Any = None) -> _StepContext:
        """``with trail.step(t) as s: ...; s.loss = loss`` records step ``t`` on a clean exit."""
        return _StepContext(self, StepRecord(_check_step(step), loss, batch_ids))

    def _tensor_index(self, kind: str, name: str, t: torch.Tensor) -> int:
        key = (kind, name)
        i = self._index.get(key)
        if i is None:
            i = len(self._index)
            self._index[key] = i
            self._new_tensors.append((i, name, kind, str(t.dtype).replace("torch.", ""), json.dumps(list(t.shape))))
        return i

    def _plan(self) -> None:
        """Caches what every record walks: the optimizer's parameters with their names, the
        model's other parameters, and (module, key) of every buffer, so a record does not
        re-walk the module tree. A buffer reassigned on its module is still found (looked up
        by key at each record); modules added after the trail was created are not tracked."""
        names = self._param_names
        self._opt_params: List[Tuple[torch.Tensor, str]] = []
        if self.optimizer is not None:
            position = 0
            for group in self.optimizer.param_groups:
                for p in group["params"]:
                    self._opt_params.append((p, names.get(id(p), f"param_groups.{position}")))
                    position += 1
        in_opt = {id(p) for p, _ in self._opt_params}
        self._free_params: List[Tuple[torch.Tensor, str]] = []
        self._buffers: List[Tuple[torch.nn.Module, str, str]] = []
        if self.model is not None:
            self._free_params = [(p, n) for n, p in self.model.named_parameters() if id(p) not in in_opt]
            for mname, mod in self.model.named_modules():
                for key in mod._buffers:
                    self._buffers.append((mod, key, f"{mname}.{key}" if mname else key))

    def _collect(self) -> Dict[int, Tuple[int, int]]:
        """Index -> msfp1 lanes of every tracked tensor present now."""
        got: Dict[int, Tuple[int, int]] = {}
        todo: List[Tuple[int, torch.Tensor, str]] = []
        opt = self.optimizer
        in_pass = self._in_pass and self._fresh_step
        self._fresh_step = False
        index = self._tensor_index
        if opt is not None:
            all_fps = _in_pass_lanes(opt) if in_pass else {}
            state = opt.state
            for p, name in self._opt_params:
                fps = all_fps.get(id(p), {})
                i = index("param", name, p)
                lanes = fps.get("param")
                if lanes is not None:
                    got[i] = lanes
                else:
                    todo.append((i, p, f"param {name}"))
                g = p.grad
                lanes = fps.get("grad")
                if lanes is not None:
                    got[index("grad", name, p if g is None else g)] = lanes
                elif g is not None:
                    todo.append((index("grad", name, g), g, f"grad {name}"))
                for k, v in sorted(state.get(p, {}).items()):
                    if isinstance(v, torch.Tensor):
                        i = index("optim", f"{name}.{k}", v)
                        lanes = fps.get(k)
                        if lanes is not None:
                            got[i] = lanes
                        else:
                            todo.append((i, v, f"optim {name}.{k}"))
        for p, n in self._free_params:
            todo.append((index("param", n, p), p, f"param {n}"))
            if p.grad is not None:
                todo.append((index("grad", n, p.grad), p.grad, f"grad {n}"))
        for mod, key, n in self._buffers:
            b = mod._buffers.get(key)
            if b is not None:
                todo.append((index("buffer", n, b), b, f"buffer {n}"))
        if self.extra:
            for n, t in named_state_tensors(self.extra):
                todo.append((index("extra", n, t), t, f"extra {n}"))
        if todo:
            lanes = _fingerprint_lanes([t.detach() for _, t, _ in todo], [label for _, _, label in todo])
            for (i, _, _), lane in zip(todo, lanes):
                got[i] = lane
        return got

    def _contract_digests(self) -> Dict[str, str]:
        if self._contracts_given is not None:
            contracts = {c.name: c for c in self._contracts_given}
        else:
            try:
                contracts = _rng._unique_live()
            except ValueError:
                contracts = {}  # ambiguous registry: nothing reliable to record
        return {name: self._chains.setdefault(name, _ContractChain()).digest(c) for name, c in sorted(contracts.items())}

    def record(self, step: int, *, loss: Any = None, batch_ids: Any = None) -> bool:
        """Records step ``step`` (call it after ``optimizer.step()``). Returns False, recording
        nothing, when ``step`` is not a multiple of ``every`` or is beyond ``max_steps``.

        ``loss``: a float or a one-element tensor; ``batch_ids``: the ids of the samples in the
        step's batch (ints), hashed. Steps must strictly increase."""
        step = _check_step(step)
        if self._conn is None:
            raise RuntimeError(f"Trail {self.path!r} is closed")
        if self._last_step is not None and step <= self._last_step:
            raise ValueError(f"Trail step {step} does not follow the last recorded step {self._last_step}")
        if step % self.every or (self.max_steps is not None and step >= self.max_steps):
            self._fresh_step = False
            return False
        if loss is not None:
            try:
                loss = float(loss.detach().item() if isinstance(loss, torch.Tensor) else loss)
            except (TypeError, ValueError, RuntimeError):
                raise TypeError(f"Trail loss at step {step} must be a number or a one-element tensor, "
                                f"got {type(loss).__name__}") from None
        bh = batch_hash(batch_ids)
        got = self._collect()
        n = len(self._index)
        blob = bytearray(16 * n)  # zero bytes = ABSENT
        pack = struct.pack_into
        for i, (lane0, lane1) in got.items():
            pack("<QQ", blob, 16 * i, lane0, lane1)
        r = rng_digests()
        self._rows.append((step, n, bytes(blob), loss, bh, r["torch"], r["cuda"], r["numpy"], r["python"],
                           json.dumps(self._contract_digests(), sort_keys=True), time.time()))
        self._last_step = step
        if len(self._rows) >= self.commit_every:
            self.flush()
        return True

    def flush(self) -> None:
        """Writes the buffered steps and new tensor names in one durable transaction."""
        if self._conn is None or (not self._rows and not self._new_tensors):
            return
        with self._conn:
            self._conn.executemany("INSERT INTO tensors VALUES (?, ?, ?, ?, ?)", self._new_tensors)
            self._conn.executemany("INSERT INTO steps VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", self._rows)
            self._conn.execute("INSERT OR REPLACE INTO header VALUES ('determinism_last_commit', ?)",
                               (json.dumps(determinism_settings()),))
        self._new_tensors, self._rows = [], []

    def close(self) -> None:
        """Flushes and closes the file (idempotent); checkpoints the WAL into the main file."""
        if self._conn is None:
            return
        try:
            self.flush()
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()
            self._conn = None
            if self._hook is not None:
                self._hook.remove()
                self._hook = None

    @property
    def closed(self) -> bool:
        return self._conn is None

    def __enter__(self) -> "Trail":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self):
        return f"Trail({self.path!r}, {len(self._index)} tensors, last step {self._last_step})"


class NullTrail:
    """The recorder ``auto()`` returns when no trail is requested: every method does nothing."""

    path = None
    closed = False

    def record(self, step: int, *, loss: Any = None, batch_ids: Any = None) -> bool:
        return False

    def step(self, step: int, *, loss: Any = None, batch_ids: Any = None):
        return _NullContext(StepRecord(step, loss, batch_ids))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __bool__(self):
        return False


class _NullContext:
    def __init__(self, record: StepRecord):
        self._record = record

    def __enter__(self):
        return self._record

    def __exit__(self, *exc):
        return False


# ------------------------------------------------------------------------------- reader
@dataclass(frozen=True)
class TensorInfo:
    index: int
    name: str
    kind: str
    dtype: str
    shape: Tuple[int, ...]

    @property
    def label(self) -> str:
        return f"{self.kind} {self.name}"


@dataclass(frozen=True)
class StepRow:
    step: int
    fingerprints: bytes  # 16 bytes per tensor, in index order; ABSENT for tensors not present
    loss: Optional[float]
    batch_hash: Optional[str]
    rng: Dict[str, Optional[str]]
    contracts: Dict[str, str]

    def fingerprint(self, index: int) -> Optional[Fingerprint]:
        raw = self.fingerprints[16 * index:16 * index + 16]
        if len(raw) < 16 or raw == ABSENT:
            return None
        return Fingerprint.from_bytes(raw)


class TrailReader:
    """Read-only view of a trail file; works while a Trail is still writing it (it sees every
    committed step). Raises TrailError naming the file if it is not a readable trail."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise TrailError(f"trail file {self.path!r} does not exist")
        try:
            self._conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            rows = self._conn.execute("SELECT key, value FROM header").fetchall()
            self.header = {k: json.loads(v) for k, v in rows}
        except sqlite3.DatabaseError as e:
            raise TrailError(f"{self.path!r} is not a memstate trail (SQLite: {e})") from None
        except ValueError as e:
            raise TrailError(f"{self.path!r} has a corrupt header ({e})") from None
        if self.header.get("format") != FORMAT:
            self._conn.close()
            raise TrailError(f"{self.path!r} is not a memstate trail (header format {self.header.get('format')!r})")
        if self.header.get("schema_version") != SCHEMA_VERSION:
            self._conn.close()
            raise TrailError(f"{self.path!r} has trail schema version {self.header.get('schema_version')!r}; "
                             f"this memstate reads version {SCHEMA_VERSION}")
        self.tensors: List[TensorInfo] = []
        self._load_tensors()

    def _load_tensors(self) -> None:
        """(Re)reads the tensor table: a trail still being written may have added names."""
        try:
            tensors = [TensorInfo(i, n, k, d, tuple(json.loads(s))) for i, n, k, d, s in
                       self._conn.execute("SELECT idx, name, kind, dtype, shape FROM tensors ORDER BY idx")]
        except (sqlite3.DatabaseError, ValueError) as e:
            raise TrailError(f"{self.path!r}: unreadable tensor table ({e})") from None
        if [t.index for t in tensors] != list(range(len(tensors))):
            raise TrailError(f"{self.path!r}: tensor indices are not 0..{len(tensors) - 1}")
        self.tensors = tensors

    def steps(self) -> List[int]:
        try:
            return [s for (s,) in self._conn.execute("SELECT step FROM steps ORDER BY step")]
        except sqlite3.DatabaseError as e:
            raise TrailError(f"{self.path!r}: unreadable steps table ({e})") from None

    def rows(self) -> Iterator[StepRow]:
        """Every committed step, in step order."""
        try:
            cur = self._conn.execute(
                "SELECT step, n_tensors, fingerprints, loss, batch_hash, rng_torch, rng_cuda, rng_numpy, rng_python, "
                "contracts FROM steps ORDER BY step")
            for step, n, blob, loss, bh, rt, rc, rn, rp, contracts in cur:
                if isinstance(n, int) and n > len(self.tensors):
                    self._load_tensors()
                if not isinstance(blob, bytes) or len(blob) != 16 * n or n > len(self.tensors):
                    raise TrailError(f"{self.path!r}: step {step} has a corrupt fingerprint row")
                yield StepRow(step, blob, loss, bh, {"torch": rt, "cuda": rc, "numpy": rn, "python": rp},
                              json.loads(contracts))
        except sqlite3.DatabaseError as e:
            raise TrailError(f"{self.path!r}: unreadable steps table ({e})") from None
        except ValueError as e:
            raise TrailError(f"{self.path!r}: corrupt step row ({e})") from None

    def close(self) -> None:
        self._conn.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
