"""RNG contracts: named, history-free random streams with a consumption log.

A training run draws randomness for several purposes: weight initialisation, data order,
augmentation, dropout, perturbations. If all of them share one global generator, a change in
one place (an extra augmentation draw in the treatment arm, say) silently shifts every draw
after it, and two arms of an experiment stop being comparable. An ``RngContract`` gives each
purpose its own *stream*, and each draw its own seed derived from

    (root seed, stream name, index)

alone, through xxh3, so a generator handed out for ``("augment", step=7)`` is the same whatever
was drawn before it, in any process, on any machine::

    contract = RngContract(1234)
    g = contract.generator("augment", step=t)    # fresh torch.Generator, never shared
    rs = contract.numpy("augment", step=t)       # fresh numpy Generator (PCG64)
    with contract.step(t):                       # global torch RNG seeded for dropout
        loss = model(x)

Every generator handed out is recorded in the *consumption log* as ``(stream, index)``. Two
arms of a branch-and-hold experiment can then prove they consumed the same draws
(``log_hash()``), or find which stream differs and where (``compare_logs``). The experiment's
declared contract is the set of streams the treatment may change;
``RngContract.check(control_log, treatment_log, may_change=("perturb",))`` raises
``ContractViolation`` naming the stream and step of every other difference.

Seed derivation (``memstate.rng.v1``), the canonical byte string hashed by xxh3_64::

    b"memstate.rng.v1\\0"                          16-byte magic, version of this layout
    root_seed   8 bytes, little-endian two's complement (the value modulo 2^64)
    u32 LE byte length of the stream name, then the name in UTF-8
    for each index item, positional ints first (in order), then keyword items sorted by name:
        u32 LE byte length of the item's name (0 for a positional item), the name in UTF-8,
        the value: 8 bytes, little-endian two's complement (the value modulo 2^64)

    seed = xxh3_64(bytes, seed=0)                  an unsigned 64-bit int

So positional and keyword indices never collide (``seed("data", 3) != seed("data", epoch=3)``),
keyword order does not matter (``seed(s, a=1, b=2) == seed(s, b=2, a=1)``), and every field is
length-prefixed, so no two different inputs share a byte string. Index values and the root seed
may be any int in [-2^63, 2^64); -1 and 2^64-1 therefore denote the same seed. Booleans and
floats are rejected (``epoch=True`` or ``step=1.0`` is almost certainly a bug).

Seeds become generators with ``torch.Generator(device).manual_seed(seed)`` and
``numpy.random.Generator(numpy.random.PCG64(seed))``: the *seed* is platform- and
version-independent; the draws then depend on torch's and numpy's generator algorithms
(stable within a version).

Live contracts register themselves by ``name`` (weak references: a contract that is no longer
referenced disappears from the registry). ``active_state()`` / ``load_active_state()`` give
``Snapshot.capture`` / ``restore`` the state of every live contract, so the consumption logs
travel with every snapshot.
"""
from __future__ import annotations

import contextlib
import operator
import struct
import weakref
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import xxhash

__all__ = [
    "RngContract",
    "ContractViolation",
    "UnknownStreamError",
    "DEFAULT_STREAMS",
    "SEED_MAGIC",
    "LOG_MAGIC",
    "active_state",
    "active_names",
    "load_active_state",
]

SEED_MAGIC = b"memstate.rng.v1\0"
LOG_MAGIC = b"memstate.rnglog.v1\0"
DEFAULT_STREAMS: Tuple[str, ...] = ("init", "data", "augment", "model", "perturb")
STATE_FORMAT = "memstate.rng.RngContract"
STATE_VERSION = 1

_M64 = (1 << 64) - 1
_MIN = -(1 << 63)  # smallest accepted int: two's complement int64
_MAX = _M64  # largest accepted int: uint64

# One index item: a positional int, or a (name, int) pair for a keyword index.
IndexItem = Union[int, Tuple[str, int]]
Index = Tuple[IndexItem, ...]
LogEntry = Tuple[str, Index]


