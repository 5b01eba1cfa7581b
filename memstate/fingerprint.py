"""msfp1 tensor fingerprints and state fingerprints.

``fingerprint(t)`` is the 128-bit msfp1 hash of a tensor's logical row-major bytes
(docs/fingerprint.md); dtype and shape are not part of it. ``fingerprint_state(obj)`` maps each
named tensor of a module, optimizer or dict to its fingerprint and digests the sorted
(name, dtype, shape, fingerprint) entries with xxh3-128.
"""
from __future__ import annotations

import struct
from typing import Dict, Iterator, List, Mapping, Sequence, Tuple, Union

import numpy as np
import torch

from memstate import _ext

__all__ = [
    "Fingerprint",
    "StateFingerprint",
    "fingerprint",
    "fingerprint_many",
    "fingerprint_partial",
    "finalize_partial",
    "fingerprint_state",
    "named_state_tensors",
]

_M64 = (1 << 64) - 1
STATE_DIGEST_MAGIC = b"memstate.state.msfp1.v1\0"


class _PyFingerprint:
    """An immutable msfp1 fingerprint: two 64-bit lanes.

    ``hex()`` gives 32 lowercase hex digits (lane 0 then lane 1); ``lanes`` the two ints;
    ``to_bytes()`` the 16-byte form (each lane little-endian), which ``from_bytes`` reads back.
    Equal fingerprints compare equal and hash alike, so they work as dict keys and in sets.

    The reference implementation of ``Fingerprint``, which is a static C type of the same
    behaviour (memstate._fingerprint, csrc/py/fingerprint_type.cpp: one small untracked object
    per fingerprint, built by memstate._C straight from the kernels' lane rows); this class is
    ``Fingerprint`` only where that module is not built. Tests compare the two.
    """

    # The 16-byte form is the whole state.
    __slots__ = ("_raw",)

    def __init__(self, lane0: int, lane1: int):
        for i, v in enumerate((lane0, lane1)):
            if not isinstance(v, int) or not 0 <= v <= _M64:
                raise ValueError(f"Fingerprint lane {i} must be an int in [0, 2^64), got {v!r}")
        object.__setattr__(self, "_raw", _PAIR.pack(lane0, lane1))

    def __setattr__(self, name, value):
        raise AttributeError("Fingerprint is immutable")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Fingerprint":
        """Reads the 16-byte form produced by ``to_bytes()``."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) != 16:
            raise ValueError(f"a msfp1 fingerprint is 16 bytes, got {data!r}")
        fp = _new(cls)
        _set_raw(fp, bytes(data))
        return fp

    @classmethod
    def fromhex(cls, text: str) -> "Fingerprint":
        """Parses the 32-hex-digit form produced by ``hex()``."""
        if not isinstance(text, str) or len(text) != 32:
            raise ValueError(f"a msfp1 fingerprint is 32 hex digits, got {text!r}")
        try:
            return cls(int(text[:16], 16), int(text[16:], 16))
        except ValueError:
            raise ValueError(f"a msfp1 fingerprint is 32 hex digits, got {text!r}") from None

    @property
    def lanes(self) -> Tuple[int, int]:
        return _PAIR.unpack(self._raw)

    def hex(self) -> str:
        raw = self._raw
        return raw[7::-1].hex() + raw[:7:-1].hex()  # each lane's bytes, most significant first

    def to_bytes(self) -> bytes:
        """16 bytes: lane 0 then lane 1, each little-endian."""
        return self._raw

    def __eq__(self, other):
        return isinstance(other, _PyFingerprint) and self._raw == other._raw

    def __hash__(self):
        return hash(self._raw)

    def __reduce__(self):  # copy, deepcopy and pickle (immutable: rebuilt, not set slot by slot)
        return (type(self).from_bytes, (self._raw,))

    def __repr__(self):
        return f"Fingerprint('{self.hex()}')"

    __str__ = hex


_PAIR = struct.Struct("<QQ")
_new = object.__new__
_set_raw = _PyFingerprint.__dict__["_raw"].__set__  # the slot's own setter: skips __setattr__

try:
    from memstate._fingerprint import Fingerprint  # the C type (see _PyFingerprint)

    _NATIVE_FINGERPRINT = True
except ImportError:  # not built: the reference implementation (the native builders need both)
    Fingerprint = _PyFingerprint  # type: ignore[misc]
    Fingerprint.__name__ = Fingerprint.__qualname__ = "Fingerprint"
    _NATIVE_FINGERPRINT = False


def _from_rows(rows: torch.Tensor) -> List[Fingerprint]:
    """int64 [..., 2] rows of msfp1 lanes (uint64 bit patterns), on any device -> one Fingerprint
    per row, built in one native loop (memstate._C.fingerprints_from_rows)."""
    rows = rows.detach()
    if rows.device.type != "cpu":  # rows already fetched (a step's batched fetch) are not touched again
        rows = rows.cpu()
    host = rows.reshape(-1, 2).contiguous().numpy()
    if not _NATIVE_FINGERPRINT:
        return [Fingerprint.from_bytes(r.tobytes()) for r in host]
    return _ext.load().fingerprints_from_rows(host)


def _check_tensor(t, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{name}: nested tensors are not supported (fingerprint each component)")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: {t.layout} tensors are not supported; only dense strided ones")
    if t.is_meta or t.device.type == "meta":
        raise TypeError(f"{name}: meta tensors have no data to fingerprint")
    if t.is_quantized:
        raise TypeError(f"{name}: quantized tensors are not supported")
    return t.detach()


def _lanes_from_rows(rows: torch.Tensor) -> List[Tuple[int, int]]:
    """int64 [N, 2] rows of uint64 bit patterns -> [(lane0, lane1)]."""
    lanes = rows.cpu().numpy().view(np.uint64)
    return list(zip(lanes[:, 0].tolist(), lanes[:, 1].tolist()))


def _one_call_rows(tensors: List[torch.Tensor]):
    """The rows of one native call over all of ``tensors``, or None where that call refuses them
    (a tensor fingerprint_many rejects, several devices, not a tensor) or answers for meta
    tensors (their fake): the checked path then names the offender or splits the call by device.
    Per tensor this costs only the op's own argument handling, the bulk of a call over many
    small tensors."""
    try:
        rows = _ext.ops().fingerprint(tensors)
    except (RuntimeError, TypeError):
        return None
    return None if rows.is_meta else rows


def fingerprint_many(tensors: Sequence[torch.Tensor], names: Sequence[str] = None) -> List[Fingerprint]:
    """Fingerprints of many tensors, one native pass per device (a single sync per device).

    ``names`` (default ``tensors[i]``) only name the offending tensor in errors.
    """
    tensors = list(tensors)
    names = list(names) if names is not None else None
    if not tensors:
        return []
    if names is None or len(names) == len(tensors):
        # None: not all plain CPU tensors
        out = _ext.load().fingerprint_many_cpu(tensors) if _NATIVE_FINGERPRINT else None
        if out is not None:
            return out
        rows = _one_call_rows(tensors)
        if rows is not None:
            return _from_rows(rows)
    names = names if names is not None else [f"tensors[{i}]" for i in range(len(tensors))]
    checked = [_check_tensor(t, n) for t, n in zip(tensors, names)]
    out: List[Fingerprint] = [None] * len(checked)  # type: ignore[list-item]
    by_device: Dict[torch.device, List[int]] = {}
    for i, t in enumerate(checked):
        by_device.setdefault(t.device, []).append(i)
    for idxs in by_device.values():
        rows = _ext.ops().fingerprint([checked[i] for i in idxs])
        for i, fp in zip(idxs, _from_rows(rows)):
            out[i] = fp
    return out


def fingerprint(tensor: torch.Tensor) -> Fingerprint:
    """msfp1 fingerprint of a dense tensor's logical row-major bytes, on its own device.

    Any dtype, any shape (0-d and empty included), any view: the bytes are those of
    ``tensor.contiguous()``. Sparse, meta, nested and quantized tensors raise TypeError.
    """
    return fingerprint_many([tensor], ["tensor"])[0]


def fingerprint_partial(shard: torch.Tensor, first_word: int = 0) -> Tuple[int, int]:
    """msfp1 partial sums (S_0, S_1) of a shard of a larger tensor's bytes.

    ``first_word`` is the shard's offset in the whole tensor in 8-byte words (pairs); every
    shard but the last must hold a multiple of 8 bytes. The sums of all shards, added mod 2^64,
    finalised with ``finalize_partial(s0, s1, total_bytes)``, equal ``fingerprint(whole)``.
    """
    shard = _check_tensor(shard, "shard")
    if not isinstance(first_word, int) or first_word < 0:
        raise ValueError(f"first_word must be a non-negative int, got {first_word!r}")
    rows = _ext.ops().fingerprint_sums([shard], [first_word])
    return _lanes_from_rows(rows)[0]


def finalize_partial(s0: int, s1: int, total_bytes: int) -> Fingerprint:
    """Finalises summed partial lanes into the fingerprint of a tensor of ``total_bytes`` bytes."""
    from memstate.reference import finalize

    if total_bytes < 0:
        raise ValueError(f"total_bytes must be >= 0, got {total_bytes}")
    return Fingerprint(*finalize(s0 & _M64, s1 & _M64, total_bytes))


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class StateFingerprint(Mapping[str, Fingerprint]):
    """Fingerprints of named tensors: a read-only mapping name -> Fingerprint.

    ``digest`` is xxh3-128 (32 hex digits) over the canonical serialisation of the entries
    sorted by name (docs/fingerprint.md): the magic ``memstate.state.msfp1.v1\\0``, then per
    entry u32 length + UTF-8 name, u32 length + dtype name (e.g. ``float32``), u32 ndim,
    ndim x u64 sizes, and the 16 fingerprint bytes (lane 0, lane 1, little-endian). All
    integers little-endian.
    """

    def __init__(self, entries: Mapping[str, Tuple[Fingerprint, torch.dtype, Tuple[int, ...]]]):
        self._entries = {k: (fp, dt, tuple(int(s) for s in shape)) for k, (fp, dt, shape) in entries.items()}
        self._digest = None

    def __getitem__(self, name: str) -> Fingerprint:
        return self._entries[name][0]

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def dtype(self, name: str) -> torch.dtype:
        return self._entries[name][1]

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._entries[name][2]

    def canonical_bytes(self) -> bytes:
        """The byte string ``digest`` hashes (see the class docstring)."""
        parts = [STATE_DIGEST_MAGIC]
        for name in sorted(self._entries, key=lambda n: n.encode("utf-8")):
            fp, dtype, shape = self._entries[name]
            nb, db = name.encode("utf-8"), _dtype_name(dtype).encode("ascii")
            parts.append(struct.pack("<I", len(nb)) + nb + struct.pack("<I", len(db)) + db)
            parts.append(struct.pack(f"<I{len(shape)}Q", len(shape), *shape))
            parts.append(fp.to_bytes())
        return b"".join(parts)

    @property
    def digest(self) -> str:
        if self._digest is None:
            import xxhash

            self._digest = xxhash.xxh3_128_hexdigest(self.canonical_bytes())
        return self._digest

    def diff(self, other: "StateFingerprint") -> List[str]:
        """Sorted names whose entry differs (fingerprint, dtype or shape) or exists on one side only."""
        if not isinstance(other, StateFingerprint):
            raise TypeError(f"diff() needs a StateFingerprint, got {type(other).__name__}")
        names = set(self._entries) | set(other._entries)
        return sorted(n for n in names if self._entries.get(n) != other._entries.get(n))

    def __eq__(self, other):
        if not isinstance(other, StateFingerprint):
            return NotImplemented
        return self._entries == other._entries

    __hash__ = None  # mutable-looking mapping semantics: compare by value, do not hash

    def to_json(self) -> Dict[str, dict]:
        """JSON-friendly form: name -> {fingerprint, dtype, shape}."""
        return {
            n: {"fingerprint": fp.hex(), "dtype": _dtype_name(dt), "shape": list(shape)}
            for n, (fp, dt, shape) in sorted(self._entries.items())
        }

    def __repr__(self):
        return f"StateFingerprint({len(self)} tensors, digest={self.digest})"


StateLike = Union[torch.nn.Module, torch.optim.Optimizer, Mapping[str, torch.Tensor]]


def named_state_tensors(obj: StateLike) -> List[Tuple[str, torch.Tensor]]:
    """The named tensors ``fingerprint_state`` covers.

    - ``nn.Module``: named parameters and named buffers (as ``state_dict`` names them).
    - ``Optimizer``: every tensor in its state, named ``state.{index}.{key}`` where index is
      the parameter's position over all param_groups (as in ``optimizer.state_dict()``).
      Non-tensor state values are skipped.
    - a mapping of names to tensors (as given), or to modules, optimizers or further mappings,
      whose names are prefixed with the key and a dot: ``{"model": m, "optimizer": o}`` gives
      ``model.fc.weight``, ``optimizer.state.0.exp_avg``, ... (the names of ``Snapshot``).
    """
    if isinstance(obj, torch.nn.Module):
        items = list(obj.named_parameters()) + list(obj.named_buffers())
        return [(n, t) for n, t in items if t is not None]
    if isinstance(obj, torch.optim.Optimizer):
        out = []
        index = 0
        for group in obj.param_groups:
            for p in group["params"]:
                for key, value in sorted(obj.state.get(p, {}).items()):
                    if isinstance(value, torch.Tensor):
                        out.append((f"state.{index}.{key}", value))
                index += 1
        return out
    if isinstance(obj, Mapping):
        out = []
        for name, value in obj.items():
            if not isinstance(name, str):
                raise TypeError(f"state dict keys must be str, got {name!r}")
            if isinstance(value, torch.Tensor):
                out.append((name, value))
            elif isinstance(value, (torch.nn.Module, torch.optim.Optimizer, Mapping)):
                out += [(f"{name}.{n}", t) for n, t in named_state_tensors(value)]
            else:
                raise TypeError(
                    f"state entry {name!r} is a {type(value).__name__}, not a tensor, module, optimizer or dict"
                )
        return out
    raise TypeError(
        f"fingerprint_state takes an nn.Module, an Optimizer or a dict of tensors, got {type(obj).__name__}"
    )


def fingerprint_state(obj: StateLike) -> StateFingerprint:
    """StateFingerprint of a module, an optimizer or a dict of named tensors.

    One native pass per device over all tensors. See ``named_state_tensors`` for the names.
    """
    named = named_state_tensors(obj)
    fps = fingerprint_many([t for _, t in named], [n for n, _ in named])
    return StateFingerprint({n: (fp, t.dtype, tuple(t.shape)) for (n, t), fp in zip(named, fps)})
