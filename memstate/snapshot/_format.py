"""Snapshot files: a directory with ``manifest.json`` and one raw data file. No pickle.

Layout of ``<path>/``:

- ``data-<token>.bin``: the bytes of every tensor, each at a 64-byte aligned offset;
- ``manifest.json``: format, versions, every tensor's name, dtype, shape, offset, byte count
  and msfp1 fingerprint, the JSON tree of non-tensor state, the data file's name, size and
  xxh3-128, and ``manifest_xxh3_128`` over the canonical JSON of everything else;
- ``.memstate.lock``: the writers' lock file (``fcntl.flock``), which also records the data
  file of a save in progress (its journal).

Saving, under an exclusive lock on ``.memstate.lock``: checks the free space, records the new
and the previous data file's names in the lock file (fsync), writes the data file under a temporary name (fsync)
and renames it, writes the manifest under a temporary name (fsync) and renames it over
``manifest.json`` (atomic), fsyncs the directory, and only then removes the data file the
previous manifest named. A failed save removes what it wrote; a killed one leaves it recorded in
the lock file, and the next save removes it. No other file is ever removed. A crash at any point
leaves either the old or the new snapshot complete.

Loading holds a shared lock on ``.memstate.lock`` (when it exists) while it reads; it validates
the manifest's structure and checksum, the data file's size and hash, every tensor's dtype,
shape, offset and fingerprint, before anything is bound or restored; the data file is read
straight into the arena (peak memory: the data size once).
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import re
import stat
import time
import uuid
from typing import Any, Dict, List, Optional

import torch
import xxhash

from memstate._version import __version__
from memstate.fingerprint import Fingerprint, fingerprint_many
from memstate.snapshot._arena import _collect_tensor_names
from memstate.snapshot._bind import _HYPER_POLICIES
from memstate.snapshot._common import (ALIGN, DIST_FORMAT, FORMAT, FORMAT_VERSION, SnapshotError, _dtype_from_name,
                                       _dtype_name, _Entry)
from memstate.snapshot._rng import _json_meta

MANIFEST = "manifest.json"
LOCK = ".memstate.lock"
MAX_MANIFEST_BYTES = 256 * 2**20
_DATA_NAME = re.compile(r"data-[0-9a-f]{16}\.bin")  # the names save() gives its data files
_CHUNK = 64 * 2**20  # bytes per write/read call


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, chunks) -> None:
    """Writes the byte chunks (bytes or memoryviews) to a new file and fsyncs it."""
    with open(path, "xb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


# ----------------------------------------------------------------------------------- lock
class _Lock:
    """Exclusive ``flock`` on ``<dir>/.memstate.lock``; the file's content is the journal: the
    new and the previous data file names of the save in progress (empty when none)."""

    def __init__(self, path: str, timeout: Optional[float]):
        self.file = os.path.join(path, LOCK)
        try:
            self.fd = os.open(self.file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise SnapshotError(f"{path}: cannot open the lock file {LOCK} to save ({e.strerror})") from None
        deadline = None if not timeout else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if deadline is None or time.monotonic() >= deadline:
                    os.close(self.fd)
                    waited = f" after waiting {timeout} s" if timeout else ""
                    raise SnapshotError(f"{path}: another process is saving a snapshot here (the lock {self.file} "
                                        f"is held){waited}; pass save(path, timeout=seconds) to wait") from None
                time.sleep(0.02)

    def journal(self) -> str:
        os.lseek(self.fd, 0, os.SEEK_SET)
        return os.read(self.fd, 256).decode("ascii", "replace").strip()

    def set_journal(self, text: str) -> None:
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, text.encode("ascii"), 0)
        os.fsync(self.fd)

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor releases the flock


def _shared_lock(path: str) -> Optional[int]:
    """A shared flock on the lock file, if there is one (readers of read-only copies have none)."""
    try:
        fd = os.open(os.path.join(path, LOCK), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return None
    return fd


def _current_manifest(path: str) -> Optional[dict]:
    """The JSON of ``path/manifest.json`` (unverified), or None when it cannot be read."""
    try:
        with open(os.path.join(path, MANIFEST), "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _manifest_format(path: str) -> Optional[str]:
    """The ``format`` field of ``path/manifest.json``, or None when it cannot be read."""
    fmt = (_current_manifest(path) or {}).get("format")
    return fmt if isinstance(fmt, str) else None


def _current_data_file(path: str) -> Optional[str]:
    """The data file the manifest at `path` names, if it is one save() could have written.
    Refuses a directory whose manifest is the global manifest of per-rank snapshots."""
    manifest = _current_manifest(path) or {}
    if manifest.get("format") == DIST_FORMAT:
        raise SnapshotError(f"{path}: holds a distributed snapshot ({MANIFEST} is its global manifest); save a "
                            f"single-process snapshot to another directory")
    name = manifest.get("data_file")
    return name if isinstance(name, str) and _DATA_NAME.fullmatch(name) else None


def _temporaries(path: str, data_name: str) -> List[str]:
    token = data_name[len("data-"):-len(".bin")]
    return [os.path.join(path, data_name + ".tmp"), os.path.join(path, f"{MANIFEST}.tmp-{token}")]


# ----------------------------------------------------------------------------------- save
def _layout(snap) -> tuple:
    """(manifest entries, data size in bytes) of the file layout: 64-byte aligned offsets."""
    entries, offset = [], 0
    for e, fp in zip(snap._entries, snap._fingerprints()):
        start = (offset + ALIGN - 1) // ALIGN * ALIGN
        entries.append({"name": e.name, "dtype": _dtype_name(e.dtype), "shape": list(e.shape), "offset": start,
                        "nbytes": e.nbytes, "fingerprint": fp.hex(), "in_state": e.in_state,
                        "device": str(e.device)})
        offset = start + e.nbytes
    return entries, offset


def _pieces(snap, entries: List[dict], h) -> Any:
    """The data file's bytes, piece by piece (arena memory itself for host arenas), hashed into h."""
    offset = 0
    for e, m in zip(snap._entries, entries):
        pad = m["offset"] - offset
        if pad:
            h.update(b"\0" * pad)
            yield b"\0" * pad
        if e.nbytes:
            slot = snap._slot(e)
            data = memoryview(slot.numpy() if slot.device.type == "cpu" else slot.cpu().numpy())
            for i in range(0, e.nbytes, _CHUNK):
                piece = data[i:i + _CHUNK]
                h.update(piece)
                yield piece
        offset = m["offset"] + e.nbytes