class UnknownStreamError(KeyError, ValueError):
    """A stream name the contract does not declare. Both a KeyError (a failed lookup) and a
    ValueError (a bad argument), so either ``except`` clause catches it; the message lists the
    valid names."""

    def __str__(self):  # KeyError would repr() the message, quotes and all
        return str(self.args[0]) if self.args else ""


class ContractViolation(AssertionError):
    """Two arms of an experiment consumed different random draws in a stream the experiment did
    not declare it may change.

    An AssertionError because it is a failed check of an invariant of the experiment (the same
    family as a failed ``assert``, which is how test runners report it), not a bad argument.
    ``violations`` holds one dict per offending stream, in stream-name order: ``stream``,
    ``position`` (the 0-based number of the stream's first differing draw), ``control`` and
    ``treatment`` (the index of that draw in each arm, None where the arm has no such draw),
    ``control_count`` and ``treatment_count`` (draws of the stream in each arm).
    """

    def __init__(self, message: str, violations: List[Dict[str, Any]]):
        super().__init__(message)
        self.violations = violations


# ----------------------------------------------------------------------------------- encoding
def _check_int(value: Any, what: str) -> int:
    """An int in [-2^63, 2^64), or TypeError/ValueError naming `what`."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{what} must be an int, got a bool ({value!r})")
    try:
        v = operator.index(value)
    except TypeError:
        raise TypeError(f"{what} must be an int, got {type(value).__name__} ({value!r})") from None
    if not _MIN <= v <= _MAX:
        raise ValueError(f"{what} must be in [-2^63, 2^64), got {v}")
    return v


def _u64(v: int) -> bytes:
    return struct.pack("<Q", v & _M64)


def _text(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<I", len(b)) + b


def _normalize_index(index: Sequence[Any], named_index: Mapping[str, Any]) -> Index:
    """The canonical index tuple: positional ints in order, then (name, int) sorted by name."""
    items: List[IndexItem] = [_check_int(v, f"index[{i}]") for i, v in enumerate(index)]
    for key in sorted(named_index):
        items.append((key, _check_int(named_index[key], f"index {key}=")))
    return tuple(items)


def _encode_index(index: Index) -> bytes:
    parts = []
    for item in index:
        if isinstance(item, tuple):
            parts.append(_text(item[0]) + _u64(item[1]))
        else:
            parts.append(_text("") + _u64(item))
    return b"".join(parts)


def format_index(index: Index) -> str:
    """Human form of an index tuple: ``(5, ("step", 3))`` -> ``"5, step=3"``; ``()`` -> ``"()"``."""
    if not index:
        return "()"
    return ", ".join(f"{it[0]}={it[1]}" if isinstance(it, tuple) else str(it) for it in index)


def _entry_from_json(entry: Any, where: str) -> LogEntry:
    """A log entry from its state_dict form ``[stream, [item, ...]]``, item an int or [name, int]."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2 or not isinstance(entry[0], str):
        raise ValueError(f"{where}: a log entry is [stream, index], got {entry!r}")
    stream, raw = entry
    if not isinstance(raw, (list, tuple)):
        raise ValueError(f"{where}: the index of a log entry is a list, got {raw!r}")
    items: List[IndexItem] = []
    for j, it in enumerate(raw):
        if isinstance(it, (list, tuple)):
            if len(it) != 2 or not isinstance(it[0], str):
                raise ValueError(f"{where}: keyword index item {j} is [name, int], got {it!r}")
            items.append((it[0], _check_int(it[1], f"{where} index item {it[0]}=")))
        else:
            items.append(_check_int(it, f"{where} index item {j}"))
    return stream, tuple(items)


def _normalize_log(log: Any, what: str) -> List[LogEntry]:
    """A log given as a contract, a list of (stream, index) tuples or its JSON (state_dict) form."""
    if isinstance(log, RngContract):
        return log._log
    if not isinstance(log, (list, tuple)):
        raise TypeError(f"{what} must be an RngContract or a list of (stream, index) entries, "
                        f"got {type(log).__name__}")
    return [_entry_from_json(e, f"{what}[{i}]") for i, e in enumerate(log)]


