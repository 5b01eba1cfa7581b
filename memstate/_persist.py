"""Snapshot files: a directory with ``manifest.json`` and one raw data file. No pickle.

Layout of ``<path>/``:

- ``data-<token>.bin``: the bytes of every tensor, each at a 64-byte aligned offset;
- ``manifest.json``: format, versions, every tensor's name, dtype, shape, offset, byte count
  and msfp1 fingerprint, the JSON tree of non-tensor state, the data file's name, size and
  xxh3-128, and ``manifest_xxh3_128`` over the canonical JSON of everything else.

Saving writes the data file under a fresh name (fsync), then the manifest under a temporary
name (fsync) and renames it over ``manifest.json`` (atomic), fsyncs the directory and only then
removes data files the manifest no longer names. A crash at any point leaves either the old or
the new snapshot complete. Loading verifies the manifest checksum, the data file's size and
hash, and every tensor's fingerprint before anything is bound or restored.
"""
from __future__ import annotations

import datetime
import json
import os
import uuid
from typing import Any, Dict, List

import torch
import xxhash

from memstate._version import __version__
from memstate.fingerprint import Fingerprint
from memstate.snapshot import (ALIGN, FORMAT, FORMAT_VERSION, SnapshotError, _collect, _dtype_from_name,
                               _dtype_name, _Entry)

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 256 * 2**20


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: str, chunks) -> None:
    with open(path, "wb") as f:
        for c in chunks:
            f.write(c)
        f.flush()
        os.fsync(f.fileno())


def save(snap, path: str) -> None:
    os.makedirs(path, exist_ok=True)
    entries: List[dict] = []
    offset = 0
    pieces = []
    h = xxhash.xxh3_128()
    fps = snap._fingerprints()
    for e, fp in zip(snap._entries, fps):
        start = (offset + ALIGN - 1) // ALIGN * ALIGN
        pad = start - offset
        data = snap._slot(e).cpu().numpy().tobytes() if e.nbytes else b""
        if pad:
            pieces.append(b"\0" * pad)
            h.update(b"\0" * pad)
        pieces.append(data)
        h.update(data)
        entries.append({"name": e.name, "dtype": _dtype_name(e.dtype), "shape": list(e.shape), "offset": start,
                        "nbytes": e.nbytes, "fingerprint": fp.hex(), "in_state": e.in_state,
                        "device": str(e.device)})
        offset = start + e.nbytes
    token = uuid.uuid4().hex[:16]
    data_name = f"data-{token}.bin"
    tmp_data = os.path.join(path, data_name + ".tmp")
    _write_file(tmp_data, pieces)
    os.replace(tmp_data, os.path.join(path, data_name))
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "memstate": __version__,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "align": ALIGN,
        "data_file": data_name,
        "data_nbytes": offset,
        "data_xxh3_128": h.hexdigest(),
        "tensors": entries,
        "meta": snap._meta,
    }
    manifest["manifest_xxh3_128"] = xxhash.xxh3_128_hexdigest(_canonical(manifest))
    tmp_manifest = os.path.join(path, MANIFEST + f".tmp-{token}")
    _write_file(tmp_manifest, [json.dumps(manifest, indent=1, allow_nan=False).encode()])
    os.replace(tmp_manifest, os.path.join(path, MANIFEST))
    _fsync_dir(path)
    for name in os.listdir(path):  # data files of earlier saves, leftovers of crashed ones
        if name != data_name and name.startswith("data-") and (name.endswith(".bin") or name.endswith(".tmp")):
            os.remove(os.path.join(path, name))
        elif name.startswith(MANIFEST + ".tmp-"):
            os.remove(os.path.join(path, name))