def save(snap, path: str, timeout: Optional[float] = None, fields: Optional[Dict[str, Any]] = None) -> str:
    """Saves `snap` to directory `path`; returns the new manifest's ``manifest_xxh3_128``.
    ``fields``: further top-level manifest fields (a per-rank snapshot's ``distributed``)."""
    os.makedirs(path, exist_ok=True)
    lock = _Lock(path, timeout)
    try:
        return _save_locked(snap, path, lock, fields or {})
    finally:
        lock.release()


def _save_locked(snap, path: str, lock: _Lock, fields: Dict[str, Any]) -> str:
    # 1. leftovers of a save that was killed: its journal names its new data file and the one
    #    it was replacing; whichever the current manifest does not name is garbage
    previous = _current_data_file(path)  # (refuses the global manifest of per-rank snapshots)
    for name in lock.journal().split():
        if _DATA_NAME.fullmatch(name):
            if name != previous:
                _remove(os.path.join(path, name))
            for tmp in _temporaries(path, name):
                _remove(tmp)
    # 2. free space: the new data file and manifest, while the old ones still exist
    entries, data_nbytes = _layout(snap)
    manifest_estimate = 2 * len(_canonical({"tensors": entries, "meta": _json_meta(snap._meta)})) + 4096
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if data_nbytes + manifest_estimate > free:
        raise SnapshotError(f"{path}: saving needs {data_nbytes + manifest_estimate} bytes (data {data_nbytes}, "
                            f"manifest about {manifest_estimate}) while the old snapshot stays until the new one "
                            f"is complete; {free} bytes are free")
    # 3. data, then manifest; on any failure remove what this save wrote
    data_name = f"data-{uuid.uuid4().hex[:16]}.bin"
    tmp_data, tmp_manifest = _temporaries(path, data_name)
    data_path = os.path.join(path, data_name)
    lock.set_journal(f"{data_name} {previous or ''}")
    committed = False
    try:
        h = xxhash.xxh3_128()
        _write_file(tmp_data, _pieces(snap, entries, h))
        os.replace(tmp_data, data_path)
        manifest = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "memstate": __version__,
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "align": ALIGN,
            "data_file": data_name,
            "data_nbytes": data_nbytes,
            "data_xxh3_128": h.hexdigest(),
            "tensors": entries,
            "meta": _json_meta(snap._meta),
            **fields,
        }
        manifest["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(_canonical(manifest))
        _write_file(tmp_manifest, [json.dumps(manifest, indent=1, allow_nan=False).encode()])
        os.replace(tmp_manifest, os.path.join(path, MANIFEST))
        committed = True
        _fsync_dir(path)
    finally:
        if not committed:
            for p in (tmp_data, data_path, tmp_manifest):
                _remove(p)
            lock.set_journal("")
    # 4. the previous snapshot's data file, now named by no manifest
    if previous is not None and previous != data_name:
        _remove(os.path.join(path, previous))
    lock.set_journal("")
    return manifest["manifest_xxh3_128"]


# ----------------------------------------------------------------------------------- load
def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def _read_manifest(path: str, fmt: str = FORMAT, version: int = FORMAT_VERSION) -> dict:
    """The manifest at `path` of format `fmt`, structure and checksum verified; its
    ``manifest_xxh3_128`` is kept in the returned dict."""
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise SnapshotError(f"{path}: no {MANIFEST} (not a memstate snapshot directory)")
    if os.path.getsize(mpath) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{mpath}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read(MAX_MANIFEST_BYTES + 1).decode("utf-8"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise SnapshotError(f"{mpath}: corrupt manifest ({e})") from None
    except RecursionError:
        raise SnapshotError(f"{mpath}: corrupt manifest (nested too deeply)") from None
    if isinstance(manifest, dict) and fmt == FORMAT and manifest.get("format") == DIST_FORMAT:
        raise SnapshotError(f"{mpath}: a distributed snapshot of {manifest.get('world_size')!r} ranks: load it under a "
                            f"process group of that size (Snapshot.load(..., group=...)), or one rank's directory "
                            f"{os.path.join(path, 'rank-<r>')} alone")
    if not isinstance(manifest, dict) or manifest.get("format") != fmt:
        raise SnapshotError(f"{mpath}: not a {fmt} manifest")
    if manifest.get("format_version") != version:
        raise SnapshotError(f"{mpath}: format version {manifest.get('format_version')!r}, this memstate reads "
                            f"{version}")
    claimed = manifest.get("manifest_xxh3_128")
    try:
        actual = xxhash.xxh3_128_hexdigest(_canonical({k: v for k, v in manifest.items() if k != "manifest_xxh3_128"}))
    except (ValueError, TypeError, RecursionError) as e:
        raise SnapshotError(f"{mpath}: corrupt manifest ({type(e).__name__}: {e})") from None
    if claimed != actual:
        raise SnapshotError(f"{mpath}: manifest checksum mismatch (the manifest was modified or corrupted)")
    return manifest


def _field(obj: Any, key: str, kind, where: str) -> Any:
    """obj[key], which must be of type `kind` (bool is not an int here)."""
    if not isinstance(obj, dict) or key not in obj:
        raise SnapshotError(f"{where}: missing field {key!r}")
    v = obj[key]
    if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
        raise SnapshotError(f"{where}: field {key!r} must be {getattr(kind, '__name__', kind)}, got {type(v).__name__}")
    return v


def _entries(manifest: dict, size: int, where: str) -> tuple:
    """(_Entry list, saved fingerprints), every field checked against the data file's size."""
    tensors = _field(manifest, "tensors", list, where)
    entries: List[_Entry] = []
    want: List[Fingerprint] = []
    seen = set()
    for i, t in enumerate(tensors):
        at = f"{where}: tensors[{i}]"
        name = _field(t, "name", str, at)
        at = f"{where}: tensor {name!r}"
        if name in seen:
            raise SnapshotError(f"{at}: listed twice")
        seen.add(name)
        if not name.startswith(("model.", "optimizer.", "extra.", "sampler", "scheduler", "scaler", "rng.")):
            raise SnapshotError(f"{at}: not a snapshot tensor name")
        dtype = _dtype_from_name(_field(t, "dtype", str, at))
        shape = _field(t, "shape", list, at)
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= size for s in shape):
            raise SnapshotError(f"{at}: shape {shape!r} is not a list of sizes in [0, {size}]")
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        off = _field(t, "offset", int, at)
        if nbytes != _field(t, "nbytes", int, at) or off < 0 or off + nbytes > size:
            raise SnapshotError(f"{at}: shape/dtype/offset inconsistent with the data file")
        try:
            fp = Fingerprint.fromhex(_field(t, "fingerprint", str, at))
            device = torch.device(_field(t, "device", str, at))
        except (ValueError, RuntimeError, TypeError) as e:
            raise SnapshotError(f"{at}: {e}") from None
        entries.append(_Entry(name, dtype, tuple(shape), device, off, nbytes, _field(t, "in_state", bool, at)))
        want.append(fp)
    return entries, want


def _read_data(path: str, manifest: dict) -> torch.Tensor:
    """The data file, read straight into a new uint8 arena (no second buffer), size and hash
    checked. Refuses anything but a regular file (symlinks included) inside `path`."""
    data_name = _field(manifest, "data_file", str, path)
    if os.path.basename(data_name) != data_name or not data_name.startswith("data-") or "\0" in data_name:
        raise SnapshotError(f"{path}: invalid data file name {data_name!r}")
    size = _field(manifest, "data_nbytes", int, path)
    digest = _field(manifest, "data_xxh3_128", str, path)
    dpath = os.path.join(path, data_name)
    try:
        fd = os.open(dpath, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        what = "is missing" if e.errno == errno.ENOENT else f"cannot be opened ({e.strerror}; symlinks are refused)"
        raise SnapshotError(f"{path}: data file {data_name} {what}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SnapshotError(f"{dpath}: not a regular file")
    with os.fdopen(fd, "rb", buffering=0) as f:
        if st.st_size != size:
            raise SnapshotError(f"{dpath}: {st.st_size} bytes, the manifest says {size} (truncated or extended)")
        arena = torch.empty(size, dtype=torch.uint8)
        view = memoryview(arena.numpy()) if size else memoryview(b"")
        h = xxhash.xxh3_128()
        pos = 0
        while pos < size:
            got = f.readinto(view[pos:min(size, pos + _CHUNK)])
            if not got:
                raise SnapshotError(f"{dpath}: shorter than {size} bytes (truncated while reading)")
            h.update(view[pos:pos + got])
            pos += got
    if h.hexdigest() != digest:
        raise SnapshotError(f"{dpath}: data checksum mismatch (corrupted or tampered)")
    return arena


def load(cls, path: str, sources: Dict[str, Any], rng: bool, hyperparameters: str = "check"):
    if hyperparameters not in _HYPER_POLICIES:
        raise ValueError(f"hyperparameters must be one of {', '.join(_HYPER_POLICIES)}, got {hyperparameters!r}")
    lock = _shared_lock(path)  # a save in progress finishes first (it may remove the old data file)
    try:
        manifest = _read_manifest(path)
        arena = _read_data(path, manifest)
    finally:
        if lock is not None:
            os.close(lock)
    entries, want = _entries(manifest, arena.numel(), path)
    fps = fingerprint_many([arena[e.offset:e.offset + e.nbytes] for e in entries], [e.name for e in entries])
    bad = [e.name for e, fp, w in zip(entries, fps, want) if fp != w]
    if bad:
        raise SnapshotError(f"{path}: fingerprint mismatch for {', '.join(bad[:10])}")

    # bind to the live objects: same sources, tensor names, shapes and dtypes as the saved state
    meta = _field(manifest, "meta", dict, path)
    saved_sources = _field(meta, "sources", list, f"{path}: meta")
    if not all(isinstance(k, str) for k in saved_sources):
        raise SnapshotError(f"{path}: meta: field 'sources' must be a list of names")
    saved_sources = set(saved_sources)
    given = {k for k, v in sources.items() if v is not None}
    if saved_sources != given:
        missing = sorted(map(str, saved_sources - given))
        extra = sorted(given - saved_sources)
        raise SnapshotError(
            f"{path}: the snapshot holds {sorted(map(str, saved_sources))}"
            + (f"; pass {', '.join(m + '=' for m in missing)}" if missing else "")
            + (f"; it has no state for {', '.join(extra)}" if extra else ""))
    if rng and "rng" not in meta:
        raise SnapshotError(f"{path}: the snapshot holds no RNG state; load it with rng=False")
    live, _ = _collect_tensor_names(sources)
    live = {n: t for n, t in live.items() if not n.startswith("optimizer.")}
    saved = {e.name: e for e in entries if e.in_state and not e.name.startswith("optimizer.")}
    missing = sorted(set(saved) - set(live))
    unexpected = sorted(set(live) - set(saved))
    if missing or unexpected:
        raise SnapshotError(
            f"{path}: the live objects do not match the snapshot:"
            + (f" missing from the live objects: {', '.join(missing[:10])};" if missing else "")
            + (f" not in the snapshot: {', '.join(unexpected[:10])}" if unexpected else ""))
    for name, e in saved.items():
        t = live[name]
        if tuple(t.shape) != e.shape or t.dtype != e.dtype:
            raise SnapshotError(f"{path}: {name}: the snapshot holds {_dtype_name(e.dtype)}{list(e.shape)}, "
                                f"the live tensor is {_dtype_name(t.dtype)}{list(t.shape)}")
    # model/extra tensors go back to the device their live counterpart is on now; optimizer
    # state to its bound parameter's (below), the rest stays on the CPU
    for e in entries:
        e.device = live[e.name].device if e.name in live else torch.device("cpu")
    if not rng:
        meta = {k: v for k, v in meta.items() if k != "rng"}
        keep = [i for i, e in enumerate(entries) if not e.name.startswith("rng.")]
        entries, want = [entries[i] for i in keep], [want[i] for i in keep]
    snap = cls()
    snap._sources = sources
    snap._rng = rng
    snap._to = "cpu"  # the arena stays in host memory; restore copies to each tensor's device
    snap._hyper = hyperparameters
    snap._entries = entries
    snap._arenas = {"cpu": arena}
    snap._fp_rows = torch.tensor([[a - (1 << 64) if a >= 1 << 63 else a for a in fp.lanes] for fp in want],
                                 dtype=torch.int64).reshape(-1, 2)
    snap._meta = meta
    snap._file = {"manifest_xxh3_128": manifest["manifest_xxh3_128"], "distributed": manifest.get("distributed")}
    plan = snap._plan()  # every check restore() makes (optimizer binding, samplers, RNGs), now
    for e in entries:
        if e.in_state and e.name.startswith("optimizer.state."):
            e.device = plan.binding[int(e.name.split(".")[2])].device
    return snap