def _per_stream(log: Sequence[LogEntry]) -> Dict[str, List[Index]]:
    out: Dict[str, List[Index]] = {}
    for stream, index in log:
        out.setdefault(stream, []).append(index)
    return out


# ----------------------------------------------------------------------------------- registry
# name -> weak references to the live, registered contracts of that name. More than one live
# contract under a name is allowed to exist (tests, notebooks), but active_state() refuses to
# pick one: a snapshot that silently captured the wrong arm's contract would be worse than an
# error.
_REGISTRY: Dict[str, List["weakref.ReferenceType[RngContract]"]] = {}


def _live(name: str) -> List["RngContract"]:
    refs = _REGISTRY.get(name, [])
    live = [c for c in (r() for r in refs) if c is not None]
    if len(live) != len(refs):
        alive = [r for r in refs if r() is not None]
        if alive:
            _REGISTRY[name] = alive
        else:
            _REGISTRY.pop(name, None)
    return live


def _register(contract: "RngContract") -> None:
    _live(contract._name)  # prune dead references first, so the list cannot grow without bound
    _REGISTRY.setdefault(contract._name, []).append(weakref.ref(contract))


def _unregister(contract: "RngContract") -> None:
    refs = _REGISTRY.get(contract._name)
    if refs is not None:
        refs[:] = [r for r in refs if r() is not None and r() is not contract]
        if not refs:
            del _REGISTRY[contract._name]


def _unique_live() -> Dict[str, "RngContract"]:
    """name -> the one live registered contract; ValueError naming every ambiguous name."""
    out, dup = {}, []
    for name in sorted(list(_REGISTRY)):
        live = _live(name)
        if len(live) > 1:
            dup.append(f"{name!r} ({len(live)} live)")
        elif live:
            out[name] = live[0]
    if dup:
        raise ValueError(
            f"several live RngContracts share a name: {', '.join(dup)}; give each a unique name= "
            f"(or register=False for private ones) so snapshots know which state is which")
    return out


def active_names() -> List[str]:
    """Sorted names of the live registered contracts (cheap: no state is serialised). Raises
    ValueError if two live contracts share a name."""
    return sorted(_unique_live())


def active_state() -> Dict[str, dict]:
    """JSON-able ``{name: contract.state_dict()}`` of every live registered contract.

    ``Snapshot.capture`` stores this with the global RNG states. Raises ValueError naming the
    name if two live registered contracts share it (which one to capture would be a guess)."""
    return {name: c.state_dict() for name, c in _unique_live().items()}


def load_active_state(state: Mapping[str, Any]) -> None:
    """Loads ``active_state()`` output into the live contracts of the same names.

    Every name in ``state`` must belong to exactly one live registered contract (ValueError
    naming the unknown or ambiguous ones otherwise); live contracts not named in ``state`` are
    left alone. Everything is validated before anything is loaded, so a bad state changes
    nothing."""
    live, parsed = _validate_active_state(state)
    for name, p in parsed.items():
        live[name]._apply_state(p)


def validate_active_state(state: Mapping[str, Any]) -> None:
    """Checks ``state`` as ``load_active_state`` would (ValueError/TypeError naming the contract
    and field), without loading anything."""
    _validate_active_state(state)


def _validate_active_state(state: Any) -> Tuple[Dict[str, "RngContract"], Dict[str, Dict[str, Any]]]:
    if not isinstance(state, Mapping):
        raise TypeError(f"RNG contract state must be a dict of name -> state_dict, got {type(state).__name__}")
    live = _unique_live()
    unknown = sorted(str(k) for k in state if k not in live)
    if unknown:
        raise ValueError(f"no live RngContract named {', '.join(repr(u) for u in unknown)} "
                         f"(live: {sorted(live) or 'none'}); create them before loading their state")
    parsed = {name: RngContract._parse_state(sd, f"RngContract {name!r}") for name, sd in state.items()}
    for name, p in parsed.items():
        if p["name"] != name:
            raise ValueError(f"RngContract {name!r}: its state_dict names it {p['name']!r}")
    return live, parsed