def _read_manifest(path: str) -> dict:
    mpath = os.path.join(path, MANIFEST)
    if not os.path.isfile(mpath):
        raise SnapshotError(f"{path}: no {MANIFEST} (not a memstate snapshot directory)")
    if os.path.getsize(mpath) > MAX_MANIFEST_BYTES:
        raise SnapshotError(f"{mpath}: manifest larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        with open(mpath, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SnapshotError(f"{mpath}: corrupt manifest ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{mpath}: not a {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise SnapshotError(f"{mpath}: format version {manifest.get('format_version')}, this memstate reads {FORMAT_VERSION}")
    claimed = manifest.pop("manifest_xxh3_128", None)
    if claimed != xxhash.xxh3_128_hexdigest(_canonical(manifest)):
        raise SnapshotError(f"{mpath}: manifest checksum mismatch (the manifest was modified or corrupted)")
    return manifest


def load(cls, path: str, sources: Dict[str, Any], rng: bool):
    manifest = _read_manifest(path)
    data_name = manifest["data_file"]
    if os.path.basename(data_name) != data_name or not data_name.startswith("data-"):
        raise SnapshotError(f"{path}: invalid data file name {data_name!r}")
    dpath = os.path.join(path, data_name)
    if not os.path.isfile(dpath):
        raise SnapshotError(f"{path}: data file {data_name} is missing")
    size = os.path.getsize(dpath)
    if size != manifest["data_nbytes"]:
        raise SnapshotError(f"{dpath}: {size} bytes, the manifest says {manifest['data_nbytes']} (truncated or extended)")
    with open(dpath, "rb") as f:
        blob = bytearray(f.read())
    if xxhash.xxh3_128_hexdigest(bytes(blob)) != manifest["data_xxh3_128"]:
        raise SnapshotError(f"{dpath}: data checksum mismatch (corrupted or tampered)")
    arena = torch.frombuffer(blob, dtype=torch.uint8) if blob else torch.empty(0, dtype=torch.uint8)

    # entries, each checked for consistency and fingerprint before anything is bound
    entries: List[_Entry] = []
    want: List[Fingerprint] = []
    raw = []
    for t in manifest["tensors"]:
        dtype = _dtype_from_name(t["dtype"])
        shape = tuple(int(s) for s in t["shape"])
        n = 1
        for s in shape:
            n *= s
        nbytes = n * torch.empty((), dtype=dtype).element_size()
        off = int(t["offset"])
        if nbytes != t["nbytes"] or off < 0 or off + nbytes > size:
            raise SnapshotError(f"{path}: tensor {t['name']}: shape/dtype/offset inconsistent with the data file")
        entries.append(_Entry(t["name"], dtype, shape, torch.device(t["device"]), off, nbytes, bool(t["in_state"])))
        want.append(Fingerprint.fromhex(t["fingerprint"]))
        raw.append(arena[off:off + nbytes])
    from memstate.fingerprint import fingerprint_many

    fps = fingerprint_many(raw, [e.name for e in entries])
    bad = [e.name for e, fp, w in zip(entries, fps, want) if fp != w]
    if bad:
        raise SnapshotError(f"{path}: fingerprint mismatch for {', '.join(bad[:10])}")

    # bind to the live objects: same tensor names, shapes and dtypes as the saved state
    meta = manifest["meta"]
    saved_sources = set(meta.get("sources", []))
    given = {k for k, v in sources.items() if v is not None}
    if saved_sources != given:
        missing = sorted(saved_sources - given)
        extra = sorted(given - saved_sources)
        raise SnapshotError(
            f"{path}: the snapshot holds {sorted(saved_sources)}"
            + (f"; pass {', '.join(m + '=' for m in missing)}" if missing else "")
            + (f"; it has no state for {', '.join(extra)}" if extra else ""))
    if rng and "rng" not in meta:
        raise SnapshotError(f"{path}: the snapshot holds no RNG state; load it with rng=False")
    live_named, _ = _collect(sources, rng=False)
    live = {n: t for n, t, in_state in live_named if in_state and not n.startswith("optimizer.")}
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
    opt = sources.get("optimizer")
    if opt is not None:
        n_live = sum(len(g["params"]) for g in opt.param_groups)
        if n_live != meta["optimizer"]["n_params"]:
            raise SnapshotError(f"{path}: the optimizer has {n_live} parameters, the snapshot {meta['optimizer']['n_params']}")
    # tensors go back to the device their live counterpart is on now
    for e in entries:
        t = live.get(e.name)
        if t is not None:
            e.device = t.device
        elif e.name.startswith("optimizer.state.") and opt is not None:
            index = int(e.name.split(".")[2])
            params = [p for g in opt.param_groups for p in g["params"]]
            e.device = params[index].device
        else:
            e.device = torch.device("cpu")

    snap = cls()
    snap._sources = sources
    snap._rng = rng
    snap._to = "cpu"  # the arena stays in host memory; restore copies to each tensor's device
    if not rng:
        meta = {k: v for k, v in meta.items() if k != "rng"}
        keep = [i for i, e in enumerate(entries) if not e.name.startswith("rng.")]
        entries, want = [entries[i] for i in keep], [want[i] for i in keep]
    snap._entries = entries
    snap._arenas = {"cpu": arena}
    snap._fp_rows = torch.tensor([[a - (1 << 64) if a >= 1 << 63 else a for a in fp.lanes] for fp in want],
                                 dtype=torch.int64).reshape(-1, 2)
    snap._meta = meta
    return snap