# ----------------------------------------------------------------------------------- contract
class RngContract:
    """Named random streams derived from one root seed, with a consumption log.

    Args:
        root_seed: int in [-2^63, 2^64); the only source of randomness of every stream.
        streams: the stream names this contract serves (non-empty, unique, non-empty strings);
            default ``DEFAULT_STREAMS`` = ("init", "data", "augment", "model", "perturb").
            ``model`` is the stream ``step()`` seeds the global RNG from (dropout).
        name: the key of this contract in snapshots (``active_state()``). Give each live
            contract of a process its own name.
        register: False keeps the contract out of the registry (and out of snapshots), for
            private contracts such as an ``OrderSampler``'s default one.

    Invariant: ``seed(stream, *index, **named_index)``, and so every generator handed out,
    depends only on (root_seed, stream, index), never on what was drawn before or on the log.
    """

    def __init__(self, root_seed: int, streams: Optional[Sequence[str]] = None, *, name: str = "default",
                 register: bool = True):
        self._root_seed = _check_int(root_seed, "root_seed")
        self._streams = self._check_streams(DEFAULT_STREAMS if streams is None else streams)
        if not isinstance(name, str) or not name:
            raise ValueError(f"RngContract name must be a non-empty string, got {name!r}")
        self._name = name
        self._log: List[LogEntry] = []
        self._registered = bool(register)
        if self._registered:
            _register(self)

    # ------------------------------------------------------------------ properties
    @staticmethod
    def _check_streams(streams: Any) -> Tuple[str, ...]:
        if isinstance(streams, str):
            raise TypeError(f"streams must be a sequence of names, got the string {streams!r} "
                            f"(did you mean ({streams!r},)?)")
        out = tuple(streams)
        if not out:
            raise ValueError("streams must name at least one stream")
        seen = set()
        for i, s in enumerate(out):
            if not isinstance(s, str) or not s:
                raise ValueError(f"streams[{i}] must be a non-empty string, got {s!r}")
            if s in seen:
                raise ValueError(f"stream {s!r} is declared twice")
            seen.add(s)
        return out

    @property
    def root_seed(self) -> int:
        return self._root_seed

    @property
    def streams(self) -> Tuple[str, ...]:
        return self._streams

    @property
    def name(self) -> str:
        return self._name

    @property
    def log(self) -> List[LogEntry]:
        """A copy of the consumption log: ``(stream, index)`` per generator handed out (and per
        ``step()``), in order. ``index`` is the canonical index tuple: positional ints, then
        ``(name, value)`` pairs sorted by name, e.g. ``(5,)`` or ``(("step", 3),)``."""
        return list(self._log)

    def __repr__(self):
        return (f"RngContract(root_seed={self._root_seed}, streams={self._streams!r}, name={self._name!r}, "
                f"log={len(self._log)} entries)")

    # ------------------------------------------------------------------ seeds and generators
    def _check_stream(self, stream: Any) -> str:
        if stream not in self._streams:
            raise UnknownStreamError(f"unknown RNG stream {stream!r}; this contract's streams are "
                                     f"{', '.join(self._streams)}")
        return stream

    def _seed(self, stream: str, index: Index) -> int:
        data = SEED_MAGIC + _u64(self._root_seed) + _text(stream) + _encode_index(index)
        return xxhash.xxh3_64_intdigest(data)

    def seed(self, stream: str, /, *index: int, **named_index: int) -> int:
        """The 64-bit unsigned seed of (root seed, stream, index): xxh3_64 of the canonical
        bytes described in the module docstring. Pure; not logged."""
        return self._seed(self._check_stream(stream), _normalize_index(index, named_index))

    def generator(self, stream: str, /, *index: int, device: Union[str, torch.device] = "cpu",
                  **named_index: int) -> torch.Generator:
        """A fresh ``torch.Generator`` on ``device``, ``manual_seed(seed(stream, *index, ...))``.
        Logged as ``(stream, index)``. (``device`` is the generator's device, not an index.)"""
        stream = self._check_stream(stream)
        index = _normalize_index(index, named_index)
        g = torch.Generator(device=device)
        g.manual_seed(self._seed(stream, index))
        self._log.append((stream, index))
        return g

    def numpy(self, stream: str, /, *index: int, **named_index: int) -> np.random.Generator:
        """A fresh ``numpy.random.Generator(PCG64(seed(stream, *index, ...)))``. Logged as
        ``(stream, index)``."""
        stream = self._check_stream(stream)
        index = _normalize_index(index, named_index)
        g = np.random.Generator(np.random.PCG64(self._seed(stream, index)))
        self._log.append((stream, index))
        return g

    @contextlib.contextmanager
    def step(self, t: int) -> Iterator[int]:
        """Seeds the global torch RNG, CPU and every CUDA device, with ``seed("model", step=t)``
        for the body of the ``with`` (layers such as dropout draw from it), then restores the
        global states as they were before, also when the body raises. Yields the seed.

        Logged as ``("model", (("step", t),))``. The global states of other backends (MPS, XPU)
        and of numpy and Python's ``random`` are not touched."""
        t = _check_int(t, "step t")
        stream = self._check_stream("model")
        index: Index = (("step", t),)
        seed = self._seed(stream, index)
        cpu_state = torch.get_rng_state()
        cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self._log.append((stream, index))
        try:
            torch.default_generator.manual_seed(seed)
            if cuda_states is not None:
                for i in range(len(cuda_states)):
                    torch.cuda.default_generators[i].manual_seed(seed)
            yield seed
        finally:
            torch.set_rng_state(cpu_state)
            if cuda_states is not None:
                torch.cuda.set_rng_state_all(cuda_states)

    # ------------------------------------------------------------------ the log
    def clear_log(self) -> None:
        """Empties the consumption log (e.g. at the start of a hold window)."""
        self._log.clear()

    @staticmethod
    def _hash_log(root_seed: int, log: Sequence[LogEntry]) -> str:
        h = xxhash.xxh3_128()
        h.update(LOG_MAGIC + _u64(root_seed) + struct.pack("<Q", len(log)))
        for stream, index in log:
            h.update(_text(stream) + struct.pack("<I", len(index)) + _encode_index(index))
        return h.hexdigest()

    def log_hash(self) -> str:
        """32 lowercase hex digits: xxh3_128 of the canonical encoding of the root seed and the log.

        Layout: ``b"memstate.rnglog.v1\\0"``, root seed (8 bytes LE, modulo 2^64), u64 LE number of
        entries, then per entry: u32 LE length + UTF-8 stream name, u32 LE number of index items,
        the items encoded as for seeds (u32 length + name, 8-byte LE value). Equal hashes mean the
        same seeds were handed out in the same order; the root seed is included so that two runs
        with different seeds never show equal hashes."""
        return self._hash_log(self._root_seed, self._log)

    @staticmethod
    def compare_logs(log_a: Any, log_b: Any) -> Dict[str, Dict[str, Any]]:
        """Streams whose consumption differs between two logs, with the first differing draw.

        ``log_a``/``log_b``: contracts, lists of (stream, index) or their state_dict form. Logs
        are compared per stream, in order of consumption within the stream: the interleaving of
        different streams is not compared, since it does not change any draw. Returns
        ``{stream: {"position", "a", "b", "count_a", "count_b"}}`` for each differing stream,
        where ``position`` is the 0-based number of the stream's first differing draw and ``a``/``b``
        its index in each log (None where that log has fewer draws). Empty dict: no difference.
        """
        a = _per_stream(_normalize_log(log_a, "log_a"))
        b = _per_stream(_normalize_log(log_b, "log_b"))
        out: Dict[str, Dict[str, Any]] = {}
        for stream in sorted(set(a) | set(b)):
            sa, sb = a.get(stream, []), b.get(stream, [])
            if sa == sb:
                continue
            pos = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
            out[stream] = {"position": pos, "a": sa[pos] if pos < len(sa) else None,
                           "b": sb[pos] if pos < len(sb) else None, "count_a": len(sa), "count_b": len(sb)}
        return out

    @staticmethod
    def check(control_log: Any, treatment_log: Any, may_change: Union[str, Sequence[str]] = ()) -> None:
        """Enforces an experiment's declared RNG contract: the treatment arm may consume
        differently only in the streams of ``may_change``.

        Returns None when every other stream's consumption is identical; otherwise raises
        ``ContractViolation`` whose message names, for every offending stream, the first
        differing draw and its index (step) in both arms, and whose ``violations`` lists them
        (see ContractViolation). A single string ``may_change`` is one stream name."""
        if isinstance(may_change, str):
            may_change = (may_change,)
        allowed = set(may_change)
        diffs = RngContract.compare_logs(control_log, treatment_log)
        violations = []
        lines = []
        for stream, d in diffs.items():
            if stream in allowed:
                continue
            violations.append({"stream": stream, "position": d["position"], "control": d["a"],
                               "treatment": d["b"], "control_count": d["count_a"],
                               "treatment_count": d["count_b"]})
            c = format_index(d["a"]) if d["a"] is not None else f"no draw (only {d['count_a']})"
            t = format_index(d["b"]) if d["b"] is not None else f"no draw (only {d['count_b']})"
            lines.append(f"stream {stream!r} first differs at its draw #{d['position']}: "
                         f"control drew {c}, treatment drew {t}")
        if violations:
            raise ContractViolation(
                f"RNG contract violated in {len(violations)} stream(s) outside "
                f"may_change={tuple(sorted(allowed))}: " + "; ".join(lines), violations)
        return None

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        """JSON-able state: format, version, root_seed, streams, name and the log, with each entry
        as ``[stream, [item, ...]]`` (item: an int, or ``[name, int]`` for a keyword index)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "root_seed": self._root_seed,
            "streams": list(self._streams),
            "name": self._name,
            "log": [[s, [list(it) if isinstance(it, tuple) else it for it in idx]] for s, idx in self._log],
        }

    @staticmethod
    def _parse_state(sd: Any, what: str) -> Dict[str, Any]:
        """Validated state (ValueError/TypeError naming the field), without touching any contract."""
        if not isinstance(sd, Mapping):
            raise TypeError(f"{what}: state_dict must be a dict, got {type(sd).__name__}")
        if sd.get("format", STATE_FORMAT) != STATE_FORMAT:
            raise ValueError(f"{what}: not an RngContract state (format {sd.get('format')!r})")
        if sd.get("version", STATE_VERSION) != STATE_VERSION:
            raise ValueError(f"{what}: state version {sd.get('version')!r} is not supported "
                             f"(this memstate reads {STATE_VERSION})")
        missing = [k for k in ("root_seed", "streams", "name", "log") if k not in sd]
        if missing:
            raise ValueError(f"{what}: state_dict lacks {', '.join(missing)}")
        try:
            streams = RngContract._check_streams(sd["streams"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what}: field 'streams': {e}") from None
        name = sd["name"]
        if not isinstance(name, str) or not name:
            raise ValueError(f"{what}: field 'name' must be a non-empty string, got {name!r}")
        if not isinstance(sd["log"], (list, tuple)):
            raise ValueError(f"{what}: field 'log' must be a list, got {type(sd['log']).__name__}")
        log = [_entry_from_json(e, f"{what}: log[{i}]") for i, e in enumerate(sd["log"])]
        bad = next((i for i, (s, _) in enumerate(log) if s not in streams), None)
        if bad is not None:
            raise ValueError(f"{what}: log[{bad}] names stream {log[bad][0]!r}, not one of {', '.join(streams)}")
        return {"root_seed": _check_int(sd["root_seed"], f"{what}: field 'root_seed'"), "streams": streams,
                "name": name, "log": log}

    def _apply_state(self, p: Dict[str, Any]) -> None:
        if p["name"] != self._name and self._registered:
            _unregister(self)
            self._name = p["name"]
            _register(self)
        self._name = p["name"]
        self._root_seed = p["root_seed"]
        self._streams = p["streams"]
        self._log = list(p["log"])

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Replaces root seed, streams, name and log with those of ``state_dict`` (a
        ``state_dict()``, possibly through JSON). Validates everything first: a bad state raises
        ValueError/TypeError naming the field and leaves the contract unchanged."""
        self._apply_state(self._parse_state(state_dict, f"RngContract {self._name!r}"))
